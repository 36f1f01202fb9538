"""The Django example (examples/django_orders): its migration applies meowmx's printed SQL
(RunSQL), and a view appends in the request's transaction. Django's own test runner runs
its tests, as a Django user would, on a test database it creates on the server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import meowmx

PROJECT = Path(__file__).resolve().parent.parent / "examples" / "django_orders"


def test_the_django_example_project_passes_its_own_tests(server_dsn: str) -> None:
    package_root = str(Path(meowmx.__file__).resolve().parent.parent)
    env = {**os.environ, "MEOWMX_DSN": server_dsn, "PYTHONPATH": package_root}
    done = subprocess.run(
        [sys.executable, "manage.py", "test", "orders", "-v", "2", "--noinput"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Ran 2 tests" in done.stderr and "OK" in done.stderr
    assert "Applying orders.0001_meowmx... OK" in done.stdout + done.stderr


def test_the_migration_is_the_printed_sql_of_its_schema_version() -> None:
    """Frozen: a later schema version must come as a new migration, not change this one."""
    text = (PROJECT / "orders" / "migrations" / "0001_meowmx.py").read_text()
    assert "meowmx.script(upto=10)" in text
    assert meowmx.latest_version() >= 10
