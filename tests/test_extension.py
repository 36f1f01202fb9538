"""CREATE EXTENSION meowmx gives the same schema as the plain-SQL install."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

import meowmx
from meowmx.install import write_extension
from support import CATALOG_QUERIES, schema_of


def extension_dir(dsn: str) -> Path:
    """The server's extension directory, when this machine can write it."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'").fetchone()
    directory = Path(row[0]) / "extension" if row else None
    if directory is None or not os.access(directory, os.W_OK):
        pytest.skip(f"the server's extension directory {directory} is not writable from here")
    return directory


def test_create_extension_gives_the_same_schema(extra_db: Callable[[], str]) -> None:
    by_extension, by_install = extra_db(), extra_db()
    written = write_extension(extension_dir(by_extension))
    assert [p.name for p in written][:2] == ["meowmx.control", "meowmx--1.sql"]

    with psycopg.connect(by_extension, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION meowmx")
        (version,) = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'meowmx'"
        ).fetchone()  # type: ignore[misc]
    assert version == str(meowmx.latest_version())
    meowmx.install(by_install)

    extension, installed = schema_of(by_extension), schema_of(by_install)
    for part in CATALOG_QUERIES:
        assert extension[part] == installed[part], part
    assert meowmx.install(by_extension) == []  # the installer sees it complete


def test_alter_extension_update_upgrades_an_older_version(extra_db: Callable[[], str]) -> None:
    dsn = extra_db()
    write_extension(extension_dir(dsn))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION meowmx VERSION '1'")
        conn.execute("SELECT meowmx.append_event('order', '1', 'Placed', '{}')")
        conn.execute("ALTER EXTENSION meowmx UPDATE")
        assert conn.execute("SELECT meowmx.version()").fetchone() == (meowmx.latest_version(),)
        assert conn.execute("SELECT meowmx.stream_version('order', '1')").fetchone() == (1,)


def test_control_file_names_the_latest_version() -> None:
    control = (Path(meowmx.__file__).parent / "sql" / "meowmx.control").read_text()
    assert f"default_version = '{meowmx.latest_version()}'" in control
