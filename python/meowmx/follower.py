"""Following the event log: wake on the append NOTIFY, and poll.

Appends notify channel CHANNEL, but only one open appending transaction at a time
does (meowmx._notify() in sql/schema/05_append.sql): the others skip their NOTIFY,
because a NOTIFY in every append would serialize commits cluster-wide. Every appender
that skipped had its transaction id, and was still open, when the notifying one
committed; so a listener that wakes keeps reading until the read horizon passes every
transaction id assigned by then.

This module is the one place that protocol lives; the Worker and `meowmx tail` use it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import psycopg

from meowmx.connection import connect as _connect_dsn

Conn = psycopg.Connection[Any]

CHANNEL = "meowmx"  # the channel meowmx._notify() sends on

_SLICE = 0.2  # the longest uninterrupted wait: how soon a stop flag takes effect
_FIRST_PAUSE = 0.002  # catching up: the first pause between reads...
_MAX_PAUSE = 0.1  # ...doubling up to this


class Follower:
    """Tells a reader when to read again.

    Read until nothing is left, then call wait(); repeat. wait() returns when there
    may be new events: a NOTIFY came, or the poll interval passed. After a NOTIFY it
    keeps returning after short pauses (2 ms, doubling to 100 ms) until the appenders
    that skipped their NOTIFY are readable, for at most the poll interval, so an
    unrelated long transaction cannot keep it spinning.

    `connect` is a DSN or a function returning a new connection for LISTEN (opened on
    first use, and again if it breaks); None polls only. `stop` set makes wait()
    return within a fraction of a second.

    It polls only, and tells `notice` once why, where LISTEN cannot work: on a hot
    standby (LISTEN is refused during recovery), and, unless `direct` says the
    connection reaches the server itself, behind a connection pooler, where LISTEN
    would sit on a pooled server connection that nobody reads. A pooler hands its
    client a backend pid (in BackendKeyData) that differs from pg_backend_pid().
    """

    def __init__(
        self,
        connect: str | Callable[[], Conn] | None,
        *,
        poll_interval: float,
        stop: threading.Event | None = None,
        notice: Callable[[str], None] | None = None,
        direct: bool = False,
    ):
        self._connect = _connector(connect) if isinstance(connect, str) else connect
        self.poll_interval = poll_interval
        self._stop = stop if stop is not None else threading.Event()
        self._notice = notice
        self._direct = direct
        self.polling_only: str | None = None  # why LISTEN is off, once found out
        self._conn: Conn | None = None
        self._fresh = False  # a new LISTEN: events may have committed before it
        self._woken = False  # a NOTIFY came: catch up once the reader has looked
        self._catch_up_to: int | None = None  # an xid8: read until the horizon passes it
        self._catch_up_until = 0.0
        self._pause = _FIRST_PAUSE

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def listen(self) -> Conn | None:
        """The LISTEN connection (None when polling only), opened if need be."""
        if self._connect is None:
            return None
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            conn = self._connect()
            try:
                # Outside a transaction: LISTEN takes effect now, notifications arrive.
                conn.autocommit = True
                why = self._why_not_listen(conn)
                if why is None:
                    conn.execute(f"LISTEN {CHANNEL}")
            except BaseException:
                conn.close()
                raise
            if why is not None:
                conn.close()
                self._connect, self.polling_only = None, why
                if self._notice is not None:
                    self._notice(f"{why}; polling every {self.poll_interval:g} s")
                return None
            self._conn, self._fresh = conn, True
        return self._conn

    def _why_not_listen(self, conn: Conn) -> str | None:
        row = conn.execute("SELECT pg_backend_pid(), pg_is_in_recovery()").fetchone()
        assert row is not None
        pid, in_recovery = row
        if in_recovery:
            return "LISTEN is off: the server is a hot standby (LISTEN cannot run in recovery)"
        if not self._direct and pid != conn.info.backend_pid:
            return (
                "LISTEN is off: the connection goes through a pooler (server pid"
                f" {pid}, the connection reports {conn.info.backend_pid}); pass"
                " listen_dsn, a direct connection to the server, for prompt delivery"
            )
        return None

    def wait(self, timeout: float | None = None) -> None:
        """Wait until there may be new events to read (at most `timeout` seconds)."""
        limit = self.poll_interval if timeout is None else min(timeout, self.poll_interval)
        conn = self.listen()
        if conn is None:
            self._stop.wait(limit)
            return
        if self._fresh:
            # The reader may have looked before this LISTEN: have it look again.
            self._fresh = False
            return
        if self._woken:
            # Taken now, after the reader's first look since the NOTIFY, rather than
            # before it: one round trip less between a NOTIFY and the read, and an id
            # taken later only covers more appenders.
            self._woken = False
            self._catch_up_to = _next_xid(conn)
            self._catch_up_until = time.monotonic() + self.poll_interval
            self._pause = _FIRST_PAUSE
        if self._catch_up_to is not None:
            if time.monotonic() < self._catch_up_until and _horizon(conn) < self._catch_up_to:
                self._stop.wait(min(self._pause, limit))
                self._pause = min(_MAX_PAUSE, self._pause * 2)
            else:
                # Caught up (or gave up): the last appenders may have committed since
                # the reader last looked, so it looks once more before a long wait.
                self._catch_up_to = None
            return
        self._woken = self._notified(conn, limit)

    def _notified(self, conn: Conn, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            woke = False
            for _ in conn.notifies(timeout=min(remaining, _SLICE), stop_after=1):
                woke = True
            if woke:
                return True
        return False


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (in the main thread; elsewhere this does nothing).

    Setting a flag, not raising KeyboardInterrupt: an exception raised in the middle of
    a database call would leave its connection busy, and the clean-up that follows
    (release the leases, close) would fail on it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _connector(dsn: str) -> Callable[[], Conn]:
    return lambda: _connect_dsn(dsn)


def _horizon(conn: Conn) -> int:
    """What reads deliver up to: every transaction below it has ended."""
    return _xid(conn, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text")


# Not the snapshot's xmax: that is one past the newest *ended* transaction, and an
# appender that skipped its NOTIFY may hold a newer xid than that while it is open.
# age() of an xid counts up to the next xid to be assigned, for a session that holds
# none, so this bounds every xid assigned so far without taking one. (Should xmax fall
# on one of the three special xids at an epoch wrap, age() is 2^31 - 1: the catch-up
# then just ends at the poll interval.)
_NEXT_XID = (
    "SELECT x + age((x % 4294967296)::text::xid)"
    " FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x) AS s"
)


def _next_xid(conn: Conn) -> int:
    """Above every transaction id assigned so far (running or ended)."""
    return _xid(conn, _NEXT_XID)


def _xid(conn: Conn, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])
