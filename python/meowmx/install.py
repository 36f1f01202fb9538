"""Apply meowmx's SQL, shipped inside the package, to a database.

``sql/schema/`` is the current definition: an empty database runs it, and it records
every upgrade it includes. ``sql/upgrades/NNNN_name.sql`` are the frozen steps an
existing database runs after its version.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

from meowmx.connection import Target, connection
from meowmx.errors import InvalidRolePrefix, SchemaTooNew, translated

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:
    from importlib.abc import Traversable

log = logging.getLogger("meowmx.install")

# Serializes installers: concurrent processes apply each migration exactly once.
# Names are qualified: the installing session's search_path may hold anything.
_INSTALL_LOCK = (
    "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('meowmx/install', 0))"
)


# A database restored or replicated from another cluster needs this once (a no-op
# elsewhere): the upgrade scripts end with it, and install() runs it every time.
_ADOPT_SINCE = 5
_ADOPT = (
    "\n-- After a restore or replication into another cluster (a no-op otherwise):\n"
    "SELECT meowmx.adopt_cluster();\n"
)


@dataclass(frozen=True)
class Migration:
    """One frozen upgrade: what a database at `version - 1` runs to reach `version`."""

    version: int
    name: str
    sql: str


def sql_dir() -> Traversable:
    return files("meowmx").joinpath("sql")


@cache
def migrations() -> tuple[Migration, ...]:
    """Every upgrade this package ships (``sql/upgrades/``), oldest first."""
    found = []
    for entry in sql_dir().joinpath("upgrades").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return tuple(sorted(found, key=lambda m: m.version))


@cache
def schema_files() -> tuple[tuple[str, str], ...]:
    """(name, text) of each file of the current definition (``sql/schema/``), in order."""
    entries = [e for e in sql_dir().joinpath("schema").iterdir() if e.name.endswith(".sql")]
    return tuple((e.name, e.read_text(encoding="utf-8")) for e in sorted(entries, key=str))


def latest_version() -> int:
    return migrations()[-1].version


def script(after: int | None = None, upto: int | None = None) -> str:
    """The SQL that takes a database from version `after` to `upto` (default: the latest).

    Without `after`, a fresh install: the current definition (or, for an older `upto`,
    the upgrades from 1). Run it in one transaction (`psql -v ON_ERROR_STOP=1 -1 -f`),
    or hand it to another stack's migrations.
    """
    upto = latest_version() if upto is None else upto
    if after is None and upto == latest_version():
        header = f"-- meowmx schema version {upto}: a fresh install\n"
        return header + "\n".join(f"-- schema/{name}\n{text}" for name, text in schema_files())
    after = after or 0
    chosen = [m for m in migrations() if after < m.version <= upto]
    adopt = _ADOPT if upto >= _ADOPT_SINCE else ""
    if not chosen:
        return f"-- meowmx schema: nothing to apply after version {after}\n{adopt}"
    header = f"-- meowmx schema: upgrades {after + 1} to {upto}\n"
    body = "\n".join(f"-- upgrades/{m.version:04d}_{m.name}.sql\n{m.sql}" for m in chosen)
    return header + body + adopt


def write_extension(directory: Path) -> list[Path]:
    """Write meowmx.control and the extension scripts into `directory` (the server's
    SHAREDIR/extension): meowmx--N.sql is the current definition, meowmx--1.sql the
    first release, and meowmx--K--K+1.sql the upgrades, so ALTER EXTENSION UPDATE
    chains them."""
    control = sql_dir().joinpath("meowmx.control")
    scripts = {"meowmx.control": control.read_text(encoding="utf-8")}
    first, *later = migrations()
    scripts[f"meowmx--{first.version}.sql"] = first.sql
    for migration in later:
        scripts[f"meowmx--{migration.version - 1}--{migration.version}.sql"] = migration.sql
    scripts[f"meowmx--{latest_version()}.sql"] = script()
    written = []
    for name, text in scripts.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def applied_versions(conn: psycopg.Connection[Any]) -> list[int]:
    """Migrations recorded in this database (empty when meowmx is not installed)."""
    if conn.execute("SELECT pg_catalog.to_regclass('meowmx.migrations')").fetchone() == (None,):
        return []
    rows = conn.execute("SELECT version FROM meowmx.migrations ORDER BY version").fetchall()
    return [row[0] for row in rows]


def install(target: Target, role_prefix: str | None = None) -> list[int]:
    """Install meowmx, or apply the pending upgrades, in one transaction; return the
    versions applied.

    Idempotent, and safe when several processes install at once. A connection you
    pass stays yours: if it is inside a transaction, the install joins it.

    `role_prefix` names this database's group roles (``<prefix>_reader``, ``_writer``,
    ``_worker``, ``_admin``; default ``meowmx``). It is read when meowmx is first
    installed in a database and kept there; a different one later raises
    `RolePrefixConflict`. Where the installer may not create roles, the install goes on
    without them and logs the server's WARNING naming the step an administrator runs
    (logger ``meowmx.install``).
    """
    if role_prefix == "":  # the SQL reads an empty setting as unset
        raise InvalidRolePrefix(
            "invalid role prefix",
            "role_prefix is ''",
            "Pass None for the default (meowmx), or a prefix: see meowmx.role_prefix.",
            {"role_prefix": ""},
        )
    with connection(target) as conn, _notices_logged(conn), translated(), conn.transaction():
        conn.execute(_INSTALL_LOCK)
        if role_prefix is not None:
            # Local to the transaction: the SQL below reads it (04_roles.sql).
            conn.execute(
                "SELECT pg_catalog.set_config('meowmx.role_prefix', %s, true)", [role_prefix]
            )
        applied = applied_versions(conn)
        if not applied:
            conn.execute(script())
            return applied_versions(conn)
        if applied[-1] > latest_version():
            raise SchemaTooNew(
                "the database holds a newer meowmx schema than this package",
                f"database schema version {applied[-1]}, package version {latest_version()}",
                "Upgrade the meowmx package.",
            )
        pending = [m for m in migrations() if m.version not in applied]
        for migration in pending:
            conn.execute(migration.sql)
        if role_prefix is not None:
            # Installed before: refuses a prefix other than the stored one (MX061).
            conn.execute("CALL meowmx._choose_role_prefix()")
        # After a restore into another cluster: its roles and grants (where the
        # installer may; else a WARNING names the step), and its order ids.
        conn.execute("SELECT FROM meowmx.create_roles()")
        conn.execute("SELECT meowmx.adopt_cluster()")
        return [m.version for m in pending]


class Notice(NamedTuple):
    """A notice of the server during an install; logged with the record as `notice`."""

    message: str
    detail: str | None
    hint: str | None


@contextmanager
def _notices_logged(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Log the server's notices (such as the roles it could not create) as warnings."""

    def log_notice(diag: psycopg.errors.Diagnostic) -> None:
        # diag is only valid during the call: copy what it says.
        notice = Notice(diag.message_primary or "", diag.message_detail, diag.message_hint)
        lines = [notice.message]
        labelled = (("DETAIL", notice.detail), ("HINT", notice.hint))
        lines += [f"{label}: {text}" for label, text in labelled if text]
        log.warning("%s", "\n".join(lines), extra={"notice": notice})

    conn.add_notice_handler(log_notice)
    try:
        yield
    finally:
        conn.remove_notice_handler(log_notice)
