"""Least privilege and a pinned search_path: what each meowmx role may do, and nothing more.

The four group roles are cluster-wide, so each test makes LOGIN roles of its own
(unique names) that are members of them, connects as those (trust auth), and drops
them afterwards. Objects planted in schema public, with public first on the caller's
search_path, must change nothing that a meowmx function does.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

import meowmx
from support import call_sql, event_count, wait_for_horizon

Connection = psycopg.Connection[Any]

ROLES = ("meowmx_reader", "meowmx_writer", "meowmx_worker", "meowmx_admin")

READ = {
    "read_stream",
    "read_events",
    "stream_version",
    "version",
    "list_streams",
    "load_snapshot",
    "end_cursor",
    "horizon_blockers",
}
WRITE = {"append_event", "append_events", "save_snapshot"}
WORK = {
    "create_subscription",
    "claim_batch",
    "ack",
    "nack",
    "renew_lease",
    "release",
    "subscription_status",
    "list_parked",
}
ADMIN_ONLY = {"delete_stream", "drop_subscription", "reset_subscription", "requeue_parked"}
PUBLIC_FUNCTIONS = READ | WRITE | WORK | ADMIN_ONLY

# The README's Security table: the public functions each role may execute.
MAY_EXECUTE = {
    "meowmx_reader": READ,
    "meowmx_writer": READ | WRITE,
    "meowmx_worker": READ | WORK,
    "meowmx_admin": PUBLIC_FUNCTIONS,
}

TABLES = (
    "events",
    "migrations",
    "subscriptions",
    "subscription_partitions",
    "parked_events",
    "snapshots",
)
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@pytest.fixture
def login_role(server_dsn: str, dsn: str) -> Iterator[Callable[..., str]]:
    """Factory: a new LOGIN role that is a member of the given meowmx roles; returns a
    DSN of the test database for it. The roles are dropped after the test."""
    created: list[str] = []

    def make(*groups: str) -> str:
        name = f"mx_priv_{secrets.token_hex(5)}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            created.append(name)
            for group in groups:
                admin.execute(
                    sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name))
                )
        return make_conninfo(dsn, user=name)

    yield make
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = ANY(%s)",
            [created],
        )
        for name in created:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def denied(conn: Connection, query: str, params: Any = None) -> None:
    """The statement fails with insufficient_privilege (42501)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(query, params)
    assert info.value.sqlstate == "42501"


def seed(conn: Connection) -> None:
    """A few events in two streams, as the owner."""
    call_sql(conn, "append_event", category="acct", stream_id="1", event_type="Opened", data={})
    call_sql(
        conn,
        "append_events",
        category="acct",
        stream_id="2",
        events=Jsonb([{"type": "Opened", "data": {}}, {"type": "Deposited", "data": {"n": 5}}]),
    )


def test_roles_are_nologin_group_roles(connect: Callable[..., Connection]) -> None:
    conn = connect()
    rows = conn.execute(
        "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls"
        " FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
        [list(ROLES)],
    ).fetchall()
    assert rows == [(name, False, False, False, False, False) for name in sorted(ROLES)]


def test_privilege_matrix_matches_the_readme(connect: Callable[..., Connection]) -> None:
    """EXECUTE exactly as documented; private functions, tables and sequences for nobody."""
    conn = connect()
    functions = conn.execute(
        "SELECT p.oid, p.proname FROM pg_proc AS p"
        " WHERE p.pronamespace = 'meowmx'::regnamespace ORDER BY p.proname"
    ).fetchall()
    names = {name for _, name in functions}
    assert PUBLIC_FUNCTIONS <= names
    assert {n for n in names if not n.startswith("_")} == PUBLIC_FUNCTIONS, "undocumented function"

    for role in (*ROLES, "public"):
        executable = {
            name
            for oid, name in functions
            if conn.execute(
                "SELECT has_function_privilege(%s, %s, 'EXECUTE')", [role, oid]
            ).fetchone()[0]  # type: ignore[index]
        }
        assert executable == MAY_EXECUTE.get(role, set()), role
        usage = conn.execute(
            "SELECT has_schema_privilege(%s, 'meowmx', 'USAGE')", [role]
        ).fetchone()
        assert usage == (role != "public",), role
        create = conn.execute(
            "SELECT has_schema_privilege(%s, 'meowmx', 'CREATE')", [role]
        ).fetchone()
        assert create == (False,), role

    relations = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class AS c"
        " WHERE c.relnamespace = 'meowmx'::regnamespace AND c.relkind IN ('r', 'p', 'S', 'v', 'm')"
    ).fetchall()
    assert {f"meowmx.{t}" for t in TABLES} <= {r[0] for r in relations}
    granted = conn.execute(
        "SELECT r.role, c.relname, p.privilege"
        " FROM pg_class AS c, unnest(%s::text[]) AS r (role), unnest(%s::text[]) AS p (privilege)"
        " WHERE c.relnamespace = 'meowmx'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')"
        " AND has_table_privilege(r.role, c.oid, p.privilege)",
        [[*ROLES, "public"], list(TABLE_PRIVILEGES)],
    ).fetchall()
    assert granted == [], "the roles reach the tables only through the functions"
    sequences = conn.execute(
        "SELECT r.role, c.relname FROM pg_class AS c, unnest(%s::text[]) AS r (role)"
        " WHERE c.relnamespace = 'meowmx'::regnamespace AND c.relkind = 'S'"
        " AND (has_sequence_privilege(r.role, c.oid, 'USAGE')"
        "      OR has_sequence_privilege(r.role, c.oid, 'SELECT')"
        "      OR has_sequence_privilege(r.role, c.oid, 'UPDATE'))",
        [[*ROLES, "public"]],
    ).fetchall()
    assert sequences == []


def test_writer_appends_and_reads_but_cannot_change_the_log(
    connect: Callable[..., Connection], login_role: Callable[..., str]
) -> None:
    owner = connect()
    seed(owner)
    with psycopg.connect(login_role("meowmx_writer"), autocommit=True) as writer:
        one = call_sql(
            writer,
            "append_event",
            "version, position",
            category="acct",
            stream_id="1",
            event_type="Deposited",
            data={"n": 1},
            expected_version=1,
            event_id=uuid.uuid4(),
        )
        assert [row[0] for row in one] == [2]
        many = call_sql(
            writer,
            "append_events",
            "version",
            category="acct",
            stream_id="3",
            events=Jsonb([{"type": "Opened", "data": {}}, {"type": "Closed", "data": {}}]),
            expected_version=0,
        )
        assert many == [(1,), (2,)]
        rows = call_sql(writer, "read_stream", "version", category="acct", stream_id="1")
        assert rows == [(1,), (2,)]
        assert call_sql(writer, "stream_version", category="acct", stream_id="3") == [(2,)]
        wait_for_horizon(owner)
        assert len(call_sql(writer, "read_events", categories=["acct"])) == 6
        call_sql(writer, "save_snapshot", category="acct", stream_id="3", version=2, state={"s": 1})
        assert call_sql(writer, "load_snapshot", "version", category="acct", stream_id="3") == [
            (2,)
        ]
        assert call_sql(writer, "list_streams", "stream_id", category="acct") == [
            ("1",),
            ("2",),
            ("3",),
        ]
        call_sql(writer, "horizon_blockers")
        assert call_sql(writer, "version") == [(meowmx.latest_version(),)]

        before = event_count(owner)
        denied(writer, "UPDATE meowmx.events SET data = '{}'")
        denied(writer, "DELETE FROM meowmx.events")
        denied(
            writer,
            "INSERT INTO meowmx.events (category, stream_id, version, event_type, data)"
            " VALUES ('acct', '1', 3, 'Forged', '{}')",
        )
        denied(writer, "TRUNCATE meowmx.events")
        denied(writer, "SELECT * FROM meowmx.events")
        denied(writer, "SELECT * FROM meowmx.snapshots")
        denied(writer, "SELECT meowmx.delete_stream(category => 'acct', stream_id => '1')")
        denied(writer, "SELECT meowmx.create_subscription(name => 'x')")
        # The private helpers are not a way around the checks.
        denied(
            writer,
            "SELECT * FROM meowmx._append('acct', '1', NULL, '{Forged}', ARRAY['{}'::jsonb],"
            " ARRAY[NULL::jsonb], ARRAY[NULL::uuid])",
        )
        denied(writer, "ALTER TABLE meowmx.events DISABLE TRIGGER ALL")
        denied(writer, "DROP TABLE meowmx.events")
        assert event_count(owner) == before


def test_reader_reads_but_cannot_append(
    connect: Callable[..., Connection], login_role: Callable[..., str]
) -> None:
    owner = connect()
    seed(owner)
    wait_for_horizon(owner)
    with psycopg.connect(login_role("meowmx_reader"), autocommit=True) as reader:
        assert len(call_sql(reader, "read_stream", category="acct", stream_id="2")) == 2
        assert len(call_sql(reader, "read_events")) == 3
        assert call_sql(reader, "stream_version", category="acct", stream_id="2") == [(2,)]
        assert len(call_sql(reader, "list_streams", category="acct")) == 2
        assert call_sql(reader, "load_snapshot", category="acct", stream_id="2") == []
        call_sql(reader, "horizon_blockers")

        denied(
            reader,
            "SELECT meowmx.append_event(category => 'acct', stream_id => '1',"
            " event_type => 'Deposited', data => '{}')",
        )
        denied(
            reader,
            "SELECT meowmx.append_events(category => 'acct', stream_id => '1',"
            ' events => \'[{"type": "A", "data": {}}]\')',
        )
        denied(
            reader,
            "SELECT meowmx.save_snapshot(category => 'acct', stream_id => '2', version => 1,"
            " state => '{}')",
        )
        denied(reader, "SELECT meowmx.create_subscription(name => 'x')")
        denied(reader, "SELECT * FROM meowmx.events")
    assert event_count(owner) == 3


def test_worker_runs_subscriptions_but_cannot_manage_them(
    connect: Callable[..., Connection], login_role: Callable[..., str]
) -> None:
    owner = connect()
    seed(owner)
    wait_for_horizon(owner)
    with psycopg.connect(login_role("meowmx_worker"), autocommit=True) as worker:
        created = call_sql(worker, "create_subscription", name="jobs", max_attempts=2)
        assert created == [(True,)]
        batch = call_sql(
            worker,
            "claim_batch",
            "partition, position",
            subscription="jobs",
            worker="w",
            max_count=2,
        )
        assert [row[1] for row in batch] == [1, 2]
        call_sql(worker, "ack", subscription="jobs", worker="w", partition=0, event_position=1)
        parked = call_sql(
            worker,
            "nack",
            subscription="jobs",
            worker="w",
            partition=0,
            event_position=2,
            error="boom",
        )
        assert parked == [(False,)]
        again = call_sql(worker, "claim_batch", "position", subscription="jobs", worker="w")
        assert [row[0] for row in again] == [2, 3]
        parked = call_sql(
            worker,
            "nack",
            subscription="jobs",
            worker="w",
            partition=0,
            event_position=2,
            error="boom",
        )
        assert parked == [(True,)]
        assert [row[1] for row in call_sql(worker, "list_parked", subscription="jobs")] == [2]
        status = call_sql(worker, "subscription_status", "lease_owner, parked", name="jobs")
        assert status == [("w", 1)]
        assert call_sql(worker, "release", subscription="jobs", worker="w") == [(1,)]
        assert len(call_sql(worker, "read_stream", category="acct", stream_id="2")) == 2

        state = owner.execute(
            "SELECT p::text FROM meowmx.subscription_partitions AS p ORDER BY partition"
        ).fetchall()
        denied(worker, "SELECT meowmx.delete_stream(category => 'acct', stream_id => '1')")
        denied(worker, "SELECT meowmx.drop_subscription(name => 'jobs')")
        denied(worker, "SELECT meowmx.reset_subscription(name => 'jobs')")
        denied(worker, "SELECT meowmx.requeue_parked(subscription => 'jobs', event_position => 2)")
        denied(
            worker,
            "SELECT meowmx.append_event(category => 'acct', stream_id => '1',"
            " event_type => 'A', data => '{}')",
        )
        for table in ("subscription_partitions", "subscriptions", "parked_events"):
            denied(worker, f"SELECT * FROM meowmx.{table}")
            denied(worker, f"DELETE FROM meowmx.{table}")
            denied(worker, f"TRUNCATE meowmx.{table}")
        denied(worker, "UPDATE meowmx.subscription_partitions SET lease_owner = 'me'")
        denied(
            worker,
            "INSERT INTO meowmx.subscription_partitions (subscription, partition,"
            " checkpoint_xid, checkpoint_position) VALUES ('jobs', 1, '0', 0)",
        )
        assert (
            owner.execute(
                "SELECT p::text FROM meowmx.subscription_partitions AS p ORDER BY partition"
            ).fetchall()
            == state
        )
    assert owner.execute("SELECT count(*) FROM meowmx.parked_events").fetchone() == (1,)


def test_admin_deletes_streams_and_manages_subscriptions(
    connect: Callable[..., Connection], login_role: Callable[..., str]
) -> None:
    owner = connect()
    seed(owner)
    wait_for_horizon(owner)
    with psycopg.connect(login_role("meowmx_admin"), autocommit=True) as admin:
        call_sql(admin, "append_event", category="acct", stream_id="9", event_type="A", data={})
        call_sql(admin, "create_subscription", name="ops", max_attempts=1)
        wait_for_horizon(owner)
        batch = call_sql(admin, "claim_batch", "position", subscription="ops", worker="a")
        assert [row[0] for row in batch] == [1, 2, 3, 4]
        parked = call_sql(
            admin, "nack", subscription="ops", worker="a", partition=0, event_position=1, error="x"
        )
        assert parked == [(True,)]
        assert call_sql(admin, "requeue_parked", subscription="ops", event_position=1) == [(1,)]
        call_sql(admin, "reset_subscription", name="ops", start_at="end")
        assert call_sql(admin, "delete_stream", category="acct", stream_id="2") == [(2,)]
        assert call_sql(admin, "stream_version", category="acct", stream_id="2") == [(0,)]
        assert call_sql(admin, "drop_subscription", name="ops") == [(True,)]
        # Even the admin changes the log only through the functions.
        denied(admin, "UPDATE meowmx.events SET data = '{}'")
        denied(admin, "DELETE FROM meowmx.events")
    assert event_count(owner) == 2


def _call_with_nulls(conn: Connection, oid: int) -> str:
    """``SELECT * FROM meowmx.f(NULL::t1, ...)`` for the function ``oid``."""
    name, types = conn.execute(
        "SELECT p.proname, coalesce(array_agg(format_type(t.oid, NULL) ORDER BY a.ord)"
        " FILTER (WHERE t.oid IS NOT NULL), '{}')"
        " FROM pg_proc AS p"
        " LEFT JOIN unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a (type, ord) ON true"
        " LEFT JOIN pg_type AS t ON t.oid = a.type"
        " WHERE p.oid = %s GROUP BY p.proname",
        [oid],
    ).fetchone()  # type: ignore[misc]
    args = ", ".join(f"NULL::{t}" for t in types)
    return f"SELECT * FROM meowmx.{name}({args})"


def test_public_gets_nothing(
    connect: Callable[..., Connection], login_role: Callable[..., str]
) -> None:
    """A role in no meowmx role cannot use the schema, call any function or see a table."""
    owner = connect()
    seed(owner)
    functions = owner.execute(
        "SELECT oid FROM pg_proc WHERE pronamespace = 'meowmx'::regnamespace"
    ).fetchall()
    calls = [_call_with_nulls(owner, oid) for (oid,) in functions]
    with psycopg.connect(login_role(), autocommit=True) as nobody:
        assert nobody.execute("SELECT has_schema_privilege('meowmx', 'USAGE')").fetchone() == (
            False,
        )
        for call in calls:
            denied(nobody, call)
        for table in TABLES:
            denied(nobody, f"SELECT * FROM meowmx.{table}")
        denied(nobody, "CREATE TABLE meowmx.mine (x int)")
        denied(
            nobody,
            "SELECT * FROM meowmx.append_event(category => 'acct', stream_id => '1',"
            " event_type => 'A', data => '{}')",
        )
    assert event_count(owner) == 3


def test_install_is_idempotent_with_the_roles_existing(
    dsn: str,
    extra_db: Callable[[], str],
    server_dsn: str,
    login_role: Callable[..., str],
    psql: Any,
) -> None:
    """The roles are cluster-wide: installing into more databases reuses them."""

    def roles() -> list[tuple[Any, ...]]:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            return conn.execute(
                "SELECT oid, rolname FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
                [list(ROLES)],
            ).fetchall()

    existing = roles()
    assert len(existing) == 4
    assert meowmx.install(dsn) == []

    second = extra_db()
    assert meowmx.install(second) == list(range(1, meowmx.latest_version() + 1))
    assert meowmx.install(second) == []
    third = extra_db()
    psql(meowmx.script(), third, args=["-1", "-f", "-"])
    assert meowmx.install(third) == []
    assert roles() == existing, "the roles were reused, not recreated"

    # The grants of the second database work for a member of the roles.
    writer_dsn = make_conninfo(login_role("meowmx_writer"), dbname=dbname_of(second))
    with psycopg.connect(writer_dsn, autocommit=True) as writer:
        rows = call_sql(
            writer, "append_event", "version", category="c", stream_id="1", event_type="A", data={}
        )
        assert rows == [(1,)]
        denied(writer, "SELECT meowmx.delete_stream(category => 'c', stream_id => '1')")


def dbname_of(conninfo: str) -> str:
    dbname = conninfo_to_dict(conninfo)["dbname"]
    assert isinstance(dbname, str)
    return dbname


def test_install_by_a_database_owner_without_superuser(
    extra_db: Callable[[], str], server_dsn: str, login_role: Callable[..., str]
) -> None:
    """With the roles present, an ordinary role with CREATE on the database installs
    meowmx (managed hosts), and the functions then run as that owner."""
    target = extra_db()
    dbname = dbname_of(target)
    owner_dsn = make_conninfo(login_role(), dbname=dbname)
    owner_name = conninfo_to_dict(owner_dsn)["user"]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(dbname), sql.Identifier(str(owner_name))
            )
        )
    assert meowmx.install(owner_dsn) == list(range(1, meowmx.latest_version() + 1))
    writer_dsn = make_conninfo(login_role("meowmx_writer"), dbname=dbname)
    with psycopg.connect(writer_dsn, autocommit=True) as writer:
        call_sql(writer, "append_event", category="c", stream_id="1", event_type="A", data={})
        assert call_sql(writer, "stream_version", category="c", stream_id="1") == [(1,)]
        denied(writer, "SELECT * FROM meowmx.events")
    with psycopg.connect(owner_dsn, autocommit=True) as owner:
        assert owner.execute("SELECT count(*) FROM meowmx.events").fetchone() == (1,)
        # Drop what it owns here, so the role can be dropped after the test.
        owner.execute("DROP SCHEMA meowmx CASCADE")


# Functions and operators -----------------------------------------------------------

SETTINGS_SEARCH_PATH = "search_path=pg_catalog, pg_temp"


def test_every_function_pins_search_path_or_binds_at_creation(
    connect: Callable[..., Connection],
) -> None:
    conn = connect()
    rows = conn.execute(
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.proconfig,"
        " l.lanname, p.prosqlbody IS NOT NULL, p.prosecdef"
        " FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang"
        " WHERE p.pronamespace = 'meowmx'::regnamespace ORDER BY 1, 2"
    ).fetchall()
    assert len(rows) >= len(PUBLIC_FUNCTIONS)
    unpinned = [
        (name, args)
        for name, args, config, language, standard_body, _ in rows
        if SETTINGS_SEARCH_PATH not in (config or []) and not (language == "sql" and standard_body)
    ]
    assert unpinned == [], "functions without a pinned search_path"
    invoker = sorted(
        name for name, _, _, _, _, definer in rows if not name.startswith("_") and not definer
    )
    assert invoker == ["horizon_blockers"], "public functions run as their owner"


# Objects planted in schema public must change nothing ------------------------------------

_RAISE = "BEGIN RAISE EXCEPTION 'planted object % called', {label} USING ERRCODE = 'ZZ999'; END"

PLANTED_FUNCTIONS = [
    # name, arguments, result
    ("md5", "text", "text"),
    ("hashtextextended", "text, bigint", "bigint"),
    ("pg_advisory_xact_lock", "bigint", "void"),
    ("pg_try_advisory_xact_lock", "bigint", "boolean"),
    ("pg_notify", "text, text", "void"),
    ("length", "text", "integer"),
    ("left", "text, integer", "text"),
    ("jsonb_typeof", "jsonb", "text"),
    ("jsonb_array_length", "jsonb", "integer"),
    ("quote_literal", "text", "text"),
    ("now", "", "timestamptz"),
    ("clock_timestamp", "", "timestamptz"),
    ("random", "", "double precision"),
    ("pg_current_xact_id", "", "xid8"),
    ("pg_current_xact_id_if_assigned", "", "xid8"),
    ("pg_current_snapshot", "", "pg_snapshot"),
    ("pg_snapshot_xmin", "pg_snapshot", "xid8"),
    ("pg_snapshot_xmax", "pg_snapshot", "xid8"),
    ("current_setting", "text, boolean", "text"),
    ("regexp_match", "text, text", "text[]"),
    ("cardinality", "anyarray", "integer"),
    ("array_position", "anycompatiblearray, anycompatible", "integer"),
    ("pg_backend_pid", "", "integer"),
    ("array_remove", "anycompatiblearray, anycompatible", "anycompatiblearray"),
]

PLANTED_SET_FUNCTIONS = [
    ("generate_series", "integer, integer", "integer"),
    ("jsonb_array_elements", "jsonb", "jsonb"),
    ("jsonb_object_keys", "jsonb", "text"),
    ("unnest", "anyarray", "anyelement"),
]

# Aggregates: name, argument, state type (the state function raises).
PLANTED_AGGREGATES = [
    ("count", "*", "bigint"),
    ("max", "bigint", "bigint"),
    ("min", "text", "text"),
]

# Operators on the types meowmx compares and combines.
PLANTED_OPERATORS = [
    *((op, "text", "text") for op in ("=", "<>", "<", ">", "<=", ">=", "||")),
    *((op, "bigint", "bigint") for op in ("=", "<>", "<", ">", "<=", ">=", "+", "-")),
    *((op, "integer", "integer") for op in ("=", "<>", "<", ">", "<=", ">=", "+", "-", "*", "%")),
    *((op, "xid8", "xid8") for op in ("=", "<>", "<", ">", "<=", ">=")),
    *((op, "bigint", "integer") for op in ("=", "<", ">", "+", "-")),
    ("->", "jsonb", "text"),
    ("->>", "jsonb", "text"),
    ("=", "jsonb", "jsonb"),
    ("<>", "jsonb", "jsonb"),
    ("!~*", "text", "text"),
    ("=", "uuid", "uuid"),
    ("+", "timestamptz", "interval"),
    ("<", "timestamptz", "timestamptz"),
    ("<=", "timestamptz", "timestamptz"),
    ("<", "interval", "interval"),
    ("<=", "interval", "interval"),
    (">", "interval", "interval"),
]

PLANTED_TABLES = (
    "events",
    "subscriptions",
    "subscription_partitions",
    "parked_events",
    "snapshots",
    "migrations",
)


def plant(conn: Connection) -> None:
    """As a superuser, plant look-alikes of what meowmx uses in schema public."""
    for index, (name, args, result) in enumerate(PLANTED_FUNCTIONS):
        body = _RAISE.format(label=f"'{name}'")
        conn.execute(
            f"CREATE FUNCTION public.{name}({args}) RETURNS {result}"
            f" LANGUAGE plpgsql AS $p{index}${body}$p{index}$"
        )
    for name, args, result in PLANTED_SET_FUNCTIONS:
        body = _RAISE.format(label=f"'{name}'")
        conn.execute(
            f"CREATE FUNCTION public.{name}({args}) RETURNS SETOF {result}"
            f" LANGUAGE plpgsql AS $p${body}$p$"
        )
    for index, (op, left, right) in enumerate(PLANTED_OPERATORS):
        function = f"public.planted_op_{index}"
        body = _RAISE.format(label=f"'operator {op} ({left}, {right})'")
        conn.execute(
            f"CREATE FUNCTION {function}({left}, {right}) RETURNS boolean"
            f" LANGUAGE plpgsql AS $p${body}$p$"
        )
        conn.execute(
            f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right},"
            f" FUNCTION = {function})"
        )
    for index, (name, arg, stype) in enumerate(PLANTED_AGGREGATES):
        step = f"public.planted_step_{index}"
        step_args = stype if arg == "*" else f"{stype}, {arg}"
        body = _RAISE.format(label=f"'aggregate {name}'")
        conn.execute(
            f"CREATE FUNCTION {step}({step_args}) RETURNS {stype} LANGUAGE plpgsql AS $p${body}$p$"
        )
        conn.execute(f"CREATE AGGREGATE public.{name}({arg}) (SFUNC = {step}, STYPE = {stype})")
    for table in PLANTED_TABLES:
        conn.execute(f"CREATE TABLE public.{table} (position bigint, name text, version bigint)")
        conn.execute(f"INSERT INTO public.{table} VALUES (1, 'planted', 99)")


def _sqlstate_of(conn: Connection, query: str, params: dict[str, Any]) -> tuple[str | None, str]:
    try:
        conn.execute(query, params)
    except psycopg.Error as error:
        return error.sqlstate, error.diag.message_detail or ""
    return None, ""


def scenario(conn: Connection, observer: Connection) -> list[Any]:
    """Append, read, subscribe, claim, ack, nack, park, requeue, delete: everything that
    comes back, without the values that differ between databases (transaction ids,
    times, and the cursors that contain transaction ids). ``observer`` (a connection
    with the default search_path) waits for the read horizon."""
    out: list[Any] = []
    ids = [uuid.UUID(int=n) for n in range(1, 10)]

    def call(function: str, columns: str = "*", **named: Any) -> list[Any]:
        rows = call_sql(conn, function, columns, **named)
        out.append((function, rows))
        return rows

    event_columns = "position, category, stream_id, version, event_type, data, metadata, event_id"
    call(
        "append_event",
        category="acct",
        stream_id="1",
        event_type="Opened",
        data={"owner": "tom"},
        expected_version=0,
        metadata={"by": "test"},
        event_id=ids[0],
    )
    call(
        "append_events",
        category="acct",
        stream_id="1",
        expected_version=1,
        events=Jsonb(
            [
                {"type": "Deposited", "data": {"n": 1}, "id": str(ids[1])},
                {"type": "Deposited", "data": {"n": 2}, "metadata": {"m": 1}, "id": str(ids[2])},
            ]
        ),
    )
    for stream in ("2", "3", "4", "5", "6"):
        call("append_event", category="acct", stream_id=stream, event_type="Opened", data={})
    call("append_event", category="acct", stream_id="3", event_type="Poison", data={})
    call("append_event", category="other", stream_id="1", event_type="Opened", data={})
    # An idempotent retry returns the first result.
    call(
        "append_event",
        category="acct",
        stream_id="1",
        event_type="Opened",
        data={},
        event_id=ids[0],
    )
    out.append(
        _sqlstate_of(
            conn,
            "SELECT meowmx.append_event(category => 'acct', stream_id => '1',"
            " event_type => 'X', data => '{}', expected_version => %(v)s)",
            {"v": 7},
        )
    )
    out.append(
        _sqlstate_of(
            conn,
            "SELECT meowmx.append_events(category => 'acct', stream_id => '1', events => %(e)s)",
            {"e": Jsonb([{"type": "A", "data": {}}, {"type": "", "data": {}}])},
        )
    )
    out.append(
        _sqlstate_of(
            conn,
            "SELECT meowmx.append_event(category => %(c)s, stream_id => '1',"
            " event_type => 'X', data => '{}')",
            {"c": "x" * 300},
        )
    )
    out.append(_sqlstate_of(conn, "SELECT * FROM meowmx.read_events(after => %(a)s)", {"a": "1:"}))
    out.append(
        _sqlstate_of(
            conn,
            "SELECT meowmx.append_event(category => 'other', stream_id => '2',"
            " event_type => 'X', data => '{}', event_id => %(id)s)",
            {"id": ids[1]},
        )
    )
    call("stream_version", category="acct", stream_id="1")
    call("read_stream", event_columns, category="acct", stream_id="1")
    call(
        "read_stream", event_columns, category="acct", stream_id="1", from_version=2, backwards=True
    )
    wait_for_horizon(observer)
    call("read_events", event_columns)
    call("read_events", event_columns, categories=["acct"], event_types=["Opened"], max_count=3)
    call("read_events", event_columns, event_types=["Deposited"])
    call("list_streams", category="acct", after="2", max_count=3)
    call("save_snapshot", category="acct", stream_id="1", version=2, state={"balance": 1})
    call("load_snapshot", "version, state", category="acct", stream_id="1")
    call("load_snapshot", "version, state", category="acct", stream_id="1", max_version=1)

    call("create_subscription", name="sub", categories=["acct"], partitions=4, max_attempts=2)
    call("create_subscription", name="sub", categories=["acct"], partitions=4, max_attempts=2)
    out.append(
        _sqlstate_of(
            conn,
            "SELECT meowmx.create_subscription(name => 'sub', partitions => %(p)s)",
            {"p": 3},
        )
    )
    delivered: dict[int, list[int]] = {}
    for _ in range(100):
        batch = call_sql(
            conn, "claim_batch", "partition, position, event_type", subscription="sub", worker="w",
            max_count=2,
        )  # fmt: skip
        if not batch:
            break
        for partition, position, _ in batch:
            delivered.setdefault(partition, []).append(position)
        poison = [row for row in batch if row[2] == "Poison"]
        if poison:
            partition, position, _ = poison[0]
            call_sql(
                conn, "nack", subscription="sub", worker="w", partition=partition,
                event_position=position, error="poison",
            )  # fmt: skip
        else:
            partition, position, _ = batch[-1]
            call_sql(
                conn, "ack", subscription="sub", worker="w", partition=partition,
                event_position=position,
            )  # fmt: skip
    out.append(sorted(delivered.items()))
    status = call_sql(
        conn,
        "subscription_status",
        "partition, split_part(checkpoint, ':', 2), events_behind, lease_owner, attempts,"
        " last_error, parked",
        name="sub",
    )
    out.append(status)
    parked = call("list_parked", "partition, position, category, stream_id, version, event_type,"
                  " attempts, error", subscription="sub")  # fmt: skip
    assert len(parked) == 1
    call("requeue_parked", subscription="sub", event_position=parked[0][1])
    out.append(
        _sqlstate_of(
            conn, "SELECT meowmx.requeue_parked(subscription => 'sub', event_position => 1)", {}
        )
    )
    again = call_sql(conn, "claim_batch", "partition, position", subscription="sub", worker="w")
    out.append(again)
    call("release", subscription="sub", worker="w")
    call("reset_subscription", name="sub", start_at="beginning")
    call("subscription_status", "partition, checkpoint, events_behind, lease_owner", name="sub")
    call("delete_stream", category="acct", stream_id="1", before_version=2)
    call("read_stream", "version, event_type", category="acct", stream_id="1")
    call("delete_stream", category="acct", stream_id="2")
    call("list_streams", category="acct")
    call("drop_subscription", name="sub")
    call("drop_subscription", name="sub")
    call_sql(conn, "horizon_blockers")  # rows depend on other sessions; it must just run
    call("version")
    return out


def test_planted_objects_change_nothing(extra_db: Callable[[], str], psql: Any) -> None:
    """The same calls give the same results with and without look-alike functions,
    operators and tables in schema public, first on the caller's search_path; none of
    the planted objects is ever called (each would raise ZZ999). Planted before the
    install too, so the functions cannot bind to them when created."""
    clean_dsn, planted_dsn = extra_db(), extra_db()
    meowmx.install(clean_dsn)
    with (
        psycopg.connect(clean_dsn, autocommit=True) as conn,
        psycopg.connect(clean_dsn, autocommit=True) as observer,
    ):
        conn.execute("SET search_path = public, pg_catalog")
        expected = scenario(conn, observer)

    with psycopg.connect(planted_dsn, autocommit=True) as conn:
        plant(conn)
    meowmx.install(planted_dsn)
    with (
        psycopg.connect(planted_dsn, autocommit=True) as conn,
        psycopg.connect(planted_dsn, autocommit=True) as observer,
    ):
        conn.execute("SET search_path = public, pg_catalog")
        conn.execute("CREATE TEMP TABLE events (position bigint)")
        conn.execute("CREATE TEMP TABLE subscription_partitions (partition integer)")
        # The planted objects are live for this session: unqualified names hit them.
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT md5('x')")
        assert info.value.sqlstate == "ZZ999"
        for probe in (
            "SELECT 'a'::text = 'b'::text",
            "SELECT count(*) FROM (VALUES (1)) AS v (x)",
            "SELECT * FROM unnest(ARRAY[1])",
        ):
            with pytest.raises(psycopg.Error) as info:
                conn.execute(probe)
            assert info.value.sqlstate == "ZZ999", probe
        got = scenario(conn, observer)
    assert got == expected

    # And for a member of the roles, whose calls run as the owner.
    with psycopg.connect(planted_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = public, pg_catalog")
        conn.execute("SET ROLE meowmx_admin")
        rows = call_sql(
            conn, "append_event", "version", category="acct", stream_id="7", event_type="A",
            data={},
        )  # fmt: skip
        assert rows == [(1,)]
        assert call_sql(conn, "stream_version", category="acct", stream_id="7") == [(1,)]
        conn.execute("RESET ROLE")
    # psql, where people call the functions by hand.
    done = psql(
        "SET search_path = public, pg_catalog;\n"
        "SELECT version FROM meowmx.append_event(category => 'acct', stream_id => '7',"
        " event_type => 'B', data => '{}', expected_version => 1);\n",
        planted_dsn,
    )
    assert done.stdout.strip().splitlines()[-1] == "2"

    # The check has teeth: a helper without its pinned search_path does hit them.
    with psycopg.connect(planted_dsn, autocommit=True) as conn:
        conn.execute("ALTER FUNCTION meowmx.stream_version(text, text) RESET search_path")
    with psycopg.connect(planted_dsn, autocommit=True) as conn:
        conn.execute("SET search_path = public, pg_catalog")
        with pytest.raises(psycopg.Error) as info:
            call_sql(conn, "stream_version", category="acct", stream_id="7")
        assert info.value.sqlstate == "ZZ999"
