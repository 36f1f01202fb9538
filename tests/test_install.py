"""Installing: idempotent, concurrent, refuses a newer schema. The current definition
(sql/schema/) and the frozen upgrades (sql/upgrades/) give the same catalog, and a
mismatch names the object; the SQL files follow the rules."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

import meowmx
from catalog import catalog_of, differences
from meowmx.install import migrations, schema_files, sql_dir

Psql = Callable[..., subprocess.CompletedProcess[str]]
UPGRADES_DIR = sql_dir().joinpath("upgrades")
UPGRADE_NAME = re.compile(r"(\d{4})_(\w+)\.sql")
ALL_VERSIONS = [m.version for m in migrations()]
PSQL_SCRIPT = ["-q", "-1", "-f", "-"]


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


# The current definition and the upgrades agree ----------------------------------------


def test_the_schema_and_the_upgrade_chain_give_the_same_catalog(
    extra_db: Callable[[], str], psql: Psql
) -> None:
    """The guard against drift: what `meowmx sql` prints for a fresh database, and the
    upgrades 1..N one after another, as other stacks apply them."""
    fresh, chained = extra_db(), extra_db()
    psql(meowmx.script(), fresh, args=PSQL_SCRIPT)
    for version in ALL_VERSIONS:
        psql(meowmx.script(after=version - 1, upto=version), chained, args=PSQL_SCRIPT)
    want, got = catalog_of(fresh), catalog_of(chained)
    assert want["functions"] and want["indexes"] and want["columns"] and want["types"]
    assert differences(want, got) == []
    assert meowmx.install(fresh) == [] and meowmx.install(chained) == []


def test_a_drifted_definition_is_named(extra_db: Callable[[], str]) -> None:
    """differences() catches each kind of drift and names the object."""
    want, drifted = extra_db(), extra_db()
    meowmx.install(want)
    meowmx.install(drifted)
    with psycopg.connect(drifted, autocommit=True) as conn:
        body = conn.execute(
            "SELECT pg_get_functiondef('meowmx.stream_version(text, text)'::regprocedure)"
        ).fetchone()[0]  # type: ignore[index]
        conn.execute(body.replace("RETURN coalesce(", "RETURN 0 + coalesce("))
        conn.execute("REVOKE EXECUTE ON FUNCTION meowmx.version() FROM meowmx_reader")
        conn.execute("ALTER FUNCTION meowmx.ack(text, text, integer, bigint) SECURITY INVOKER")
        conn.execute("CREATE INDEX events_extra_idx ON meowmx.events (recorded_at)")
        conn.execute("ALTER TABLE meowmx.snapshots ALTER COLUMN created_at DROP DEFAULT")
    assert differences(catalog_of(want), catalog_of(drifted)) == [
        "relations: events_extra_idx is extra",
        "columns: events_extra_idx.recorded_at is extra",
        "columns: snapshots.created_at differs in default",
        "indexes: events_extra_idx is extra",
        "functions: meowmx.ack(subscription text, worker text, partition integer,"
        " event_position bigint) differs in security_definer, definition",
        "functions: meowmx.stream_version(category text, stream_id text)"
        " differs in body, definition",
        "functions: meowmx.version() differs in acl",
    ]


def test_the_schema_records_every_upgrade(dsn: str) -> None:
    assert recorded(dsn) == [(m.version, m.name) for m in migrations()]


def test_upgrading_step_by_step_keeps_events(extra_db: Callable[[], str], psql: Psql) -> None:
    stepwise = extra_db()
    psql(meowmx.script(upto=1), stepwise, args=PSQL_SCRIPT)
    psql(
        "SELECT meowmx.append_event(category => 'cart', stream_id => '1',"
        " event_type => 'Created', data => '{\"n\": 1}');",
        stepwise,
    )
    for version in ALL_VERSIONS[1:]:
        psql(meowmx.script(after=version - 1, upto=version), stepwise, args=PSQL_SCRIPT)
    assert [v for v, _ in recorded(stepwise)] == ALL_VERSIONS
    done = psql(
        "SELECT version, data FROM meowmx.read_stream(category => 'cart', stream_id => '1');",
        stepwise,
    )
    assert done.stdout == '1|{"n": 1}\n'


# SQL files ------------------------------------------------------------------------------


def test_upgrades_are_numbered_consecutively_from_one() -> None:
    sql_files = [entry.name for entry in UPGRADES_DIR.iterdir() if entry.name.endswith(".sql")]
    assert sql_files, "no upgrades shipped"
    misnamed = [name for name in sql_files if not UPGRADE_NAME.fullmatch(name)]
    assert misnamed == [], "install() would silently skip these"
    assert ALL_VERSIONS == list(range(1, len(ALL_VERSIONS) + 1))
    assert meowmx.latest_version() == ALL_VERSIONS[-1]


SQL_FILES = [(f"upgrades/{m.version:04d}_{m.name}.sql", m.sql) for m in migrations()] + [
    (f"schema/{name}", text) for name, text in schema_files()
]


@pytest.mark.parametrize("text", [pytest.param(text, id=name) for name, text in SQL_FILES])
def test_sql_files_are_plain_sql(text: str) -> None:
    meta_commands = [line for line in text.splitlines() if line.lstrip().startswith("\\")]
    assert meta_commands == [], "psql meta-commands do not run in other tools"
    assert re.search(r"\b(BEGIN|COMMIT)\s*;", text, re.IGNORECASE) is None, (
        "the installer owns the transaction"
    )


# Public functions that no role is granted: they act with the caller's own rights.
OWNER_ONLY = {"create_roles"}


def test_the_schema_defines_each_function_once_with_its_grant() -> None:
    """One current definition per function; a public one says SECURITY DEFINER (but
    horizon_blockers and create_roles, which must run as their caller) and grants
    EXECUTE right after, through meowmx._grant_execute (so a missing role is skipped)."""
    text = "".join(text for _, text in schema_files())
    defined = re.findall(r"^CREATE (?:FUNCTION|PROCEDURE) meowmx\.(\w+)\(", text, re.MULTILINE)
    assert len(defined) == len(set(defined)), "a function is defined twice in sql/schema/"
    assert "CREATE OR REPLACE" not in text and "ALTER FUNCTION" not in text
    # Only the statements around the bodies: a body may well say GRANT.
    statements = re.sub(r"\$\$.*?\$\$", "$$ $$", text, flags=re.DOTALL)
    assert re.search(r"^GRANT ", statements, re.MULTILINE) is None, "use meowmx._grant_execute"
    blocks = re.split(r"^(?=CREATE (?:FUNCTION|PROCEDURE) )", statements, flags=re.MULTILINE)[1:]
    for block in blocks:
        name = re.match(r"CREATE \w+ meowmx\.(\w+)", block)[1]  # type: ignore[index]
        granted = re.search(rf"\nCALL meowmx\._grant_execute\(\s*'meowmx\.{name}\(", block)
        if name.startswith("_"):
            assert not granted, f"private {name} is granted"
            continue
        definer = "SECURITY DEFINER" in block.split("$$")[0].split("RETURN ")[0]
        assert definer == (name not in {"horizon_blockers", *OWNER_ONLY}), name
        assert bool(granted) == (name not in OWNER_ONLY), name


def test_each_upgrade_records_itself(extra_db: Callable[[], str], psql: Psql) -> None:
    """Applied one by one with plain psql, each file adds exactly its own row."""
    target = extra_db()
    for migration in migrations():
        path = UPGRADES_DIR.joinpath(f"{migration.version:04d}_{migration.name}.sql")
        psql("", target, args=["-q", "-1", "-f", str(path)])
        assert recorded(target)[-1] == (migration.version, migration.name)
        assert len(recorded(target)) == migration.version
    assert meowmx.install(target) == []


def test_the_control_file_names_the_latest_version() -> None:
    control = sql_dir().joinpath("meowmx.control").read_text(encoding="utf-8")
    assert f"default_version = '{meowmx.latest_version()}'" in control
