"""Workers that run a handler over a subscription: claim, handle, ack or nack.

Several workers (threads, processes or tasks) share one subscription: each claims a
partition at a time, so every stream's events are handled in order by one worker.
Delivery is at-least-once: make handlers idempotent, or use `transactional=True` so
the handler's writes commit together with the ack.

A worker keeps going: a database error of one call is logged by name and retried
after a growing pause; only stop(), SIGTERM/SIGINT or a bug in the worker ends run().

The logic is written once, in _Runner, as generators that yield steps (a Call, a
handler call, a transaction, a blocking wait) and get back each step's result, or
its error thrown in. Worker does the steps on a Client; AsyncWorker awaits them on
an AsyncClient.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import psycopg

from meowmx.client import AsyncClient, Call, ClaimedEvent, Client, Conn, _Calls
from meowmx.connection import AsyncTarget, Target
from meowmx.errors import LeaseLost, MeowmxError, NotInBatch, describe
from meowmx.follower import Follower, stop_on_signals

log = logging.getLogger("meowmx.worker")

AsyncConn = psycopg.AsyncConnection[Any]
Handler = Callable[[ClaimedEvent], None]
TransactionalHandler = Callable[[ClaimedEvent, Conn], None]
AsyncHandler = Callable[[ClaimedEvent], Awaitable[None] | None]
AsyncTransactionalHandler = Callable[[ClaimedEvent, AsyncConn], Awaitable[None] | None]

T = TypeVar("T")
TargetT = TypeVar("TargetT")
ClientT = TypeVar("ClientT", Client, AsyncClient)
HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


def default_backoff(attempt: int) -> timedelta:
    """0.1 s, 0.2 s, 0.4 s, ... at most 60 s before an event is tried again."""
    return timedelta(seconds=min(60.0, 0.1 * 2 ** (attempt - 1)))


_MAX_PAUSE = 30.0  # seconds: the longest wait after failed database calls


@dataclass(frozen=True)
class Drained:
    """What run_until_idle did: events handled, failures nacked (each a try of an
    event), and of those the ones that parked their event."""

    handled: int
    failed: int
    parked: int


# The steps a worker's logic yields -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Handle:
    """Call the handler on events[start:] in order (with `conn`, the batch's
    transaction, as well), and stop after the first event handled once
    time.monotonic() passes `until`; the reply is the index after the last one
    handled. One step for many events: a step per event took about a quarter of
    a catch-up's time. A handler's error, or JSON that does not decode, raises
    _Failed."""

    events: list[ClaimedEvent]
    start: int = 0
    until: float = math.inf
    conn: Any = None


@dataclass(frozen=True, slots=True)
class _Transaction:
    """Do the steps of body(conn) in one transaction on one connection; an error
    rolls it back."""

    body: Callable[[Any], Steps[Any]]


@dataclass(frozen=True, slots=True)
class _Block:
    """Call `wait`, which blocks (a LISTEN, a pause): in a thread, for AsyncWorker."""

    wait: Callable[[], object]


Step = Call[Any] | _Handle | _Transaction | _Block
Steps = Generator[Step, Any, T]


class _Failed(Exception):
    """The handler failed on events[index] (and, in a transaction, rolls it back)."""

    def __init__(self, index: int, error: Exception):
        super().__init__(index, error)
        self.index, self.error = index, error


class _Runner(Generic[TargetT, ClientT, HandlerT]):
    """What Worker and AsyncWorker share: their settings, and all their logic."""

    client: ClientT

    def __init__(
        self,
        target: TargetT | ClientT,
        subscription: str,
        handler: HandlerT,
        *,
        name: str | None = None,
        batch_size: int = 100,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: float = 1.0,
        listen: bool = True,
        listen_dsn: str | None = None,
        read_target: TargetT | None = None,
        transactional: bool = False,
        backoff: Callable[[int], timedelta] = default_backoff,
    ):
        self.client, self._owns_client = self._client_for(target, read_target)
        self._on_standby = self.client._read is not self.client._connect
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

    def _client_for(
        self, target: TargetT | ClientT, read_target: TargetT | None
    ) -> tuple[ClientT, bool]:
        """The client to call through, and whether the worker made it (and closes it)."""
        raise NotImplementedError

    def _renew_target(self) -> Target | None:
        """Where the renewing thread connects (None: nowhere, with one connection)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the worker to stop after the batch in hand (from any thread)."""
        self.stop_event.set()

    def _follower(self) -> Follower:
        return Follower(
            self.listen_dsn,
            poll_interval=self.poll_interval,
            stop=self.stop_event,
            notice=lambda message: log.warning("worker %s: %s", self.name, message),
            direct=self._listen_direct,
        )

    # The loop -------------------------------------------------------------------

    def _run(self, follower: Follower) -> Steps[None]:
        failures = 0
        while not self.stop_event.is_set():
            try:
                handled = yield from self._run_once()
                failures = 0
                if not handled:
                    yield _Block(follower.wait)
            except (psycopg.Error, MeowmxError) as error:
                # One failed call (a lost connection, a timeout, disk full...): its
                # batch comes back to this worker or another; keep going.
                failures += 1
                pause = min(_MAX_PAUSE, self.poll_interval * 2 ** min(failures - 1, 16))
                log.warning(
                    "worker %s: %s; trying again in %.2g s", self.name, describe(error), pause
                )
                yield _Block(functools.partial(self.stop_event.wait, pause))

    def _until_idle(self) -> Steps[Drained]:
        handled, failed, parked = 0, self._failed, self._parked
        while not self.stop_event.is_set():
            before = (self._failed, handled)
            handled += yield from self._run_once()
            if (self._failed, handled) == before:
                break  # nothing claimed, handled or failed: idle
        return Drained(handled, self._failed - failed, self._parked - parked)

    def _release(self) -> Steps[None]:
        try:
            yield _Calls.release.describe(self.client, self.subscription, self.name)
        except (psycopg.Error, MeowmxError) as error:
            log.warning("worker %s could not release its leases: %s", self.name, describe(error))

    # One batch ------------------------------------------------------------------

    def _run_once(self) -> Steps[int]:
        batch, through = yield from self._claim()
        if not batch:
            return 0
        self._start_renewer()
        self._batch_since = time.monotonic()
        try:
            if self.transactional:
                return (yield from self._handle_in_transaction(batch, through))
            return (yield from self._handle(batch, through))
        except (LeaseLost, NotInBatch) as lost:
            # Taken over (lease expired) or reset: another claimer has these events.
            log.warning("worker %s dropped its batch: %s", self.name, lost.message)
            return 0
        finally:
            self._batch_since = None

    def _claim(self) -> Steps[tuple[list[ClaimedEvent], str | None]]:
        """The next batch, and the cursor its last ack moves to (None: its last event)."""
        calls, sub = _Calls, self.subscription
        if not self._on_standby:
            batch = yield calls.claim_batch.describe(
                self.client, sub, self.name, max_count=self.batch_size, lease=self.lease
            )
            return batch, None
        while not self.stop_event.is_set():
            claim = yield calls.claim_partition.describe(
                self.client, sub, self.name, lease=self.lease
            )
            if claim is None:
                break
            rows = yield calls.read_partition.describe(
                self.client,
                sub,
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
            yield calls.ack_through.describe(
                self.client, sub, self.name, claim.partition, rows[-1].cursor
            )
        return [], None

    def _handle(self, batch: list[ClaimedEvent], through: str | None) -> Steps[int]:
        # A slow batch acks what it has done every third of the lease: a crash then
        # redelivers less (and with one connection, no renewer, it keeps the lease).
        heartbeat = self.lease.total_seconds() / 3
        done = 0
        while True:
            try:
                done = yield _Handle(batch, done, until=time.monotonic() + heartbeat)
            except _Failed as failed:
                yield from self._nack(batch[failed.index], failed.error)
                return failed.index
            if done == len(batch):
                break
            yield self._ack(batch[done - 1])
        yield self._ack(batch[-1], through=through)
        return len(batch)

    def _handle_in_transaction(self, batch: list[ClaimedEvent], through: str | None) -> Steps[int]:
        # A failure rolls back the whole transaction: apply the events before it
        # again (and again, should one of those fail now), then nack it.
        done, error = len(batch), None
        while done > 0:
            last = through if done == len(batch) else None
            try:
                yield _Transaction(functools.partial(self._apply, batch[:done], last))
                break
            except _Failed as failed:
                done, error = failed.index, failed.error
        if error is not None:
            yield from self._nack(batch[done], error)
        return done

    def _apply(self, events: list[ClaimedEvent], through: str | None, conn: Any) -> Steps[None]:
        """Handle `events` and ack the last (or through `through`) in the transaction
        on `conn`; a handler error rolls it back (_Failed)."""
        yield self._bound(conn)
        yield _Handle(events, conn=conn)
        yield self._ack(events[-1], conn, through)

    def _bound(self, conn: Any) -> Call[None]:
        """Limit the batch's transaction by the lease, and name it after the worker
        (subscription_status shows it); SET LOCAL, so it ends with the transaction."""
        limit = f"{max(1, int(self.lease.total_seconds() * 1000))}ms"
        return Call(
            "SELECT set_config('idle_in_transaction_session_timeout', %(limit)s, true),"
            " set_config('statement_timeout', %(limit)s, true),"
            " set_config('application_name', %(name)s, true)",
            {"limit": limit, "name": f"meowmx worker {self.name}"[:63]},
            lambda rows: None,
            conn=conn,
        )

    def _ack(self, event: ClaimedEvent, conn: Any = None, through: str | None = None) -> Call[None]:
        if through is None:
            return _Calls.ack.describe(
                self.client,
                self.subscription,
                self.name,
                event.partition,
                event.position,
                conn=conn,
            )
        return _Calls.ack_through.describe(
            self.client, self.subscription, self.name, event.partition, through, conn=conn
        )

    def _nack(self, event: ClaimedEvent, error: Exception) -> Steps[None]:
        attempt = event.attempts + 1  # the server's count: it survives restarts
        parked = yield _Calls.nack.describe(
            self.client,
            self.subscription,
            self.name,
            event.partition,
            event.position,
            f"{type(error).__name__}: {error}",
            retry_after=self.backoff(attempt),
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

    # Renewing the leases while a batch is in hand ---------------------------------
    #
    # However long one handler call takes (or one blocks the event loop), a thread
    # renews the leases on a connection of its own once the batch is a third of the
    # lease old, and every third of the lease after that. (A transactional batch
    # cannot ack before it commits; a plain one acks only between events.)

    def _start_renewer(self) -> None:
        if self._renewer is not None:
            return
        target = self._renew_target()
        if target is None:
            return
        self._renewer = Client(target, prepared_statements=self.client._connect.prepared_statements)
        self._renew_thread = threading.Thread(
            target=self._renew_while_in_batch,
            args=(self._renewer,),
            name=f"{self.name}-renew",
            daemon=True,
        )
        self._renew_thread.start()

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

    def _close_renewer(self) -> None:
        self._closing.set()
        if self._renew_thread is not None:
            self._renew_thread.join(timeout=10)
        if self._renewer is not None:
            self._renewer.close()
        self._renewer, self._renew_thread = None, None
        self._closing.clear()


class Worker(_Runner[Target, Client, Handler | TransactionalHandler]):
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

    def _client_for(
        self, target: Target | Client, read_target: Target | None
    ) -> tuple[Client, bool]:
        if isinstance(target, AsyncClient):
            raise TypeError("an AsyncClient goes with an AsyncWorker")
        if isinstance(target, psycopg.Connection) and not target.autocommit:
            # Claims and acks would sit in a transaction nobody commits, holding
            # the lease rows and the read horizon.
            raise ValueError("a Worker needs an autocommit connection, a DSN or a pool")
        if not isinstance(target, Client):
            return Client(target, read_target=read_target), True
        if read_target is not None:
            raise ValueError("give read_target to the Client or to the Worker, not to both")
        return target, False

    def _renew_target(self) -> Target | None:
        target = self.client._connect.target
        return None if isinstance(target, psycopg.Connection) else target

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, *, handle_signals: bool = True) -> None:
        """Handle events until stop() or SIGTERM/SIGINT; then release the leases.

        Waits for the append NOTIFY and also polls every poll_interval seconds, so
        a lost notification or a pooler that drops LISTEN never stalls it.
        """
        signals = stop_on_signals(self.stop_event) if handle_signals else nullcontext()
        with signals, self._follower() as follower:
            try:
                self._drive(self._run(follower))
            finally:
                self.close()

    def run_once(self) -> int:
        """Claim one batch and handle it; returns how many events were handled."""
        return self._drive(self._run_once())

    def run_until_idle(self) -> Drained:
        """Handle batches until no partition has work it may claim now (or stop()).
        A failed event is nacked, as in run(); one whose retry is not due yet stays
        for later, and so does the rest of its partition."""
        return self._drive(self._until_idle())

    def close(self) -> None:
        """Release the worker's leases (its unacknowledged events go to the next
        claimer at once, not after the lease) and close what it opened. run() ends
        with this; after run_once or run_until_idle, call it, or use `with`."""
        self._drive(self._release())
        self._close_renewer()
        if self._owns_client:
            self.client.close()

    def _drive(self, steps: Steps[T]) -> T:
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]
            reply, error = None, None
            try:
                reply = self._do(step)
            except Exception as failure:  # noqa: BLE001  (thrown into the steps)
                error = failure

    def _do(self, step: Step) -> Any:
        if isinstance(step, Call):
            return self.client._run(step)
        if isinstance(step, _Handle):
            handler, events, conn, until = self.handler, step.events, step.conn, step.until
            for index in range(step.start, len(events)):
                event = events[index]
                try:
                    event.data  # noqa: B018  (decodes, or raises UndecodableEvent)
                    if conn is None:
                        handler(event)  # type: ignore[call-arg]
                    else:
                        handler(event, conn)  # type: ignore[call-arg]
                except Exception as error:  # noqa: BLE001  (any handler failure is a nack)
                    raise _Failed(index, error) from error
                if time.monotonic() > until:
                    return index + 1
            return len(events)
        if isinstance(step, _Transaction):
            with self.client._connect() as conn, conn.transaction():
                return self._drive(step.body(conn))
        return step.wait()


class AsyncWorker(_Runner[AsyncTarget, AsyncClient, AsyncHandler | AsyncTransactionalHandler]):
    """Worker, for asyncio: the same arguments, settings and semantics, awaited.

    `target` is a DSN, an autocommit AsyncConnection or an AsyncConnectionPool (or
    an AsyncClient). The handler may be a coroutine function (awaited) or a plain
    function (called in the event loop: one that blocks, blocks the loop). Claims,
    handler calls and acks run in the event loop; waiting for the append NOTIFY and
    renewing the lease during a batch each run in a thread of their own, on plain
    connections to the target's DSN (a pool's conninfo; a single AsyncConnection
    has nothing to renew on, as with Worker).
    """

    def _client_for(
        self, target: AsyncTarget | AsyncClient, read_target: AsyncTarget | None
    ) -> tuple[AsyncClient, bool]:
        if isinstance(target, Client):
            raise TypeError("a Client goes with a Worker; an AsyncWorker takes an AsyncClient")
        if isinstance(target, psycopg.AsyncConnection) and not target.autocommit:
            raise ValueError("an AsyncWorker needs an autocommit AsyncConnection, a DSN or a pool")
        if not isinstance(target, AsyncClient):
            return AsyncClient(target, read_target=read_target), True
        if read_target is not None:
            raise ValueError("give read_target to the AsyncClient or to the AsyncWorker")
        return target, False

    def _renew_target(self) -> Target | None:
        return _dsn_of(self.client)

    async def __aenter__(self) -> AsyncWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Handle events until stop(), SIGTERM/SIGINT or the task's cancellation (which
        ends the batch in hand where it is: it comes again); then release the leases."""
        signals = stop_on_signals(self.stop_event) if handle_signals else nullcontext()
        with signals, self._follower() as follower:
            try:
                await self._drive(self._run(follower))
            except asyncio.CancelledError:
                self.stop()  # ends a wait in progress in its thread
                raise
            finally:
                await self.close()

    async def run_once(self) -> int:
        """Claim one batch and handle it; returns how many events were handled."""
        return await self._drive(self._run_once())

    async def run_until_idle(self) -> Drained:
        """Handle batches until no partition has work it may claim now (or stop())."""
        return await self._drive(self._until_idle())

    async def close(self) -> None:
        """Release the worker's leases and close what it opened (see Worker.close)."""
        await self._drive(self._release())
        await asyncio.to_thread(self._close_renewer)
        if self._owns_client:
            await self.client.close()

    async def _drive(self, steps: Steps[T]) -> T:
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as finished:
                return finished.value  # type: ignore[no-any-return]
            reply, error = None, None
            try:
                reply = await self._do(step)
            except Exception as failure:  # noqa: BLE001  (thrown into the steps)
                error = failure

    async def _do(self, step: Step) -> Any:
        if isinstance(step, Call):
            return await self.client._run(step)
        if isinstance(step, _Handle):
            handler, events, conn, until = self.handler, step.events, step.conn, step.until
            for index in range(step.start, len(events)):
                event = events[index]
                try:
                    event.data  # noqa: B018  (decodes, or raises UndecodableEvent)
                    result = handler(event) if conn is None else handler(event, conn)  # type: ignore[call-arg]
                    if inspect.isawaitable(result):
                        await result
                except Exception as error:  # noqa: BLE001  (any handler failure is a nack)
                    raise _Failed(index, error) from error
                if time.monotonic() > until:
                    return index + 1
            return len(events)
        if isinstance(step, _Transaction):
            async with self.client._connect() as conn, conn.transaction():
                return await self._drive(step.body(conn))
        return await asyncio.to_thread(step.wait)


def _check_handler(handler: Callable[..., Any], transactional: bool) -> None:
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


def _dsn_of(client: Client | AsyncClient) -> str | None:
    """A DSN for the LISTEN connection, when the client's target reveals one."""
    target = client._connect.target
    if isinstance(target, str):
        return target
    conninfo = getattr(target, "conninfo", None)
    return conninfo if isinstance(conninfo, str) else None
