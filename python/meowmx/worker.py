"""A worker that runs a handler over a subscription: claim, handle, ack or nack.

Several workers (threads or processes) share one subscription: each claims a
partition at a time, so every stream's events are handled in order by one
worker. Delivery is at-least-once: make handlers idempotent, or use
`transactional=True` so the handler's writes commit together with the ack.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType

import psycopg

from meowmx.client import ClaimedEvent, Client, Conn
from meowmx.connection import Target
from meowmx.errors import LeaseLost, NotInBatch
from meowmx.follower import Follower

log = logging.getLogger("meowmx.worker")

Handler = Callable[[ClaimedEvent], None]
TransactionalHandler = Callable[[ClaimedEvent, Conn], None]


def default_backoff(attempt: int) -> timedelta:
    """0.1 s, 0.2 s, 0.4 s, ... at most 60 s before an event is tried again."""
    return timedelta(seconds=min(60.0, 0.1 * 2 ** (attempt - 1)))


class Worker:
    """Runs `handler` over the events of `subscription`.

    `target` is a DSN, connection or pool (or a Client). With `transactional=True`
    the handler is called as `handler(event, conn)` inside a transaction that also
    acks the batch, so its writes to the same database take effect exactly once.
    """

    def __init__(
        self,
        target: Target | Client,
        subscription: str,
        handler: Handler | TransactionalHandler,
        *,
        name: str | None = None,
        batch_size: int = 100,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: float = 1.0,
        listen: bool = True,
        listen_dsn: str | None = None,
        transactional: bool = False,
        backoff: Callable[[int], timedelta] = default_backoff,
    ):
        if isinstance(target, psycopg.Connection) and not target.autocommit:
            # Claims and acks would sit in a transaction nobody commits, holding
            # the lease rows and the read horizon.
            raise ValueError("a Worker needs an autocommit connection, a DSN or a pool")
        self.client = target if isinstance(target, Client) else Client(target)
        self._owns_client = not isinstance(target, Client)
        self.subscription = subscription
        self.handler = handler
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.transactional = transactional
        self.backoff = backoff
        self.listen_dsn = listen_dsn if listen_dsn is not None else _dsn_of(self.client)
        if not listen:
            self.listen_dsn = None
        self.stop_event = threading.Event()
        self._failures: dict[int, int] = {}  # event position -> attempts seen here

    def stop(self) -> None:
        """Ask the worker to stop after the batch in hand."""
        self.stop_event.set()

    # One batch ------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch and handle it; returns how many events were handled."""
        batch = self.client.claim_batch(
            self.subscription, self.name, max_count=self.batch_size, lease=self.lease
        )
        if not batch:
            return 0
        try:
            if self.transactional:
                return self._handle_in_transaction(batch)
            return self._handle(batch)
        except (LeaseLost, NotInBatch) as lost:
            # Taken over (lease expired) or reset: another claimer has these events.
            log.warning("worker %s dropped its batch: %s", self.name, lost.message)
            return 0

    def _handle(self, batch: list[ClaimedEvent]) -> int:
        # A slow batch acks what it has done every third of the lease: that keeps
        # the lease, and a crash redelivers less.
        heartbeat = self.lease.total_seconds() / 3
        renew_at = time.monotonic() + heartbeat
        for done, event in enumerate(batch):
            try:
                self.handler(event)  # type: ignore[call-arg]
            except Exception as error:  # noqa: BLE001  (any handler failure is a nack)
                self._nack(event, error)
                return done
            if time.monotonic() > renew_at and event is not batch[-1]:
                self._ack(event)
                renew_at = time.monotonic() + heartbeat
        self._ack(batch[-1])
        return len(batch)

    def _handle_in_transaction(self, batch: list[ClaimedEvent]) -> int:
        with self.client._connect() as conn:
            # A failure rolls back the whole transaction: apply the events before
            # it again (and again, should one of those fail now), then nack it.
            done, error = len(batch), None
            while done > 0:
                failed = self._apply(conn, batch[:done])
                if failed is None:
                    break
                done, error = failed
            if error is not None:
                self._nack(batch[done], error, conn)
            return done

    def _apply(self, conn: Conn, events: list[ClaimedEvent]) -> tuple[int, Exception] | None:
        """Handle `events` and ack the last in one transaction; on a handler error,
        roll back and return (index, error)."""
        failure: tuple[int, Exception] | None = None
        try:
            with conn.transaction():
                for index, event in enumerate(events):
                    try:
                        self.handler(event, conn)  # type: ignore[call-arg]
                    except Exception as error:  # noqa: BLE001
                        failure = (index, error)
                        raise _Rollback from error
                self._ack(events[-1], conn)
        except _Rollback:
            return failure
        return None

    def _ack(self, event: ClaimedEvent, conn: Conn | None = None) -> None:
        self.client.ack(self.subscription, self.name, event.partition, event.position, conn=conn)
        self._failures.clear()

    def _nack(self, event: ClaimedEvent, error: Exception, conn: Conn | None = None) -> None:
        attempt = self._failures.get(event.position, 0) + 1
        self._failures = {event.position: attempt}
        parked = self.client.nack(
            self.subscription,
            self.name,
            event.partition,
            event.position,
            f"{type(error).__name__}: {error}",
            retry_after=self.backoff(attempt),
            conn=conn,
        )
        log.log(
            logging.ERROR if parked else logging.WARNING,
            "event %s failed (%s attempt %s): %r",
            event.position,
            "parked after" if parked else "retrying,",
            attempt,
            error,
        )

    # The loop -------------------------------------------------------------------

    def run(self, *, handle_signals: bool = True) -> None:
        """Handle events until stop() or SIGTERM/SIGINT; then release the leases.

        Waits for the append NOTIFY and also polls every poll_interval seconds, so
        a lost notification or a pooler that drops LISTEN never stalls it.
        """
        follower = Follower(self.listen_dsn, poll_interval=self.poll_interval, stop=self.stop_event)
        with self._signals(handle_signals), follower:
            try:
                while not self.stop_event.is_set():
                    try:
                        if self.run_once():
                            continue
                        follower.wait()
                    except psycopg.OperationalError as error:
                        log.warning("worker %s lost its connection: %s", self.name, error)
                        self.stop_event.wait(self.poll_interval)
            finally:
                try:
                    self.client.release(self.subscription, self.name)
                except psycopg.Error as error:
                    log.warning("worker %s could not release its leases: %s", self.name, error)
                if self._owns_client:
                    self.client.close()

    @contextmanager
    def _signals(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back after a handler error."""


def _dsn_of(client: Client) -> str | None:
    """A DSN for the LISTEN connection, when the client's target reveals one."""
    target = client._connect.target
    if isinstance(target, str):
        return target
    conninfo = getattr(target, "conninfo", None)
    return conninfo if isinstance(conninfo, str) else None
