"""Where a meowmx call gets its connection: a DSN, a connection, or a pool.

Server-side prepared statements are used only on direct connections. psycopg
prepares a statement after it ran 5 times on a connection, and behind a
transaction-mode pooler (PgBouncer before 1.21, or without max_prepared_statements)
the next run may land on another server connection, which lacks it ("prepared
statement _pg3_0 does not exist"). A pooler shows itself: the backend pid it reports
to the client is not the server's pg_backend_pid(). Preparing saves the parse and
plan of each call: 15 % of a Client.append on a direct connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Union

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session as SASession

Target = Union[str, psycopg.Connection[Any], "ConnectionPool[Any]"]
# What a call's conn= takes: the connection of the caller's transaction.
CallerConnection = Union[psycopg.Connection[Any], "SAConnection", "SASession"]
AsyncTarget = Union[str, psycopg.AsyncConnection[Any], "AsyncConnectionPool[Any]"]


def driver_connection(conn: CallerConnection) -> psycopg.Connection[Any]:
    """The psycopg connection under a caller's `conn=`: a psycopg connection itself, or
    a SQLAlchemy 2 Connection or Session on the psycopg dialect (the connection of its
    transaction: a Session begins one if it has none)."""
    if isinstance(conn, psycopg.Connection):
        return conn
    found: Any = conn  # duck-typed: SQLAlchemy need not be installed
    if callable(getattr(found, "connection", None)):  # a Session: its Connection
        found = found.connection()
    driver = getattr(getattr(found, "connection", None), "driver_connection", None)
    if isinstance(driver, psycopg.Connection):
        return driver
    raise TypeError(
        "conn= takes a psycopg Connection, or a SQLAlchemy Connection or Session on the"
        f" psycopg dialect (postgresql+psycopg://), not {type(conn).__name__}"
    )


def connect(dsn: str, *, prepared_statements: bool | None = None) -> psycopg.Connection[Any]:
    """A new autocommit connection that prepares statements if `prepared_statements`
    (None: if it is direct, not through a pooler)."""
    conn = psycopg.connect(dsn, autocommit=True)
    if not (direct(conn) if prepared_statements is None else prepared_statements):
        conn.prepare_threshold = None
    return conn


def direct(conn: psycopg.Connection[Any]) -> bool:
    """Whether `conn` reaches the server itself, not a pooler (which reports a backend
    pid of its own)."""
    row = conn.execute("SELECT pg_catalog.pg_backend_pid()", prepare=False).fetchone()
    return row is not None and row[0] == conn.info.backend_pid


@contextmanager
def connection(
    target: Target, *, prepared_statements: bool | None = None
) -> Iterator[psycopg.Connection[Any]]:
    """A connection for one call: a new autocommit one for a DSN (closed after),
    the pool's for a pool, or the given connection itself (never committed here)."""
    if isinstance(target, str):
        with connect(target, prepared_statements=prepared_statements) as conn:
            yield conn
    elif isinstance(target, psycopg.Connection):
        yield target
    else:
        with target.connection() as conn:
            yield conn


class Connector:
    """Hands out connections for a client's calls.

    A DSN gets one lazily opened autocommit connection, shared by threads under a
    lock and reopened if it breaks; a pool lends one per call; a connection is used
    as it is, and its transactions stay the caller's. prepare(conn) is what meowmx
    passes as psycopg's execute(prepare=...): False (never prepare) unless prepared
    statements are on, or, by default, the connection is direct (checked once per
    connection), so that a pool's or caller's connection needs no setting.
    """

    def __init__(self, target: Target, *, prepared_statements: bool | None = None):
        self.target = target
        self.prepared_statements = prepared_statements
        self._direct: weakref.WeakKeyDictionary[psycopg.Connection[Any], bool] = (
            weakref.WeakKeyDictionary()
        )
        self._own: psycopg.Connection[Any] | None = None
        # Re-entrant: a handler may call the client inside a call of the client.
        self._lock = threading.RLock()

    @contextmanager
    def __call__(self, conn: CallerConnection | None = None) -> Iterator[psycopg.Connection[Any]]:
        if conn is not None:
            yield driver_connection(conn)
        elif isinstance(self.target, str):
            with self._lock:
                if self._own is None or self._own.closed or self._own.broken:
                    self._own = connect(self.target, prepared_statements=self.prepared_statements)
                    # connect() asked already: it prepares only where direct.
                    self._direct[self._own] = self._own.prepare_threshold is not None
                yield self._own
        else:
            with connection(self.target) as conn:
                yield conn

    def prepare(self, conn: psycopg.Connection[Any]) -> bool | None:
        if self.prepared_statements is not None:
            return None if self.prepared_statements else False
        known = self._direct.get(conn)
        if known is None:
            known = self._direct[conn] = direct(conn)
        return None if known else False

    def close(self) -> None:
        with self._lock:
            if self._own is not None:
                self._own.close()
                self._own = None


async def connect_async(
    dsn: str, *, prepared_statements: bool | None = None
) -> psycopg.AsyncConnection[Any]:
    """connect(), for asyncio."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    if not (await direct_async(conn) if prepared_statements is None else prepared_statements):
        conn.prepare_threshold = None
    return conn


async def direct_async(conn: psycopg.AsyncConnection[Any]) -> bool:
    """direct(), for asyncio."""
    cursor = await conn.execute("SELECT pg_catalog.pg_backend_pid()", prepare=False)
    row = await cursor.fetchone()
    return row is not None and row[0] == conn.info.backend_pid


class AsyncConnector:
    """Connector, for asyncio: the same choices of connection and of preparing.

    A DSN's one connection is held by one task at a time, as a thread holds
    Connector's, so that no other task's call lands in a transaction on it (a
    transactional AsyncWorker's). The holder may call again meanwhile: a context
    variable marks it (so does a task it starts while holding, which then shares
    the transaction, as a handler's thread would with Connector).
    """

    def __init__(self, target: AsyncTarget, *, prepared_statements: bool | None = None):
        # A pool is known by its coroutine open(): psycopg_pool need not be installed.
        pool = inspect.iscoroutinefunction(getattr(target, "open", None))
        if not (isinstance(target, str | psycopg.AsyncConnection) or pool):
            raise TypeError(
                "an async client takes a DSN, a psycopg AsyncConnection or an"
                f" AsyncConnectionPool, not {type(target).__name__}"
            )
        self.target = target
        self.prepared_statements = prepared_statements
        self._direct: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], bool] = (
            weakref.WeakKeyDictionary()
        )
        self._own: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._holding: contextvars.ContextVar[bool] = contextvars.ContextVar(
            "meowmx_holding", default=False
        )

    @asynccontextmanager
    async def __call__(
        self, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if conn is not None:
            if not isinstance(conn, psycopg.AsyncConnection):
                raise TypeError(
                    "conn= of an async client takes a psycopg AsyncConnection,"
                    f" not {type(conn).__name__}"
                )
            yield conn
        elif isinstance(self.target, str):
            if self._holding.get():
                assert self._own is not None
                yield self._own
                return
            async with self._lock:
                if self._own is None or self._own.closed or self._own.broken:
                    self._own = await connect_async(
                        self.target, prepared_statements=self.prepared_statements
                    )
                    self._direct[self._own] = self._own.prepare_threshold is not None
                token = self._holding.set(True)
                try:
                    yield self._own
                finally:
                    self._holding.reset(token)
        elif isinstance(self.target, psycopg.AsyncConnection):
            yield self.target
        else:
            async with self.target.connection() as pooled:
                yield pooled

    async def prepare(self, conn: psycopg.AsyncConnection[Any]) -> bool | None:
        if self.prepared_statements is not None:
            return None if self.prepared_statements else False
        known = self._direct.get(conn)
        if known is None:
            known = self._direct[conn] = await direct_async(conn)
        return None if known else False

    async def close(self) -> None:
        async with self._lock:
            if self._own is not None:
                await self._own.close()
                self._own = None
