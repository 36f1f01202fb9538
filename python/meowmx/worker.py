"""A worker that runs a handler over a subscription: claim, handle, ack or nack.

Several workers (threads or processes) share one subscription: each claims a
partition at a time, so every stream's events are handled in order by one
worker. Delivery is at-least-once: make handlers idempotent, or use
`transactional=True` so the handler's writes commit together with the ack.

A worker keeps going: a database error of one call is logged by name and retried
after a growing pause; only stop(), SIGTERM/SIGINT or a bug in the worker ends run().
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import psycopg

from meowmx.client import ClaimedEvent, Client, Conn
from meowmx.connection import Target
from meowmx.errors import LeaseLost, MeowmxError, NotInBatch, UndecodableEvent, describe
from meowmx.follower import Follower, stop_on_signals

log = logging.getLogger("meowmx.worker")

Handler = Callable[[ClaimedEvent], None]
TransactionalHandler = Callable[[ClaimedEvent, Conn], None]


def default_backoff(attempt: int) -> timedelta:
    """0.1 s, 0.2 s, 0.4 s, ... at most 60 s before an event is tried again."""
    return timedelta(seconds=min(60.0, 0.1 * 2 ** (attempt - 1)))


_MAX_PAUSE = 30.0  # seconds: the longest wait after failed database calls


@dataclass(frozen=True)
class Drained:
    """What Worker.run_until_idle did: events handled, failures nacked (each a try of
    an event), and of those the ones that parked their event."""

    handled: int
    failed: int
    parked: int


class Worker:
    """Runs `handler` over the events of `subscription`.

    `target` is a DSN, connection or pool (or a Client). With `transactional=True`
    the handler is called as `handler(event, conn)` inside a transaction that also
    acks the batch, so its writes to the same database take effect exactly once.
    That transaction is bounded by the lease: a statement, or a pause between two,
    longer than the lease ends it (it is retried), so that a stuck worker cannot hold
    the cluster's read horizon back for long; meanwhile a second connection renews
    the lease, so a batch may take longer than the lease.

    `listen_dsn` is where to LISTEN: a direct connection to the server, when `target`
    goes through a pooler. Without it the worker listens on the target's DSN, unless
    that turns out to be a pooler or a hot standby: then it polls, and logs so once.

    `read_target` (or a Client with one) is a hot standby to read the batches on: the
    worker leases a partition on the primary (claim_partition), reads its events on the
    standby (read_partition) and acks on the primary (ack_through), so the primary does
    not read the events it hands out. Events reach the worker once the standby has
    replayed them.
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
        read_target: Target | None = None,
        transactional: bool = False,
        backoff: Callable[[int], timedelta] = default_backoff,
    ):
        if isinstance(target, psycopg.Connection) and not target.autocommit:
            # Claims and acks would sit in a transaction nobody commits, holding
            # the lease rows and the read horizon.
            raise ValueError("a Worker needs an autocommit connection, a DSN or a pool")
        if isinstance(target, Client) and read_target is not None:
            raise ValueError("give read_target to the Client or to the Worker, not to both")
        self.client = (
            target if isinstance(target, Client) else Client(target, read_target=read_target)
        )
        self._on_standby = self.client._read is not self.client._connect
        self._owns_client = not isinstance(target, Client)
        self.subscription = subscription
        _check_handler(handler, transactional)
        self.handler = handler
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.transactional = transactional
        self.backoff = backoff
        self._listen_direct = listen_dsn is not None  # given: trusted to reach the server
        self.listen_dsn = listen_dsn if listen_dsn is not None else _dsn_of(self.client)
        if not listen:
            self.listen_dsn = None
        self.stop_event = threading.Event()
        self._renewer: Client | None = None  # opened for the first batch, with its thread
        self._batch_since: float | None = None  # when the batch in hand was claimed
        self._renew_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._failed = self._parked = 0  # nacks so far, and of those the parking ones

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the worker's leases (its unacknowledged events go to the next
        claimer at once, not after the lease) and close what it opened. run() ends
        with this; after run_once or run_until_idle, call it, or use `with`."""
        try:
            self.client.release(self.subscription, self.name)
        except (psycopg.Error, MeowmxError) as error:
            log.warning("worker %s could not release its leases: %s", self.name, describe(error))
        self._close_renewer()
        if self._owns_client:
            self.client.close()

    def run_until_idle(self) -> Drained:
        """Handle batches until no partition has work it may claim now (or stop()).
        A failed event is nacked, as in run(); one whose retry is not due yet stays
        for later, and so does the rest of its partition."""
        handled, failed, parked = 0, self._failed, self._parked
        while not self.stop_event.is_set():
            before = (self._failed, handled)
            handled += self.run_once()
            if (self._failed, handled) == before:
                break  # nothing claimed, handled or failed: idle
        return Drained(handled, self._failed - failed, self._parked - parked)

    def stop(self) -> None:
        """Ask the worker to stop after the batch in hand."""
        self.stop_event.set()

    # One batch ------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim one batch and handle it; returns how many events were handled."""
        batch, through = self._claim()
        if not batch:
            return 0
        try:
            with self._renewing():
                if self.transactional:
                    return self._handle_in_transaction(batch, through)
                return self._handle(batch, through)
        except (LeaseLost, NotInBatch) as lost:
            # Taken over (lease expired) or reset: another claimer has these events.
            log.warning("worker %s dropped its batch: %s", self.name, lost.message)
            return 0

    def _claim(self) -> tuple[list[ClaimedEvent], str | None]:
        """The next batch, and the cursor its last ack moves to (None: its last event)."""
        if not self._on_standby:
            batch = self.client.claim_batch(
                self.subscription, self.name, max_count=self.batch_size, lease=self.lease
            )
            return batch, None
        while not self.stop_event.is_set():
            claim = self.client.claim_partition(self.subscription, self.name, lease=self.lease)
            if claim is None:
                break
            rows = self.client.read_partition(
                self.subscription,
                claim.partition,
                after=claim.after,
                until=claim.until,
                max_count=self.batch_size,
            )
            if not rows:
                break  # the standby has not replayed them yet
            batch = [event for event in rows if event.partition == claim.partition]
            if batch:
                for event in batch:
                    if event.position == claim.failing_position:
                        event.attempts = claim.attempts  # the server's count
                return batch, rows[-1].cursor
            # The scan held only other partitions' events: move past them, look again.
            self.client.ack_through(self.subscription, self.name, claim.partition, rows[-1].cursor)
        return [], None

    def _handle(self, batch: list[ClaimedEvent], through: str | None) -> int:
        # A slow batch acks what it has done every third of the lease: a crash then
        # redelivers less (and with one connection, no renewer, it keeps the lease).
        heartbeat = self.lease.total_seconds() / 3
        renew_at = time.monotonic() + heartbeat
        for done, event in enumerate(batch):
            try:
                _decoded(event)
                self.handler(event)  # type: ignore[call-arg]
            except Exception as error:  # noqa: BLE001  (any handler failure is a nack)
                self._nack(event, error)
                return done
            if time.monotonic() > renew_at and event is not batch[-1]:
                self._ack(event)
                renew_at = time.monotonic() + heartbeat
        self._ack(batch[-1], through=through)
        return len(batch)

    def _handle_in_transaction(self, batch: list[ClaimedEvent], through: str | None) -> int:
        with self.client._connect() as conn:
            # A failure rolls back the whole transaction: apply the events before
            # it again (and again, should one of those fail now), then nack it.
            done, error = len(batch), None
            while done > 0:
                failed = self._apply(conn, batch[:done], through if done == len(batch) else None)
                if failed is None:
                    break
                done, error = failed
            if error is not None:
                self._nack(batch[done], error, conn)
            return done

    def _apply(
        self, conn: Conn, events: list[ClaimedEvent], through: str | None
    ) -> tuple[int, Exception] | None:
        """Handle `events` and ack the last (or through `through`) in one transaction; on
        a handler error, roll back and return (index, error)."""
        failure: tuple[int, Exception] | None = None
        try:
            with conn.transaction():
                self._bound(conn)
                for index, event in enumerate(events):
                    try:
                        _decoded(event)
                        self.handler(event, conn)  # type: ignore[call-arg]
                    except Exception as error:  # noqa: BLE001
                        failure = (index, error)
                        raise _Rollback from error
                self._ack(events[-1], conn, through)
        except _Rollback:
            return failure
        return None

    def _bound(self, conn: Conn) -> None:
        """Limit the batch's transaction by the lease, and name it after the worker
        (subscription_status shows it); SET LOCAL, so it ends with the transaction."""
        limit = f"{max(1, int(self.lease.total_seconds() * 1000))}ms"
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %(limit)s, true),"
            " set_config('statement_timeout', %(limit)s, true),"
            " set_config('application_name', %(name)s, true)",
            {"limit": limit, "name": f"meowmx worker {self.name}"[:63]},
            prepare=self.client._connect.prepare(conn),
        )

    @contextmanager
    def _renewing(self) -> Iterator[None]:
        """Keep the leases while a batch is in hand, however long one handler call takes:
        a thread renews them on another connection once the batch is a third of the
        lease old, and every third of the lease after that. (A transactional batch can't
        ack before it commits; a plain one acks only between events.)"""
        if self._renewer_client() is None:
            yield
            return
        self._batch_since = time.monotonic()
        try:
            yield
        finally:
            self._batch_since = None

    def _renew_while_in_batch(self, renewer: Client) -> None:
        # Looks every third of the lease: a batch is renewed at most two thirds of the
        # lease after its claim. One thread per worker, not per batch: it costs nothing
        # to a batch that ends sooner.
        period = self.lease.total_seconds() / 3
        while not self._closing.wait(period):
            since = self._batch_since
            if since is None or time.monotonic() - since < period:
                continue
            try:
                renewer.renew_lease(self.subscription, self.name)
            except (psycopg.Error, MeowmxError) as error:
                log.warning("worker %s could not renew: %s", self.name, describe(error))

    def _renewer_client(self) -> Client | None:
        if self._renewer is None:
            target = self.client._connect.target
            if isinstance(target, psycopg.Connection):
                return None  # one connection: nothing to renew on while the batch runs
            self._renewer = Client(
                target, prepared_statements=self.client._connect.prepared_statements
            )
            self._renew_thread = threading.Thread(
                target=self._renew_while_in_batch,
                args=(self._renewer,),
                name=f"{self.name}-renew",
                daemon=True,
            )
            self._renew_thread.start()
        return self._renewer

    def _close_renewer(self) -> None:
        self._closing.set()
        if self._renew_thread is not None:
            self._renew_thread.join(timeout=10)
        if self._renewer is not None:
            self._renewer.close()
        self._renewer, self._renew_thread = None, None
        self._closing.clear()

    def _ack(
        self, event: ClaimedEvent, conn: Conn | None = None, through: str | None = None
    ) -> None:
        if through is None:
            self.client.ack(
                self.subscription, self.name, event.partition, event.position, conn=conn
            )
        else:
            self.client.ack_through(
                self.subscription, self.name, event.partition, through, conn=conn
            )

    def _nack(self, event: ClaimedEvent, error: Exception, conn: Conn | None = None) -> None:
        attempt = event.attempts + 1  # the server's count: it survives restarts
        parked = self.client.nack(
            self.subscription,
            self.name,
            event.partition,
            event.position,
            f"{type(error).__name__}: {error}",
            retry_after=self.backoff(attempt),
            conn=conn,
        )
        self._failed += 1
        self._parked += parked
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
        follower = Follower(
            self.listen_dsn,
            poll_interval=self.poll_interval,
            stop=self.stop_event,
            notice=lambda message: log.warning("worker %s: %s", self.name, message),
            direct=self._listen_direct,
        )
        failures = 0
        with stop_on_signals(self.stop_event) if handle_signals else nullcontext(), follower:
            try:
                while not self.stop_event.is_set():
                    try:
                        handled = self.run_once()
                        failures = 0
                        if not handled:
                            follower.wait()
                    except (psycopg.Error, MeowmxError) as error:
                        # One failed call (a lost connection, a timeout, disk full...):
                        # its batch comes back to this worker or another; keep going.
                        failures += 1
                        pause = min(_MAX_PAUSE, self.poll_interval * 2 ** min(failures - 1, 16))
                        log.warning(
                            "worker %s: %s; trying again in %.2g s",
                            self.name,
                            describe(error),
                            pause,
                        )
                        self.stop_event.wait(pause)
            finally:
                self.close()


def _check_handler(handler: Callable[..., None], transactional: bool) -> None:
    """A handler that cannot take the arguments it will get fails here, not at each
    event (ten failed attempts and a parked event later)."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return  # no signature to check (some builtins)
    try:
        signature.bind(None, None) if transactional else signature.bind(None)
    except TypeError:
        name = f"{getattr(handler, '__name__', 'handler')}{signature}"
        if transactional:
            raise TypeError(
                f"{name} cannot be called as handler(event, conn), as transactional=True"
                " calls it; a handler of the event alone runs without transactional=True"
            ) from None
        raise TypeError(
            f"{name} cannot be called as handler(event); a handler that takes the"
            " transaction's connection too runs with transactional=True"
        ) from None


def _decoded(event: ClaimedEvent) -> None:
    """Raise UndecodableEvent for an event whose JSON could not be decoded: a failure
    of the event (nacked, in time parked), not of the worker."""
    if event.decode_error is not None:
        raise UndecodableEvent(event.position, event.decode_error)


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back after a handler error."""


def _dsn_of(client: Client) -> str | None:
    """A DSN for the LISTEN connection, when the client's target reveals one."""
    target = client._connect.target
    if isinstance(target, str):
        return target
    conninfo = getattr(target, "conninfo", None)
    return conninfo if isinstance(conninfo, str) else None
