"""The Python binding: every method is one call of one meowmx SQL function."""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from psycopg.rows import RowMaker, class_row
from psycopg.types.json import Jsonb, set_json_loads

from meowmx.connection import CallerConnection, Connector, Target
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


# Events are plain slotted dataclasses: reads build thousands per page, and a
# frozen dataclass costs three times as much to build.
@dataclass(slots=True)
class RecordedEvent:
    position: int
    transaction_id: int
    category: str
    stream_id: str
    version: int
    event_type: str
    data: dict[str, Any]
    metadata: dict[str, Any] | None
    event_id: uuid.UUID | None
    recorded_at: datetime.datetime
    cursor: str


@dataclass(slots=True)
class ClaimedEvent(RecordedEvent):
    """An event handed to a worker by claim_batch, with the partition it came from.

    `attempts`: the failures the server recorded for it so far (0 the first time).
    `decode_error`: set when its data or metadata cannot be decoded here (then they
    are empty); a Worker nacks such an event without calling the handler.
    """

    partition: int
    attempts: int = 0
    decode_error: str | None = None


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


_EVENT_FIELDS = [f.name for f in fields(RecordedEvent)]
_CLAIMED_FIELDS = [f.name for f in fields(ClaimedEvent) if f.name != "decode_error"]


class _Undecodable:
    """What a JSON value that json.loads refused loads as (see _Safe)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class _Safe:
    """A JSON loads that returns _Undecodable instead of raising RecursionError: a value
    nested deeper than Python's recursion limit is valid jsonb, and the error would fail
    the whole page (or claim). A class, not a closure: psycopg keeps one loader per
    function, and warns that closures leak."""

    __slots__ = ("loads",)

    def __init__(self, loads: Callable[[bytes | str], Any]):
        self.loads = loads

    def __call__(self, data: bytes | str) -> Any:
        try:
            return self.loads(data)
        except RecursionError as error:
            return _Undecodable(error)


@functools.cache
def _safe(loads: Callable[[bytes | str], Any]) -> _Safe:
    # One per loads function: psycopg makes a loader class for each, and keeps it.
    return _Safe(loads)


def event_rows(cursor: psycopg.Cursor[Any]) -> RowMaker[RecordedEvent]:
    """Row factory for meowmx.recorded_event and claimed_event rows.

    Picks columns by name, so columns a later schema adds are ignored. An event
    whose JSON cannot be decoded raises UndecodableEvent in a read; in a claim it
    arrives with `decode_error` set, so that the worker can nack it.
    """
    names = [column.name for column in cursor.description or ()]
    claimed = "partition" in names
    cls = ClaimedEvent if claimed else RecordedEvent
    where = [names.index(name) for name in (_CLAIMED_FIELDS if claimed else _EVENT_FIELDS)]
    xid = _EVENT_FIELDS.index("transaction_id")
    data, metadata = _EVENT_FIELDS.index("data"), _EVENT_FIELDS.index("metadata")

    def make(values: Sequence[Any]) -> RecordedEvent:
        picked = [values[i] for i in where]
        picked[xid] = int(picked[xid])  # xid8 arrives as text
        for i in (data, metadata):
            if isinstance(picked[i], _Undecodable):
                error = picked[i].error
                reason = f"{type(error).__name__}: {error}"
                if not claimed:
                    raise UndecodableEvent(picked[0], reason)
                picked[data], picked[metadata] = {}, None
                picked.append(reason)
                break
        return cls(*picked)

    return make


_EVENT_COLUMNS = (
    "position, transaction_id::text, category, stream_id, version, event_type,"
    " data, metadata, event_id, recorded_at, cursor"
)
_CLAIMED_COLUMNS = "partition, " + _EVENT_COLUMNS + ", attempts"


class Client:
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
    strings); `json_loads` reads them (default json.loads; for instance
    `functools.partial(json.loads, parse_float=decimal.Decimal)`).
    """

    def __init__(
        self,
        target: Target,
        *,
        read_target: Target | None = None,
        prepared_statements: bool | None = None,
        json_dumps: Callable[[Any], str] = default_json_dumps,
        json_loads: Callable[[bytes | str], Any] = json.loads,
    ):
        self._dumps = json_dumps
        self._json_loads = json_loads
        self._loads = _safe(json_loads)  # for events: see event_rows
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

    def _call(
        self,
        conn: CallerConnection | None,
        sql: str,
        params: Mapping[str, Any],
        *,
        read: bool = False,
    ) -> list[Any]:
        connector = self._read if read else self._connect
        with connector(conn) as c, translated():
            return c.execute(sql, params, prepare=connector.prepare(c)).fetchall()

    def _events(
        self,
        conn: CallerConnection | None,
        sql: str,
        params: Mapping[str, Any],
        *,
        read: bool = False,
    ) -> list[RecordedEvent]:
        connector = self._read if read else self._connect
        with connector(conn) as c, translated(), c.cursor(row_factory=event_rows) as cur:
            set_json_loads(self._loads, cur)
            return cur.execute(sql, params, prepare=connector.prepare(c)).fetchall()

    def _objects(
        self,
        conn: CallerConnection | None,
        cls: type[T],
        sql: str,
        params: Mapping[str, Any],
        *,
        read: bool = False,
    ) -> list[T]:
        connector = self._read if read else self._connect
        with connector(conn) as c, translated(), c.cursor(row_factory=class_row(cls)) as cur:
            set_json_loads(self._json_loads, cur)
            return cur.execute(sql, params, prepare=connector.prepare(c)).fetchall()

    # Appends ------------------------------------------------------------------

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
        conn: CallerConnection | None = None,
    ) -> Appended:
        """Append one event. Raises WrongExpectedVersion if the stream moved on."""
        row = self._call(
            conn,
            "SELECT version, position FROM meowmx.append_event("
            "category => %(category)s, stream_id => %(stream_id)s,"
            " event_type => %(event_type)s, data => %(data)s,"
            " expected_version => %(expected_version)s, metadata => %(metadata)s,"
            " event_id => %(event_id)s)",
            {
                "category": category,
                "stream_id": stream_id,
                "event_type": event_type,
                "data": Jsonb(data, self._dumps),
                "expected_version": expected_version,
                "metadata": None if metadata is None else Jsonb(metadata, self._dumps),
                "event_id": event_id,
            },
        )[0]
        return Appended(*row)

    def append_many(
        self,
        category: str,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int | None = None,
        conn: CallerConnection | None = None,
    ) -> list[Appended]:
        """Append several events atomically, with consecutive versions."""
        rows = self._call(
            conn,
            "SELECT version, position FROM meowmx.append_events("
            "category => %(category)s, stream_id => %(stream_id)s, events => %(events)s,"
            " expected_version => %(expected_version)s)",
            {
                "category": category,
                "stream_id": stream_id,
                "events": Jsonb([event.as_json() for event in events], self._dumps),
                "expected_version": expected_version,
            },
        )
        return [Appended(*row) for row in rows]

    # Reads --------------------------------------------------------------------

    def stream_version(
        self, category: str, stream_id: str, *, conn: CallerConnection | None = None
    ) -> int:
        """The stream's current version; 0 if it does not exist."""
        sql = "SELECT meowmx.stream_version(category => %(category)s, stream_id => %(stream_id)s)"
        params = {"category": category, "stream_id": stream_id}
        version: int = self._call(conn, sql, params, read=True)[0][0]
        return version

    def read_stream_page(
        self,
        category: str,
        stream_id: str,
        *,
        from_version: int | None = None,
        max_count: int = 1000,
        backwards: bool = False,
        conn: CallerConnection | None = None,
    ) -> list[RecordedEvent]:
        """One page of a stream's events in version order."""
        return self._events(
            conn,
            f"SELECT {_EVENT_COLUMNS} FROM meowmx.read_stream("
            "category => %(category)s, stream_id => %(stream_id)s,"
            " from_version => %(from_version)s, max_count => %(max_count)s,"
            " backwards => %(backwards)s)",
            {
                "category": category,
                "stream_id": stream_id,
                "from_version": from_version,
                "max_count": max_count,
                "backwards": backwards,
            },
            read=True,
        )

    def read_stream(
        self,
        category: str,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        page_size: int = 1000,
        conn: CallerConnection | None = None,
    ) -> Iterator[RecordedEvent]:
        """A stream's events, fetched lazily page by page."""
        while True:
            page = self.read_stream_page(
                category,
                stream_id,
                from_version=from_version,
                max_count=page_size,
                backwards=backwards,
                conn=conn,
            )
            yield from page
            if len(page) < page_size:
                return
            from_version = page[-1].version + (-1 if backwards else 1)
            if from_version < 1:
                return

    def read_events_page(
        self,
        *,
        after: str | None = None,
        max_count: int = 1000,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
        conn: CallerConnection | None = None,
    ) -> list[RecordedEvent]:
        """One page of events in commit order; pass the last row's `cursor` as `after`."""
        return self._events(
            conn,
            f"SELECT {_EVENT_COLUMNS} FROM meowmx.read_events("
            "after => %(after)s, max_count => %(max_count)s,"
            " categories => %(categories)s, event_types => %(event_types)s)",
            {
                "after": after,
                "max_count": max_count,
                "categories": None if categories is None else list(categories),
                "event_types": None if event_types is None else list(event_types),
            },
            read=True,
        )

    def read_events(
        self,
        *,
        after: str | None = None,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
        page_size: int = 1000,
        conn: CallerConnection | None = None,
    ) -> Iterator[RecordedEvent]:
        """All events (or some categories or types) in commit order, fetched lazily.

        Ends at the read horizon: events of transactions still running when a page
        is read come later, to a reader that continues from the last cursor.
        """
        while True:
            page = self.read_events_page(
                after=after,
                max_count=page_size,
                categories=categories,
                event_types=event_types,
                conn=conn,
            )
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].cursor

    def end_cursor(self, *, conn: CallerConnection | None = None) -> str:
        """A cursor after every event readable now: reading after it returns only
        events that commit later (including those of transactions open now)."""
        cursor: str = self._call(conn, "SELECT meowmx.end_cursor()", {}, read=True)[0][0]
        return cursor

    def list_streams(
        self,
        category: str,
        *,
        after: str | None = None,
        max_count: int = 1000,
        conn: CallerConnection | None = None,
    ) -> list[StreamSummary]:
        """One page of a category's streams in stream id order, after `after`."""
        sql = (
            "SELECT * FROM meowmx.list_streams(category => %(category)s, after => %(after)s,"
            " max_count => %(max_count)s)"
        )
        params = {"category": category, "after": after, "max_count": max_count}
        return self._objects(conn, StreamSummary, sql, params, read=True)

    def delete_stream(
        self,
        category: str,
        stream_id: str,
        *,
        before_version: int | None = None,
        conn: CallerConnection | None = None,
    ) -> int:
        """Delete a stream's events (all, or those before `before_version`); admin only."""
        sql = (
            "SELECT meowmx.delete_stream(category => %(category)s, stream_id => %(stream_id)s,"
            " before_version => %(before_version)s)"
        )
        params = {"category": category, "stream_id": stream_id, "before_version": before_version}
        deleted: int = self._call(conn, sql, params)[0][0]
        return deleted

    def save_snapshot(
        self,
        category: str,
        stream_id: str,
        version: int,
        state: JsonObject,
        *,
        conn: CallerConnection | None = None,
    ) -> None:
        """Store the stream's state as of `version`."""
        self._call(
            conn,
            "SELECT meowmx.save_snapshot(category => %(category)s, stream_id => %(stream_id)s,"
            " version => %(version)s, state => %(state)s)",
            {
                "category": category,
                "stream_id": stream_id,
                "version": version,
                "state": Jsonb(state, self._dumps),
            },
        )

    def load_snapshot(
        self,
        category: str,
        stream_id: str,
        *,
        max_version: int | None = None,
        conn: CallerConnection | None = None,
    ) -> Snapshot | None:
        """The newest snapshot at or below `max_version` (default: the newest), or None."""
        sql = (
            "SELECT * FROM meowmx.load_snapshot(category => %(category)s,"
            " stream_id => %(stream_id)s, max_version => %(max_version)s)"
        )
        params = {"category": category, "stream_id": stream_id, "max_version": max_version}
        found = self._objects(conn, Snapshot, sql, params, read=True)
        return found[0] if found else None

    def schema_version(self, *, conn: CallerConnection | None = None) -> int:
        """The installed schema version (the newest migration applied)."""
        version: int = self._call(conn, "SELECT meowmx.version()", {})[0][0]
        return version

    # Subscriptions --------------------------------------------------------------

    def create_subscription(
        self,
        name: str,
        *,
        categories: Sequence[str] | None = None,
        event_types: Sequence[str] | None = None,
        partitions: int = 1,
        start_at: str = "beginning",
        max_attempts: int = 10,
        conn: CallerConnection | None = None,
    ) -> bool:
        """Create a subscription; True if created, False if it exists identically."""
        created: bool = self._call(
            conn,
            "SELECT meowmx.create_subscription(name => %(name)s, categories => %(categories)s,"
            " event_types => %(event_types)s, partitions => %(partitions)s,"
            " start_at => %(start_at)s, max_attempts => %(max_attempts)s)",
            {
                "name": name,
                "categories": None if categories is None else list(categories),
                "event_types": None if event_types is None else list(event_types),
                "partitions": partitions,
                "start_at": start_at,
                "max_attempts": max_attempts,
            },
        )[0][0]
        return created

    def drop_subscription(self, name: str, *, conn: CallerConnection | None = None) -> bool:
        """Drop a subscription with its checkpoints and parked events; False if absent."""
        sql = "SELECT meowmx.drop_subscription(name => %(name)s)"
        dropped: bool = self._call(conn, sql, {"name": name})[0][0]
        return dropped

    def reset_subscription(
        self, name: str, start_at: str = "beginning", *, conn: CallerConnection | None = None
    ) -> None:
        """Move every partition to 'beginning', 'end' or a cursor."""
        sql = "SELECT meowmx.reset_subscription(name => %(name)s, start_at => %(start_at)s)"
        self._call(conn, sql, {"name": name, "start_at": start_at})

    def claim_batch(
        self,
        subscription: str,
        worker: str,
        *,
        max_count: int = 100,
        lease: timedelta = timedelta(seconds=30),
        conn: CallerConnection | None = None,
    ) -> list[ClaimedEvent]:
        """Claim a partition with work waiting and return its next events, in order."""
        events = self._events(
            conn,
            f"SELECT {_CLAIMED_COLUMNS} FROM meowmx.claim_batch(subscription => %(subscription)s,"
            " worker => %(worker)s, max_count => %(max_count)s, lease => %(lease)s)",
            {
                "subscription": subscription,
                "worker": worker,
                "max_count": max_count,
                "lease": lease,
            },
        )
        return events  # type: ignore[return-value]

    def claim_partition(
        self,
        subscription: str,
        worker: str,
        *,
        lease: timedelta = timedelta(seconds=30),
        conn: CallerConnection | None = None,
    ) -> PartitionClaim | None:
        """Lease a partition with work waiting, for a batch read with read_partition."""
        rows = self._call(
            conn,
            "SELECT * FROM meowmx.claim_partition(subscription => %(subscription)s,"
            " worker => %(worker)s, lease => %(lease)s)",
            {"subscription": subscription, "worker": worker, "lease": lease},
        )
        return PartitionClaim(*rows[0]) if rows else None

    def read_partition(
        self,
        subscription: str,
        partition: int,
        *,
        after: str,
        until: str,
        max_count: int = 100,
        conn: CallerConnection | None = None,
    ) -> list[ClaimedEvent]:
        """The batch of a claimed partition, read on the read target (a standby). The
        last row may be another partition's event, where the scan ended."""
        events = self._events(
            conn,
            f"SELECT {_CLAIMED_COLUMNS} FROM meowmx.read_partition("
            "subscription => %(subscription)s, partition => %(partition)s,"
            " after => %(after)s, until => %(until)s, max_count => %(max_count)s)",
            {
                "subscription": subscription,
                "partition": partition,
                "after": after,
                "until": until,
                "max_count": max_count,
            },
            read=True,
        )
        return events  # type: ignore[return-value]

    def ack_through(
        self,
        subscription: str,
        worker: str,
        partition: int,
        cursor: str,
        *,
        conn: CallerConnection | None = None,
    ) -> None:
        """Mark the partition handled up to `cursor` (from read_partition); ends the batch."""
        self._call(
            conn,
            "SELECT meowmx.ack_through(subscription => %(subscription)s, worker => %(worker)s,"
            " partition => %(partition)s, cursor => %(cursor)s)",
            {
                "subscription": subscription,
                "worker": worker,
                "partition": partition,
                "cursor": cursor,
            },
        )

    def ack(
        self,
        subscription: str,
        worker: str,
        partition: int,
        event_position: int,
        *,
        conn: CallerConnection | None = None,
    ) -> None:
        """Mark the event, and those before it in the batch, as handled."""
        self._call(
            conn,
            "SELECT meowmx.ack(subscription => %(subscription)s, worker => %(worker)s,"
            " partition => %(partition)s, event_position => %(event_position)s)",
            {
                "subscription": subscription,
                "worker": worker,
                "partition": partition,
                "event_position": event_position,
            },
        )

    def nack(
        self,
        subscription: str,
        worker: str,
        partition: int,
        event_position: int,
        error: str,
        *,
        retry_after: timedelta = timedelta(0),
        conn: CallerConnection | None = None,
    ) -> bool:
        """Record a failure of the event; True if it was parked (a dead letter)."""
        parked: bool = self._call(
            conn,
            "SELECT meowmx.nack(subscription => %(subscription)s, worker => %(worker)s,"
            " partition => %(partition)s, event_position => %(event_position)s,"
            " error => %(error)s, retry_after => %(retry_after)s)",
            {
                "subscription": subscription,
                "worker": worker,
                "partition": partition,
                "event_position": event_position,
                "error": error,
                "retry_after": retry_after,
            },
        )[0][0]
        return parked

    def renew_lease(
        self, subscription: str, worker: str, *, conn: CallerConnection | None = None
    ) -> int:
        """Extend the worker's leases without acking; returns how many it still holds."""
        sql = "SELECT meowmx.renew_lease(subscription => %(subscription)s, worker => %(worker)s)"
        params = {"subscription": subscription, "worker": worker}
        renewed: int = self._call(conn, sql, params)[0][0]
        return renewed

    def release(
        self, subscription: str, worker: str, *, conn: CallerConnection | None = None
    ) -> int:
        """Give up the worker's leases; returns how many partitions it held."""
        sql = "SELECT meowmx.release(subscription => %(subscription)s, worker => %(worker)s)"
        params = {"subscription": subscription, "worker": worker}
        released: int = self._call(conn, sql, params)[0][0]
        return released

    def subscription_status(
        self, name: str | None = None, *, conn: CallerConnection | None = None
    ) -> list[PartitionStatus]:
        """One row per partition: checkpoint, lag, lease, failures, parked count."""
        sql = "SELECT * FROM meowmx.subscription_status(name => %(name)s)"
        return self._objects(conn, PartitionStatus, sql, {"name": name})

    def list_parked(
        self, subscription: str, *, max_count: int = 100, conn: CallerConnection | None = None
    ) -> list[ParkedEvent]:
        sql = (
            "SELECT * FROM meowmx.list_parked(subscription => %(subscription)s,"
            " max_count => %(max_count)s)"
        )
        params = {"subscription": subscription, "max_count": max_count}
        return self._objects(conn, ParkedEvent, sql, params)

    def requeue_parked(
        self, subscription: str, event_position: int, *, conn: CallerConnection | None = None
    ) -> int:
        """Deliver a parked event again (its partition rewinds to just before it)."""
        sql = (
            "SELECT meowmx.requeue_parked(subscription => %(subscription)s,"
            " event_position => %(event_position)s)"
        )
        params = {"subscription": subscription, "event_position": event_position}
        removed: int = self._call(conn, sql, params)[0][0]
        return removed

    def horizon_blockers(self, *, conn: CallerConnection | None = None) -> list[HorizonBlocker]:
        """Transactions holding the read horizon back, oldest first."""
        rows = self._call(
            conn,
            "SELECT pid, database, username, application_name, state,"
            " transaction_id::text, transaction_age, query FROM meowmx.horizon_blockers()",
            {},
        )
        names = [f.name for f in fields(HorizonBlocker)]
        blockers = [dict(zip(names, row, strict=True)) for row in rows]
        return [
            HorizonBlocker(**{**b, "transaction_id": int(b["transaction_id"])}) for b in blockers
        ]
