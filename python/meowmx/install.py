"""Apply meowmx's SQL migrations, shipped inside the package, to a database."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg

from meowmx.connection import Target, connection
from meowmx.errors import SchemaTooNew

# Serializes installers: concurrent processes apply each migration exactly once.
# Names are qualified: the installing session's search_path may hold anything.
_INSTALL_LOCK = (
    "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('meowmx/install', 0))"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration this package ships, oldest first."""
    found = []
    for entry in files("meowmx").joinpath("sql").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


def latest_version() -> int:
    return migrations()[-1].version


def script(after: int = 0, upto: int | None = None) -> str:
    """One SQL script applying the migrations after `after` up to `upto` (default: all).

    Run it in one transaction (`psql -1 -f`), or hand it to another stack's migrations.
    """
    upto = latest_version() if upto is None else upto
    chosen = [m for m in migrations() if after < m.version <= upto]
    if not chosen:
        return f"-- meowmx schema: nothing to apply after version {after}\n"
    header = f"-- meowmx schema: migrations {after + 1} to {upto}\n"
    return header + "\n".join(f"-- {m.version:04d}_{m.name}.sql\n{m.sql}" for m in chosen)


def write_extension(directory: Path) -> list[Path]:
    """Write meowmx.control and the extension scripts into `directory` (the server's
    SHAREDIR/extension). The scripts are the migrations: meowmx--1.sql installs
    version 1 and meowmx--N--M.sql updates, so CREATE EXTENSION chains them."""
    control = files("meowmx").joinpath("sql").joinpath("meowmx.control")
    written = [directory / "meowmx.control"]
    written[0].write_text(control.read_text(encoding="utf-8"), encoding="utf-8")
    previous = None
    for migration in migrations():
        name = f"meowmx--{migration.version}.sql"
        if previous is not None:
            name = f"meowmx--{previous}--{migration.version}.sql"
        path = directory / name
        path.write_text(migration.sql, encoding="utf-8")
        written.append(path)
        previous = migration.version
    return written


def applied_versions(conn: psycopg.Connection[Any]) -> list[int]:
    """Migrations recorded in this database (empty when meowmx is not installed)."""
    if conn.execute("SELECT pg_catalog.to_regclass('meowmx.migrations')").fetchone() == (None,):
        return []
    rows = conn.execute("SELECT version FROM meowmx.migrations ORDER BY version").fetchall()
    return [row[0] for row in rows]


def install(target: Target) -> list[int]:
    """Apply the pending migrations in one transaction; return the versions applied.

    Idempotent, and safe when several processes install at once. A connection you
    pass stays yours: if it is inside a transaction, the migrations join it.
    """
    with connection(target) as conn, conn.transaction():
        conn.execute(_INSTALL_LOCK)
        applied = applied_versions(conn)
        if applied and applied[-1] > latest_version():
            raise SchemaTooNew(
                "the database holds a newer meowmx schema than this package",
                f"database schema version {applied[-1]}, package version {latest_version()}",
                "Upgrade the meowmx package.",
            )
        pending = [m for m in migrations() if m.version not in applied]
        for migration in pending:
            conn.execute(migration.sql)
        return [m.version for m in pending]
