"""A read model kept in the same database: the handler's writes and the ack commit in one
transaction, so each event takes effect exactly once even if it is delivered twice.

    MEOWMX_DSN=postgresql://... python examples/projection.py
"""

import os

import psycopg

import meowmx

SCHEMA = """
CREATE TABLE IF NOT EXISTS order_totals (
    order_id text PRIMARY KEY,
    status text NOT NULL,
    total numeric NOT NULL DEFAULT 0,
    version bigint NOT NULL
)
"""


def project(event: meowmx.ClaimedEvent, conn: psycopg.Connection) -> None:
    if event.event_type == "OrderPlaced":
        conn.execute(
            "INSERT INTO order_totals VALUES (%s, 'placed', %s, %s)",
            (event.stream_id, event.data["amount"], event.version),
        )
    else:
        status = event.event_type.removeprefix("Order").lower()
        conn.execute(
            "UPDATE order_totals SET status = %s, version = %s WHERE order_id = %s",
            (status, event.version, event.stream_id),
        )


if __name__ == "__main__":
    dsn = os.environ["MEOWMX_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    with meowmx.Client(dsn) as store:
        store.create_subscription("order-totals", categories=["order"], partitions=2)
    # Catch up, then stop (worker.run() would keep going); `with` releases the leases.
    with meowmx.Worker(dsn, "order-totals", project, transactional=True) as worker:
        handled = worker.run_until_idle().handled
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'confirmed') FROM order_totals"
        ).fetchone()
    print(f"handled {handled} events; orders: {rows[0]}, confirmed: {rows[1]}")
