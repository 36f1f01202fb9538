"""Bad input gets its own SQLSTATE (class MX), a DETAIL and a HINT, and writes nothing."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

import meowmx
from meowmx import Client, NewEvent
from meowmx.errors import ERRORS
from meowmx.install import schema_files
from support import call_sql, event_count, raises_meowmx, stream_version

LONG = "x" * 256  # one past the 255-character limit
UUID = str(uuid.uuid4())

VALID = {
    "append_event": {"category": "cart", "stream_id": "1", "event_type": "Added", "data": {}},
    "append_events": {
        "category": "cart",
        "stream_id": "1",
        "events": Jsonb([{"type": "Added", "data": {}}]),
    },
    "read_stream": {"category": "cart", "stream_id": "1"},
    "read_events": {},
    "stream_version": {"category": "cart", "stream_id": "1"},
}


def bad(function: str, sqlstate: str, name: str, **overrides: Any) -> Any:
    """A call of ``function`` with valid arguments except ``overrides``."""
    return pytest.param(
        function, {**VALID[function], **overrides}, sqlstate, id=f"{function}:{name}"
    )


def bad_event(sqlstate: str, name: str, *events: Any) -> Any:
    return bad("append_events", sqlstate, name, events=Jsonb(list(events)))


STREAM_FUNCTIONS = ["append_event", "append_events", "read_stream", "stream_version"]

CASES = [
    # category and stream_id, wherever a stream is named
    *(bad(f, "MX010", "category-null", category=None) for f in STREAM_FUNCTIONS),
    *(bad(f, "MX010", "category-empty", category="") for f in STREAM_FUNCTIONS),
    *(bad(f, "MX010", "category-too-long", category=LONG) for f in STREAM_FUNCTIONS),
    *(bad(f, "MX010", "stream_id-null", stream_id=None) for f in STREAM_FUNCTIONS),
    *(bad(f, "MX010", "stream_id-empty", stream_id="") for f in STREAM_FUNCTIONS),
    *(bad(f, "MX010", "stream_id-too-long", stream_id=LONG) for f in STREAM_FUNCTIONS),
    # append_event
    bad("append_event", "MX011", "event_type-null", event_type=None),
    bad("append_event", "MX011", "event_type-empty", event_type=""),
    bad("append_event", "MX011", "event_type-too-long", event_type=LONG),
    bad("append_event", "MX012", "data-null", data=None),
    bad("append_event", "MX012", "data-json-null", data=Jsonb(None)),
    bad("append_event", "MX012", "data-array", data=Jsonb([1, 2])),
    bad("append_event", "MX012", "data-string", data=Jsonb("text")),
    bad("append_event", "MX012", "data-number", data=Jsonb(42)),
    bad("append_event", "MX012", "metadata-array", metadata=Jsonb([])),
    bad("append_event", "MX012", "metadata-string", metadata=Jsonb("text")),
    bad("append_event", "MX012", "metadata-number", metadata=Jsonb(1)),
    bad("append_event", "MX016", "expected_version--2", expected_version=-2),
    # append_events: the array itself
    bad("append_events", "MX013", "events-null", events=None),
    bad("append_events", "MX013", "events-object", events=Jsonb({"type": "A", "data": {}})),
    bad("append_events", "MX013", "events-string", events=Jsonb("[]")),
    bad("append_events", "MX013", "events-empty", events=Jsonb([])),
    bad(
        "append_events", "MX013", "events-10001", events=Jsonb([{"type": "A", "data": {}}] * 10001)
    ),
    # append_events: one element (the second; the first is fine)
    bad_event("MX013", "element-not-object", {"type": "A", "data": {}}, ["A", {}]),
    bad_event("MX013", "element-null", {"type": "A", "data": {}}, None),
    bad_event("MX013", "missing-type", {"type": "A", "data": {}}, {"data": {}}),
    bad_event("MX013", "type-not-string", {"type": "A", "data": {}}, {"type": 1, "data": {}}),
    bad_event("MX013", "type-empty", {"type": "A", "data": {}}, {"type": "", "data": {}}),
    bad_event("MX013", "type-too-long", {"type": "A", "data": {}}, {"type": LONG, "data": {}}),
    bad_event("MX013", "missing-data", {"type": "A", "data": {}}, {"type": "A"}),
    bad_event("MX013", "data-array", {"type": "A", "data": {}}, {"type": "A", "data": []}),
    bad_event("MX013", "data-null", {"type": "A", "data": {}}, {"type": "A", "data": None}),
    bad_event(
        "MX013",
        "metadata-array",
        {"type": "A", "data": {}},
        {"type": "A", "data": {}, "metadata": [1]},
    ),
    bad_event(
        "MX013", "unknown-key", {"type": "A", "data": {}}, {"type": "A", "data": {}, "payload": {}}
    ),
    bad_event(
        "MX013",
        "id-not-uuid",
        {"type": "A", "data": {}},
        {"type": "A", "data": {}, "id": "not-a-uuid"},
    ),
    bad_event("MX013", "id-number", {"type": "A", "data": {}}, {"type": "A", "data": {}, "id": 7}),
    bad_event(
        "MX013",
        "duplicate-id",
        {"type": "A", "data": {}, "id": UUID},
        {"type": "A", "data": {}, "id": UUID},
    ),
    bad_event(
        "MX013",
        "duplicate-id-other-case",
        {"type": "A", "data": {}, "id": UUID},
        {"type": "A", "data": {}, "id": UUID.upper()},
    ),
    bad("append_events", "MX016", "expected_version--2", expected_version=-2),
    # read_stream
    *(bad("read_stream", "MX014", f"max_count-{n}", max_count=n) for n in (0, -1, 10001, None)),
    bad("read_stream", "MX017", "from_version-0", from_version=0),
    bad("read_stream", "MX017", "from_version--1", from_version=-1),
    bad("read_stream", "MX017", "backwards-null", backwards=None),
    # read_events
    *(bad("read_events", "MX014", f"max_count-{n}", max_count=n) for n in (0, -1, 10001, None)),
    *(
        bad("read_events", "MX015", f"cursor-{cursor!r}", after=cursor)
        for cursor in [
            "",
            "abc",
            "1:",
            ":1",
            "1:2:3",
            "-1:5",
            "1:-5",
            " 1:2",
            "1:2\n",
            "99999999999999999999999:1",
            "18446744073709551616:1",  # 2^64: past the largest xid8
            "1:9223372036854775808",  # 2^63: past the largest position
        ]
    ),
    *(
        bad("read_events", "MX018", f"{name}-{label}", **{name: value})
        for name in ("categories", "event_types")
        for label, value in [("empty", []), ("null-element", [None]), ("empty-name", [""])]
    ),
]


@pytest.fixture
def db(connect: Callable[..., psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
    conn = connect()
    call_sql(conn, "append_event", category="cart", stream_id="1", event_type="Created", data={})
    return conn


@pytest.mark.parametrize(("function", "args", "sqlstate"), CASES)
def test_bad_input_is_refused(
    db: psycopg.Connection[Any], function: str, args: dict[str, Any], sqlstate: str
) -> None:
    with pytest.raises(psycopg.Error) as info:
        call_sql(db, function, **args)
    diag = info.value.diag
    assert info.value.sqlstate == sqlstate, diag.message_primary
    assert diag.message_detail, "a DETAIL says what was wrong"
    assert diag.message_hint, "a HINT says what to do"
    assert event_count(db) == 1
    assert stream_version(db, "cart", "1") == 1


def test_the_limits_themselves_are_accepted(db: psycopg.Connection[Any]) -> None:
    """255 characters and max_count 1 and 10000 are in range (the cases above are one past)."""
    name = "x" * 255
    call_sql(db, "append_event", category=name, stream_id=name, event_type=name, data={})
    assert stream_version(db, name, name) == 1
    for max_count in (1, 10000):
        assert (
            len(call_sql(db, "read_stream", category=name, stream_id=name, max_count=max_count))
            == 1
        )
        call_sql(db, "read_events", max_count=max_count)
    events = Jsonb([{"type": "A", "data": {}}] * 10000)
    assert len(call_sql(db, "append_events", category="c", stream_id="big", events=events)) == 10000


def raised_sqlstates() -> set[str]:
    """Every meowmx SQLSTATE named in the shipped SQL."""
    text = "".join(sql for _, sql in schema_files())
    return set(re.findall(r"'(MX\d{3})'", text))


def test_every_sqlstate_the_sql_raises_has_a_python_exception() -> None:
    raised = raised_sqlstates()
    assert raised, "found no meowmx._fail calls"
    assert raised <= set(ERRORS), f"no Python class for {sorted(raised - set(ERRORS))}"
    for sqlstate, cls in ERRORS.items():
        assert re.fullmatch(r"MX\d{3}", sqlstate)
        assert issubclass(cls, meowmx.MeowmxError) and cls.sqlstate == sqlstate
        assert getattr(meowmx, cls.__name__) is cls, "exported from the package"


PYTHON_CASES = [
    (meowmx.InvalidStream, lambda c: c.append("", "1", "Added", {})),
    (meowmx.InvalidEventType, lambda c: c.append("cart", "1", "", {})),
    (meowmx.InvalidEventData, lambda c: c.append("cart", "1", "Added", [1])),
    (meowmx.InvalidEvents, lambda c: c.append_many("cart", "1", [])),
    (
        meowmx.InvalidEvents,
        lambda c: c.append_many("cart", "1", [NewEvent("A", {}, id=uuid.UUID(UUID))] * 2),
    ),
    (
        meowmx.InvalidExpectedVersion,
        lambda c: c.append("cart", "1", "Added", {}, expected_version=-2),
    ),
    (meowmx.InvalidMaxCount, lambda c: c.read_stream_page("cart", "1", max_count=0)),
    (meowmx.InvalidStreamRead, lambda c: c.read_stream_page("cart", "1", from_version=0)),
    (meowmx.InvalidCursor, lambda c: c.read_events_page(after="1:")),
    (meowmx.InvalidCursor, lambda c: next(c.read_events(after="abc"))),
    (meowmx.InvalidFilter, lambda c: c.read_events_page(categories=[])),
    (meowmx.InvalidFilter, lambda c: list(c.read_events(event_types=[""]))),
    (meowmx.InvalidStream, lambda c: c.stream_version("cart", "")),
]


@pytest.mark.parametrize(
    ("cls", "call"),
    PYTHON_CASES,
    ids=[f"{i}-{cls.__name__}" for i, (cls, _) in enumerate(PYTHON_CASES)],
)
def test_python_raises_the_typed_exception(
    dsn: str,
    db: psycopg.Connection[Any],
    cls: type[meowmx.MeowmxError],
    call: Callable[[Client], Any],
) -> None:
    with Client(dsn) as client, raises_meowmx(cls) as info:
        call(client)
    assert ERRORS[cls.sqlstate] is cls  # type: ignore[index]
    assert info.value.detail and info.value.hint
    assert info.value.hint in str(info.value)
    assert event_count(db) == 1
