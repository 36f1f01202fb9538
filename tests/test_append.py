"""Appends through the Python Client and through SQL with named arguments.

Versions, expected_version, atomic batches, idempotent retries, event ids, stream ids,
metadata, and appends that join the caller's own transaction. Malformed input is in
test_bad_input.py's catalogue.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import inspect
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

import meowmx
from meowmx import Appended, Client, NewEvent
from meowmx.errors import translated
from support import call_sql, event_count, raises_meowmx, stream_version, stream_versions


class SqlApi:
    """The same calls as the Client, made as plain SQL with named arguments.

    Optional arguments left at None are omitted, so the SQL defaults are exercised.
    Server errors are translated exactly as the Client translates them.
    """

    def __init__(self, conn: psycopg.Connection[Any]):
        self.conn = conn

    def append(
        self,
        category: str,
        stream_id: str,
        event_type: str,
        data: Any,
        *,
        expected_version: int | None = None,
        metadata: Any = None,
        event_id: uuid.UUID | None = None,
    ) -> Appended:
        optional = {
            "expected_version": expected_version,
            "metadata": metadata,
            "event_id": event_id,
        }
        named = {name: value for name, value in optional.items() if value is not None}
        with translated():
            (row,) = call_sql(
                self.conn,
                "append_event",
                "version, position",
                category=category,
                stream_id=stream_id,
                event_type=event_type,
                data=Jsonb(data),
                **named,
            )
        return Appended(*row)

    def append_many(
        self,
        category: str,
        stream_id: str,
        events: list[NewEvent],
        *,
        expected_version: int | None = None,
    ) -> list[Appended]:
        named = {} if expected_version is None else {"expected_version": expected_version}
        with translated():
            rows = call_sql(
                self.conn,
                "append_events",
                "version, position",
                category=category,
                stream_id=stream_id,
                events=Jsonb([event.as_json() for event in events]),
                **named,
            )
        return [Appended(*row) for row in rows]


@pytest.fixture(params=["python", "sql"])
def api(request: pytest.FixtureRequest, dsn: str, connect: Callable[..., Any]) -> Iterator[Any]:
    """The append API under test: the Python Client or SQL with named arguments."""
    if request.param == "python":
        with Client(dsn) as client:
            yield client
    else:
        yield SqlApi(connect())


@pytest.fixture
def db(connect: Callable[..., psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
    """An autocommit connection for setting up and checking the store."""
    return connect()


def seed(db: psycopg.Connection[Any], category: str, stream_id: str, count: int) -> None:
    """Put ``count`` events into a stream, plus one into an unrelated stream."""
    call_sql(db, "append_event", category="unrelated", stream_id="x", event_type="Seeded", data={})
    if count:
        events = [{"type": "Seeded", "data": {"n": n}} for n in range(1, count + 1)]
        call_sql(db, "append_events", category=category, stream_id=stream_id, events=Jsonb(events))


def new_events(count: int, *, ids: bool = False) -> list[NewEvent]:
    return [
        NewEvent("Added", {"n": n}, id=uuid.uuid4() if ids else None) for n in range(1, count + 1)
    ]


# Versions ---------------------------------------------------------------------------------


def test_versions_start_at_one_and_are_consecutive(api: Any, db: psycopg.Connection[Any]) -> None:
    first = api.append("cart", "1", "Created", {"n": 0})
    batch = api.append_many("cart", "1", new_events(3))
    single = api.append("cart", "1", "Checked out", {})

    appended = [first, *batch, single]
    assert [a.version for a in appended] == [1, 2, 3, 4, 5]
    positions = [a.position for a in appended]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert stream_versions(db, "cart", "1") == [1, 2, 3, 4, 5]
    assert stream_version(db, "cart", "1") == 5


def test_each_stream_counts_its_own_versions(api: Any, db: psycopg.Connection[Any]) -> None:
    api.append_many("cart", "1", new_events(3))
    assert api.append("cart", "2", "Created", {}).version == 1
    assert api.append("order", "1", "Created", {}).version == 1  # same id, other category
    assert stream_version(db, "cart", "1") == 3


def test_append_returns_the_stored_positions(api: Any, db: psycopg.Connection[Any]) -> None:
    appended = api.append_many("cart", "1", new_events(2))
    rows = call_sql(db, "read_stream", "version, position", category="cart", stream_id="1")
    assert [tuple(row) for row in rows] == [(a.version, a.position) for a in appended]


# expected_version -------------------------------------------------------------------------

EXPECTED_VERSION_CASES = [
    # events already in the stream, expected_version, accepted
    pytest.param(0, None, True, id="any/new-stream"),
    pytest.param(3, None, True, id="any/existing"),
    pytest.param(0, 0, True, id="no-stream/new-stream"),
    pytest.param(3, 0, False, id="no-stream/existing"),
    pytest.param(0, -1, False, id="exists/new-stream"),
    pytest.param(3, -1, True, id="exists/existing"),
    pytest.param(3, 3, True, id="exact/current"),
    pytest.param(3, 2, False, id="exact/behind"),
    pytest.param(3, 4, False, id="exact/ahead"),
    pytest.param(0, 1, False, id="exact/new-stream"),
]


@pytest.mark.parametrize("batch", [False, True], ids=["append_event", "append_events"])
@pytest.mark.parametrize(("existing", "expected", "accepted"), EXPECTED_VERSION_CASES)
def test_expected_version(
    api: Any,
    db: psycopg.Connection[Any],
    existing: int,
    expected: int | None,
    accepted: bool,
    batch: bool,
) -> None:
    seed(db, "cart", "1", existing)
    count = event_count(db)

    def append() -> list[Appended]:
        if batch:
            return api.append_many("cart", "1", new_events(2), expected_version=expected)  # type: ignore[no-any-return]
        return [api.append("cart", "1", "Added", {}, expected_version=expected)]

    if accepted:
        appended = append()
        assert [a.version for a in appended] == [existing + 1 + i for i in range(len(appended))]
        assert event_count(db) == count + len(appended)
    else:
        with raises_meowmx(meowmx.WrongExpectedVersion) as info:
            append()
        assert (info.value.expected, info.value.actual) == (expected, existing)
        assert info.value.detail and info.value.hint
        assert event_count(db) == count
        assert stream_version(db, "cart", "1") == existing


def test_expected_and_actual_do_not_depend_on_the_stream_id(
    api: Any, db: psycopg.Connection[Any]
) -> None:
    stream_id = "a: expected version 7, actual version 8"
    api.append("cart", stream_id, "Created", {})
    with raises_meowmx(meowmx.WrongExpectedVersion) as info:
        api.append("cart", stream_id, "Created", {}, expected_version=0)
    assert (info.value.expected, info.value.actual) == (0, 1)


# Atomic batches ---------------------------------------------------------------------------


def test_a_batch_whose_last_id_is_taken_writes_nothing(
    api: Any, db: psycopg.Connection[Any]
) -> None:
    taken = uuid.uuid4()
    api.append("order", "9", "Placed", {}, event_id=taken)
    count = event_count(db)
    batch = [*new_events(3, ids=True), NewEvent("Added", {}, id=taken)]
    with raises_meowmx(meowmx.EventIdConflict):
        api.append_many("cart", "1", batch)
    assert event_count(db) == count
    assert stream_version(db, "cart", "1") == 0


# Idempotent retries and event ids ---------------------------------------------------------


def test_retrying_a_batch_returns_the_original_result(
    api: Any, db: psycopg.Connection[Any]
) -> None:
    api.append("cart", "1", "Created", {})
    batch = new_events(3, ids=True)
    first = api.append_many("cart", "1", batch, expected_version=1)
    api.append("cart", "1", "Checked out", {})  # the stream moves on
    count = event_count(db)

    # The retry carries the expected_version of the original call, now stale.
    again = api.append_many("cart", "1", batch, expected_version=1)

    assert again == first
    assert [a.version for a in again] == [2, 3, 4]
    assert event_count(db) == count
    assert stream_version(db, "cart", "1") == 5


@pytest.mark.parametrize("retry_expected", [None, 0, 7], ids=["any", "stale-0", "wrong-7"])
def test_retrying_one_event_returns_the_original_result(
    api: Any, db: psycopg.Connection[Any], retry_expected: int | None
) -> None:
    event_id = uuid.uuid4()
    first = api.append("cart", "1", "Created", {"n": 1}, expected_version=0, event_id=event_id)
    api.append("cart", "1", "Added", {})
    count = event_count(db)

    again = api.append(
        "cart", "1", "Created", {"n": 1}, expected_version=retry_expected, event_id=event_id
    )

    assert again == first == Appended(1, first.position)
    assert event_count(db) == count


def stored_id_of(db: psycopg.Connection[Any], category: str, stream_id: str) -> uuid.UUID:
    (row,) = call_sql(db, "read_stream", "event_id", category=category, stream_id=stream_id)
    return row[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("category", "stream_id"),
    [("cart", "2"), ("order", "1")],
    ids=["other-stream", "same-id-other-category"],
)
@pytest.mark.parametrize("batch", [False, True], ids=["append_event", "append_events"])
def test_an_event_id_is_unique_in_the_store(
    api: Any, db: psycopg.Connection[Any], category: str, stream_id: str, batch: bool
) -> None:
    event_id = uuid.uuid4()
    api.append("cart", "1", "Created", {}, event_id=event_id)
    count = event_count(db)
    with raises_meowmx(meowmx.EventIdConflict):
        if batch:
            api.append_many(category, stream_id, [NewEvent("Created", {}, id=event_id)])
        else:
            api.append(category, stream_id, "Created", {}, event_id=event_id)
    assert event_count(db) == count
    assert stream_version(db, category, stream_id) == 0
    assert stored_id_of(db, "cart", "1") == event_id


def test_a_retry_of_a_batch_where_only_some_events_have_ids_returns_the_original(
    api: Any, db: psycopg.Connection[Any]
) -> None:
    api.append_many("cart", "1", new_events(1))
    batch = [NewEvent("Added", {"n": 1}, id=uuid.uuid4()), NewEvent("Added", {"n": 2})]
    first = api.append_many("cart", "1", batch)
    count = event_count(db)
    assert api.append_many("cart", "1", batch, expected_version=1) == first
    assert event_count(db) == count
    assert [a.version for a in first] == [2, 3]


@pytest.mark.parametrize(
    "retry",
    [
        pytest.param(lambda a, b, new: [a, b, new], id="more-events"),
        pytest.param(lambda a, b, new: [b, a], id="reordered"),
        pytest.param(lambda a, b, new: [a, new], id="one-old-one-new"),
    ],
)
def test_a_partial_retry_is_refused(
    api: Any, db: psycopg.Connection[Any], retry: Callable[..., list[NewEvent]]
) -> None:
    a, b, new = new_events(3, ids=True)
    api.append_many("cart", "1", [a, b])
    count = event_count(db)
    with raises_meowmx(meowmx.PartialRetry):
        api.append_many("cart", "1", retry(a, b, new))
    assert event_count(db) == count
    assert stream_version(db, "cart", "1") == 2


# Stream ids, data and metadata ------------------------------------------------------------


@pytest.mark.parametrize(
    "stream_id",
    [
        str(uuid.UUID("6f9619ff-8b86-d011-b42d-00cf4fc964ff")),
        "42",
        "a/b:c",
        "ünïcødé-流-🐈",
        "with space and 'quote\"",
        "x" * 255,
    ],
    ids=["uuid", "integer", "composite", "unicode", "quotes", "255-chars"],
)
def test_any_text_is_a_stream_id(api: Any, db: psycopg.Connection[Any], stream_id: str) -> None:
    assert api.append("cart", stream_id, "Created", {}).version == 1
    assert [a.version for a in api.append_many("cart", stream_id, new_events(2))] == [2, 3]
    (row,) = call_sql(
        db,
        "read_stream",
        "stream_id, version",
        category="cart",
        stream_id=stream_id,
        backwards=True,
        max_count=1,
    )
    assert tuple(row) == (stream_id, 3)
    assert stream_version(db, "cart", stream_id) == 3


def test_separators_do_not_merge_streams(api: Any, db: psycopg.Connection[Any]) -> None:
    """'a' + 'b/c' and 'a/b' + 'c' are two streams, however they are joined internally."""
    api.append("a", "b/c", "Created", {})
    assert api.append("a/b", "c", "Created", {}, expected_version=0).version == 1
    assert api.append("a", "b/c", "Added", {}, expected_version=1).version == 2


def test_data_and_metadata_are_stored(api: Any, db: psycopg.Connection[Any]) -> None:
    data = {"sku": "ß-1", "qty": 2, "price": 9.5, "tags": ["a", None], "nested": {"ok": True}}
    metadata = {"correlation_id": "c-1", "user": {"id": 7}}
    api.append("cart", "1", "Added", data, metadata=metadata)
    api.append("cart", "1", "Added", {"n": 2})
    api.append_many(
        "cart", "1", [NewEvent("Added", {"n": 3}, metadata={"m": 3}), NewEvent("Added", {"n": 4})]
    )
    rows = call_sql(db, "read_stream", "event_type, data, metadata", category="cart", stream_id="1")
    assert [tuple(row) for row in rows] == [
        ("Added", data, metadata),
        ("Added", {"n": 2}, None),
        ("Added", {"n": 3}, {"m": 3}),
        ("Added", {"n": 4}, None),
    ]


def test_json_null_metadata_is_stored_as_no_metadata(db: psycopg.Connection[Any]) -> None:
    call_sql(
        db,
        "append_event",
        category="c",
        stream_id="1",
        event_type="T",
        data={},
        metadata=Jsonb(None),
    )
    events = Jsonb([{"type": "T", "data": {}, "metadata": None, "id": None}])
    call_sql(db, "append_events", category="c", stream_id="1", events=events)
    rows = call_sql(db, "read_stream", "metadata, event_id", category="c", stream_id="1")
    assert [tuple(row) for row in rows] == [(None, None), (None, None)]


# The caller's connection and transaction --------------------------------------------------


@pytest.fixture
def read_model(db: psycopg.Connection[Any]) -> Iterator[str]:
    """A table outside meowmx, for writes that share a transaction with appends."""
    db.execute("DROP TABLE IF EXISTS public.test_append_read_model")
    db.execute("CREATE TABLE public.test_append_read_model (cart text PRIMARY KEY, items int)")
    yield "public.test_append_read_model"
    db.execute("DROP TABLE public.test_append_read_model")


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_appends_on_the_callers_connection_share_its_transaction(
    dsn: str,
    connect: Callable[..., psycopg.Connection[Any]],
    db: psycopg.Connection[Any],
    read_model: str,
    outcome: str,
) -> None:
    own = connect(autocommit=False)
    with Client(dsn) as client:
        client.append("cart", "1", "Created", {}, conn=own)
        client.append_many("cart", "1", new_events(2), expected_version=1, conn=own)
        own.execute(f"INSERT INTO {read_model} VALUES ('1', 2)")
        assert client.stream_version("cart", "1", conn=own) == 3  # visible inside

        # meowmx never commits a connection it was given: others see nothing yet.
        assert event_count(db) == 0
        assert client.stream_version("cart", "1") == 0

        own.commit() if outcome == "commit" else own.rollback()

        expected = (3, 1) if outcome == "commit" else (0, 0)
        models = db.execute(f"SELECT count(*) FROM {read_model}").fetchone()[0]  # type: ignore[index]
        assert (event_count(db), models) == expected
        assert client.stream_version("cart", "1") == expected[0]


def test_a_conflict_inside_the_callers_transaction_can_be_handled(
    dsn: str, connect: Callable[..., psycopg.Connection[Any]], db: psycopg.Connection[Any]
) -> None:
    own = connect(autocommit=False)
    with Client(dsn) as client:
        client.append("cart", "1", "Created", {}, conn=own)
        with pytest.raises(meowmx.WrongExpectedVersion), own.transaction():  # a savepoint
            client.append("cart", "1", "Created", {}, expected_version=0, conn=own)
        client.append("cart", "1", "Added", {}, expected_version=1, conn=own)
        own.commit()
    assert stream_versions(db, "cart", "1") == [1, 2]


def test_a_client_on_a_connection_pool(dsn: str, db: psycopg.Connection[Any]) -> None:
    # A default pool: its connections are not autocommit; the pool commits on return.
    with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
        client = Client(pool)
        assert client.append("cart", "1", "Created", {}).version == 1
        with raises_meowmx(meowmx.WrongExpectedVersion):
            client.append("cart", "1", "Created", {}, expected_version=0)
        appended = client.append_many("cart", "1", new_events(2), expected_version=1)
        assert [a.version for a in appended] == [2, 3]
        assert [e.version for e in client.read_stream("cart", "1")] == [1, 2, 3]
    assert stream_versions(db, "cart", "1") == [1, 2, 3]  # committed, seen from outside


def test_a_client_on_a_connection(
    connect: Callable[..., psycopg.Connection[Any]], db: psycopg.Connection[Any]
) -> None:
    client = Client(connect())
    client.append("cart", "1", "Created", {})
    with raises_meowmx(meowmx.WrongExpectedVersion):
        client.append("cart", "1", "Created", {}, expected_version=0)
    assert client.append("cart", "1", "Added", {}, expected_version=1).version == 2
    assert stream_versions(db, "cart", "1") == [1, 2]


# Values and helpers -------------------------------------------------------------------


def test_expected_version_constants_mean_what_they_say(dsn: str) -> None:
    with Client(dsn) as client:
        assert client.append("cart", "new", "Created", {}, expected_version=meowmx.NO_STREAM)
        with raises_meowmx(meowmx.WrongExpectedVersion):
            client.append("cart", "new", "Created", {}, expected_version=meowmx.NO_STREAM)
        with raises_meowmx(meowmx.WrongExpectedVersion):
            client.append("cart", "none", "Added", {}, expected_version=meowmx.STREAM_EXISTS)
        assert client.append("cart", "new", "Added", {}, expected_version=meowmx.STREAM_EXISTS)
        assert client.append("cart", "new", "Added", {}, expected_version=meowmx.ANY).version == 3


def test_both_conflicts_worth_retrying_share_a_base_class() -> None:
    assert issubclass(meowmx.WrongExpectedVersion, meowmx.Conflict)
    assert issubclass(meowmx.StaleTransaction, meowmx.Conflict)
    assert not issubclass(meowmx.EventIdConflict, meowmx.Conflict)  # a retry cannot help


def test_retry_on_conflict_reads_and_decides_again(dsn: str, connect: Any) -> None:
    """Two writers race to take the next seat; the loser's helper reads again."""
    with Client(dsn) as client, Client(connect()) as rival:
        client.append("seats", "1", "Taken", {"seat": 1})
        tries: list[int] = []

        def take_next_seat() -> int:
            events = list(client.read_stream("seats", "1"))
            version = events[-1].version
            if not tries:  # the rival appends between this read and this append
                rival.append("seats", "1", "Taken", {"seat": 2})
            tries.append(version)
            seat = events[-1].data["seat"] + 1
            client.append("seats", "1", "Taken", {"seat": seat}, expected_version=version)
            return seat

        assert meowmx.retry_on_conflict(take_next_seat) == 3
        assert tries == [1, 2]

        def always_late() -> None:
            rival.append("seats", "1", "Taken", {"seat": 0})
            client.append("seats", "1", "Taken", {}, expected_version=1)

        with raises_meowmx(meowmx.WrongExpectedVersion):
            meowmx.retry_on_conflict(always_late, attempts=3)
        assert client.stream_version("seats", "1") == 3 + 3  # the rival's three, none of ours


def test_datetimes_decimals_and_uuids_are_written_by_default(dsn: str) -> None:
    at = datetime.datetime(2026, 12, 2, 18, 30, tzinfo=datetime.timezone.utc)
    order = uuid.UUID("0b9d7f52-3c1e-4e55-8f0a-6d4c2b1a9e01")
    data = {"at": at, "day": at.date(), "amount": decimal.Decimal("45.60"), "order": order}
    with Client(dsn) as client:
        client.append("order", "1", "Placed", data, metadata={"at": at})
        client.append_many("order", "1", [NewEvent("Paid", {"amount": decimal.Decimal("1e-30")})])
        client.save_snapshot("order", "1", 2, {"paid_at": at})
        events = list(client.read_stream("order", "1"))
        snapshot = client.load_snapshot("order", "1")
    assert events[0].data == {
        "at": "2026-12-02T18:30:00+00:00",
        "day": "2026-12-02",
        "amount": "45.60",  # exact, as a string
        "order": str(order),
    }
    assert events[0].metadata == {"at": "2026-12-02T18:30:00+00:00"}
    assert events[1].data == {"amount": "1E-30"}
    assert snapshot is not None and snapshot.state == {"paid_at": "2026-12-02T18:30:00+00:00"}
    with Client(dsn) as client, pytest.raises(TypeError, match="json_dumps"):
        client.append("order", "1", "Odd", {"tags": {"a"}})  # a set: no default for it


def test_json_hooks_decide_how_data_is_written_and_read(dsn: str) -> None:
    def dumps(value: Any) -> str:
        return json.dumps(value, default=lambda o: float(o))  # Decimals as numbers

    loads = functools.partial(json.loads, parse_float=decimal.Decimal)
    with Client(dsn, json_dumps=dumps, json_loads=loads) as client:
        client.append("order", "2", "Placed", {"amount": decimal.Decimal("45.6")})
        client.save_snapshot("order", "2", 1, {"total": decimal.Decimal("45.6")})
        [event] = client.read_stream("order", "2")
        [page] = [client.read_events_page(categories=["order"])]
        snapshot = client.load_snapshot("order", "2")
    assert event.data == {"amount": decimal.Decimal("45.6")}
    assert page[-1].data == {"amount": decimal.Decimal("45.6")}
    assert snapshot is not None and snapshot.state == {"total": decimal.Decimal("45.6")}


def test_events_read_back_as_json_loads_reads_them(dsn: str) -> None:
    # The default loads is msgspec's where installed: every value must read as json.loads
    # reads it, numbers past a float and nesting past msgspec's limit included.
    texts = [
        '{"big": 123456789012345678901234567890, "neg": -9223372036854775809}',
        '{"huge": 1e400, "tiny": 1e-400, "exact": 45.60, "min": 4.9e-324}',
        '{"max": 1.7976931348623157e308, "long": 0.1000000000000000055511151231257827}',
        '{"zero": -0.0, "deep": ' + "[" * 800 + "]" * 800 + "}",
        '{"text": "caf\\u00e9 \\ud83d\\ude00", "nested": ' + "[" * 600 + "]" * 600 + "}",
    ]
    with Client(dsn) as client, psycopg.connect(dsn, autocommit=True) as conn:
        for i, text in enumerate(texts):
            conn.execute(
                "SELECT meowmx.append_event(category => 'num', stream_id => %s,"
                " event_type => 'N', data => %s::jsonb, metadata => %s::jsonb)",
                [str(i), text, text],
            )
        stored = [row[0] for row in conn.execute("SELECT data::text FROM meowmx.events")]
        events = list(client.read_events(categories=["num"]))
    assert [e.data for e in events] == [json.loads(t) for t in stored]
    assert [e.metadata for e in events] == [json.loads(t) for t in stored]
    assert events[0].data["big"] == 123456789012345678901234567890


def test_every_method_takes_the_callers_connection(dsn: str, connect: Any) -> None:
    methods = [name for name, f in vars(Client).items() if callable(f) and not name.startswith("_")]
    assert [
        m for m in methods if "conn" not in inspect.signature(getattr(Client, m)).parameters
    ] == ["close"]
    tx = connect(autocommit=False)
    with Client(dsn) as client:
        client.append("cart", "1", "Added", {})
        # A migration that creates a subscription and is rolled back leaves none.
        client.create_subscription("in-migration", conn=tx)
        assert [s.subscription for s in client.subscription_status(conn=tx)] == ["in-migration"]
        tx.rollback()
        assert client.subscription_status() == []
        # A snapshot and the events after it, from one REPEATABLE READ snapshot.
        client.save_snapshot("cart", "1", 1, {"n": 1})
        tx.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with tx.transaction():
            snapshot = client.load_snapshot("cart", "1", conn=tx)
            client.append("cart", "1", "Added", {})  # commits meanwhile
            after = list(client.read_stream("cart", "1", from_version=2, conn=tx))
        assert snapshot is not None and snapshot.version == 1 and after == []
