from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse

import meowmx

from .models import Order

store = meowmx.Client(settings.MEOWMX_DSN)


def place(request: HttpRequest, order_id: str) -> JsonResponse:
    """Place an order: the Order row and its OrderPlaced event, in the request's
    transaction. A request that fails (here: a negative total) keeps neither."""
    total = int(request.POST["total"])
    Order.objects.create(id=order_id, total=total)
    appended = store.append(
        "order",
        order_id,
        "OrderPlaced",
        {"total": total},
        expected_version=meowmx.NO_STREAM,
        conn=connection.connection,  # the request's transaction
    )
    if total < 0:
        raise ValueError("a negative total")  # after both writes: both roll back
    return JsonResponse({"version": appended.version, "position": appended.position}, status=201)
