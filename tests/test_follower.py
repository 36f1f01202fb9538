"""The one NOTIFY follower (meowmx.follower) and the end-of-log cursor, on real connections.

Appenders skip their NOTIFY while another open appender holds the notify lock; a woken
follower must still deliver their events as soon as they commit, not at the next poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from meowmx import Client, Worker
from meowmx.follower import CHANNEL, Follower
from support import scalar, wait_for_horizon, wait_until

Connection = psycopg.Connection[Any]

LISTENER = "meowmx-test-follower"  # application_name of the follower's LISTEN connection


def append(conn: Connection, stream_id: str) -> int:
    position: int = scalar(
        conn,
        "SELECT position FROM meowmx.append_event(category => 'order', stream_id => %s,"
        " event_type => 'Placed', data => %s)",
        [stream_id, Jsonb({})],
    )
    return position


def notify_lock_holders(conn: Connection) -> list[int]:
    """Backends holding the notify lock of meowmx._notify() (a bigint advisory key)."""
    rows = conn.execute(
        "SELECT l.pid FROM pg_locks AS l,"
        " (SELECT hashtextextended('meowmx/notify', 0) AS k) AS key"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.classid = ((key.k >> 32) & 4294967295)::oid"
        " AND l.objid = (key.k & 4294967295)::oid"
    ).fetchall()
    return [row[0] for row in rows]


def listener_query(conn: Connection) -> str | None:
    """The last statement of the follower's LISTEN connection, once it is idle."""
    row = conn.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'",
        [LISTENER],
    ).fetchone()
    return None if row is None else str(row[0])


@pytest.fixture(params=["follower", "worker"])
def delivered(request: pytest.FixtureRequest, dsn: str) -> Iterator[list[int]]:
    """Positions delivered by a running reader whose poll interval (30 s) never comes:
    a read loop over a Follower, or a Worker (which uses one)."""
    listen_dsn = make_conninfo(dsn, application_name=LISTENER)
    positions: list[int] = []
    client = Client(dsn)
    if request.param == "worker":
        client.create_subscription("catch-up")
        worker = Worker(
            client,
            "catch-up",
            lambda event: positions.append(event.position),
            poll_interval=30.0,
            listen_dsn=listen_dsn,
        )
        stop, run = worker.stop_event, lambda: worker.run(handle_signals=False)
    else:
        stop = threading.Event()

        def run() -> None:
            with Follower(listen_dsn, poll_interval=30.0, stop=stop) as follower:
                after = None
                while not stop.is_set():
                    for event in client.read_events(after=after):
                        positions.append(event.position)
                        after = event.cursor
                    follower.wait()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield positions
    finally:
        stopped = time.monotonic()
        stop.set()
        thread.join(timeout=10)
        client.close()
    assert not thread.is_alive()
    assert time.monotonic() - stopped < 5, "stop took effect only at the poll"


def test_a_woken_follower_delivers_the_event_of_an_appender_that_skipped_its_notify(
    connect: Callable[..., Connection], delivered: list[int]
) -> None:
    observer = connect()
    wait_until(lambda: listener_query(observer) == f"LISTEN {CHANNEL}", "the follower to LISTEN")

    notifier, skipper = connect(autocommit=False), connect(autocommit=False)
    first = append(notifier, "a")  # takes the notify lock: NOTIFY at its commit
    second = append(skipper, "b")  # finds the lock taken: no NOTIFY
    assert notify_lock_holders(observer) == [notifier.info.backend_pid]

    notifier.commit()
    # Woken by that NOTIFY while the skipper is open: it delivers the first event and
    # is catching up (its LISTEN connection compares snapshot bounds).
    wait_until(lambda: delivered == [first], "the NOTIFY to deliver the first event")
    wait_until(
        lambda: "pg_snapshot_" in (listener_query(observer) or ""), "the follower to catch up"
    )

    committed = time.monotonic()
    skipper.commit()  # sends no NOTIFY
    wait_until(lambda: delivered == [first, second], "the skipped event", timeout=25)
    assert time.monotonic() - committed < 5, "delivered by the 30 s poll, not by catching up"


def test_catching_up_backs_off_and_ends_within_the_poll_interval(
    connect: Callable[..., Connection], dsn: str
) -> None:
    # An unrelated transaction holds the horizon below the wake-up snapshot's xmax.
    blocker = connect(autocommit=False)
    blocker.execute("SELECT pg_current_xact_id()")
    poll = 0.5
    with Follower(dsn, poll_interval=poll) as follower:
        follower.wait()  # a new LISTEN returns at once
        connect().execute(f"NOTIFY {CHANNEL}")
        follower.wait()  # woken
        woke = time.monotonic()
        returns = 0
        while True:
            began = time.monotonic()
            follower.wait()
            if time.monotonic() - began > poll * 0.8:
                break  # a full poll wait: catching up is over
            returns += 1
            assert time.monotonic() - woke < poll + 10, "still catching up"
    # Pauses of 2, 4, ... 100 ms over half a second: about a dozen, not a spin.
    assert 3 <= returns <= 20, returns


def test_poll_only_follower_waits_the_interval_or_until_stopped() -> None:
    stop = threading.Event()
    with Follower(None, poll_interval=0.2, stop=stop) as follower:
        began = time.monotonic()
        follower.wait()
        assert time.monotonic() - began >= 0.19
        stop.set()
        began = time.monotonic()
        follower.wait(timeout=30)
        assert time.monotonic() - began < 1


def test_end_cursor_is_after_every_event_readable_now(
    connect: Callable[..., Connection], dsn: str
) -> None:
    conn = connect()
    before = [append(conn, "1"), append(conn, "2")]
    open_then = connect(autocommit=False)
    during = append(open_then, "3")  # not committed yet when the cursor is taken
    wait_for_horizon(conn)  # an older transaction elsewhere would hold the horizon back
    with Client(dsn) as client:
        end = client.end_cursor()
        assert [e.position for e in client.read_events()] == before
        assert list(client.read_events(after=end)) == []
        assert list(client.read_events(after=client.end_cursor(conn=conn))) == []
        open_then.commit()
        later = append(conn, "4")
        wait_for_horizon(conn)
        assert [e.position for e in client.read_events(after=end)] == [during, later]
