"""CREATE EXTENSION meowmx, and ALTER EXTENSION UPDATE from the first release, give the
same catalog as the plain-SQL install."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

import meowmx
from catalog import catalog_of, differences
from clusters import extension_dir
from meowmx.install import write_extension


def test_create_extension_gives_the_same_schema(extra_db: Callable[[], str]) -> None:
    by_extension, by_install = extra_db(), extra_db()
    written = write_extension(extension_dir(by_extension))
    latest = meowmx.latest_version()
    names = {p.name for p in written}
    assert {"meowmx.control", "meowmx--1.sql", f"meowmx--{latest}.sql"} <= names
    assert {f"meowmx--{v - 1}--{v}.sql" for v in range(2, latest + 1)} <= names

    with psycopg.connect(by_extension, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION meowmx")
        (version,) = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'meowmx'"
        ).fetchone()  # type: ignore[misc]
    assert version == str(meowmx.latest_version())
    meowmx.install(by_install)

    assert differences(catalog_of(by_install), catalog_of(by_extension)) == []
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
    fresh = extra_db()
    meowmx.install(fresh)
    assert differences(catalog_of(fresh), catalog_of(dsn)) == []
