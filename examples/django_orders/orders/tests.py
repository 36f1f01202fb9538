"""Django's own tests of the example (python manage.py test orders). Each test runs in a
transaction of Django's, so they read the stream on that connection."""

from django.db import connection
from django.test import TestCase

from .models import Order
from .views import store


class PlaceOrderTests(TestCase):
    def events(self, order_id: str) -> list[tuple[str, dict[str, int]]]:
        stream = store.read_stream("order", order_id, conn=connection.connection)
        return [(e.event_type, e.data) for e in stream]

    def test_the_event_commits_with_the_order(self) -> None:
        response = self.client.post("/orders/7/place", {"total": 25})
        self.assertEqual(response.status_code, 201)
        self.assertEqual(response.json()["version"], 1)
        self.assertEqual(Order.objects.get(id="7").total, 25)
        self.assertEqual(self.events("7"), [("OrderPlaced", {"total": 25})])

    def test_a_failed_request_keeps_neither(self) -> None:
        with self.assertRaises(ValueError):
            self.client.post("/orders/8/place", {"total": -1})
        self.assertFalse(Order.objects.filter(id="8").exists())
        self.assertEqual(self.events("8"), [])
