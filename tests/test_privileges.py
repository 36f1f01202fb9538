"""Least privilege and a pinned search_path: what each meowmx role may do, and nothing more.

The four group roles are cluster-wide, so each test makes LOGIN roles of its own
(unique names) that are members of them, connects as those (trust auth), and drops
them afterwards. Look-alike objects planted in schema public and pg_temp, with public
first on the caller's search_path, must never be used by a meowmx function.
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
from support import call_sql, event_count, fingerprint, wait_for_horizon
from test_bad_input import CASES, MORE_VALID, VALID, build_world, resolve

Connection = psycopg.Connection[Any]

KINDS = ("reader", "writer", "worker", "admin")


def roles_of(prefix: str) -> tuple[str, ...]:
    """A database's group roles: <prefix>_reader, _writer, _worker, _admin."""
    return tuple(f"{prefix}_{kind}" for kind in KINDS)


ROLES = roles_of("meowmx")  # the default prefix, which the test database uses

READ = {
    "read_stream",
    "read_events",
    "stream_version",
    "version",
    "list_streams",
    "load_snapshot",
    "end_cursor",
    "horizon_blockers",
    "metrics",
}
WRITE = {"append_event", "append_events", "save_snapshot"}
WORK = {
    "create_subscription",
    "claim_batch",
    "claim_partition",
    "read_partition",
    "ack",
    "ack_through",
    "nack",
    "renew_lease",
    "release",
    "subscription_status",
    "list_parked",
}
ADMIN_ONLY = {
    "delete_stream",
    "drop_subscription",
    "reset_subscription",
    "requeue_parked",
    "adopt_cluster",
}
OWNER_ONLY = {"create_roles"}  # acts with its caller's rights: granted to nobody
PUBLIC_FUNCTIONS = READ | WRITE | WORK | ADMIN_ONLY | OWNER_ONLY

# The README's Security table: the public functions each kind of role may execute.
MAY_EXECUTE_BY_KIND = {
    "reader": READ,
    "writer": READ | WRITE,
    "worker": READ | WORK,
    "admin": READ | WRITE | WORK | ADMIN_ONLY,
}

TABLES = (
    "events",
    "migrations",
    "subscriptions",
    "subscription_partitions",
    "parked_events",
    "snapshots",
    "settings",
    "function_grants",
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
    check_privilege_matrix(connect(), "meowmx")


def check_privilege_matrix(conn: Connection, prefix: str) -> None:
    """EXECUTE exactly as documented, for the roles of `prefix`; private functions,
    tables and sequences for nobody."""
    functions = conn.execute(
        "SELECT p.oid, p.proname FROM pg_proc AS p"
        " WHERE p.pronamespace = 'meowmx'::regnamespace ORDER BY p.proname"
    ).fetchall()
    names = {name for _, name in functions}
    assert PUBLIC_FUNCTIONS <= names
    assert {n for n in names if not n.startswith("_")} == PUBLIC_FUNCTIONS, "undocumented function"

    roles = roles_of(prefix)
    may_execute = dict(zip(roles, MAY_EXECUTE_BY_KIND.values(), strict=True))
    for role in (*roles, "public"):
        executable = {
            name
            for oid, name in functions
            if conn.execute(
                "SELECT has_function_privilege(%s, %s, 'EXECUTE')", [role, oid]
            ).fetchone()[0]  # type: ignore[index]
        }
        assert executable == may_execute.get(role, set()), role
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
        [[*roles, "public"], list(TABLE_PRIVILEGES)],
    ).fetchall()
    assert granted == [], "the roles reach the tables only through the functions"
    sequences = conn.execute(
        "SELECT r.role, c.relname FROM pg_class AS c, unnest(%s::text[]) AS r (role)"
        " WHERE c.relnamespace = 'meowmx'::regnamespace AND c.relkind = 'S'"
        " AND (has_sequence_privilege(r.role, c.oid, 'USAGE')"
        "      OR has_sequence_privilege(r.role, c.oid, 'SELECT')"
        "      OR has_sequence_privilege(r.role, c.oid, 'UPDATE'))",
        [[*roles, "public"]],
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
        assert call_sql(writer, "metrics", "metric, value")[0] == (
            "meowmx_schema_version",
            meowmx.latest_version(),
        )
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
        assert len(call_sql(reader, "metrics")) > 1

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


# Functions run as their owner, with a pinned search_path ---------------------------

SETTINGS_SEARCH_PATH = "search_path=pg_catalog, pg_temp"


def test_public_functions_run_as_their_owner(connect: Callable[..., Connection]) -> None:
    """So roles reach the tables only through them (horizon_blockers reads only
    pg_stat_activity, as the caller)."""
    invoker = connect().execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'meowmx'::regnamespace"
        " AND proname !~ '^_' AND NOT prosecdef ORDER BY 1"
    )
    assert [name for (name,) in invoker] == ["create_roles", "horizon_blockers"]


# Look-alikes planted on the caller's search_path are never used -------------------------

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
    body = _RAISE.format(label="relation")
    conn.execute(
        "CREATE FUNCTION public.planted_relation(relation text) RETURNS boolean"
        f" LANGUAGE plpgsql AS $p${body}$p$"
    )


def plant_relations(conn: Connection, names: list[str], *, temp: bool) -> None:
    """Views named like meowmx's relations (and so types too), in public or pg_temp;
    reading one raises."""
    for name in names:
        conn.execute(
            sql.SQL(
                "CREATE {kind} {name} AS SELECT 1::bigint AS position, 'planted'::text AS name,"
                " 99::bigint AS version WHERE public.planted_relation({label})"
            ).format(
                kind=sql.SQL("TEMP VIEW" if temp else "VIEW"),
                name=sql.Identifier(name) if temp else sql.Identifier("public", name),
                label=sql.Literal(name),
            )
        )


# Each kind of look-alike, called unqualified where it wins over pg_catalog.
PROBES = [
    "SELECT md5('x')",
    "SELECT 'a'::text = 'b'::text",
    "SELECT count(*) FROM (VALUES (1)) AS v (x)",
    "SELECT * FROM unnest(ARRAY[1])",
    "SELECT * FROM events",  # pg_temp, searched first for relations
    "SELECT * FROM public.subscriptions",
]


def outcome(conn: Connection, function: str, args: dict[str, Any]) -> tuple[Any, ...]:
    """("ok",) or (SQLSTATE, DETAIL) of one call, in a transaction that is rolled back."""
    try:
        with conn.transaction(force_rollback=True):
            call_sql(conn, function, **args)
    except psycopg.Error as error:
        return error.sqlstate, error.diag.message_detail
    return ("ok",)


def test_look_alikes_on_the_search_path_are_never_used(
    dsn: str, extra_db: Callable[[], str]
) -> None:
    """Every meowmx function (read from pg_proc, so a new one is covered too) pins its
    search_path or has a SQL-standard body, bound when created. And with look-alike
    functions, operators, aggregates and relations first on the caller's search_path,
    each public function answers its valid call and every catalogued bad call exactly
    as it does without them, for the owner and for a member of meowmx_admin; the
    look-alikes raise ZZ999 if used. Planted before the install too, so the functions
    cannot bind to them when created. The calls are test_bad_input.py's: VALID and
    MORE_VALID (the paths of success) and CASES (the paths of failure)."""
    with psycopg.connect(dsn) as conn:
        relations = [
            row[0]
            for row in conn.execute(
                "SELECT relname FROM pg_class WHERE relnamespace = 'meowmx'::regnamespace"
                " AND relkind IN ('r', 'p', 'v', 'm', 'S', 'c') ORDER BY 1"
            )
        ]
    target = extra_db()
    with psycopg.connect(target, autocommit=True) as conn:
        plant(conn)
        plant_relations(conn, relations, temp=False)
    meowmx.install(target)
    with (
        psycopg.connect(target, autocommit=True) as plain,
        psycopg.connect(target, autocommit=True) as hijacked,
    ):
        ctx = build_world(plain)
        hijacked.execute("SET search_path = public, pg_catalog")
        plant_relations(hijacked, relations, temp=True)
        for probe in PROBES:  # the look-alikes are live for this session
            with pytest.raises(psycopg.Error) as info:
                hijacked.execute(probe)
            assert info.value.sqlstate == "ZZ999", probe

        functions = plain.execute(
            "SELECT p.oid::regprocedure::text, p.proname, l.lanname = 'sql' AND p.prosqlbody"
            " IS NOT NULL, coalesce(p.proconfig, '{}') FROM pg_proc AS p"
            " JOIN pg_language AS l ON l.oid = p.prolang"
            " WHERE p.pronamespace = 'meowmx'::regnamespace ORDER BY 1"
        ).fetchall()
        assert {name for _, name, _, _ in functions} >= PUBLIC_FUNCTIONS
        before = fingerprint(plain)
        wrong = []
        for signature, name, bound_at_creation, config in functions:
            if SETTINGS_SEARCH_PATH not in config and not bound_at_creation:
                wrong.append(f"{signature}: search_path not pinned")
            if name.startswith("_"):
                continue  # private helpers run only inside the public functions
            if name not in VALID:
                wrong.append(f"{signature}: no valid call in test_bad_input.VALID")
                continue
            calls = [
                (VALID[name], "ok"),
                *((args, "ok") for function, args, _ in MORE_VALID if function == name),
                *((case.args, case.sqlstate) for case in CASES if case.function == name),
            ]
            for args, expected in ((resolve(args, ctx), expected) for args, expected in calls):
                # On the default search_path, as the catalogue says (a function bound to a
                # look-alike when created would fail here too, with ZZ999).
                want = outcome(plain, name, args)
                if want[0] != expected:
                    wrong.append(f"{name}({list(args)}): {want}, not {expected}")
                # create_roles acts with its caller's rights: only the owner may call it.
                for role in ("owner",) if name in OWNER_ONLY else ("owner", "meowmx_admin"):
                    hijacked.execute("RESET ROLE" if role == "owner" else f"SET ROLE {role}")
                    got = outcome(hijacked, name, args)
                    if got != want:
                        wrong.append(f"{name}({list(args)}) as {role}: {got}, not {want}")
        assert wrong == []
        assert fingerprint(plain) == before

    # The check has teeth: a function without its pinned search_path does use them.
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER FUNCTION meowmx.stream_version(text, text) RESET search_path")
        conn.execute("SET search_path = public, pg_catalog")
        with pytest.raises(psycopg.Error) as info:
            call_sql(conn, "stream_version", category="cart", stream_id="1")
        assert info.value.sqlstate == "ZZ999"
