"""Every program in examples/ runs against a real database and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
Psql = Callable[..., subprocess.CompletedProcess[str]]


def run_example(name: str, dsn: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env={**os.environ, "MEOWMX_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_psql_walkthrough(dsn: str, psql: Psql) -> None:
    sql = (EXAMPLES / "psql_walkthrough.sql").read_text()
    done = psql(sql, dsn, args=["-q", "-P", "format=aligned", "-P", "tuples_only=off"])
    assert "ERROR:  wrong expected version" in done.stderr  # the conflict is shown...
    assert done.stdout.count("ERROR") == 0
    with psycopg.connect(dsn) as conn:
        # ...and wrote nothing; the rest of the walkthrough ran to the end.
        assert conn.execute("SELECT meowmx.stream_version('cart', 'alice')").fetchone() == (3,)
        status = conn.execute(
            "SELECT checkpoint <> '0:0', lease_owner FROM meowmx.subscription_status('cart-emails')"
        ).fetchall()
    assert status == [(True, None)]  # acked, then released
    assert " bob       |       1 | ItemAdded" in done.stdout  # the second page, via the cursor


def test_python_writer_worker_and_projection(dsn: str) -> None:
    written = run_example("python_writer.py", dsn)
    assert written.count("version 2, conflicts retried 0") == 5

    printed = run_example("python_worker.py", dsn, "--until-idle").splitlines()
    assert len(printed) == 10
    assert sum("OrderPlaced" in line for line in printed) == 5

    summary = run_example("projection.py", dsn)
    assert summary.strip() == "handled 10 events; orders: 5, confirmed: 5"
    # Running it again finds nothing new: the ack committed with the read model.
    assert run_example("projection.py", dsn).strip() == "handled 0 events; orders: 5, confirmed: 5"


def test_alembic_migration_installs_meowmx(extra_db: Callable[[], str]) -> None:
    dsn = extra_db()
    alembic = Path(sys.executable).parent / "alembic"
    done = subprocess.run(
        [str(alembic), "-c", str(EXAMPLES / "alembic" / "alembic.ini"), "upgrade", "head"],
        env={**os.environ, "MEOWMX_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT meowmx.version()").fetchone() == (3,)
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
        versions = conn.execute("SELECT version FROM meowmx.migrations ORDER BY 1").fetchall()
    assert versions == [(1,), (2,), (3,)]
