"""Reads: read_stream, read_events (filters, cursors), stream_version, version()."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

import meowmx
from meowmx import Client, NewEvent, RecordedEvent
from support import EVENT_COLUMNS, HORIZON_PROBE, call_sql, wait_for_horizon

# (category, stream_id, event_type) appended one transaction each, in this order,
# and then one batch of two in a single transaction.
APPENDS = [
    ("cart", "1", "Created"),
    ("cart", "1", "Added"),
    ("order", "1", "Placed"),
    ("cart", "2", "Created"),
    ("user", "1", "Registered"),
    ("cart", "1", "Added"),
    ("order", "1", "Paid"),
    ("cart", "2", "Added"),
]
BATCH = ("order", "2", ["Placed", "Paid"])


@pytest.fixture
def db(connect: Callable[..., psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
    return connect()


@pytest.fixture
def client(clients: Callable[[], Client]) -> Client:
    """A Client, or an AsyncClient (the scenario runs against both)."""
    return clients()


@pytest.fixture
def store(db: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    """The events of APPENDS and BATCH, committed, in commit order, visible to read_events."""
    for n, (category, stream_id, event_type) in enumerate(APPENDS):
        call_sql(
            db,
            "append_event",
            category=category,
            stream_id=stream_id,
            event_type=event_type,
            data={"n": n},
        )
    category, stream_id, types = BATCH
    events = Jsonb([{"type": t, "data": {"n": len(APPENDS) + i}} for i, t in enumerate(types)])
    call_sql(db, "append_events", category=category, stream_id=stream_id, events=events)
    wait_for_horizon(db)
    return [*APPENDS, *((category, stream_id, t) for t in types)]


def ns(events: list[RecordedEvent]) -> list[int]:
    """The ``n`` each event's data carries: its index in the order of appending."""
    return [event.data["n"] for event in events]


# read_stream ------------------------------------------------------------------------------


def fill(client: Client, count: int, category: str = "cart", stream_id: str = "1") -> None:
    client.append_many(
        category, stream_id, [NewEvent("Added", {"v": v}) for v in range(1, count + 1)]
    )


STREAM_READS = [
    # from_version, max_count, backwards, expected versions (the stream has 10)
    (None, 1000, False, list(range(1, 11))),
    (4, 1000, False, list(range(4, 11))),
    (None, 3, False, [1, 2, 3]),
    (4, 3, False, [4, 5, 6]),
    (10, 1000, False, [10]),
    (11, 1000, False, []),
    (None, 1000, True, list(range(10, 0, -1))),
    (4, 1000, True, [4, 3, 2, 1]),
    (None, 3, True, [10, 9, 8]),
    (7, 2, True, [7, 6]),
    (20, 2, True, [10, 9]),
    (1, 1000, True, [1]),
]


@pytest.mark.parametrize(("from_version", "max_count", "backwards", "expected"), STREAM_READS)
def test_read_stream(
    client: Client,
    db: psycopg.Connection[Any],
    from_version: int | None,
    max_count: int,
    backwards: bool,
    expected: list[int],
) -> None:
    fill(client, 10)
    fill(client, 3, stream_id="2")
    fill(client, 3, category="order")
    named = {"max_count": max_count, "backwards": backwards}
    if from_version is not None:
        named["from_version"] = from_version
    rows = call_sql(
        db,
        "read_stream",
        "category, stream_id, version, data",
        category="cart",
        stream_id="1",
        **named,
    )
    assert [tuple(row) for row in rows] == [("cart", "1", v, {"v": v}) for v in expected]

    page = client.read_stream_page(
        "cart", "1", from_version=from_version, max_count=max_count, backwards=backwards
    )
    assert [e.version for e in page] == expected


def test_read_stream_rows_carry_the_contract_columns(
    client: Client, db: psycopg.Connection[Any]
) -> None:
    appended = client.append("cart", "1", "Added", {"sku": "a"}, metadata={"m": 1})
    cur = db.execute("SELECT * FROM meowmx.read_stream(category => 'cart', stream_id => '1')")
    names = [column.name for column in cur.description or ()]
    assert set(EVENT_COLUMNS) <= set(names)
    (row,) = cur.fetchall()
    event = dict(zip(names, row, strict=True))
    assert (event["position"], event["version"]) == (appended.position, appended.version)
    assert (event["category"], event["stream_id"], event["event_type"]) == ("cart", "1", "Added")
    assert (event["data"], event["metadata"], event["event_id"]) == ({"sku": "a"}, {"m": 1}, None)
    assert event["recorded_at"] is not None and event["cursor"]


def test_a_missing_stream_reads_as_empty(client: Client) -> None:
    fill(client, 2)
    assert client.read_stream_page("cart", "nope") == []
    assert list(client.read_stream("cart", "nope", backwards=True)) == []
    assert client.stream_version("cart", "nope") == 0


def test_paging_a_stream_with_max_count(client: Client, db: psycopg.Connection[Any]) -> None:
    fill(client, 10)
    seen: list[int] = []
    from_version = 1
    while True:
        rows = call_sql(
            db,
            "read_stream",
            "version",
            category="cart",
            stream_id="1",
            from_version=from_version,
            max_count=4,
        )
        seen += [row[0] for row in rows]
        if len(rows) < 4:
            break
        from_version = rows[-1][0] + 1
    assert seen == list(range(1, 11))


@pytest.mark.parametrize("count", [10, 9, 2, 0])
@pytest.mark.parametrize("backwards", [False, True])
def test_the_stream_iterator_pages_through_everything(
    client: Client, count: int, backwards: bool
) -> None:
    if count:
        fill(client, count)
    versions = [
        e.version for e in client.read_stream("cart", "1", backwards=backwards, page_size=3)
    ]
    expected = list(range(1, count + 1))
    assert versions == (expected[::-1] if backwards else expected)


def test_the_stream_iterator_starts_at_from_version(client: Client) -> None:
    fill(client, 10)
    forward = client.read_stream("cart", "1", from_version=5, page_size=2)
    assert [e.version for e in forward] == [5, 6, 7, 8, 9, 10]
    backward = client.read_stream("cart", "1", from_version=5, backwards=True, page_size=2)
    assert [e.version for e in backward] == [5, 4, 3, 2, 1]


def test_the_stream_iterator_is_lazy(client: Client) -> None:
    """Pages are fetched as the caller goes, so events appended meanwhile are included."""
    fill(client, 4)
    events = client.read_stream("cart", "1", page_size=3)
    first = next(events)
    fill(client, 3)  # versions 5..7
    assert [first.version, *(e.version for e in events)] == list(range(1, 8))


def test_stream_version(client: Client, db: psycopg.Connection[Any]) -> None:
    assert client.stream_version("cart", "1") == 0
    client.append("cart", "1", "Created", {})
    fill(client, 4)
    fill(client, 2, stream_id="2")
    assert client.stream_version("cart", "1") == 5
    assert [tuple(r) for r in call_sql(db, "stream_version", category="cart", stream_id="2")] == [
        (2,)
    ]


# read_events ------------------------------------------------------------------------------


def test_read_events_returns_everything_in_commit_order(
    store: list[Any], db: psycopg.Connection[Any], client: Client
) -> None:
    events = client.read_events_page()
    assert ns(events) == list(range(len(store)))
    assert [(e.category, e.stream_id, e.event_type) for e in events] == store
    positions = [e.position for e in events]
    assert len(set(positions)) == len(positions)
    assert [e.transaction_id for e in events] == sorted(e.transaction_id for e in events)
    # The two events of the batch share its transaction.
    assert events[-1].transaction_id == events[-2].transaction_id

    rows = call_sql(db, "read_events", "data ->> 'n'")
    assert [int(row[0]) for row in rows] == ns(events)


def test_read_events_rows_carry_the_contract_columns(
    store: list[Any], db: psycopg.Connection[Any]
) -> None:
    cur = db.execute("SELECT * FROM meowmx.read_events(max_count => 1)")
    assert set(EVENT_COLUMNS) <= {column.name for column in cur.description or ()}


@pytest.mark.parametrize("page", [1, 3, 4, 1000])
def test_continuing_from_a_cursor(
    store: list[Any], db: psycopg.Connection[Any], client: Client, page: int
) -> None:
    seen: list[int] = []
    after = None
    while True:
        rows = call_sql(db, "read_events", "data ->> 'n', cursor", after=after, max_count=page)
        seen += [int(row[0]) for row in rows]
        if not rows:
            break
        after = rows[-1][1]
    assert seen == list(range(len(store)))

    # After the last cursor there is nothing, until something new commits.
    assert client.read_events_page(after=after) == []
    client.append("late", "1", "Arrived", {"n": 99})
    wait_for_horizon(db)
    assert ns(client.read_events_page(after=after)) == [99]


def test_the_events_iterator_pages_through_everything(store: list[Any], client: Client) -> None:
    assert ns(list(client.read_events(page_size=2))) == list(range(len(store)))
    third = client.read_events_page(max_count=3)[-1]
    assert ns(list(client.read_events(after=third.cursor, page_size=2))) == list(
        range(3, len(store))
    )


FILTERS = [
    # categories, event_types
    (["cart"], None),
    (["order"], None),
    (["cart", "order"], None),
    (["order", "cart", "cart"], None),
    (["user", "order", "cart"], None),
    (["nothing"], None),
    (["cart", "nothing"], None),
    (None, ["Added"]),
    (None, ["Placed", "Paid"]),
    (None, ["Paid", "Added", "Paid"]),
    (None, ["Nothing"]),
    (["cart"], ["Added"]),
    (["cart", "order"], ["Created", "Paid"]),
    (["user"], ["Added"]),
]


@pytest.mark.parametrize("page", [2, 1000])
@pytest.mark.parametrize(("categories", "event_types"), FILTERS)
def test_read_events_filters(
    store: list[tuple[str, str, str]],
    client: Client,
    categories: list[str] | None,
    event_types: list[str] | None,
    page: int,
) -> None:
    """Filtered reads are the full read with the others left out: same commit order."""
    expected = [
        n
        for n, (category, _, event_type) in enumerate(store)
        if (categories is None or category in categories)
        and (event_types is None or event_type in event_types)
    ]
    events = list(
        client.read_events(categories=categories, event_types=event_types, page_size=page)
    )
    assert ns(events) == expected


def test_a_filtered_cursor_continues_a_filtered_read(store: list[Any], client: Client) -> None:
    first = client.read_events_page(categories=["cart", "order"], max_count=3)
    rest = client.read_events_page(categories=["cart", "order"], after=first[-1].cursor)
    everything = client.read_events_page(categories=["cart", "order"])
    assert ns(first + rest) == ns(everything)
    # A cursor is a place in commit order, usable with any filter.
    unfiltered = client.read_events_page(after=first[-1].cursor)
    assert ns(unfiltered) == [n for n in range(len(store)) if n > ns(first)[-1]]


# version() --------------------------------------------------------------------------------


def test_version_is_the_newest_migration(client: Client, db: psycopg.Connection[Any]) -> None:
    names = [f.name for f in files("meowmx").joinpath("sql", "upgrades").iterdir()]
    newest = max(int(m[1]) for m in (re.fullmatch(r"(\d{4})_\w+\.sql", n) for n in names) if m)
    assert db.execute("SELECT meowmx.version()").fetchone() == (newest,)
    assert client.schema_version() == newest == meowmx.latest_version()


# Query plans ------------------------------------------------------------------------------


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *itertools.chain.from_iterable(plan_nodes(p) for p in plan.get("Plans", []))]


def executed_plans(conn: psycopg.Connection[Any], sql: str) -> list[dict[str, Any]]:
    """The EXPLAIN (FORMAT JSON) plans of every statement ``sql`` runs, nested ones included
    (but the horizon probe, which reads one index entry).

    auto_explain reports the plans of the queries inside the PL/pgSQL functions as
    notices, so the test sees the plan the function really uses, not a copy of its SQL.
    """
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("LOAD 'auto_explain' needs a superuser")
    for setting, value in [
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_format", "json"),
        ("auto_explain.log_level", "notice"),
        ("client_min_messages", "notice"),
    ]:
        conn.execute("SELECT set_config(%s, %s, false)", [setting, value])
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute(sql).fetchall()
    conn.execute("SET auto_explain.log_min_duration = -1")
    explained = [json.loads(n[n.index("{") :]) for n in notices if '"Plan"' in n]
    return [e["Plan"] for e in explained if HORIZON_PROBE not in e.get("Query Text", "")]


def index_columns(conn: psycopg.Connection[Any], index: str) -> str:
    row = conn.execute(
        "SELECT pg_get_indexdef(indexrelid, 1, true) FROM pg_index"
        " WHERE indexrelid = %s::regclass AND indrelid = 'meowmx.events'::regclass",
        [f"meowmx.{index}"],
    ).fetchone()
    assert row, f"{index} is not an index of meowmx.events"
    return str(row[0])


SELECTIVE_READS = [
    # the read, the leading columns of the indexes it may use
    ("read_events(categories => ARRAY['rare'])", {"category"}),
    ("read_events(categories => ARRAY['rare', 'filler3'], max_count => 5)", {"category"}),
    ("read_events(event_types => ARRAY['Rare'])", {"event_type"}),
    (
        "read_events(categories => ARRAY['rare'], event_types => ARRAY['Rare'])",
        {"category", "event_type"},
    ),
    ("read_events(after => %(cursor)s)", {"transaction_id"}),
]


def index_problem(db: psycopg.Connection[Any], sql: str, leading: set[str]) -> str | None:
    """None if ``sql`` reads meowmx.events only through indexes led by a ``leading`` column."""
    plans = [
        p
        for p in executed_plans(db, sql)
        if any(n.get("Relation Name") == "events" for n in plan_nodes(p))
    ]
    nodes = [n for p in plans for n in plan_nodes(p)]
    scans = {n["Node Type"] for n in nodes if n.get("Relation Name") == "events"}
    used = {n["Index Name"] for n in nodes if "Index Name" in n}
    if not scans or "Seq Scan" in scans:
        return f"{sql}: scans {scans or 'nothing'} on meowmx.events"
    if not used or not all(index_columns(db, name) in leading for name in used):
        return f"{sql}: uses {used or 'no index'}, not an index led by {leading}"
    return None


@pytest.mark.parametrize(
    "fillers",
    [
        20,
        1,
    ],
    ids=["among-20-others", "among-1-dominant"],
)
def test_selective_reads_use_an_index(db: psycopg.Connection[Any], fillers: int) -> None:
    """A rare category or type among 200k other events is found through an index.

    Checked on the plans the functions really execute (EXPLAIN JSON via auto_explain),
    not by timing. The rare events arrive after ANALYZE, as a new category would.
    """
    db.execute(
        "INSERT INTO meowmx.events (category, stream_id, version, event_type, data)"
        " SELECT 'filler' || g %% %(n)s, (g / %(n)s)::text, 1, 'Filled' || g %% %(n)s, '{}'"
        " FROM generate_series(1, 200000) AS g",
        {"n": fillers},
    )
    db.execute("ANALYZE meowmx.events")
    for _ in range(2):
        call_sql(db, "append_event", category="rare", stream_id="1", event_type="Rare", data={})
    wait_for_horizon(db)
    (cursor,) = db.execute(
        "SELECT meowmx._cursor(transaction_id, position) FROM meowmx.events"
        " WHERE category <> 'rare' ORDER BY transaction_id DESC, position DESC LIMIT 1"
    ).fetchone()  # type: ignore[misc]

    problems = []
    for call, leading in SELECTIVE_READS:
        sql = "SELECT * FROM meowmx." + call.replace("%(cursor)s", f"'{cursor}'")
        assert len(db.execute(sql).fetchall()) >= 2, sql
        problems.append(index_problem(db, sql, leading))
    assert [p for p in problems if p] == []
