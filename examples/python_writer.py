"""Place orders with optimistic concurrency: decide from the stream, append with the
version the decision was based on, and on a conflict read again and decide again.

    MEOWMX_DSN=postgresql://... python examples/python_writer.py
"""

import os
import uuid

import meowmx


def place_and_confirm(store: meowmx.Client, order_id: str, amount: float) -> int:
    """Returns how many conflicts were retried."""
    store.append("order", order_id, "OrderPlaced", {"amount": amount}, expected_version=0)
    conflicts = 0
    while True:
        history = list(store.read_stream("order", order_id))
        if any(e.event_type == "OrderConfirmed" for e in history):
            return conflicts  # somebody else confirmed it: nothing left to decide
        try:
            store.append(
                "order",
                order_id,
                "OrderConfirmed",
                {"total": sum(e.data.get("amount", 0) for e in history)},
                expected_version=history[-1].version,
                event_id=uuid.uuid4(),  # lets a retry after a lost connection be idempotent
            )
            return conflicts
        except meowmx.WrongExpectedVersion:
            conflicts += 1


if __name__ == "__main__":
    with meowmx.Client(os.environ["MEOWMX_DSN"]) as store:
        for n in range(5):
            order_id = f"example-{uuid.uuid4().hex[:8]}"
            retried = place_and_confirm(store, order_id, 10.0 + n)
            version = store.stream_version("order", order_id)
            print(f"order {order_id}: version {version}, conflicts retried {retried}")
