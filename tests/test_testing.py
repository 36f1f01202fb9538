"""meowmx's pytest plugin (meowmx.testing), run as a user runs it: pytest on the example
test file, in a new process, against the server given or an embedded one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "test_with_meowmx.py"


def run_pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=EXAMPLE.parent,
    )  # fmt: skip


def databases(server_dsn: str) -> set[str]:
    with psycopg.connect(server_dsn) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_the_plugin_gives_each_test_a_clean_database_on_the_server_given(server_dsn: str) -> None:
    before = databases(server_dsn)
    done = run_pytest("--meowmx-dsn", server_dsn)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
    assert databases(server_dsn) == before  # each test's database, and the template, dropped


def test_the_dsn_setting_is_honoured_not_replaced_by_an_embedded_server() -> None:
    env = {**os.environ, "MEOWMX_TEST_DSN": "postgresql://postgres@127.0.0.1:1/postgres"}
    done = run_pytest(env=env)
    assert done.returncode != 0
    assert "127.0.0.1" in done.stdout and "3 errors" in done.stdout


def test_without_a_dsn_the_plugin_runs_an_embedded_server() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEOWMX_TEST_DSN"}
    done = run_pytest(env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
