"""A campaign of malformed calls across every public function, beyond the core appends and
reads of test_bad_input.py: each gets its own SQLSTATE (class MX, with DETAIL and HINT)
and writes nothing. Then thousands of random calls, which either succeed or fail cleanly.

PostgreSQL-level errors are accepted only where PostgreSQL rejects the input before any
meowmx function runs, while it turns the arguments into their types:

- ``22P02`` invalid_text_representation: a literal that does not parse as the parameter's
  type (``'not-a-uuid'::uuid``, ``max_count => 'abc'``, ``events => 'not json'``);
- ``22P05`` untranslatable_character: ``\\u0000`` in JSON (jsonb cannot store it);
- ``22003`` numeric_value_out_of_range and ``22007`` invalid_datetime_format: literals
  out of their type's range or format;
- ``42883`` undefined_function: an argument of a type with no implicit cast to the
  parameter's (``partitions => 1.5``);
- and no SQLSTATE at all from psycopg itself for a NUL character in text (psycopg refuses
  to send it: PostgreSQL text cannot hold NUL).

The psql cases show these. The random calls send typed values in range (Python ints
within the parameter's integer type, timedeltas for intervals), so of these only the
NUL cases (psycopg's refusal, and ``22P05``) can occur there; anything else must be a
meowmx SQLSTATE, never ``XX000`` or another internal error.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

import meowmx
from support import call_sql, wait_for_horizon

Connection = psycopg.Connection[Any]

LONG = "x" * 256  # one past the 255-character limit
HUGE = "y" * (1024 * 1024)  # 1 MB


# The world the catalogue runs against: built once, never changed by a bad call --------------


@dataclass
class World:
    conn: Connection
    ctx: dict[str, int]
    dsn: str


class Ref(str):
    """A value of the world, known only once it is built (a claimed partition, ...)."""


STATE_QUERIES = {
    "events": "SELECT count(*), coalesce(max(position), 0) FROM meowmx.events",
    "versions": "SELECT category, stream_id, max(version) FROM meowmx.events GROUP BY 1, 2"
    " ORDER BY 1, 2",
    "subscriptions": "SELECT s::text FROM meowmx.subscriptions AS s ORDER BY name",
    "partitions": "SELECT p::text FROM meowmx.subscription_partitions AS p"
    " ORDER BY subscription, partition",
    "parked": "SELECT d::text FROM meowmx.parked_events AS d ORDER BY subscription, position",
    "snapshots": "SELECT s::text FROM meowmx.snapshots AS s ORDER BY category, stream_id, version",
}


def state(conn: Connection) -> dict[str, list[Any]]:
    """Everything a call could write: counts, stream versions, subscription state."""
    return {name: conn.execute(query).fetchall() for name, query in STATE_QUERIES.items()}


def build_world(conn: Connection) -> dict[str, int]:
    """Streams, a snapshot, subscription 'sub' (2 partitions) with a batch claimed by 'w',
    and subscription 'dead' with a parked event."""
    for stream, count in (("1", 3), ("2", 2), ("3", 2), ("4", 1)):
        call_sql(
            conn,
            "append_events",
            category="cart",
            stream_id=stream,
            events=Jsonb([{"type": "Added", "data": {"n": n}} for n in range(count)]),
        )
    call_sql(conn, "append_event", category="other", stream_id="x", event_type="Noise", data={})
    call_sql(conn, "save_snapshot", category="cart", stream_id="1", version=2, state={"n": 2})
    call_sql(conn, "create_subscription", name="sub", categories=["cart"], partitions=2)
    call_sql(conn, "create_subscription", name="dead", max_attempts=1)
    wait_for_horizon(conn)
    ((partition, position),) = call_sql(
        conn, "claim_batch", "partition, position", subscription="sub", worker="w", max_count=1
    )
    last = conn.execute("SELECT max(position) FROM meowmx.events").fetchone()[0]  # type: ignore[index]
    dead = call_sql(conn, "claim_batch", "position", subscription="dead", worker="d", max_count=1)
    parked = call_sql(
        conn, "nack", subscription="dead", worker="d", partition=0, event_position=dead[0][0],
        error="boom",
    )  # fmt: skip
    assert parked == [(True,)]
    assert last != position
    return {
        "partition": partition,
        "other_partition": 1 - partition,
        "position": position,
        "outside": last,
        "parked": dead[0][0],
    }


@pytest.fixture(scope="module")
def world(server_dsn: str) -> Iterator[World]:
    """A database of this module's own, built once (the cases only read it)."""
    name = f"meowmx_test_campaign_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        target = make_conninfo(server_dsn, dbname=name)
        meowmx.install(target)
        with psycopg.connect(target, autocommit=True) as conn:
            yield World(conn, build_world(conn), target)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# The catalogue ---------------------------------------------------------------------------

VALID: dict[str, dict[str, Any]] = {
    "create_subscription": {"name": "new", "categories": ["cart"], "partitions": 2},
    "claim_batch": {"subscription": "sub", "worker": "w2"},
    "ack": {
        "subscription": "sub",
        "worker": "w",
        "partition": Ref("partition"),
        "event_position": Ref("position"),
    },
    "nack": {
        "subscription": "sub",
        "worker": "w",
        "partition": Ref("partition"),
        "event_position": Ref("position"),
        "error": "failed",
        "retry_after": timedelta(seconds=1),
    },
    "release": {"subscription": "sub", "worker": "w"},
    "reset_subscription": {"name": "sub", "start_at": "beginning"},
    "requeue_parked": {"subscription": "dead", "event_position": Ref("parked")},
    "list_parked": {"subscription": "dead"},
    "subscription_status": {"name": "sub"},
    "save_snapshot": {"category": "cart", "stream_id": "1", "version": 3, "state": {"n": 3}},
    "load_snapshot": {"category": "cart", "stream_id": "1"},
    "list_streams": {"category": "cart"},
    "delete_stream": {"category": "cart", "stream_id": "1", "before_version": 2},
    "append_event": {"category": "cart", "stream_id": "9", "event_type": "Added", "data": {}},
    "append_events": {
        "category": "cart",
        "stream_id": "9",
        "events": Jsonb([{"type": "Added", "data": {}}]),
    },
    "read_events": {},
}


def bad(function: str, sqlstate: str, label: str, /, *marks: Any, **overrides: Any) -> Any:
    """A call of ``function`` with valid arguments except ``overrides``."""
    return pytest.param(
        function,
        {**VALID[function], **overrides},
        sqlstate,
        id=f"{function}:{label}",
        marks=list(marks),
    )


UPPER = "AAAAAAAA-AAAA-4AAA-8AAA-AAAAAAAAAAAA"

CASES = [
    # create_subscription: checked in order name, filters, partitions, max_attempts, start_at
    bad("create_subscription", "MX024", "name-null", name=None),
    bad("create_subscription", "MX024", "name-empty", name=""),
    bad("create_subscription", "MX024", "name-256", name=LONG),
    bad("create_subscription", "MX024", "name-1MB", name=HUGE),
    bad("create_subscription", "MX024", "partitions-0", partitions=0),
    bad("create_subscription", "MX024", "partitions-1025", partitions=1025),
    bad("create_subscription", "MX024", "partitions-null", partitions=None),
    bad("create_subscription", "MX024", "partitions-negative", partitions=-3),
    bad("create_subscription", "MX024", "max_attempts-0", max_attempts=0),
    bad("create_subscription", "MX024", "max_attempts-1001", max_attempts=1001),
    bad("create_subscription", "MX024", "max_attempts-null", max_attempts=None),
    bad("create_subscription", "MX015", "start_at-middle", start_at="middle"),
    bad("create_subscription", "MX015", "start_at-empty", start_at=""),
    bad("create_subscription", "MX015", "start_at-null", start_at=None),
    bad("create_subscription", "MX015", "start_at-half-cursor", start_at="12:"),
    bad("create_subscription", "MX015", "start_at-Beginning", start_at="Beginning"),
    bad("create_subscription", "MX018", "categories-empty", categories=[]),
    bad("create_subscription", "MX018", "categories-null-element", categories=["cart", None]),
    bad("create_subscription", "MX018", "categories-empty-name", categories=[""]),
    bad("create_subscription", "MX018", "event_types-empty", event_types=[]),
    bad("create_subscription", "MX018", "event_types-empty-name", event_types=["Added", ""]),
    bad(
        "create_subscription",
        "MX018",
        "event_types-2d",
        event_types=[["Added", "Removed"], ["A", "B"]],
    ),
    bad("create_subscription", "MX024", "name-before-filters", name="", categories=[]),
    bad("create_subscription", "MX021", "redefined", name="sub", partitions=3),
    bad("create_subscription", "MX021", "redefined-categories", name="sub", categories=["other"]),
    # claim_batch
    bad("claim_batch", "MX020", "unknown-subscription", subscription="nope"),
    bad("claim_batch", "MX020", "subscription-null", subscription=None),
    bad("claim_batch", "MX024", "worker-null", worker=None),
    bad("claim_batch", "MX024", "worker-empty", worker=""),
    bad("claim_batch", "MX024", "worker-256", worker=LONG),
    bad("claim_batch", "MX024", "worker-1MB", worker=HUGE),
    bad("claim_batch", "MX014", "max_count-0", max_count=0),
    bad("claim_batch", "MX014", "max_count-10001", max_count=10001),
    bad("claim_batch", "MX014", "max_count-null", max_count=None),
    bad("claim_batch", "MX014", "max_count-2e9", max_count=2_000_000_000),
    bad("claim_batch", "MX024", "lease-0", lease=timedelta(0)),
    bad("claim_batch", "MX024", "lease-negative", lease=timedelta(seconds=-1)),
    bad("claim_batch", "MX024", "lease-2-days", lease=timedelta(days=2)),
    bad("claim_batch", "MX024", "lease-text-2-days", lease="2 days"),
    bad("claim_batch", "MX024", "lease-null", lease=None),
    # ack
    bad("ack", "MX020", "unknown-subscription", subscription="nope"),
    bad("ack", "MX024", "partition--1", partition=-1),
    bad("ack", "MX024", "partition-999", partition=999),
    bad("ack", "MX024", "partition-null", partition=None),
    bad("ack", "MX022", "partition-not-leased", partition=Ref("other_partition")),
    bad("ack", "MX023", "position-outside-batch", event_position=Ref("outside")),
    bad("ack", "MX023", "position-missing", event_position=999_999),
    bad("ack", "MX023", "position-null", event_position=None),
    bad("ack", "MX023", "position-negative", event_position=-1),
    bad("ack", "MX022", "other-worker", worker="intruder"),
    bad("ack", "MX024", "worker-null", worker=None),
    bad("ack", "MX024", "worker-empty", worker=""),
    # nack
    bad("nack", "MX020", "unknown-subscription", subscription="nope"),
    bad("nack", "MX024", "partition--1", partition=-1),
    bad("nack", "MX024", "partition-999", partition=999),
    bad("nack", "MX023", "position-outside-batch", event_position=Ref("outside")),
    bad("nack", "MX023", "position-null", event_position=None),
    bad("nack", "MX022", "other-worker", worker="intruder"),
    bad("nack", "MX024", "retry_after-negative", retry_after=timedelta(seconds=-1)),
    bad("nack", "MX024", "retry_after-over-1-day", retry_after=timedelta(days=1, seconds=1)),
    bad("nack", "MX024", "retry_after-null", retry_after=None),
    # release
    bad("release", "MX024", "worker-null", worker=None),
    bad("release", "MX024", "worker-empty", worker=""),
    bad("release", "MX024", "worker-256", worker=LONG),
    bad("release", "MX020", "unknown-subscription", subscription="nope"),
    # reset_subscription
    bad("reset_subscription", "MX015", "start_at-middle", start_at="middle"),
    bad("reset_subscription", "MX015", "start_at-null", start_at=None),
    bad("reset_subscription", "MX015", "start_at-cursor-too-big", start_at="1:9223372036854775808"),
    bad("reset_subscription", "MX020", "unknown", name="nope"),
    bad("reset_subscription", "MX020", "name-null", name=None),
    # requeue_parked, list_parked, subscription_status
    bad("requeue_parked", "MX025", "not-parked", event_position=Ref("outside")),
    bad("requeue_parked", "MX025", "position-null", event_position=None),
    bad("requeue_parked", "MX025", "parked-elsewhere", subscription="sub"),
    bad("requeue_parked", "MX020", "unknown-subscription", subscription="nope"),
    bad("list_parked", "MX014", "max_count-0", max_count=0),
    bad("list_parked", "MX014", "max_count-10001", max_count=10001),
    bad("list_parked", "MX014", "max_count-null", max_count=None),
    bad("list_parked", "MX020", "unknown-subscription", subscription="nope"),
    bad("subscription_status", "MX020", "unknown", name="nope"),
    bad("subscription_status", "MX020", "empty", name=""),
    # snapshots
    bad("save_snapshot", "MX030", "version-0", version=0),
    bad("save_snapshot", "MX030", "version-beyond-current", version=4),
    bad("save_snapshot", "MX030", "version-null", version=None),
    bad("save_snapshot", "MX030", "stream-missing", stream_id="nope", version=1),
    bad("save_snapshot", "MX012", "state-array", state=Jsonb([1])),
    bad("save_snapshot", "MX012", "state-string", state=Jsonb("x")),
    bad("save_snapshot", "MX012", "state-json-null", state=Jsonb(None)),
    bad("save_snapshot", "MX012", "state-null", state=None),
    bad("save_snapshot", "MX010", "category-empty", category=""),
    bad("save_snapshot", "MX010", "stream_id-256", stream_id=LONG),
    bad("load_snapshot", "MX010", "category-empty", category=""),
    bad("load_snapshot", "MX010", "stream_id-null", stream_id=None),
    # list_streams, delete_stream
    bad("list_streams", "MX014", "max_count-0", max_count=0),
    bad("list_streams", "MX014", "max_count-10001", max_count=10001),
    bad("list_streams", "MX010", "category-null", category=None),
    bad("list_streams", "MX010", "category-empty", category=""),
    bad("list_streams", "MX010", "category-1MB", category=HUGE),
    bad("delete_stream", "MX017", "before_version-0", before_version=0),
    bad("delete_stream", "MX017", "before_version-negative", before_version=-5),
    bad("delete_stream", "MX010", "stream_id-empty", stream_id=""),
    bad("delete_stream", "MX010", "category-null", category=None),
    # huge strings and odd shapes in the core functions
    bad("append_event", "MX010", "category-1MB", category=HUGE),
    bad("append_event", "MX010", "stream_id-1MB", stream_id=HUGE),
    bad("append_event", "MX011", "event_type-1MB", event_type=HUGE),
    bad("append_events", "MX013", "type-1MB", events=Jsonb([{"type": HUGE, "data": {}}])),
    bad(
        "append_events",
        "MX013",
        "ids-differ-in-case-only",
        events=Jsonb(
            [
                {"type": "A", "data": {}, "id": UPPER},
                {"type": "A", "data": {}, "id": UPPER.lower()},
            ]
        ),
    ),
    bad("read_events", "MX015", "after-1MB", after=HUGE),
    bad("read_events", "MX018", "categories-2d", categories=[["cart"], ["other"]]),
]


def resolve(args: dict[str, Any], ctx: dict[str, int]) -> dict[str, Any]:
    return {k: ctx[v] if isinstance(v, Ref) else v for k, v in args.items()}


@pytest.mark.parametrize(("function", "args", "sqlstate"), CASES)
def test_bad_call_is_refused_and_writes_nothing(
    world: World, function: str, args: dict[str, Any], sqlstate: str
) -> None:
    before = state(world.conn)
    with pytest.raises(psycopg.Error) as info:
        call_sql(world.conn, function, **resolve(args, world.ctx))
    error = info.value
    assert error.sqlstate == sqlstate, f"{error.sqlstate}: {error.diag.message_primary}"
    assert error.diag.message_detail, "a DETAIL says what was wrong"
    assert error.diag.message_hint, "a HINT says what to do"
    assert state(world.conn) == before


def test_the_catalogue_is_large_and_covers_every_function(world: World) -> None:
    covered = {case.values[0] for case in CASES}
    functions = {
        row[0]
        for row in world.conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'meowmx'::regnamespace"
            " AND proname !~ '^_'"
            " AND proname NOT IN ('version', 'horizon_blockers', 'create_roles')"
        )
    }
    # read_stream and stream_version are covered by test_bad_input.py
    assert functions - covered <= {"read_stream", "stream_version", "drop_subscription"}
    assert len(CASES) >= 40


def test_the_valid_calls_themselves_work(world: World, extra_db: Callable[[], str]) -> None:
    """The baseline arguments are accepted, so each case fails for its one bad value."""
    target = extra_db()
    meowmx.install(target)
    with psycopg.connect(target, autocommit=True) as conn:
        ctx = build_world(conn)
        for function in (
            "ack",
            "list_parked",
            "subscription_status",
            "save_snapshot",
            "load_snapshot",
            "list_streams",
            "append_event",
            "append_events",
            "read_events",
            "claim_batch",
            "release",
            "requeue_parked",
            "reset_subscription",
            "delete_stream",
            "create_subscription",
        ):
            call_sql(conn, function, **resolve(VALID[function], ctx))
        # nack needs a batch again (the reset above dropped it)
        wait_for_horizon(conn)
        claimed = call_sql(
            conn, "claim_batch", "partition, position", subscription="sub", worker="w"
        )
        nack = {**VALID["nack"], "partition": claimed[0][0], "event_position": claimed[0][1]}
        assert call_sql(conn, "nack", **nack) == [(False,)]


def test_drop_subscription_of_null_or_unknown_is_false(world: World) -> None:
    before = state(world.conn)
    assert call_sql(world.conn, "drop_subscription", name=None) == [(False,)]
    assert call_sql(world.conn, "drop_subscription", name="nope") == [(False,)]
    assert call_sql(world.conn, "drop_subscription", name="") == [(False,)]
    assert state(world.conn) == before


def test_nack_can_park_an_event_again_after_a_reset(connect: Callable[..., Connection]) -> None:
    """Found by the random calls below: a sequence of valid calls only."""
    conn = connect()
    call_sql(conn, "append_event", category="c", stream_id="1", event_type="A", data={})
    call_sql(conn, "create_subscription", name="r", max_attempts=1)
    wait_for_horizon(conn)
    for _ in range(2):
        call_sql(conn, "claim_batch", subscription="r", worker="w", max_count=1)
        parked = call_sql(
            conn, "nack", subscription="r", worker="w", partition=0, event_position=1, error="x"
        )
        assert parked == [(True,)]
        call_sql(conn, "reset_subscription", name="r")


# Through psql: PostgreSQL's own parsing of the argument literals ------------------------

PSQL_CASES = [
    (
        "uuid",
        "SELECT meowmx.append_event(category => 'cart', stream_id => '1', event_type => 'A',"
        " data => '{}', event_id => 'not-a-uuid'::uuid);",
        "22P02",
    ),
    (
        "uuid-implicit",
        "SELECT meowmx.append_event(category => 'cart', stream_id => '1', event_type => 'A',"
        " data => '{}', event_id => 'not-a-uuid');",
        "22P02",
    ),
    (
        "max_count-text",
        "SELECT * FROM meowmx.read_stream(category => 'cart', stream_id => '1',"
        " max_count => 'abc');",
        "22P02",
    ),
    (
        "claim-max_count-text",
        "SELECT * FROM meowmx.claim_batch(subscription => 'sub', worker => 'w',"
        " max_count => 'abc');",
        "22P02",
    ),
    (
        "events-not-json",
        "SELECT * FROM meowmx.append_events(category => 'cart', stream_id => '1',"
        " events => 'not json');",
        "22P02",
    ),
    (
        "data-nul-escape",
        "SELECT meowmx.append_event(category => 'cart', stream_id => '1', event_type => 'A',"
        ' data => \'{"a": "\\u0000"}\');',
        "22P05",
    ),
    (
        "lease-not-an-interval",
        "SELECT * FROM meowmx.claim_batch(subscription => 'sub', worker => 'w', lease => 'soon');",
        "22007",
    ),
    (
        "expected_version-beyond-bigint",
        "SELECT meowmx.append_event(category => 'cart', stream_id => '1', event_type => 'A',"
        " data => '{}', expected_version => '99999999999999999999');",
        "22003",
    ),
    (
        "partitions-numeric",
        "SELECT meowmx.create_subscription(name => 'x', partitions => 1.5);",
        "42883",
    ),
    (
        "categories-not-an-array",
        "SELECT * FROM meowmx.read_events(categories => 'cart');",
        "22P02",
    ),
]


@pytest.mark.parametrize(
    ("sql_text", "sqlstate"), [c[1:] for c in PSQL_CASES], ids=[c[0] for c in PSQL_CASES]
)
def test_psql_literals_postgresql_rejects(
    world: World, psql: Any, sql_text: str, sqlstate: str
) -> None:
    before = state(world.conn)
    done = psql("\\set VERBOSITY verbose\n" + sql_text, world.dsn, check=False)
    assert done.returncode != 0
    assert f"ERROR:  {sqlstate}:" in done.stderr, done.stderr
    assert state(world.conn) == before


# Property-based: random calls succeed or fail cleanly ------------------------------------

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
CURSOR_RE = re.compile(r"([0-9]{1,20}):([0-9]{1,19})")
INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)
CLIENT = "client"  # psycopg refuses to send NUL in text; no SQLSTATE
VALID_INPUT = "valid"


class SqlNull:
    """SQL NULL, as opposed to the JSON null ``Jsonb(None)``."""

    def __repr__(self) -> str:
        return "SQL-NULL"


SQL_NULL = SqlNull()

texts = st.one_of(
    st.sampled_from(["cart", "1", "2", "other", "x", "Added", "w", "sub", "dead"]),
    st.none(),
    st.just(""),
    st.text(max_size=12),  # any code point but surrogates: control chars, NUL, emoji, ...
    st.integers(250, 260).map(lambda n: "é" * n),
    st.integers(250, 260).map(lambda n: "\U0001f408" * n),
    st.integers(256, 3000).map(lambda n: "y" * n),  # 1 MB ones are in the catalogue above
)


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` about three times in four, else ``other`` (one_of would pick ``other``
    far more often than its share: hypothesis favours the varied branch)."""
    return st.builds(lambda g, o, pick: g if pick < 6 else o, good, other, st.integers(0, 7))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
raw_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
json_objects = raw_objects.map(Jsonb)
json_args = mostly(
    json_objects,
    st.one_of(st.just(SQL_NULL), json_values.map(Jsonb)),  # JSON null, scalars, arrays, ...
)
# Mostly valid names, so that calls get past the first check and reach the later ones.
GOOD = ["cart", "1", "2", "3", "other", "x", "Added", "w", "sub", "dead"]
names = mostly(st.sampled_from(GOOD), texts)
id_pool = [str(uuid.UUID(int=n)) for n in range(1, 6)]
event_ids = st.one_of(st.none(), st.sampled_from(id_pool).map(uuid.UUID), st.uuids())
small_ints = st.one_of(st.none(), st.integers(-3, 12))
int4s = st.one_of(small_ints, st.integers(*INT4), st.sampled_from([10000, 10001, 1024, 1025]))
int8s = st.one_of(small_ints, st.integers(*INT8))
filters = st.one_of(st.none(), st.lists(st.one_of(texts, st.none()), max_size=3))
cursors = st.one_of(
    st.none(),
    texts,
    st.tuples(st.integers(0, 2**65), st.integers(0, 2**64)).map(lambda p: f"{p[0]}:{p[1]}"),
    st.sampled_from(["0:0", "1:", ":1", "18446744073709551615:9223372036854775807", " 1:1"]),
)
intervals = st.one_of(
    st.none(),
    st.timedeltas(min_value=timedelta(days=-2), max_value=timedelta(days=2)),
    st.sampled_from([timedelta(0), timedelta(days=1), timedelta(days=1, microseconds=1)]),
)
event_like = st.fixed_dictionaries(
    {"type": st.one_of(names, names, json_values), "data": st.one_of(raw_objects, json_values)},
    optional={
        "metadata": json_values,
        "id": st.one_of(st.sampled_from(id_pool), st.uuids().map(str), json_values),
        "extra": json_values,
    },
)
events_args = st.one_of(
    st.lists(event_like, max_size=4).map(Jsonb),
    json_args,
)


def has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, (list, tuple)):
        return any(has_nul(v) for v in value)
    return False


def json_has_nul(value: Any) -> bool:
    if isinstance(value, Jsonb):
        value = value.obj
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(json_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(json_has_nul(k) or json_has_nul(v) for k, v in value.items())
    return False


def bad_name(name: Any) -> bool:
    return name is None or name == "" or len(name) > 255


def bad_filter(names: Any) -> bool:
    return names is not None and (len(names) == 0 or any(bad_name(n) for n in names))


def bad_cursor(cursor: str) -> bool:
    found = CURSOR_RE.fullmatch(cursor)
    return not found or int(found[1]) > 2**64 - 1 or int(found[2]) > 2**63 - 1


def bad_max_count(n: Any) -> bool:
    return n is None or n < 1 or n > 10000


def bad_interval(i: Any, low_ok: bool) -> bool:
    if i is None:
        return True
    too_low = i < timedelta(0) if low_ok else i <= timedelta(0)
    return too_low or i > timedelta(days=1)


def json_obj(value: Any) -> Any:
    """The Python value of a JSON argument, or SQL_NULL."""
    return value.obj if isinstance(value, Jsonb) else value


def event_problem(event: Any) -> bool:
    if not isinstance(event, dict):
        return True
    if set(event) - {"type", "data", "metadata", "id"}:
        return True
    kind = event.get("type")
    if not isinstance(kind, str) or kind == "" or len(kind) > 255:
        return True
    if not isinstance(event.get("data"), dict):
        return True
    if "metadata" in event and not (
        event["metadata"] is None or isinstance(event["metadata"], dict)
    ):
        return True
    ident = event.get("id")
    return ident is not None and not (isinstance(ident, str) and UUID_RE.fullmatch(ident))


def first(*checks: tuple[bool, str]) -> str:
    """The SQLSTATE of the first failing check, in the order the function checks."""
    for failed, sqlstate in checks:
        if failed:
            return sqlstate
    return VALID_INPUT


def expect_append_event(a: dict[str, Any]) -> str:
    data, metadata = json_obj(a["data"]), json_obj(a["metadata"])
    return first(
        (bad_name(a["category"]) or bad_name(a["stream_id"]), "MX010"),
        (bad_name(a["event_type"]), "MX011"),
        (not isinstance(data, dict), "MX012"),
        (not (metadata is SQL_NULL or metadata is None or isinstance(metadata, dict)), "MX012"),
        (a["expected_version"] is not None and a["expected_version"] < -1, "MX016"),
    )


def expect_append_events(a: dict[str, Any]) -> str:
    events = json_obj(a["events"])
    shape_bad = not isinstance(events, list) or not 1 <= len(events) <= 10000
    ids = [] if shape_bad else [e.get("id") for e in events if isinstance(e, dict)]
    given = [i for i in ids if isinstance(i, str)]
    return first(
        (bad_name(a["category"]) or bad_name(a["stream_id"]), "MX010"),
        (shape_bad, "MX013"),
        (not shape_bad and any(event_problem(e) for e in events), "MX013"),
        (len(set(given)) != len(given), "MX013"),
        (a["expected_version"] is not None and a["expected_version"] < -1, "MX016"),
    )


OUTCOMES_AFTER_VALID_INPUT = {
    "append_event": {"MX001", "MX002", "MX003"},
    "append_events": {"MX001", "MX002", "MX003"},
    "create_subscription": {"MX021"},
    "save_snapshot": {"MX030"},
    "ack": {"MX022", "MX023", "MX024"},
    "nack": {"MX022", "MX023", "MX024"},
    "requeue_parked": {"MX025"},
}


def _short(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r:.200}" for k, v in args.items())


class Harness:
    """Runs one call, checks its outcome against the expectation and the state after."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.outcomes: dict[str, int] = {}

    def stream_version(self, category: str, stream_id: str) -> int:
        row = self.conn.execute(
            "SELECT coalesce(max(version), 0) FROM meowmx.events"
            " WHERE category = %s AND stream_id = %s",
            [category, stream_id],
        ).fetchone()
        assert row is not None
        return int(row[0])

    def subscriptions(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT name FROM meowmx.subscriptions")}

    def run(self, function: str, args: dict[str, Any], expected: str) -> list[Any] | None:
        """``expected``: an SQLSTATE, VALID_INPUT (success or one of the state-dependent
        errors of OUTCOMES_AFTER_VALID_INPUT), or None (any MX error or success)."""
        sent = {k: None if v is SQL_NULL else v for k, v in args.items()}
        if any(has_nul(v) for v in sent.values()):
            expected = CLIENT
        elif any(json_has_nul(v) for v in sent.values() if isinstance(v, Jsonb)):
            expected = "22P05"  # PostgreSQL's jsonb input rejects \u0000
        before = state(self.conn)
        try:
            rows = call_sql(self.conn, function, **sent)
        except psycopg.Error as error:
            got = error.sqlstate or CLIENT
            self.outcomes[got] = self.outcomes.get(got, 0) + 1

            message = str(error)

            def label() -> str:  # only built for a failure message (arguments may be 1 MB)
                return f"{function}({_short(args)}): {got} {message}"

            if got == CLIENT:
                assert expected == CLIENT and isinstance(error, psycopg.DataError), label()
            elif expected == VALID_INPUT:
                assert got in OUTCOMES_AFTER_VALID_INPUT.get(function, set()), label()
            elif expected is not None:
                assert got == expected, f"expected {expected}: {label()}"
            else:
                assert got.startswith("MX"), label()
            if got.startswith("MX"):
                assert error.diag.message_hint, label()
            assert state(self.conn) == before, f"a failed call wrote something: {label()}"
            return None
        self.outcomes["ok"] = self.outcomes.get("ok", 0) + 1
        assert expected in (VALID_INPUT, None), f"{function}({_short(args)}) succeeded: {expected}"
        if function in ("append_event", "append_events"):
            self.check_append(args, before, rows)
        return rows

    def check_append(self, args: dict[str, Any], before: dict[str, Any], rows: list[Any]) -> None:
        """An append wrote all its events with consecutive versions, or (a retry) none."""
        ((count, last),) = state(self.conn)["events"]
        ((count_before, last_before),) = before["events"]
        events = json_obj(args.get("events", Jsonb([None])))
        assert len(rows) == len(events), "one row per event"
        if count == count_before:
            assert all(row[1] <= last_before for row in rows), "a retry returns stored events"
        else:
            assert count == count_before + len(rows)
            versions = [row[0] for row in rows]
            assert versions == list(range(versions[0], versions[0] + len(rows)))
            assert all(row[1] > last_before for row in rows)


def assert_varied(outcomes: dict[str, int]) -> None:
    """The random calls reached success and several different checks."""
    assert outcomes.get("ok", 0) >= 20, outcomes
    assert len([k for k in outcomes if k.startswith("MX")]) >= 5, outcomes


@pytest.fixture
def harness(connect: Callable[..., Connection]) -> Harness:
    conn = connect()
    build_world(conn)
    return Harness(conn)


FAST = settings(
    max_examples=600,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_random_appends(harness: Harness) -> None:
    @FAST
    @given(
        category=names, stream_id=names, event_type=names, data=json_args, metadata=json_args,
        expected_version=int8s, event_id=event_ids, events=events_args, many=st.booleans(),
    )  # fmt: skip
    def run(many: bool, events: Any, **a: Any) -> None:
        if many:
            args = {k: a[k] for k in ("category", "stream_id", "expected_version")}
            args["events"] = events
            harness.run("append_events", args, expect_append_events(args))
        else:
            harness.run("append_event", a, expect_append_event(a))

    run()
    assert_varied(harness.outcomes)


def test_random_reads_streams_and_snapshots(harness: Harness) -> None:
    @FAST
    @given(
        which=st.integers(0, 6), category=names, stream_id=names, version=int8s,
        max_count=int4s, backwards=st.one_of(st.none(), st.booleans()), after=cursors,
        categories=filters, event_types=filters, state=json_args,
    )  # fmt: skip
    def run(which: int, **a: Any) -> None:
        stream_bad = bad_name(a["category"]) or bad_name(a["stream_id"])
        if which == 0:
            args = {k: a[k] for k in ("category", "stream_id", "max_count", "backwards")}
            args["from_version"] = a["version"]
            fv = a["version"]
            harness.run("read_stream", args, first(
                (stream_bad, "MX010"),
                (bad_max_count(a["max_count"]), "MX014"),
                ((fv is not None and fv < 1) or a["backwards"] is None, "MX017"),
            ))  # fmt: skip
        elif which == 1:
            args = {k: a[k] for k in ("after", "max_count", "categories", "event_types")}
            harness.run("read_events", args, first(
                (bad_max_count(a["max_count"]), "MX014"),
                (bad_filter(a["categories"]), "MX018"),
                (bad_filter(a["event_types"]), "MX018"),
                (a["after"] is not None and bad_cursor(a["after"]), "MX015"),
            ))  # fmt: skip
        elif which == 2:
            args = {k: a[k] for k in ("category", "stream_id")}
            harness.run("stream_version", args, first((stream_bad, "MX010")))
        elif which == 3:
            args = {"category": a["category"], "after": a["after"], "max_count": a["max_count"]}
            harness.run("list_streams", args, first(
                (bad_name(a["category"]), "MX010"),
                (bad_max_count(a["max_count"]), "MX014"),
            ))  # fmt: skip
        elif which == 4:
            args = {k: a[k] for k in ("category", "stream_id")}
            args["max_version"] = a["version"]
            harness.run("load_snapshot", args, first(
                (stream_bad, "MX010"),
                (a["version"] is not None and a["version"] < 1, "MX017"),
            ))  # fmt: skip
        else:
            args = {k: a[k] for k in ("category", "stream_id", "version", "state")}
            unsendable = has_nul(a["category"]) or has_nul(a["stream_id"])
            current = (
                0
                if stream_bad or unsendable
                else harness.stream_version(a["category"], a["stream_id"])
            )
            v = a["version"]
            harness.run("save_snapshot", args, first(
                (stream_bad, "MX010"),
                (v is None or v < 1 or v > current, "MX030"),
                (not isinstance(json_obj(a["state"]), dict), "MX012"),
            ))  # fmt: skip

    run()
    assert_varied(harness.outcomes)


def test_random_subscription_calls(harness: Harness) -> None:
    recent: list[tuple[int, int]] = []

    @settings(
        max_examples=700,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        which=st.integers(0, 9), name=mostly(st.sampled_from(["sub", "dead", "s2"]), texts),
        worker=mostly(st.sampled_from(["w", "w2", "d"]), texts),
        categories=mostly(st.none(), filters), event_types=mostly(st.none(), filters),
        partitions=mostly(st.integers(1, 4), st.one_of(
            st.sampled_from([0, 1024, 1025, None]), st.integers(*INT4))),
        max_attempts=mostly(st.integers(1, 3), int4s),
        start_at=mostly(st.sampled_from(["beginning", "end"]), cursors),
        max_count=mostly(st.integers(1, 10), st.one_of(st.none(), st.integers(-5, 20000))),
        lease=mostly(st.timedeltas(timedelta(seconds=1), timedelta(minutes=5)), intervals),
        retry_after=mostly(st.timedeltas(timedelta(0), timedelta(seconds=5)), intervals),
        error=st.one_of(st.none(), texts),
        partition=mostly(st.integers(0, 3), int4s),
        position=st.one_of(st.integers(0, 30), int8s), use_recent=st.booleans(),
    )  # fmt: skip
    def run(which: int, **a: Any) -> None:
        existing = harness.subscriptions()
        if "sub" not in existing:  # dropped by an earlier example
            call_sql(
                harness.conn, "create_subscription", name="sub", categories=["cart"], partitions=2
            )
        if "dead" not in existing:
            call_sql(harness.conn, "create_subscription", name="dead", max_attempts=1)
        exists = a["name"] in harness.subscriptions()
        missing = (not exists, "MX020")
        if a["use_recent"] and recent:  # ack or nack what was claimed last, sometimes
            a["partition"], a["position"] = recent[(a["position"] or 0) % len(recent)]
        if which == 0:
            args = {
                k: a[k]
                for k in (
                    "name",
                    "categories",
                    "event_types",
                    "partitions",
                    "start_at",
                    "max_attempts",
                )
            }
            p, m, s = a["partitions"], a["max_attempts"], a["start_at"]
            harness.run("create_subscription", args, first(
                (bad_name(a["name"]), "MX024"),
                (bad_filter(a["categories"]), "MX018"),
                (bad_filter(a["event_types"]), "MX018"),
                (p is None or not 1 <= p <= 1024, "MX024"),
                (m is None or not 1 <= m <= 1000, "MX024"),
                (s not in ("beginning", "end") and (s is None or bad_cursor(s)), "MX015"),
            ))  # fmt: skip
        elif which in (1, 2, 3):
            args = {"subscription": a["name"], "worker": a["worker"],
                    "max_count": a["max_count"], "lease": a["lease"]}  # fmt: skip
            rows = harness.run("claim_batch", args, first(
                missing,
                (bad_name(a["worker"]), "MX024"),
                (bad_max_count(a["max_count"]), "MX014"),
                (bad_interval(a["lease"], low_ok=False), "MX024"),
            ))  # fmt: skip
            if rows:
                recent[:] = [(row[0], row[1]) for row in rows][-5:]
        elif which in (4, 5):
            args = {"subscription": a["name"], "worker": a["worker"],
                    "partition": a["partition"], "event_position": a["position"]}  # fmt: skip
            function = "ack"
            if which == 5:
                function = "nack"
                args |= {"error": a["error"], "retry_after": a["retry_after"]}
            rows = harness.run(function, args, first(missing, (bad_name(a["worker"]), "MX024")))
            if rows is not None and which == 5:
                assert not bad_interval(a["retry_after"], low_ok=True), (
                    "nack took a bad retry_after"
                )
        elif which == 6:
            args = {"subscription": a["name"], "worker": a["worker"]}
            harness.run("release", args, first(missing, (bad_name(a["worker"]), "MX024")))
        elif which == 7:
            args = {"subscription": a["name"], "event_position": a["position"]}
            harness.run("requeue_parked", args, first(missing))
            args = {"subscription": a["name"], "max_count": a["max_count"]}
            harness.run(
                "list_parked", args, first(missing, (bad_max_count(a["max_count"]), "MX014"))
            )
        elif which == 8:
            s = a["start_at"]
            args = {"name": a["name"], "start_at": s}
            harness.run("reset_subscription", args, first(
                missing,
                (s not in ("beginning", "end") and (s is None or bad_cursor(s)), "MX015"),
            ))  # fmt: skip
        else:
            status_missing = a["name"] is not None and not exists
            harness.run(
                "subscription_status", {"name": a["name"]}, first((status_missing, "MX020"))
            )
            if a["partition"] == 0:
                harness.run("drop_subscription", {"name": a["name"]}, VALID_INPUT)

    run()
    assert_varied(harness.outcomes)
