"""Bad input: one catalogue of calls that must fail, each with its own SQLSTATE (class MX),
a DETAIL and a HINT, and write nothing. Then the Python binding's typed exceptions for
some of them, the literals PostgreSQL itself rejects before meowmx runs, and thousands
of random calls that either succeed or fail as the catalogue says.

The catalogue (CASES) is the one place that says which SQLSTATE each condition gets:
one literal per row. The random calls' model takes its codes from catalogue rows, and
a test checks the model against every row, so changing a code means editing its rows.

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
from dataclasses import dataclass, field
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
from meowmx import Client, NewEvent
from meowmx.errors import ERRORS
from meowmx.install import schema_files
from support import call_sql, fingerprint, wait_for_horizon

Connection = psycopg.Connection[Any]

LONG = "x" * 256  # one past the 255-character limit
HUGE = "y" * (1024 * 1024)  # 1 MB
UUID = "5f0c6a3e-8f0e-4c8e-9a51-7d2b8c1e4f60"
UPPER = "AAAAAAAA-AAAA-4AAA-8AAA-AAAAAAAAAAAA"


# The world the catalogue runs against: built once, never changed by a bad call --------------

# Streams and their versions. cart/2 was appended as one batch with these ids.
WORLD_STREAMS = {("cart", "1"): 3, ("cart", "2"): 2, ("cart", "3"): 2, ("cart", "4"): 1}
WORLD_IDS = ["0b9d7f52-3c1e-4e55-8f0a-6d4c2b1a9e01", "0b9d7f52-3c1e-4e55-8f0a-6d4c2b1a9e02"]
WORLD_SUBSCRIPTIONS = {"sub", "dead"}


@dataclass
class World:
    conn: Connection
    ctx: dict[str, Any]
    dsn: str


class Ref(str):
    """A value of the world, known only once it is built (a claimed partition, ...)."""


def build_world(conn: Connection) -> dict[str, Any]:
    """WORLD_STREAMS, other/x, a snapshot, subscription 'sub' (2 partitions) with a batch
    claimed by 'w', and subscription 'dead' (max_attempts 1) with a parked event and a
    batch claimed by 'd'. Returns what the Refs name."""
    for (category, stream), count in WORLD_STREAMS.items():
        ids = WORLD_IDS if stream == "2" else [None] * count
        events = [{"type": "Added", "data": {"n": n}, "id": ids[n]} for n in range(count)]
        call_sql(conn, "append_events", category=category, stream_id=stream, events=Jsonb(events))
    call_sql(conn, "append_event", category="other", stream_id="x", event_type="Noise", data={})
    call_sql(conn, "save_snapshot", category="cart", stream_id="1", version=2, state={"n": 2})
    call_sql(conn, "create_subscription", name="sub", categories=["cart"], partitions=2)
    call_sql(conn, "create_subscription", name="dead", max_attempts=1)
    wait_for_horizon(conn)
    ((partition, position, claimed_cursor),) = call_sql(
        conn, "claim_batch", "partition, position, cursor", subscription="sub", worker="w",
        max_count=1,
    )  # fmt: skip
    last = conn.execute("SELECT max(position) FROM meowmx.events").fetchone()[0]  # type: ignore[index]
    ((parked,),) = call_sql(
        conn, "claim_batch", "position", subscription="dead", worker="d", max_count=1
    )
    assert call_sql(
        conn, "nack", subscription="dead", worker="d", partition=0, event_position=parked,
        error="boom",
    ) == [(True,)]  # fmt: skip
    ((dead_next,),) = call_sql(
        conn, "claim_batch", "position", subscription="dead", worker="d", max_count=1
    )
    ((cursor,),) = call_sql(conn, "read_events", "cursor", max_count=1)
    assert last not in (position, dead_next)
    return {
        "partition": partition,
        "other_partition": 1 - partition,
        "position": position,
        "outside": last,
        "parked": parked,
        "dead_next": dead_next,
        "cursor": cursor,
        "claimed_cursor": claimed_cursor,
        "end": call_sql(conn, "end_cursor")[0][0],
    }


@pytest.fixture(scope="module")
def world(server_dsn: str) -> Iterator[World]:
    """A database of this module's own, built once (the cases only read it). Not one of
    conftest's: those have their backends ended after each test, and this outlives tests."""
    name = f"meowmx_test_bad_input_{secrets.token_hex(4)}"
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


def resolve(args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    return {k: ctx[v] if isinstance(v, Ref) else v for k, v in args.items()}


# The catalogue ---------------------------------------------------------------------------

# A valid call of every public function in the world; each case changes one argument.
VALID: dict[str, dict[str, Any]] = {
    "append_event": {"category": "cart", "stream_id": "9", "event_type": "Added", "data": {}},
    "append_events": {
        "category": "cart",
        "stream_id": "9",
        "events": Jsonb([{"type": "Added", "data": {}}]),
    },
    "read_stream": {"category": "cart", "stream_id": "1"},
    "read_events": {},
    "stream_version": {"category": "cart", "stream_id": "1"},
    "create_subscription": {"name": "new", "categories": ["cart"], "partitions": 2},
    "claim_batch": {"subscription": "sub", "worker": "w2"},
    "claim_partition": {"subscription": "sub", "worker": "w3"},
    "read_partition": {
        "subscription": "sub",
        "partition": Ref("partition"),
        "after": Ref("cursor"),
        "until": Ref("end"),
    },
    "ack_through": {
        "subscription": "sub",
        "worker": "w",
        "partition": Ref("partition"),
        "cursor": Ref("claimed_cursor"),
    },
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
    "renew_lease": {"subscription": "sub", "worker": "w"},
    "reset_subscription": {"name": "sub", "start_at": "beginning"},
    "requeue_parked": {"subscription": "dead", "event_position": Ref("parked")},
    "list_parked": {"subscription": "dead"},
    "subscription_status": {"name": "sub"},
    "drop_subscription": {"name": "sub"},
    "save_snapshot": {"category": "cart", "stream_id": "1", "version": 3, "state": {"n": 3}},
    "load_snapshot": {"category": "cart", "stream_id": "1"},
    "list_streams": {"category": "cart"},
    "delete_stream": {"category": "cart", "stream_id": "1", "before_version": 2},
    "horizon_blockers": {},
    "metrics": {},
    "version": {},
    "end_cursor": {},
    "adopt_cluster": {},
    "create_roles": {},
}

# More valid calls, down other paths of the same functions: (function, arguments, the
# rows it returns, where that shows the path was taken).
MORE_VALID: list[tuple[str, dict[str, Any], Any]] = [
    # retries of what cart/2 stored, and ids on new events
    ("append_event", {"category": "cart", "stream_id": "2", "event_type": "Added",
                      "data": {"n": 0}, "event_id": WORLD_IDS[0]}, None),
    ("append_events", {"category": "cart", "stream_id": "2", "events": Jsonb(
        [{"type": "Added", "data": {"n": n}, "id": WORLD_IDS[n]} for n in range(2)])}, None),
    ("append_events", {"category": "cart", "stream_id": "9", "expected_version": 0,
                       "events": Jsonb([{"type": "A", "data": {}, "id": UUID}])}, None),
    ("read_stream", {"category": "cart", "stream_id": "1", "from_version": 2,
                     "backwards": True, "max_count": 1}, None),
    ("read_events", {"after": Ref("cursor"), "categories": ["cart"],
                     "event_types": ["Added"], "max_count": 2}, None),
    ("load_snapshot", {"category": "cart", "stream_id": "1", "max_version": 1}, []),
    ("list_streams", {"category": "cart", "after": "1", "max_count": 2}, None),
    ("delete_stream", {"category": "cart", "stream_id": "1"}, [(3,)]),
    ("create_subscription", {"name": "sub", "categories": ["cart"], "partitions": 2},
     [(False,)]),  # the same definition again
    ("create_subscription", {"name": "new", "start_at": Ref("cursor")}, [(True,)]),
    ("claim_batch", {"subscription": "sub", "worker": "w"}, None),  # the lease holder
    ("claim_partition", {"subscription": "sub", "worker": "w"}, None),
    ("nack", {"subscription": "dead", "worker": "d", "partition": 0,
              "event_position": Ref("dead_next"), "error": "boom"}, [(True,)]),  # parks
    ("reset_subscription", {"name": "sub", "start_at": Ref("cursor")}, None),
    ("reset_subscription", {"name": "sub", "start_at": "end"}, None),
    ("release", {"subscription": "sub", "worker": "nobody"}, [(0,)]),
    ("subscription_status", {"name": None}, None),  # every subscription
    ("drop_subscription", {"name": "nope"}, [(False,)]),
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    function: str
    sqlstate: str
    label: str
    args: dict[str, Any] = field(hash=False)
    detail: str | None = None  # a fragment the DETAIL must contain

    @property
    def id(self) -> str:
        return f"{self.function}:{self.label}"


def bad(
    function: str, sqlstate: str, label: str, /, *, detail: str | None = None, **overrides: Any
) -> Case:
    """A call of ``function`` with the valid arguments except ``overrides``."""
    return Case(function, sqlstate, label, {**VALID[function], **overrides}, detail)


def bad_event(sqlstate: str, label: str, event: Any, detail: str = "event 2") -> Case:
    """append_events with a good first event and ``event`` second."""
    events = Jsonb([{"type": "A", "data": {}}, event])
    return bad("append_events", sqlstate, label, detail=detail, events=events)


def event(**fields: Any) -> dict[str, Any]:
    """An element of the events array: type "A" and empty data unless given."""
    return {"type": "A", "data": {}, **fields}


CURSOR_2_64 = "18446744073709551616:1"  # 2^64: past the largest xid8
CURSOR_2_63 = "1:9223372036854775808"  # 2^63: past the largest position

# One row per case, so that each SQLSTATE is one literal on its row.
# fmt: off
CASES = [
    # append_event
    bad("append_event", "MX010", "category-null", category=None),
    bad("append_event", "MX010", "category-empty", category=""),
    bad("append_event", "MX010", "category-too-long", category=LONG),
    bad("append_event", "MX010", "category-1MB", category=HUGE),
    bad("append_event", "MX010", "stream_id-null", stream_id=None),
    bad("append_event", "MX010", "stream_id-empty", stream_id=""),
    bad("append_event", "MX010", "stream_id-too-long", stream_id=LONG),
    bad("append_event", "MX010", "stream_id-1MB", stream_id=HUGE),
    bad("append_event", "MX011", "event_type-null", event_type=None),
    bad("append_event", "MX011", "event_type-empty", event_type=""),
    bad("append_event", "MX011", "event_type-too-long", event_type=LONG),
    bad("append_event", "MX011", "event_type-1MB", event_type=HUGE),
    bad("append_event", "MX012", "data-null", data=None),
    bad("append_event", "MX012", "data-json-null", data=Jsonb(None)),
    bad("append_event", "MX012", "data-array", data=Jsonb([1, 2])),
    bad("append_event", "MX012", "data-string", data=Jsonb("text")),
    bad("append_event", "MX012", "data-number", data=Jsonb(42)),
    bad("append_event", "MX012", "metadata-array", metadata=Jsonb([])),
    bad("append_event", "MX012", "metadata-string", metadata=Jsonb("text")),
    bad("append_event", "MX012", "metadata-number", metadata=Jsonb(1)),
    bad("append_event", "MX016", "expected_version--2", expected_version=-2),
    # ... that depend on what is stored (optimistic concurrency, event ids)
    bad("append_event", "MX001", "expected_version-stale", stream_id="1", expected_version=2,
        detail="actual version 3"),
    bad("append_event", "MX001", "expected_version-0-stream-exists", stream_id="1",
        expected_version=0, detail="actual version 3"),
    bad("append_event", "MX001", "expected_version--1-stream-missing", expected_version=-1,
        detail="actual version 0"),
    bad("append_event", "MX002", "event_id-taken", event_id=WORLD_IDS[0], detail="cart/2"),
    # append_events: the stream
    bad("append_events", "MX010", "category-null", category=None),
    bad("append_events", "MX010", "category-empty", category=""),
    bad("append_events", "MX010", "category-too-long", category=LONG),
    bad("append_events", "MX010", "stream_id-null", stream_id=None),
    bad("append_events", "MX010", "stream_id-empty", stream_id=""),
    bad("append_events", "MX010", "stream_id-too-long", stream_id=LONG),
    # append_events: the array itself
    bad("append_events", "MX013", "events-null", events=None),
    bad("append_events", "MX013", "events-object", events=Jsonb({"type": "A", "data": {}})),
    bad("append_events", "MX013", "events-string", events=Jsonb("[]")),
    bad("append_events", "MX013", "events-empty", events=Jsonb([])),
    bad("append_events", "MX013", "events-10001", events=Jsonb([event()] * 10001)),
    # append_events: one element; the DETAIL names which
    bad_event("MX013", "element-not-object", ["A", {}]),
    bad_event("MX013", "element-null", None),
    bad_event("MX013", "missing-type", {"data": {}}),
    bad_event("MX013", "type-not-string", {"type": 1, "data": {}}),
    bad_event("MX013", "type-empty", {"type": "", "data": {}}),
    bad_event("MX013", "type-too-long", {"type": LONG, "data": {}}),
    bad_event("MX013", "missing-data", {"type": "A"}),
    bad_event("MX013", "data-array", {"type": "A", "data": []}),
    bad_event("MX013", "data-null", {"type": "A", "data": None}),
    bad_event("MX013", "metadata-array", {"type": "A", "data": {}, "metadata": [1]}),
    bad_event("MX013", "unknown-key", {"type": "A", "data": {}, "payload": {}}),
    bad_event("MX013", "id-not-uuid", {"type": "A", "data": {}, "id": "not-a-uuid"}),
    bad_event("MX013", "id-number", {"type": "A", "data": {}, "id": 7}),
    bad("append_events", "MX013", "type-1MB", events=Jsonb([event(type=HUGE)]), detail="event 1"),
    bad("append_events", "MX013", "duplicate-id", events=Jsonb([event(id=UUID)] * 2)),
    bad("append_events", "MX013", "ids-differ-in-case-only",
        events=Jsonb([event(id=UPPER), event(id=UPPER.lower())])),
    bad("append_events", "MX016", "expected_version--2", expected_version=-2),
    # ... that depend on what is stored
    bad("append_events", "MX001", "expected_version-stale", stream_id="1", expected_version=1,
        detail="actual version 3"),
    bad("append_events", "MX002", "id-taken", events=Jsonb([event(id=WORLD_IDS[1])]),
        detail="cart/2"),
    bad("append_events", "MX003", "partial-retry", stream_id="2", detail="1 of the 2",
        events=Jsonb([event(type="Added", data={"n": 0}, id=WORLD_IDS[0]), event(id=UUID)])),
    # read_stream
    bad("read_stream", "MX010", "category-null", category=None),
    bad("read_stream", "MX010", "category-empty", category=""),
    bad("read_stream", "MX010", "category-too-long", category=LONG),
    bad("read_stream", "MX010", "stream_id-null", stream_id=None),
    bad("read_stream", "MX010", "stream_id-empty", stream_id=""),
    bad("read_stream", "MX010", "stream_id-too-long", stream_id=LONG),
    bad("read_stream", "MX014", "max_count-0", max_count=0),
    bad("read_stream", "MX014", "max_count--1", max_count=-1),
    bad("read_stream", "MX014", "max_count-10001", max_count=10001),
    bad("read_stream", "MX014", "max_count-null", max_count=None),
    bad("read_stream", "MX017", "from_version-0", from_version=0),
    bad("read_stream", "MX017", "from_version--1", from_version=-1),
    bad("read_stream", "MX017", "backwards-null", backwards=None),
    # read_events
    bad("read_events", "MX014", "max_count-0", max_count=0),
    bad("read_events", "MX014", "max_count--1", max_count=-1),
    bad("read_events", "MX014", "max_count-10001", max_count=10001),
    bad("read_events", "MX014", "max_count-null", max_count=None),
    bad("read_events", "MX015", "after-empty", after=""),
    bad("read_events", "MX015", "after-abc", after="abc"),
    bad("read_events", "MX015", "after-1:", after="1:"),
    bad("read_events", "MX015", "after-:1", after=":1"),
    bad("read_events", "MX015", "after-1:2:3", after="1:2:3"),
    bad("read_events", "MX015", "after--1:5", after="-1:5"),
    bad("read_events", "MX015", "after-1:-5", after="1:-5"),
    bad("read_events", "MX015", "after-leading-space", after=" 1:2"),
    bad("read_events", "MX015", "after-trailing-newline", after="1:2\n"),
    bad("read_events", "MX015", "after-23-digit-xid", after="99999999999999999999999:1"),
    bad("read_events", "MX015", "after-xid-2^64", after=CURSOR_2_64),
    bad("read_events", "MX015", "after-position-2^63", after=CURSOR_2_63),
    bad("read_events", "MX015", "after-1MB", after=HUGE),
    bad("read_events", "MX018", "categories-empty", categories=[]),
    bad("read_events", "MX018", "categories-null-element", categories=[None]),
    bad("read_events", "MX018", "categories-empty-name", categories=[""]),
    bad("read_events", "MX018", "categories-2d", categories=[["cart"], ["other"]]),
    bad("read_events", "MX018", "event_types-empty", event_types=[]),
    bad("read_events", "MX018", "event_types-null-element", event_types=[None]),
    bad("read_events", "MX018", "event_types-empty-name", event_types=[""]),
    # stream_version
    bad("stream_version", "MX010", "category-null", category=None),
    bad("stream_version", "MX010", "category-empty", category=""),
    bad("stream_version", "MX010", "category-too-long", category=LONG),
    bad("stream_version", "MX010", "stream_id-null", stream_id=None),
    bad("stream_version", "MX010", "stream_id-empty", stream_id=""),
    bad("stream_version", "MX010", "stream_id-too-long", stream_id=LONG),
    # create_subscription: checked in order name, filters, partitions, max_attempts, start_at
    bad("create_subscription", "MX024", "name-null", name=None),
    bad("create_subscription", "MX024", "name-empty", name=""),
    bad("create_subscription", "MX024", "name-256", name=LONG),
    bad("create_subscription", "MX024", "name-1MB", name=HUGE),
    bad("create_subscription", "MX026", "partitions-0", partitions=0),
    bad("create_subscription", "MX026", "partitions-1025", partitions=1025),
    bad("create_subscription", "MX026", "partitions-null", partitions=None),
    bad("create_subscription", "MX026", "partitions-negative", partitions=-3),
    bad("create_subscription", "MX027", "max_attempts-0", max_attempts=0),
    bad("create_subscription", "MX027", "max_attempts-1001", max_attempts=1001),
    bad("create_subscription", "MX027", "max_attempts-null", max_attempts=None),
    bad("create_subscription", "MX028", "start_at-middle", start_at="middle"),
    bad("create_subscription", "MX028", "start_at-empty", start_at=""),
    bad("create_subscription", "MX028", "start_at-null", start_at=None),
    bad("create_subscription", "MX028", "start_at-half-cursor", start_at="12:"),
    bad("create_subscription", "MX028", "start_at-no-colon", start_at="12"),
    bad("create_subscription", "MX028", "start_at-Beginning", start_at="Beginning"),
    bad("create_subscription", "MX018", "categories-empty", categories=[]),
    bad("create_subscription", "MX018", "categories-null-element", categories=["cart", None]),
    bad("create_subscription", "MX018", "categories-empty-name", categories=[""]),
    bad("create_subscription", "MX018", "event_types-empty", event_types=[]),
    bad("create_subscription", "MX018", "event_types-empty-name", event_types=["Added", ""]),
    bad("create_subscription", "MX018", "event_types-2d",
        event_types=[["Added", "Removed"], ["A", "B"]]),
    bad("create_subscription", "MX024", "name-before-filters", name="", categories=[]),
    bad("create_subscription", "MX021", "redefined", name="sub", partitions=3, detail="sub"),
    bad("create_subscription", "MX021", "redefined-categories", name="sub", categories=["other"]),
    # claim_batch
    bad("claim_batch", "MX020", "unknown-subscription", subscription="nope", detail="nope"),
    bad("claim_batch", "MX020", "subscription-null", subscription=None),
    bad("claim_batch", "MX040", "worker-null", worker=None),
    bad("claim_batch", "MX040", "worker-empty", worker=""),
    bad("claim_batch", "MX040", "worker-256", worker=LONG),
    bad("claim_batch", "MX040", "worker-1MB", worker=HUGE),
    bad("claim_batch", "MX014", "max_count-0", max_count=0),
    bad("claim_batch", "MX014", "max_count-10001", max_count=10001),
    bad("claim_batch", "MX014", "max_count-null", max_count=None),
    bad("claim_batch", "MX014", "max_count-2e9", max_count=2_000_000_000),
    bad("claim_batch", "MX041", "lease-0", lease=timedelta(0)),
    bad("claim_batch", "MX041", "lease-negative", lease=timedelta(seconds=-1)),
    bad("claim_batch", "MX041", "lease-2-days", lease=timedelta(days=2)),
    bad("claim_batch", "MX041", "lease-null", lease=None),
    # claim_partition, read_partition, ack_through: batches read on a standby
    bad("claim_partition", "MX020", "unknown-subscription", subscription="nope"),
    bad("claim_partition", "MX040", "worker-null", worker=None),
    bad("claim_partition", "MX040", "worker-empty", worker=""),
    bad("claim_partition", "MX041", "lease-0", lease=timedelta(0)),
    bad("claim_partition", "MX041", "lease-null", lease=None),
    bad("read_partition", "MX020", "unknown-subscription", subscription="nope"),
    bad("read_partition", "MX042", "partition--1", partition=-1),
    bad("read_partition", "MX042", "partition-2", partition=2),
    bad("read_partition", "MX042", "partition-null", partition=None),
    bad("read_partition", "MX014", "max_count-0", max_count=0),
    bad("read_partition", "MX014", "max_count-10001", max_count=10001),
    bad("read_partition", "MX015", "until-malformed", until="x", detail="x"),
    bad("read_partition", "MX015", "until-null", until=None),
    bad("read_partition", "MX015", "after-malformed", after="1:"),
    bad("ack_through", "MX020", "unknown-subscription", subscription="nope"),
    bad("ack_through", "MX040", "worker-null", worker=None),
    bad("ack_through", "MX042", "partition--1", partition=-1),
    bad("ack_through", "MX022", "partition-not-leased", partition=Ref("other_partition")),
    bad("ack_through", "MX022", "other-worker", worker="intruder"),
    bad("ack_through", "MX015", "cursor-malformed", cursor="x:y"),
    bad("ack_through", "MX015", "cursor-null", cursor=None),
    bad("ack_through", "MX023", "cursor-at-the-start", cursor="0:0"),
    bad("ack_through", "MX023", "cursor-beyond-the-batch", cursor=Ref("end")),
    # ack
    bad("ack", "MX020", "unknown-subscription", subscription="nope"),
    bad("ack", "MX042", "partition--1", partition=-1),
    bad("ack", "MX042", "partition-999", partition=999),
    bad("ack", "MX042", "partition-null", partition=None),
    bad("ack", "MX022", "partition-not-leased", partition=Ref("other_partition")),
    bad("ack", "MX023", "position-outside-batch", event_position=Ref("outside")),
    bad("ack", "MX023", "position-missing", event_position=999_999),
    bad("ack", "MX023", "position-null", event_position=None),
    bad("ack", "MX023", "position-negative", event_position=-1),
    bad("ack", "MX022", "other-worker", worker="intruder", detail="intruder"),
    bad("ack", "MX040", "worker-null", worker=None),
    bad("ack", "MX040", "worker-empty", worker=""),
    # nack
    bad("nack", "MX020", "unknown-subscription", subscription="nope"),
    bad("nack", "MX042", "partition--1", partition=-1),
    bad("nack", "MX042", "partition-999", partition=999),
    bad("nack", "MX023", "position-outside-batch", event_position=Ref("outside")),
    bad("nack", "MX023", "position-null", event_position=None),
    bad("nack", "MX022", "other-worker", worker="intruder"),
    bad("nack", "MX040", "worker-null", worker=None),
    bad("nack", "MX040", "worker-empty", worker=""),
    bad("nack", "MX043", "retry_after-negative", retry_after=timedelta(seconds=-1)),
    bad("nack", "MX043", "retry_after-over-1-day", retry_after=timedelta(days=1, seconds=1)),
    bad("nack", "MX043", "retry_after-null", retry_after=None),
    # release
    bad("release", "MX040", "worker-null", worker=None),
    bad("release", "MX040", "worker-empty", worker=""),
    bad("release", "MX040", "worker-256", worker=LONG),
    bad("release", "MX020", "unknown-subscription", subscription="nope"),
    bad("renew_lease", "MX040", "worker-null", worker=None),
    bad("renew_lease", "MX040", "worker-empty", worker=""),
    bad("renew_lease", "MX020", "unknown-subscription", subscription="nope"),
    # reset_subscription
    bad("reset_subscription", "MX028", "start_at-middle", start_at="middle"),
    bad("reset_subscription", "MX028", "start_at-null", start_at=None),
    bad("reset_subscription", "MX028", "start_at-cursor-too-big", start_at=CURSOR_2_63),
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
    bad("save_snapshot", "MX030", "version-beyond-current", version=4, detail="version 3"),
    bad("save_snapshot", "MX030", "version-null", version=None),
    bad("save_snapshot", "MX030", "stream-missing", stream_id="nope", version=1),
    bad("save_snapshot", "MX032", "state-array", state=Jsonb([1])),
    bad("save_snapshot", "MX032", "state-string", state=Jsonb("x")),
    bad("save_snapshot", "MX032", "state-json-null", state=Jsonb(None)),
    bad("save_snapshot", "MX032", "state-null", state=None),
    bad("save_snapshot", "MX010", "category-empty", category=""),
    bad("save_snapshot", "MX010", "stream_id-256", stream_id=LONG),
    bad("load_snapshot", "MX010", "category-empty", category=""),
    bad("load_snapshot", "MX010", "stream_id-null", stream_id=None),
    bad("load_snapshot", "MX031", "max_version-0", max_version=0),
    # list_streams, delete_stream
    bad("list_streams", "MX014", "max_count-0", max_count=0),
    bad("list_streams", "MX014", "max_count-10001", max_count=10001),
    bad("list_streams", "MX010", "category-null", category=None),
    bad("list_streams", "MX010", "category-empty", category=""),
    bad("list_streams", "MX010", "category-1MB", category=HUGE),
    bad("delete_stream", "MX019", "before_version-0", before_version=0),
    bad("delete_stream", "MX019", "before_version-negative", before_version=-5),
    bad("delete_stream", "MX010", "stream_id-empty", stream_id=""),
    bad("delete_stream", "MX010", "category-null", category=None),
]

# fmt: on

CASE = {case.id: case for case in CASES}
assert len(CASE) == len(CASES), "case labels are unique per function"

# SQLSTATEs of the SQL that no single call can cause: tested where they can happen.
NOT_CATALOGUED = {
    "MX004": "an append in a transaction older than the stream's last (test_concurrency.py)",
    "MX050": "a log moved from another cluster, not adopted yet (test_moving.py)",
    "MX060": "an invalid meowmx.role_prefix at install (test_managed.py)",
    "MX061": "another meowmx.role_prefix than at the first install (test_managed.py)",
}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_call_is_refused_and_writes_nothing(world: World, case: Case) -> None:
    before = fingerprint(world.conn)
    with pytest.raises(psycopg.Error) as info:
        call_sql(world.conn, case.function, **resolve(case.args, world.ctx))
    diag = info.value.diag
    assert info.value.sqlstate == case.sqlstate, f"{info.value.sqlstate}: {diag.message_primary}"
    assert diag.message_detail, "a DETAIL says what was wrong"
    if case.detail:
        assert case.detail in diag.message_detail
    assert diag.message_hint, "a HINT says what to do"
    assert fingerprint(world.conn) == before


def public_functions(conn: Connection) -> dict[str, int]:
    """The public meowmx functions (not _private) and how many arguments each takes."""
    rows = conn.execute(
        "SELECT proname, pronargs FROM pg_proc"
        " WHERE pronamespace = 'meowmx'::regnamespace AND proname !~ '^_'"
    )
    return dict(rows.fetchall())


def shipped_sql() -> str:
    """The current definition of the SQL (what a fresh install runs)."""
    return "".join(text for _, text in schema_files())


def test_the_catalogue_covers_every_function_and_sqlstate(world: World) -> None:
    functions = public_functions(world.conn)
    assert set(VALID) == set(functions), "VALID needs a valid call of each public function"
    without_cases = {name for name, nargs in functions.items() if nargs} - {
        case.function for case in CASES
    }
    # drop_subscription takes any name: NULL or unknown is false (tested below).
    assert without_cases == {"drop_subscription"}
    raised = set(re.findall(r"'(MX\d{3})'", shipped_sql()))
    assert raised - {case.sqlstate for case in CASES} == set(NOT_CATALOGUED)


def test_the_world_is_as_described(world: World) -> None:
    """WORLD_STREAMS and WORLD_SUBSCRIPTIONS, which the model test relies on, are true."""
    names = world.conn.execute("SELECT name FROM meowmx.subscriptions").fetchall()
    assert {name for (name,) in names} == WORLD_SUBSCRIPTIONS
    for (category, stream_id), version in WORLD_STREAMS.items():
        assert call_sql(world.conn, "stream_version", category=category, stream_id=stream_id) == [
            (version,)
        ]


def test_the_valid_calls_themselves_work(world: World) -> None:
    """Each baseline call succeeds in the world, so each case fails for its one change;
    and the other valid calls take the paths they are there for."""
    before = fingerprint(world.conn)
    calls = [*((f, args, None) for f, args in VALID.items()), *MORE_VALID]
    for function, args, expected in calls:
        with world.conn.transaction(force_rollback=True):  # each sees the world as built
            rows = call_sql(world.conn, function, **resolve(args, world.ctx))
        if expected is not None:
            assert rows == expected, (function, args)
    assert fingerprint(world.conn) == before


def test_drop_subscription_of_null_or_unknown_is_false(world: World) -> None:
    before = fingerprint(world.conn)
    assert call_sql(world.conn, "drop_subscription", name=None) == [(False,)]
    assert call_sql(world.conn, "drop_subscription", name="nope") == [(False,)]
    assert call_sql(world.conn, "drop_subscription", name="") == [(False,)]
    assert fingerprint(world.conn) == before


def test_the_limits_themselves_are_accepted(connect: Callable[..., Connection]) -> None:
    """255 characters and max_count 1 and 10000 are in range (the cases above are one past)."""
    db = connect()
    name = "x" * 255
    call_sql(db, "append_event", category=name, stream_id=name, event_type=name, data={})
    assert call_sql(db, "stream_version", category=name, stream_id=name) == [(1,)]
    for max_count in (1, 10000):
        rows = call_sql(db, "read_stream", category=name, stream_id=name, max_count=max_count)
        assert len(rows) == 1
        call_sql(db, "read_events", max_count=max_count)
    events = Jsonb([{"type": "A", "data": {}}] * 10000)
    assert len(call_sql(db, "append_events", category="c", stream_id="big", events=events)) == 10000


# The Python binding: the typed exception of the catalogue row each call mirrors ------------

PYTHON_CASES: list[tuple[str, Callable[[Client, dict[str, int]], Any]]] = [
    ("append_event:category-empty", lambda c, w: c.append("", "1", "Added", {})),
    ("append_event:event_type-empty", lambda c, w: c.append("cart", "1", "", {})),
    ("append_event:data-array", lambda c, w: c.append("cart", "1", "Added", [1])),
    (
        "append_event:expected_version--2",
        lambda c, w: c.append("cart", "1", "Added", {}, expected_version=-2),
    ),
    ("append_events:events-empty", lambda c, w: c.append_many("cart", "1", [])),
    (
        "append_events:data-array",
        lambda c, w: c.append_many("cart", "1", [NewEvent("A", {}), NewEvent("B", [1])]),  # type: ignore[arg-type]
    ),
    (
        "append_events:duplicate-id",
        lambda c, w: c.append_many("cart", "1", [NewEvent("A", {}, id=uuid.UUID(UUID))] * 2),
    ),
    ("read_stream:max_count-0", lambda c, w: c.read_stream_page("cart", "1", max_count=0)),
    ("read_stream:from_version-0", lambda c, w: c.read_stream_page("cart", "1", from_version=0)),
    ("read_events:after-1:", lambda c, w: c.read_events_page(after="1:")),
    ("read_events:after-abc", lambda c, w: next(c.read_events(after="abc"))),
    ("read_events:categories-empty", lambda c, w: c.read_events_page(categories=[])),
    ("read_events:event_types-empty-name", lambda c, w: list(c.read_events(event_types=[""]))),
    ("stream_version:stream_id-empty", lambda c, w: c.stream_version("cart", "")),
    (
        "create_subscription:partitions-1025",
        lambda c, w: c.create_subscription("new", partitions=1025),
    ),
    ("claim_batch:unknown-subscription", lambda c, w: c.claim_batch("nope", "w2")),
    ("claim_batch:lease-0", lambda c, w: c.claim_batch("sub", "w2", lease=timedelta(0))),
    ("requeue_parked:not-parked", lambda c, w: c.requeue_parked("dead", w["outside"])),
]


@pytest.mark.parametrize(("case_id", "call"), PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_python_raises_the_typed_exception(
    world: World, case_id: str, call: Callable[[Client, dict[str, Any]], Any]
) -> None:
    cls = ERRORS[CASE[case_id].sqlstate]
    before = fingerprint(world.conn)
    with Client(world.dsn) as client, pytest.raises(cls) as info:
        call(client, world.ctx)
    cause = info.value.__cause__
    assert isinstance(cause, psycopg.Error), "typed error must come from the server's error"
    assert cause.sqlstate == cls.sqlstate
    assert info.value.detail and info.value.hint
    assert (CASE[case_id].detail or "") in info.value.detail
    assert info.value.hint in str(info.value)
    assert fingerprint(world.conn) == before


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
    before = fingerprint(world.conn)
    done = psql("\\set VERBOSITY verbose\n" + sql_text, world.dsn, check=False)
    assert done.returncode != 0
    assert f"ERROR:  {sqlstate}:" in done.stderr, done.stderr
    assert fingerprint(world.conn) == before


# The model of the random calls: which catalogue row a call's first problem matches ------

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


def code(case_id: str) -> str:
    """The SQLSTATE of a catalogue row: the model's codes all come from the catalogue."""
    return CASE[case_id].sqlstate


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
    return not isinstance(name, str) or name == "" or len(name) > 255


def bad_filter(names: Any) -> bool:
    return names is not None and (len(names) == 0 or any(bad_name(n) for n in names))


def bad_cursor(cursor: Any) -> bool:
    found = isinstance(cursor, str) and CURSOR_RE.fullmatch(cursor)
    return not found or int(found[1]) > 2**64 - 1 or int(found[2]) > 2**63 - 1


def bad_ref_cursor(cursor: Any) -> bool:
    """A cursor the world names (a Ref) is a good one."""
    return not isinstance(cursor, Ref) and bad_cursor(cursor)


def bad_start(start_at: Any) -> bool:
    return start_at not in ("beginning", "end") and bad_cursor(start_at)


def bad_max_count(n: Any) -> bool:
    return n is None or n < 1 or n > 10000


def bad_interval(i: Any, low_ok: bool) -> bool:
    if i is None:
        return True
    too_low = i < timedelta(0) if low_ok else i <= timedelta(0)
    return too_low or i > timedelta(days=1)


def json_obj(value: Any) -> Any:
    """The Python value of a JSON argument (SQL_NULL or None for SQL NULL)."""
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


@dataclass
class Known:
    """What the model needs to know of the database: subscriptions and stream versions."""

    subscriptions: Callable[[], set[str]]
    version: Callable[[str, str], int]


# Arguments a call may leave out, at a value in range (the SQL defaults are in range).
DEFAULTS = {
    "max_count": 100,
    "backwards": False,
    "lease": timedelta(seconds=30),
    "retry_after": timedelta(0),
    "start_at": "beginning",
    "partitions": 1,
    "max_attempts": 10,
}


def expect(function: str, args: dict[str, Any], known: Known) -> str:
    """The SQLSTATE a call must fail with, or VALID_INPUT (success, or one of the
    OUTCOMES_AFTER_VALID_INPUT that depend on what is stored)."""
    a = {**DEFAULTS, **args}
    get = a.get
    stream_bad = bad_name(get("category")) or bad_name(get("stream_id"))

    def missing() -> bool:
        return get("subscription", get("name")) not in known.subscriptions()

    def row(label: str) -> str:
        return code(f"{function}:{label}")

    if function == "append_event":
        data, metadata = json_obj(get("data")), json_obj(get("metadata"))
        return first(
            (stream_bad, row("category-empty")),
            (bad_name(get("event_type")), row("event_type-empty")),
            (not isinstance(data, dict), row("data-array")),
            (
                metadata not in (SQL_NULL, None) and not isinstance(metadata, dict),
                row("metadata-array"),
            ),
            ((get("expected_version") or 0) < -1, row("expected_version--2")),
        )
    if function == "append_events":
        events = json_obj(get("events"))
        shape_bad = not isinstance(events, list) or not 1 <= len(events) <= 10000
        ids = [] if shape_bad else [e.get("id") for e in events if isinstance(e, dict)]
        given = [i.lower() for i in ids if isinstance(i, str)]  # uuids ignore case
        return first(
            (stream_bad, row("category-empty")),
            (shape_bad, row("events-empty")),
            (not shape_bad and any(event_problem(e) for e in events), row("missing-type")),
            (len(set(given)) != len(given), row("duplicate-id")),
            ((get("expected_version") or 0) < -1, row("expected_version--2")),
        )
    if function == "read_stream":
        from_version = get("from_version")
        return first(
            (stream_bad, row("category-empty")),
            (bad_max_count(get("max_count")), row("max_count-0")),
            (from_version is not None and from_version < 1, row("from_version-0")),
            (get("backwards") is None, row("backwards-null")),
        )
    if function == "read_events":
        return first(
            (bad_max_count(get("max_count")), row("max_count-0")),
            (bad_filter(get("categories")), row("categories-empty")),
            (bad_filter(get("event_types")), row("event_types-empty")),
            (get("after") is not None and bad_cursor(get("after")), row("after-abc")),
        )
    if function == "stream_version":
        return first((stream_bad, row("category-empty")))
    if function == "list_streams":
        return first(
            (bad_name(get("category")), row("category-empty")),
            (bad_max_count(get("max_count")), row("max_count-0")),
        )
    if function == "load_snapshot":
        max_version = get("max_version")
        return first(
            (stream_bad, row("category-empty")),
            (max_version is not None and max_version < 1, row("max_version-0")),
        )
    if function == "save_snapshot":
        version = get("version")
        current = 0 if stream_bad else known.version(a["category"], a["stream_id"])
        return first(
            (stream_bad, row("category-empty")),
            (version is None or not 1 <= version <= current, row("version-0")),
            (not isinstance(json_obj(get("state")), dict), row("state-array")),
        )
    if function == "create_subscription":
        partitions, max_attempts = get("partitions"), get("max_attempts")
        return first(
            (bad_name(get("name")), row("name-empty")),
            (bad_filter(get("categories")), row("categories-empty")),
            (bad_filter(get("event_types")), row("event_types-empty")),
            (partitions is None or not 1 <= partitions <= 1024, row("partitions-0")),
            (max_attempts is None or not 1 <= max_attempts <= 1000, row("max_attempts-0")),
            (bad_start(get("start_at")), row("start_at-middle")),
        )
    if function == "claim_batch":
        return first(
            (missing(), row("unknown-subscription")),
            (bad_name(get("worker")), row("worker-empty")),
            (bad_max_count(get("max_count")), row("max_count-0")),
            (bad_interval(get("lease"), low_ok=False), row("lease-0")),
        )
    if function == "claim_partition":
        return first(
            (missing(), row("unknown-subscription")),
            (bad_name(get("worker")), row("worker-empty")),
            (bad_interval(get("lease"), low_ok=False), row("lease-0")),
        )
    if function == "read_partition":  # then the partition, which depends on the subscription
        return first(
            (missing(), row("unknown-subscription")),
            (bad_max_count(get("max_count")), row("max_count-0")),
            (bad_ref_cursor(get("until")), row("until-malformed")),
            (get("after") is not None and bad_ref_cursor(get("after")), row("after-malformed")),
        )
    if function == "ack_through":
        return first(
            (missing(), row("unknown-subscription")),
            (bad_ref_cursor(get("cursor")), row("cursor-malformed")),
            (bad_name(get("worker")), row("worker-null")),
        )
    if function in ("ack", "nack", "release"):
        return first(
            (missing(), row("unknown-subscription")),
            (bad_name(get("worker")), row("worker-empty")),
        )
    if function == "requeue_parked":
        return first((missing(), row("unknown-subscription")))
    if function == "list_parked":
        return first(
            (missing(), row("unknown-subscription")),
            (bad_max_count(get("max_count")), row("max_count-0")),
        )
    if function == "reset_subscription":
        return first(
            (missing(), row("unknown")), (bad_start(get("start_at")), row("start_at-middle"))
        )
    if function == "subscription_status":
        return first((get("name") is not None and missing(), row("unknown")))
    assert function == "drop_subscription", f"no model of {function}"
    return VALID_INPUT


# What input that passes the argument checks can still meet, depending on what is stored.
OUTCOMES_AFTER_VALID_INPUT = {
    "append_event": {
        code("append_event:expected_version-stale"),
        code("append_event:event_id-taken"),
        code("append_events:partial-retry"),
    },
    "append_events": {
        code("append_events:expected_version-stale"),
        code("append_events:id-taken"),
        code("append_events:partial-retry"),
    },
    "create_subscription": {code("create_subscription:redefined")},
    "save_snapshot": {code("save_snapshot:version-beyond-current")},
    "ack": {
        code("ack:other-worker"),
        code("ack:position-outside-batch"),
        code("ack:partition-999"),
    },
    "nack": {
        code("nack:other-worker"),
        code("nack:position-outside-batch"),
        code("nack:partition-999"),
        code("nack:retry_after-negative"),  # not modelled: a nack that succeeds is checked for it
    },
    "requeue_parked": {code("requeue_parked:not-parked")},
    "read_partition": {code("read_partition:partition-2")},
    "ack_through": {
        code("ack_through:partition--1"),
        code("ack_through:other-worker"),
        code("ack_through:cursor-at-the-start"),
    },
}
MODELLED = {
    *OUTCOMES_AFTER_VALID_INPUT,
    "read_stream",
    "read_events",
    "stream_version",
    "list_streams",
    "load_snapshot",
    "claim_batch",
    "claim_partition",
    "release",
    "list_parked",
    "reset_subscription",
    "subscription_status",
    "drop_subscription",
}


def test_the_model_of_the_random_calls_agrees_with_the_catalogue() -> None:
    """The random calls below are checked against this model, so it must say what the
    catalogue says for every row (no database needed: the world is known)."""
    known = Known(lambda: set(WORLD_SUBSCRIPTIONS), lambda c, s: WORLD_STREAMS.get((c, s), 0))
    checked, wrong = 0, []
    for case in CASES:
        if case.function not in MODELLED:
            continue
        checked += 1
        expected = expect(case.function, case.args, known)
        if expected == VALID_INPUT:
            expected = f"one of {sorted(OUTCOMES_AFTER_VALID_INPUT[case.function])}"
            if case.sqlstate in OUTCOMES_AFTER_VALID_INPUT[case.function]:
                continue
        if expected != case.sqlstate:
            wrong.append(f"{case.id}: the model says {expected}, the catalogue {case.sqlstate}")
    assert wrong == []
    assert checked > len(CASES) * 0.9, "nearly every function is modelled"


# Property-based: random calls succeed or fail as the model says -------------------------

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


def _short(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r:.200}" for k, v in args.items())


class Harness:
    """Runs one call, checks its outcome against the model and that a failure wrote nothing."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.outcomes: dict[str, int] = {}
        self.known = Known(self.subscriptions, self.stream_version)

    def stream_version(self, category: str, stream_id: str) -> int:
        if has_nul(category) or has_nul(stream_id):
            return 0  # cannot be sent, so cannot be stored
        row = self.conn.execute(
            "SELECT coalesce(max(version), 0) FROM meowmx.events"
            " WHERE category = %s AND stream_id = %s",
            [category, stream_id],
        ).fetchone()
        assert row is not None
        return int(row[0])

    def subscriptions(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT name FROM meowmx.subscriptions")}

    def events(self) -> tuple[int, int]:
        row = self.conn.execute(
            "SELECT count(*), coalesce(max(position), 0) FROM meowmx.events"
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    def run(self, function: str, args: dict[str, Any]) -> list[Any] | None:
        expected = expect(function, args, self.known)
        sent = {k: None if v is SQL_NULL else v for k, v in args.items()}
        if any(has_nul(v) for v in sent.values()):
            expected = CLIENT
        elif any(json_has_nul(v) for v in sent.values() if isinstance(v, Jsonb)):
            expected = "22P05"  # PostgreSQL's jsonb input rejects \u0000
        before = fingerprint(self.conn)
        events_before = self.events()
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
            else:
                assert got == expected, f"expected {expected}: {label()}"
            if got.startswith("MX"):
                assert error.diag.message_detail and error.diag.message_hint, label()
            assert fingerprint(self.conn) == before, f"a failed call wrote something: {label()}"
            return None
        self.outcomes["ok"] = self.outcomes.get("ok", 0) + 1
        assert expected == VALID_INPUT, f"{function}({_short(args)}) succeeded: {expected}"
        if function in ("append_event", "append_events"):
            self.check_append(args, events_before, rows)
        return rows

    def check_append(self, args: dict[str, Any], before: tuple[int, int], rows: list[Any]) -> None:
        """An append wrote all its events with consecutive versions, or (a retry) none."""
        count, _ = self.events()
        count_before, last_before = before
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
            harness.run("append_events", {**args, "events": events})
        else:
            harness.run("append_event", a)

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
        def pick(*keys: str) -> dict[str, Any]:
            return {k: a[k] for k in keys}

        stream = pick("category", "stream_id")
        if which == 0:
            args = {**stream, **pick("max_count", "backwards"), "from_version": a["version"]}
            harness.run("read_stream", args)
        elif which == 1:
            harness.run("read_events", pick("after", "max_count", "categories", "event_types"))
        elif which == 2:
            harness.run("stream_version", stream)
        elif which == 3:
            harness.run("list_streams", pick("category", "after", "max_count"))
        elif which == 4:
            harness.run("load_snapshot", {**stream, "max_version": a["version"]})
        else:
            harness.run("save_snapshot", {**stream, **pick("version", "state")})

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
        if a["use_recent"] and recent:  # ack or nack what was claimed last, sometimes
            a["partition"], a["position"] = recent[(a["position"] or 0) % len(recent)]
        sub = {"subscription": a["name"], "worker": a["worker"]}
        if which == 0:
            keys = ("name", "categories", "event_types", "partitions", "start_at", "max_attempts")
            harness.run("create_subscription", {k: a[k] for k in keys})
        elif which in (1, 2, 3):
            args = {**sub, "max_count": a["max_count"], "lease": a["lease"]}
            rows = harness.run("claim_batch", args)
            if rows:
                recent[:] = [(row[0], row[1]) for row in rows][-5:]
        elif which in (4, 5):
            args = {**sub, "partition": a["partition"], "event_position": a["position"]}
            if which == 4:
                harness.run("ack", args)
            else:
                args |= {"error": a["error"], "retry_after": a["retry_after"]}
                if harness.run("nack", args) is not None:
                    assert not bad_interval(a["retry_after"], low_ok=True), (
                        "nack took a bad retry_after"
                    )
        elif which == 6:
            harness.run("release", sub)
        elif which == 7:
            harness.run(
                "requeue_parked", {"subscription": a["name"], "event_position": a["position"]}
            )
            harness.run("list_parked", {"subscription": a["name"], "max_count": a["max_count"]})
        elif which == 8:
            harness.run("reset_subscription", {"name": a["name"], "start_at": a["start_at"]})
        else:
            harness.run("subscription_status", {"name": a["name"]})
            if a["partition"] == 0:
                harness.run("drop_subscription", {"name": a["name"]})

    run()
    assert_varied(harness.outcomes)


def test_nack_can_park_an_event_again_after_a_reset(connect: Callable[..., Connection]) -> None:
    """Found by the random calls above: a sequence of valid calls only."""
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
