"""Small helpers shared by the core test files (no fixtures here: see conftest.py)."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.types.json import Jsonb

import meowmx

Connection = psycopg.Connection[Any]
T = TypeVar("T")


def call_sql(conn: Connection, function: str, columns: str = "*", **named: Any) -> list[Any]:
    """``SELECT columns FROM meowmx.function(name => value, ...)``: named arguments only.

    Dicts and lists of dicts are sent as jsonb; pass ``psycopg.types.json.Jsonb`` to send
    any other JSON value (a bare string, number, array, or JSON null).
    """
    params = {
        name: Jsonb(value) if isinstance(value, dict) else value for name, value in named.items()
    }
    args = ", ".join(f"{name} => %({name})s" for name in params)
    return conn.execute(f"SELECT {columns} FROM meowmx.{function}({args})", params).fetchall()


# The contract's event columns (more may be added, none removed).
EVENT_COLUMNS = [
    "position",
    "transaction_id",
    "category",
    "stream_id",
    "version",
    "event_type",
    "data",
    "metadata",
    "event_id",
    "recorded_at",
    "cursor",
]
# The ones meowmx.events stores (a cursor is made from transaction_id and position).
STORED_EVENT_COLUMNS = [column for column in EVENT_COLUMNS if column != "cursor"]


def scalar(conn: Connection, sql: str, params: Any = ()) -> Any:
    """The first column of the first row."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def fingerprint(conn: Connection) -> dict[str, Any]:
    """A hash of every row of every meowmx table (found in the catalog, so a new table
    counts too): equal before and after a call that wrote nothing. Sequences are left
    out: a failed call may use up a position, which is allowed."""
    tables = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_catalog.pg_class AS c"
        " WHERE c.relnamespace = 'meowmx'::regnamespace AND c.relkind IN ('r', 'p') ORDER BY 1"
    ).fetchall()
    return {
        table: conn.execute(
            # A sum of row hashes: no sort, and the order rows are stored in does not matter.
            f"SELECT pg_catalog.count(*), pg_catalog.sum(pg_catalog.hashtextextended(t::text, 0))"
            f" FROM {table} AS t"
        ).fetchone()
        for (table,) in tables
    }


def event_count(conn: Connection) -> int:
    return conn.execute("SELECT count(*) FROM meowmx.events").fetchone()[0]  # type: ignore[index]


def stream_version(conn: Connection, category: str, stream_id: str) -> int:
    row = conn.execute(
        "SELECT meowmx.stream_version(category => %s, stream_id => %s)", [category, stream_id]
    ).fetchone()
    assert row is not None
    return int(row[0])


def stream_versions(conn: Connection, category: str, stream_id: str) -> list[int]:
    rows = call_sql(conn, "read_stream", "version", category=category, stream_id=stream_id)
    return [row[0] for row in rows]


@contextmanager
def raises_meowmx(cls: type[meowmx.MeowmxError]) -> Iterator[pytest.ExceptionInfo[Any]]:
    """Expect the typed exception ``cls``, raised from a server error with its SQLSTATE."""
    with pytest.raises(cls) as info:
        yield info
    cause = info.value.__cause__
    assert isinstance(cause, psycopg.Error), "typed error must come from the server's error"
    assert cause.sqlstate == cls.sqlstate
    assert info.value.hint, "every meowmx error carries a HINT"


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll until ``predicate()`` is truthy; fail after ``timeout`` seconds (not a timing check)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_for_horizon(conn: Connection) -> None:
    """Wait until every stored event is below the read horizon (visible to read_events).

    The horizon is cluster-wide: on a shared server another session's transaction may
    hold it back for a while, which delays reads but must never lose events.
    """

    # The horizon in order ids (shifted in a log adopted from another cluster); schema
    # versions before 5 compare transaction ids directly.
    shifted = scalar(conn, "SELECT to_regproc('meowmx._horizon') IS NOT NULL")
    horizon = "meowmx._horizon()" if shifted else "pg_snapshot_xmin(pg_current_snapshot())"

    def passed() -> bool:
        query = f"SELECT coalesce(max(transaction_id) < {horizon}, true) FROM meowmx.events"
        return bool(scalar(conn, query))

    wait_until(passed, "the read horizon to pass every stored event")


def wait_until_blocked(conn: Connection, pid: int) -> None:
    """Wait until backend ``pid`` is waiting for a lock held by another transaction."""

    def blocked() -> bool:
        row = conn.execute(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        return bool(row and row[0])

    wait_until(blocked, f"backend {pid} to wait for a lock")


# meowmx._horizon()'s probe for order ids this cluster has not handed out: one descent
# of the commit order index, past its end. Plan checks leave it out.
HORIZON_PROBE = "WHERE e.transaction_id >= meowmx._next_xid()"


# Async meowmx, driven from sync tests ---------------------------------------------------


class LoopThread:
    """An asyncio event loop on a thread of its own, on which sync test code awaits
    (see Blocking). Several AsyncWorkers share it, as tasks of one service would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wait() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Blocking:
    """An AsyncClient, AsyncWorker or AsyncConnection seen from sync code, so that the
    sync tests' scenarios run against it unchanged: what a method returns is awaited on
    the loop, an async iterator becomes a lazy iterator, and the async objects it hands
    out (a worker's client, a cursor) are wrapped in turn."""

    def __init__(self, target: Any, loop: LoopThread) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_loop", loop)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value) or isinstance(value, meowmx.AsyncClient):
            return self._wrapped(value)
        return lambda *args, **kwargs: self._resolved(value(*args, **kwargs))

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def _resolved(self, result: Any) -> Any:
        if inspect.isawaitable(result):
            return self._wrapped(self._loop.run(result))
        if isinstance(result, AsyncIterator):
            return self._iterate(result)
        return result

    def _wrapped(self, value: Any) -> Any:
        if isinstance(value, meowmx.AsyncClient | psycopg.AsyncCursor):
            return Blocking(value, self._loop)
        return value

    def _iterate(self, iterator: AsyncIterator[Any]) -> Iterator[Any]:
        while True:
            try:
                yield self._loop.run(anext(iterator))
            except StopAsyncIteration:
                return


def in_a_thread(
    handler: Callable[..., None], loop: LoopThread, *, transactional: bool
) -> Callable[..., Awaitable[None]]:
    """A sync test handler as an AsyncWorker's coroutine handler: it runs in a thread
    (so that it may sleep without stalling the loop), and a transactional one gets the
    batch's AsyncConnection as a Blocking one."""
    if transactional:

        async def handle_in_transaction(event: meowmx.ClaimedEvent, conn: Any) -> None:
            await asyncio.to_thread(handler, event, Blocking(conn, loop))

        return handle_in_transaction

    async def handle(event: meowmx.ClaimedEvent) -> None:
        await asyncio.to_thread(handler, event)

    return handle
