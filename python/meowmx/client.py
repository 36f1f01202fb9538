"""The Python binding: every method is one call of one meowmx SQL function."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import functools
import inspect
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import psycopg
from psycopg.rows import RowMaker, class_row
from psycopg.types.json import Jsonb, set_json_loads

from meowmx.connection import AsyncConnector, AsyncTarget, CallerConnection, Connector, Target
from meowmx.errors import Conflict, UndecodableEvent, translated

Conn = psycopg.Connection[Any]
T = TypeVar("T")
JsonObject = Mapping[str, Any]

# expected_version, besides the version the stream must be at:
ANY = None  # whatever the stream's version (no check)
NO_STREAM = 0  # the stream must not exist yet
STREAM_EXISTS = -1  # the stream must have an event


def retry_on_conflict(attempt: Callable[[], T], *, attempts: int = 5) -> T:
    """Call `attempt` again after a Conflict, at most `attempts` times in all, with a
    short random pause between (racing writers spread out); the last Conflict
    propagates. `attempt` must read again each time, decide, and append with the
    expected version it read. In a transaction of your own it must be the whole
    transaction (StaleTransaction asks for that), rolled back before it runs again."""
    for tries in range(1, attempts):
        try:
            return attempt()
        except Conflict:
            time.sleep(0.005 * tries * random.random())
    return attempt()


async def retry_on_conflict_async(attempt: Callable[[], Awaitable[T]], *, attempts: int = 5) -> T:
    """retry_on_conflict, for asyncio: `attempt` is a coroutine function."""
    for tries in range(1, attempts):
        try:
            return await attempt()
        except Conflict:
            await asyncio.sleep(0.005 * tries * random.random())
    return await attempt()


def _json_default(value: Any) -> Any:
    """What json.dumps cannot write by itself: datetimes, dates and times as ISO 8601,
    UUIDs and Decimals as their text (a Decimal as a string, exactly)."""
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable: pass json_dumps=")


default_json_dumps = functools.partial(json.dumps, default=_json_default)


@dataclass(frozen=True)
class Appended:
    version: int
    position: int


@dataclass(frozen=True)
class NewEvent:
    """An event to append; `id` makes a retry of the append idempotent."""

    type: str
    data: JsonObject
    metadata: JsonObject | None = None
    id: uuid.UUID | None = None

    def as_json(self) -> dict[str, Any]:
        event: dict[str, Any] = {"type": self.type, "data": self.data}
        if self.metadata is not None:
            event["metadata"] = self.metadata
        if self.id is not None:
            event["id"] = str(self.id)
        return event


class RecordedEvent:
    """An event as stored. `data` and `metadata` arrive as JSON text and are decoded on
    first access (a reader that skips most events by type never pays for theirs); an
    event whose JSON this Python cannot decode raises UndecodableEvent there.

    A slotted class rather than a dataclass: reads build thousands per page, and the
    row maker fills the slots from the row without a call per field.
    """

    _fields: tuple[str, ...] = (
        *("position", "transaction_id", "category", "stream_id", "version", "event_type"),
        *("data", "metadata", "event_id", "recorded_at", "cursor"),
    )
    # data and metadata live in _data and _metadata; _loads is set while they are text.
    __slots__ = (*(f"_{n}" if n in ("data", "metadata") else n for n in _fields), "_loads")

    position: int
    transaction_id: int
    category: str
    stream_id: str
    version: int
    event_type: str
    event_id: uuid.UUID | None
    recorded_at: datetime.datetime
    cursor: str
    _data: Any  # the decoded value, or its JSON text while _loads is set
    _metadata: Any

    def __init__(
        self,
        position: int,
        transaction_id: int,
        category: str,
        stream_id: str,
        version: int,
        event_type: str,
        data: dict[str, Any],
        metadata: dict[str, Any] | None,
        event_id: uuid.UUID | None,
        recorded_at: datetime.datetime,
        cursor: str,
    ):
        self.position = position
        self.transaction_id = transaction_id
        self.category = category
        self.stream_id = stream_id
        self.version = version
        self.event_type = event_type
        self._data = data
        self._metadata = metadata
        self.event_id = event_id
        self.recorded_at = recorded_at
        self.cursor = cursor
        self._loads: Callable[[str], Any] | None = None

    def _decode(self) -> None:
        """Decode data and metadata, both at once, if they are still text."""
        if self._loads is None:
            return
        try:
            data = self._loads(self._data)
            metadata = None if self._metadata is None else self._loads(self._metadata)
        except RecursionError as error:  # valid jsonb nested deeper than Python recurses
            raise UndecodableEvent(self.position, f"{type(error).__name__}: {error}") from None
        self._data, self._metadata, self._loads = data, metadata, None

    @property
    def data(self) -> dict[str, Any]:
        if self._loads is not None:
            self._decode()
        return self._data  # type: ignore[no-any-return]

    @data.setter
    def data(self, value: dict[str, Any]) -> None:
        self._decode()
        self._data = value

    @property
    def metadata(self) -> dict[str, Any] | None:
        if self._loads is not None:
            self._decode()
        return self._metadata  # type: ignore[no-any-return]

    @metadata.setter
    def metadata(self, value: dict[str, Any] | None) -> None:
        self._decode()
        self._metadata = value

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    # Mutable, so unhashable (as the dataclass it replaces was).
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # without decoding: JSON still undecoded shows as its text
        shown = ", ".join(
            f"{name}={getattr(self, '_' + name if name in ('data', 'metadata') else name)!r}"
            for name in self._fields
        )
        return f"{type(self).__name__}({shown})"


class ClaimedEvent(RecordedEvent):
    """An event handed to a worker by claim_batch, with the partition it came from.

    `attempts`: the failures the server recorded for it so far (0 the first time).
    `decode_error`: why its data or metadata cannot be decoded here, or None; a
    Worker nacks such an event without calling the handler.
    """

    __slots__ = ("partition", "attempts")
    _fields = (*RecordedEvent._fields, "partition", "attempts")

    partition: int
    attempts: int

    def __init__(self, *event: Any, partition: int, attempts: int = 0):
        super().__init__(*event)
        self.partition = partition
        self.attempts = attempts

    @property
    def decode_error(self) -> str | None:
        try:
            self.data  # noqa: B018
        except UndecodableEvent as error:
            return error.reason
        return None


@dataclass(frozen=True)
class PartitionClaim:
    """A partition leased by claim_partition: its batch follows `after` and ends before
    `until`; `attempts` failures are recorded for the event at `failing_position`."""

    partition: int
    after: str
    until: str
    failing_position: int | None
    attempts: int


@dataclass(frozen=True)
class PartitionStatus:
    subscription: str
    partition: int
    checkpoint: str
    events_behind: int
    lease_owner: str | None
    lease_expires_at: datetime.datetime | None
    attempts: int
    last_error: str | None
    retry_at: datetime.datetime | None
    parked: int
    # The lease owner's open transaction (a transactional batch), where visible.
    worker_pid: int | None = None
    worker_transaction_age: datetime.timedelta | None = None


@dataclass(frozen=True)
class ParkedEvent:
    partition: int
    position: int
    category: str
    stream_id: str
    version: int
    event_type: str
    attempts: int
    error: str | None
    parked_at: datetime.datetime


@dataclass(frozen=True)
class Snapshot:
    version: int
    state: dict[str, Any]
    created_at: datetime.datetime


@dataclass(frozen=True)
class StreamSummary:
    stream_id: str
    version: int


@dataclass(frozen=True)
class HorizonBlocker:
    """A transaction holding the read horizon back (pid is None for a prepared one)."""

    pid: int | None
    database: str | None
    username: str | None
    application_name: str | None
    state: str | None
    transaction_id: int
    transaction_age: datetime.timedelta | None
    query: str | None


@dataclass(frozen=True)
class Metric:
    """One sample of meowmx.metrics(): its family's name, kind ('gauge' or 'counter')
    and help, its labels, and its value."""

    metric: str
    kind: str
    help: str
    labels: dict[str, str]
    value: float


def default_json_loads(text: str | bytes) -> Any:
    """msgspec's JSON decoder where msgspec is installed (eight times faster than
    json.loads on small objects, and exact on integers of any size), else json.loads.
    What msgspec refuses (numbers past a float, nesting past its limit) goes to
    json.loads, so both read every jsonb value alike."""
    return json.loads(text)


try:
    import msgspec
except ImportError:  # pragma: no cover  (the dev install has it)
    pass
else:
    _decode, _DecodeError = msgspec.json.Decoder().decode, msgspec.DecodeError

    def default_json_loads(text: str | bytes) -> Any:  # noqa: F811
        try:
            return _decode(text)
        except _DecodeError:
            return json.loads(text)


class _EventRows:
    """Row factory for the columns below: RecordedEvent (or, with partition and
    attempts, ClaimedEvent) with data and metadata left as text for `loads`."""

    __slots__ = ("loads",)

    def __init__(self, loads: Callable[[str], Any]):
        self.loads = loads

    def __call__(self, cursor: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> RowMaker[Any]:
        loads, new = self.loads, object.__new__
        if len(cursor.description or ()) == len(RecordedEvent._fields):

            def event(values: Sequence[Any]) -> RecordedEvent:
                e = new(RecordedEvent)
                (e.position, xid, e.category, e.stream_id, e.version, e.event_type,
                 e._data, e._metadata, e.event_id, e.recorded_at, e.cursor) = values  # fmt: skip
                e.transaction_id, e._loads = int(xid), loads  # xid8 arrives as text
                return e

            return event

        def claimed(values: Sequence[Any]) -> ClaimedEvent:
            e = new(ClaimedEvent)
            (e.position, xid, e.category, e.stream_id, e.version, e.event_type,
             e._data, e._metadata, e.event_id, e.recorded_at, e.cursor,
             e.partition, e.attempts) = values  # fmt: skip
            e.transaction_id, e._loads = int(xid), loads
            return e

        return claimed


# data and metadata as text: psycopg's text loader makes them str without a Python
# call, and the event decodes them when they are first read.
_EVENT_COLUMNS = (
    "position, transaction_id::text, category, stream_id, version, event_type,"
    " data::text, metadata::text, event_id, recorded_at, cursor"
)
_CLAIMED_COLUMNS = _EVENT_COLUMNS + ", partition, attempts"


# One description of each call ------------------------------------------------------
#
# A Call says what one method sends and how its rows become the result; Client runs
# it on a psycopg Connection and AsyncClient on an AsyncConnection, so the 27 methods
# exist once. Call.of writes the SQL from the parameters' names, each passed by name
# (so a parameter the function gains later never shifts the others). The descriptors
# below turn each description into a method of both.

P = ParamSpec("P")
R = TypeVar("R")
E = TypeVar("E", bound=RecordedEvent)
Rows = Literal["tuples", "events"] | type  # a dataclass: one per row, by column name
AnyCallerConnection = CallerConnection | psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One call of a meowmx SQL function: the statement, its parameters, how its rows
    are built, and what the method returns from them."""

    sql: str
    params: Mapping[str, Any]
    result: Callable[[list[Any]], R]
    rows: Rows = "tuples"
    read: bool = False  # served by the read target (a standby), if there is one
    conn: AnyCallerConnection | None = None  # the caller's transaction, if given

    @staticmethod
    def of(
        function: str,
        params: Mapping[str, Any],
        result: Callable[[list[Any]], T],
        *,
        columns: str = "*",
        rows: Rows = "tuples",
        read: bool = False,
        conn: AnyCallerConnection | None = None,
    ) -> Call[T]:
        """The call of meowmx.<function>, with each parameter passed by its name."""
        return Call(_select(function, tuple(params), columns), params, result, rows, read, conn)


@functools.cache
def _select(function: str, names: tuple[str, ...], columns: str) -> str:
    arguments = ", ".join(f"{name} => %({name})s" for name in names)
    return f"SELECT {columns} FROM meowmx.{function}({arguments})"


@dataclass(frozen=True, slots=True)
class Pages(Generic[E]):
    """A paged read: its first page, and the call for the page after a full one."""

    first: Call[list[E]]
    after: Callable[[list[E]], Call[list[E]] | None]


def _all(rows: list[Any]) -> list[Any]:
    return rows


def _value(rows: list[Any]) -> Any:
    return rows[0][0]


def _none(rows: list[Any]) -> None:
    return None


def _signatures(describe: Callable[..., Any]) -> tuple[inspect.Signature, inspect.Signature]:
    """The signatures `describe` gives its method, unbound and bound (for help())."""
    signature = inspect.signature(describe).replace(return_annotation=inspect.Signature.empty)
    return signature, signature.replace(parameters=list(signature.parameters.values())[1:])


class _Method(Generic[P, R]):
    """A method of Client and AsyncClient made from one description: it returns R on
    a Client, an awaitable of R on an AsyncClient."""

    def __init__(self, describe: Callable[Concatenate[Any, P], Call[R]]):
        self.describe = describe
        self.__doc__, self.__name__ = describe.__doc__, describe.__name__
        self.__signature__, self._bound = _signatures(describe)

    def __call__(self, client: _Calls, *args: Any, **kwargs: Any) -> Any:
        return client._run(self.describe(client, *args, **kwargs))

    @overload
    def __get__(self, client: None, owner: type) -> _Method[P, R]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, R]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Awaitable[R]]: ...
    def __get__(self, client: _Calls | None, owner: type) -> Any:
        if client is None:
            return self
        describe, run = self.describe, client._run

        def method(*args: Any, **kwargs: Any) -> Any:
            return run(describe(client, *args, **kwargs))

        method.__doc__, method.__name__ = self.__doc__, self.__name__
        method.__signature__ = self._bound  # type: ignore[attr-defined]
        return method


class _Paged(Generic[P, E]):
    """An iterating method made from one description: an Iterator of E on a Client,
    an AsyncIterator on an AsyncClient. Pages are fetched as the caller gets to them."""

    def __init__(self, describe: Callable[Concatenate[Any, P], Pages[E]]):
        self.describe = describe
        self.__doc__, self.__name__ = describe.__doc__, describe.__name__
        self.__signature__, self._bound = _signatures(describe)

    def __call__(self, client: _Calls, *args: Any, **kwargs: Any) -> Any:
        return client._iterate(self.describe(client, *args, **kwargs))

    @overload
    def __get__(self, client: None, owner: type) -> _Paged[P, E]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, Iterator[E]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, AsyncIterator[E]]: ...
    def __get__(self, client: _Calls | None, owner: type) -> Any:
        if client is None:
            return self
        describe, iterate = self.describe, client._iterate

        def method(*args: Any, **kwargs: Any) -> Any:
            return iterate(describe(client, *args, **kwargs))

        method.__doc__, method.__name__ = self.__doc__, self.__name__
        method.__signature__ = self._bound  # type: ignore[attr-defined]
        return method


class _Calls:
    """Every method of Client and AsyncClient, each described once as a Call."""

    def __init__(
        self,
        json_dumps: Callable[[Any], str],
        json_loads: Callable[[bytes | str], Any],
    ):
        self._dumps = json_dumps
        self._json_loads = json_loads
        self._event_rows = _EventRows(json_loads)

    def _run(self, call: Call[Any]) -> Any:
        raise NotImplementedError

    def _iterate(self, pages: Pages[Any]) -> Any:
        raise NotImplementedError

    def _json(self, value: JsonObject | None) -> Jsonb | None:
        return None if value is None else Jsonb(value, self._dumps)

    def _row_factory(self, rows: Rows) -> Any:
        if rows == "events":
            return self._event_rows
        assert isinstance(rows, type)
        return class_row(rows)

    # Appends ------------------------------------------------------------------

    @_Method
    def append(
        self,
        category: str,
        stream_id: str,
        event_type: str,
        data: JsonObject,
        *,
        expected_version: int | None = None,
        metadata: JsonObject | None = None,
        event_id: uuid.UUID | None = None,
        conn: AnyCallerConnection | None = None,
    ) -> Call[Appended]:
        """Append one event. Raises WrongExpectedVersion if the stream moved on."""
        return Call.of(
            "append_event",
            {
                "category": category,
                "stream_id": stream_id,
                "event_type": event_type,
                "data": Jsonb(data, self._dumps),
                "expected_version": expected_version,
                "metadata": self._json(metadata),
                "event_id": event_id,
            },
            lambda rows: Appended(*rows[0]),
            conn=conn,
            columns="version, position",
        )

    @_Method
    def append_many(
        self,
        category: str,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        conn: AnyCallerConnection | None = None,
    ) -> Call[list[Appended]]:
        """Append several events atomically, with consecutive versions."""
        return Call.of(
            "append_events",
            {
                "category": category,
                "stream_id": stream_id,
                "events": Jsonb([event.as_json() for event in events], self._dumps),
                "expected_version": expected_version,
            },
            lambda rows: [Appended(*row) for row in rows],
            conn=conn,
            columns="version, position",
        )

    # Reads --------------------------------------------------------------------

    @_Method
    def stream_version(
        self, category: str, stream_id: str, *, conn: AnyCallerConnection | None = None
    ) -> Call[int]:
        """The stream's current version; 0 if it does not exist."""
        return Call.of(
            "stream_version",
            {"category": category, "stream_id": stream_id},
            _value,
            read=True,
            conn=conn,
        )

    @_Method
    def read_stream_page(
        self,
        category: str,
        stream_id: str,
        *,
        from_version: int | None = None,
        max_count: int = 1000,
        backwards: bool = False,
        conn: AnyCallerConnection | None = None,
    ) -> Call[list[RecordedEvent]]:
        """One page of a stream's events in version order."""
        return Call.of(
            "read_stream",
            {
                "category": category,
                "stream_id": stream_id,
                "from_version": from_version,
                "max_count": max_count,
                "backwards": backwards,
            },
            _all,
            rows="events",
            read=True,
            conn=conn,
            columns=_EVENT_COLUMNS,
        )

    @_Paged
    def read_stream(
        self,
        category: str,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        page_size: int = 1000,
        conn: AnyCallerConnection | None = None,
    ) -> Pages[RecordedEvent]:
        """A stream's events, fetched lazily page by page."""

        def page(from_version: int | None) -> Call[list[RecordedEvent]]:
            return _Calls.read_stream_page.describe(
                self,
                category,
                stream_id,
                from_version=from_version,
                max_count=page_size,
                backwards=backwards,
                conn=conn,
            )

        def after(events: list[RecordedEvent]) -> Call[list[RecordedEvent]] | None:
            following = events[-1].version + (-1 if backwards else 1)
            return page(following) if following >= 1 else None

        return Pages(page(from_version), after)

    @_Method
    def read_events_page(
        self,
        *,
        after: str | None = None,
        max_count: int = 1000,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
        conn: AnyCallerConnection | None = None,
    ) -> Call[list[RecordedEvent]]:
        """One page of events in commit order; pass the last row's `cursor` as `after`."""
        return Call.of(
            "read_events",
            {
                "after": after,
                "max_count": max_count,
                "categories": None if categories is None else list(categories),
                "event_types": None if event_types is None else list(event_types),
            },
            _all,
            rows="events",
            read=True,
            conn=conn,
            columns=_EVENT_COLUMNS,
        )

    @_Paged
    def read_events(
        self,
        *,
        after: str | None = None,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
        page_size: int = 1000,
        conn: AnyCallerConnection | None = None,
    ) -> Pages[RecordedEvent]:
        """All events (or some categories or types) in commit order, fetched lazily.

        Ends at the read horizon: events of transactions still running when a page
        is read come later, to a reader that continues from the last cursor.
        """

        def page(after: str | None) -> Call[list[RecordedEvent]]:
            return _Calls.read_events_page.describe(
                self,
                after=after,
                max_count=page_size,
                categories=categories,
                event_types=event_types,
                conn=conn,
            )

        return Pages(page(after), lambda events: page(events[-1].cursor))

    @_Method
    def end_cursor(self, *, conn: AnyCallerConnection | None = None) -> Call[str]:
        """A cursor after every event readable now: reading after it returns only
        events that commit later (including those of transactions open now)."""
        return Call.of("end_cursor", {}, _value, read=True, conn=conn)

    @_Method
    def list_streams(
        self,
        category: str,
        *,
        after: str | None = None,
        max_count: int = 1000,
        conn: AnyCallerConnection | None = None,
    ) -> Call[list[StreamSummary]]:
        """One page of a category's streams in stream id order, after `after`."""
        return Call.of(
            "list_streams",
            {"category": category, "after": after, "max_count": max_count},
            _all,
            rows=StreamSummary,
            read=True,
            conn=conn,
        )

    @_Method
    def delete_stream(
        self,
        category: str,
        stream_id: str,
        *,
        before_version: int | None = None,
        conn: AnyCallerConnection | None = None,
    ) -> Call[int]:
        """Delete a stream's events (all, or those before `before_version`); admin only."""
        return Call.of(
            "delete_stream",
            {"category": category, "stream_id": stream_id, "before_version": before_version},
            _value,
            conn=conn,
        )

    @_Method
    def save_snapshot(
        self,
        category: str,
        stream_id: str,
        version: int,
        state: JsonObject,
        *,
        conn: AnyCallerConnection | None = None,
    ) -> Call[None]:
        """Store the stream's state as of `version`."""
        return Call.of(
            "save_snapshot",
            {
                "category": category,
                "stream_id": stream_id,
                "version": version,
                "state": Jsonb(state, self._dumps),
            },
            _none,
            conn=conn,
        )

    @_Method
    def load_snapshot(
        self,
        category: str,
        stream_id: str,
        *,
        max_version: int | None = None,
        conn: AnyCallerConnection | None = None,
    ) -> Call[Snapshot | None]:
        """The newest snapshot at or below `max_version` (default: the newest), or None."""
        return Call.of(
            "load_snapshot",
            {"category": category, "stream_id": stream_id, "max_version": max_version},
            lambda found: found[0] if found else None,
            rows=Snapshot,
            read=True,
            conn=conn,
        )

    @_Method
    def schema_version(self, *, conn: AnyCallerConnection | None = None) -> Call[int]:
        """The installed schema version (the newest migration applied)."""
        return Call.of("version", {}, _value, conn=conn)

    # Subscriptions --------------------------------------------------------------

    @_Method
    def create_subscription(
        self,
        name: str,
        *,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
        partitions: int = 1,
        start_at: str = "beginning",
        max_attempts: int = 10,
        conn: AnyCallerConnection | None = None,
    ) -> Call[bool]:
        """Create a subscription; True if created, False if it exists identically."""
        return Call.of(
            "create_subscription",
            {
                "name": name,
                "categories": None if categories is None else list(categories),
                "event_types": None if event_types is None else list(event_types),
                "partitions": partitions,
                "start_at": start_at,
                "max_attempts": max_attempts,
            },
            _value,
            conn=conn,
        )

    @_Method
    def drop_subscription(
        self, name: str, *, conn: AnyCallerConnection | None = None
    ) -> Call[bool]:
        """Drop a subscription with its checkpoints and parked events; False if absent."""
        return Call.of("drop_subscription", {"name": name}, _value, conn=conn)

    @_Method
    def reset_subscription(
        self, name: str, start_at: str = "beginning", *, conn: AnyCallerConnection | None = None
    ) -> Call[None]:
        """Move every partition to 'beginning', 'end' or a cursor."""
        return Call.of(
            "reset_subscription",
            {"name": name, "start_at": start_at},
            _none,
            conn=conn,
        )

    @_Method
    def claim_batch(
        self,
        subscription: str,
        worker: str,
        *,
        max_count: int = 100,
        lease: timedelta = timedelta(seconds=30),
        conn: AnyCallerConnection | None = None,
    ) -> Call[list[ClaimedEvent]]:
        """Claim a partition with work waiting and return its next events, in order."""
        return Call.of(
            "claim_batch",
            {
                "subscription": subscription,
                "worker": worker,
                "max_count": max_count,
                "lease": lease,
            },
            _all,
            rows="events",
            conn=conn,
            columns=_CLAIMED_COLUMNS,
        )

    @_Method
    def claim_partition(
        self,
        subscription: str,
        worker: str,
        *,
        lease: timedelta = timedelta(seconds=30),
        conn: AnyCallerConnection | None = None,
    ) -> Call[PartitionClaim | None]:
        """Lease a partition with work waiting, for a batch read with read_partition."""
        return Call.of(
            "claim_partition",
            {"subscription": subscription, "worker": worker, "lease": lease},
            lambda rows: PartitionClaim(*rows[0]) if rows else None,
            conn=conn,
        )

    @_Method
    def read_partition(
        self,
        subscription: str,
        partition: int,
        *,
        after: str,
        until: str,
        max_count: int = 100,
        conn: AnyCallerConnection | None = None,
    ) -> Call[list[ClaimedEvent]]:
        """The batch of a claimed partition, read on the read target (a standby). The
        last row may be another partition's event, where the scan ended."""
        return Call.of(
            "read_partition",
            {
                "subscription": subscription,
                "partition": partition,
                "after": after,
                "until": until,
                "max_count": max_count,
            },
            _all,
            rows="events",
            read=True,
            conn=conn,
            columns=_CLAIMED_COLUMNS,
        )

    @_Method
    def ack_through(
        self,
        subscription: str,
        worker: str,
        partition: int,
        cursor: str,
        *,
        conn: AnyCallerConnection | None = None,
    ) -> Call[None]:
        """Mark the partition handled up to `cursor` (from read_partition); ends the batch."""
        return Call.of(
            "ack_through",
            {
                "subscription": subscription,
                "worker": worker,
                "partition": partition,
                "cursor": cursor,
            },
            _none,
            conn=conn,
        )

    @_Method
    def ack(
        self,
        subscription: str,
        worker: str,
        partition: int,
        event_position: int,
        *,
        conn: AnyCallerConnection | None = None,
    ) -> Call[None]:
        """Mark the event, and those before it in the batch, as handled."""
        return Call.of(
            "ack",
            {
                "subscription": subscription,
                "worker": worker,
                "partition": partition,
                "event_position": event_position,
            },
            _none,
            conn=conn,
        )

    @_Method
    def nack(
        self,
        subscription: str,
        worker: str,
        partition: int,
        event_position: int,
        error: str,
        *,
        retry_after: timedelta = timedelta(0),
        conn: AnyCallerConnection | None = None,
    ) -> Call[bool]:
        """Record a failure of the event; True if it was parked (a dead letter)."""
        return Call.of(
            "nack",
            {
                "subscription": subscription,
                "worker": worker,
                "partition": partition,
                "event_position": event_position,
                "error": error,
                "retry_after": retry_after,
            },
            _value,
            conn=conn,
        )

    @_Method
    def renew_lease(
        self, subscription: str, worker: str, *, conn: AnyCallerConnection | None = None
    ) -> Call[int]:
        """Extend the worker's leases without acking; returns how many it still holds."""
        return Call.of(
            "renew_lease",
            {"subscription": subscription, "worker": worker},
            _value,
            conn=conn,
        )

    @_Method
    def release(
        self, subscription: str, worker: str, *, conn: AnyCallerConnection | None = None
    ) -> Call[int]:
        """Give up the worker's leases; returns how many partitions it held."""
        return Call.of(
            "release",
            {"subscription": subscription, "worker": worker},
            _value,
            conn=conn,
        )

    @_Method
    def subscription_status(
        self, name: str | None = None, *, conn: AnyCallerConnection | None = None
    ) -> Call[list[PartitionStatus]]:
        """One row per partition: checkpoint, lag, lease, failures, parked count."""
        return Call.of(
            "subscription_status",
            {"name": name},
            _all,
            rows=PartitionStatus,
            conn=conn,
        )

    @_Method
    def list_parked(
        self, subscription: str, *, max_count: int = 100, conn: AnyCallerConnection | None = None
    ) -> Call[list[ParkedEvent]]:
        """The subscription's parked events (dead letters), oldest first."""
        return Call.of(
            "list_parked",
            {"subscription": subscription, "max_count": max_count},
            _all,
            rows=ParkedEvent,
            conn=conn,
        )

    @_Method
    def requeue_parked(
        self, subscription: str, event_position: int, *, conn: AnyCallerConnection | None = None
    ) -> Call[int]:
        """Deliver a parked event again (its partition rewinds to just before it)."""
        return Call.of(
            "requeue_parked",
            {"subscription": subscription, "event_position": event_position},
            _value,
            conn=conn,
        )

    @_Method
    def horizon_blockers(
        self, *, conn: AnyCallerConnection | None = None
    ) -> Call[list[HorizonBlocker]]:
        """Transactions holding the read horizon back, oldest first."""
        return Call.of(
            "horizon_blockers",
            {},
            lambda rows: [HorizonBlocker(*row) for row in rows],
            conn=conn,
            columns="pid, database, username, application_name, state,"
            " transaction_id::text::bigint, transaction_age, query",
        )

    @_Method
    def metrics(self, *, conn: AnyCallerConnection | None = None) -> Call[list[Metric]]:
        """Every figure a monitoring scrape reads (see meowmx.metrics), in one call."""
        return Call.of("metrics", {}, _all, rows=Metric, conn=conn)


class Client(_Calls):
    """meowmx for Python. `target` is a DSN, a psycopg connection, or a psycopg_pool pool.

    Every method takes `conn=`: pass your own connection to make the call part of
    your transaction (so events and read-model writes commit together). meowmx
    never commits a connection it was given.

    `read_target` (a DSN, connection or pool, e.g. a hot standby) serves the reads
    of the event log: read_stream, read_events, end_cursor, stream_version,
    list_streams, load_snapshot, read_partition (a Worker on this client reads its
    batches there). It lags the primary: an append is not there at once.
    `prepared_statements` lets psycopg prepare statements (after 5 runs); by default
    (None) only on direct connections, since a transaction-mode pooler breaks them
    (see meowmx.connection).

    `json_dumps` writes event data, metadata and snapshot states (default: json.dumps
    that also writes datetimes, dates and times as ISO 8601 and UUIDs and Decimals as
    strings); `json_loads` reads them (default: msgspec's decoder where msgspec is
    installed, else json.loads; for instance `functools.partial(json.loads,
    parse_float=decimal.Decimal)`). Events decode their data on first access.
    """

    def __init__(
        self,
        target: Target,
        *,
        read_target: Target | None = None,
        prepared_statements: bool | None = None,
        json_dumps: Callable[[Any], str] = default_json_dumps,
        json_loads: Callable[[bytes | str], Any] = default_json_loads,
    ):
        super().__init__(json_dumps, json_loads)
        self._connect = Connector(target, prepared_statements=prepared_statements)
        self._read = (
            self._connect
            if read_target is None
            else Connector(read_target, prepared_statements=prepared_statements)
        )

    def close(self) -> None:
        """Close the connections the client opened for a DSN, if any."""
        self._connect.close()
        self._read.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: Call[R]) -> R:
        connector = self._read if call.read else self._connect
        if isinstance(call.conn, psycopg.AsyncConnection):
            raise TypeError("conn= of a Client takes a Connection; an AsyncClient takes this one")
        with connector(call.conn) as c, translated():
            prepare = connector.prepare(c)
            if call.rows == "tuples":
                return call.result(c.execute(call.sql, call.params, prepare=prepare).fetchall())
            with c.cursor(row_factory=self._row_factory(call.rows)) as cur:
                set_json_loads(self._json_loads, cur)
                return call.result(cur.execute(call.sql, call.params, prepare=prepare).fetchall())

    def _iterate(self, pages: Pages[E]) -> Iterator[E]:
        call: Call[list[E]] | None = pages.first
        while call is not None:
            page = self._run(call)
            yield from page
            if len(page) < call.params["max_count"]:
                return
            call = pages.after(page)


class AsyncClient(_Calls):
    """Client, for asyncio: the same methods, arguments, errors and semantics, awaited.

    `target` and `read_target` are a DSN, a psycopg AsyncConnection or a psycopg_pool
    AsyncConnectionPool; `conn=` takes an AsyncConnection. read_stream and read_events
    return async iterators (`async for`). A DSN's connection serves one call at a time,
    in the order the calls come; give a pool for calls that should run side by side.
    """

    def __init__(
        self,
        target: AsyncTarget,
        *,
        read_target: AsyncTarget | None = None,
        prepared_statements: bool | None = None,
        json_dumps: Callable[[Any], str] = default_json_dumps,
        json_loads: Callable[[bytes | str], Any] = default_json_loads,
    ):
        super().__init__(json_dumps, json_loads)
        self._connect = AsyncConnector(target, prepared_statements=prepared_statements)
        self._read = (
            self._connect
            if read_target is None
            else AsyncConnector(read_target, prepared_statements=prepared_statements)
        )

    async def close(self) -> None:
        """Close the connections the client opened for a DSN, if any."""
        await self._connect.close()
        await self._read.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, call: Call[R]) -> R:
        connector = self._read if call.read else self._connect
        conn = call.conn
        if conn is not None and not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError(
                f"conn= of an AsyncClient takes an AsyncConnection, not {type(conn).__name__}"
            )
        async with connector(conn) as c:
            with translated():
                prepare = await connector.prepare(c)
                if call.rows == "tuples":
                    cursor = await c.execute(call.sql, call.params, prepare=prepare)
                    return call.result(await cursor.fetchall())
                async with c.cursor(row_factory=self._row_factory(call.rows)) as cur:
                    set_json_loads(self._json_loads, cur)
                    await cur.execute(call.sql, call.params, prepare=prepare)
                    return call.result(await cur.fetchall())

    async def _iterate(self, pages: Pages[E]) -> AsyncIterator[E]:
        call: Call[list[E]] | None = pages.first
        while call is not None:
            page = await self._run(call)
            for event in page:
                yield event
            if len(page) < call.params["max_count"]:
                return
            call = pages.after(page)
