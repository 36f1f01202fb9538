"""A worker on the subscription `order-printer`: prints each order event once it commits.
Start several (processes or machines) to share the load; stop one with Ctrl-C or SIGTERM.

    MEOWMX_DSN=postgresql://... python examples/python_worker.py [--until-idle]
"""

import os
import sys

import meowmx


def show(event: meowmx.ClaimedEvent) -> None:
    print(f"partition {event.partition}: {event.stream_id} v{event.version} {event.event_type}")


if __name__ == "__main__":
    dsn = os.environ["MEOWMX_DSN"]
    with meowmx.Client(dsn) as store:
        store.create_subscription("order-printer", categories=["order"], partitions=4)
    worker = meowmx.Worker(dsn, "order-printer", show, batch_size=100)
    if "--until-idle" in sys.argv:
        with worker:  # releases the leases at the end
            worker.run_until_idle()
    else:
        worker.run()
