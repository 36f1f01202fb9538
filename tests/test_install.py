"""Installing: idempotent, concurrent, refuses a newer schema; migrations and the one-file
script give the same schema; migration files and function settings follow the rules."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

import psycopg
import pytest

import meowmx
from support import CATALOG_QUERIES, schema_of

Psql = Callable[..., subprocess.CompletedProcess[str]]
SQL_DIR = files("meowmx").joinpath("sql")
MIGRATION_NAME = re.compile(r"(\d{4})_(\w+)\.sql")


def migration_files() -> list[tuple[int, str, str]]:
    """(number, name, text) of every migration file, by number."""
    found = []
    for entry in SQL_DIR.iterdir():
        match = MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


ALL_VERSIONS = [number for number, _, _ in migration_files()]


def recorded(dsn: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version, name FROM meowmx.migrations ORDER BY version")
        return [(version, name) for version, name in rows]


# install() --------------------------------------------------------------------------------


def test_installing_twice_applies_nothing_the_second_time(empty_dsn: str) -> None:
    assert meowmx.install(empty_dsn) == ALL_VERSIONS
    assert meowmx.install(empty_dsn) == []
    assert [v for v, _ in recorded(empty_dsn)] == ALL_VERSIONS


def test_concurrent_installs_apply_each_migration_once(empty_dsn: str) -> None:
    installers = 4
    start = threading.Barrier(installers)

    def install() -> list[int]:
        start.wait()
        return meowmx.install(empty_dsn)  # each opens its own connection

    with ThreadPoolExecutor(installers) as pool:
        applied = [f.result() for f in [pool.submit(install) for _ in range(installers)]]

    assert sorted(v for versions in applied for v in versions) == ALL_VERSIONS
    assert [v for v, _ in recorded(empty_dsn)] == ALL_VERSIONS


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_install_joins_the_callers_transaction(empty_dsn: str, outcome: str) -> None:
    with psycopg.connect(empty_dsn) as conn:  # not autocommit: a transaction is open
        conn.execute("SELECT 1")
        assert meowmx.install(conn) == ALL_VERSIONS
        conn.commit() if outcome == "commit" else conn.rollback()
        (schema,) = conn.execute("SELECT to_regnamespace('meowmx') IS NOT NULL").fetchone()  # type: ignore[misc]
    assert schema == (outcome == "commit")


def test_a_newer_schema_is_refused(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO meowmx.migrations (version, name) VALUES (9999, 'future')")
    with pytest.raises(meowmx.SchemaTooNew) as info:
        meowmx.install(dsn)
    assert info.value.sqlstate == "MX090"
    assert "9999" in (info.value.detail or "") and info.value.hint
    assert [v for v, _ in recorded(dsn)] == [*ALL_VERSIONS, 9999]


# The one-file script and the migrations give the same schema ------------------------------


def test_the_one_file_script_installs_the_same_schema(
    extra_db: Callable[[], str], psql: Psql
) -> None:
    by_script, by_install = extra_db(), extra_db()
    psql(meowmx.script(), by_script, args=["-q", "-1", "-f", "-"])
    meowmx.install(by_install)

    scripted, installed = schema_of(by_script), schema_of(by_install)
    for part in CATALOG_QUERIES:
        assert scripted[part] == installed[part], part
    assert scripted["functions"] and scripted["indexes"] and scripted["routine_grants"]
    functions = {row[0].split("(")[0] for row in installed["functions"]}
    assert {"append_event", "read_events", "version"} <= functions
    # install() recognises what the script installed.
    assert meowmx.install(by_script) == []


def test_upgrading_step_by_step_gives_the_same_schema_and_keeps_events(
    extra_db: Callable[[], str], psql: Psql
) -> None:
    stepwise, at_once = extra_db(), extra_db()
    psql(meowmx.script(upto=1), stepwise, args=["-q", "-1", "-f", "-"])
    psql(
        "SELECT meowmx.append_event(category => 'cart', stream_id => '1',"
        " event_type => 'Created', data => '{\"n\": 1}');",
        stepwise,
    )
    for version in ALL_VERSIONS[1:]:
        psql(meowmx.script(after=version - 1, upto=version), stepwise, args=["-q", "-1", "-f", "-"])
    meowmx.install(at_once)

    assert schema_of(stepwise) == schema_of(at_once)
    assert [v for v, _ in recorded(stepwise)] == ALL_VERSIONS
    done = psql(
        "SELECT version, data FROM meowmx.read_stream(category => 'cart', stream_id => '1');",
        stepwise,
    )
    assert done.stdout == '1|{"n": 1}\n'


# Migration files --------------------------------------------------------------------------


def test_migration_files_are_numbered_consecutively_from_one() -> None:
    sql_files = [entry.name for entry in SQL_DIR.iterdir() if entry.name.endswith(".sql")]
    assert sql_files, "no migrations shipped"
    misnamed = [name for name in sql_files if not MIGRATION_NAME.fullmatch(name)]
    assert misnamed == [], "install() would silently skip these"
    assert ALL_VERSIONS == list(range(1, len(ALL_VERSIONS) + 1))
    assert meowmx.latest_version() == ALL_VERSIONS[-1]


@pytest.mark.parametrize(
    "text", [pytest.param(text, id=f"{n:04d}_{name}") for n, name, text in migration_files()]
)
def test_a_migration_is_plain_sql(text: str) -> None:
    meta_commands = [line for line in text.splitlines() if line.lstrip().startswith("\\")]
    assert meta_commands == [], "psql meta-commands do not run in other tools"
    assert re.search(r"\b(BEGIN|COMMIT)\s*;", text, re.IGNORECASE) is None, (
        "the installer owns the transaction"
    )


def test_each_migration_records_itself(extra_db: Callable[[], str], psql: Psql) -> None:
    """Applied one by one with plain psql, each file adds exactly its own row."""
    target = extra_db()
    for number, name, _ in migration_files():
        psql("", target, args=["-q", "-1", "-f", str(SQL_DIR.joinpath(f"{number:04d}_{name}.sql"))])
        assert recorded(target)[-1] == (number, name)
        assert len(recorded(target)) == number
    assert meowmx.install(target) == []
