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

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session as SASession

Target = Union[str, psycopg.Connection[Any], "ConnectionPool[Any]"]
# What a call's conn= takes: the connection of the caller's transaction.
CallerConnection = Union[psycopg.Connection[Any], "SAConnection", "SASession"]


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
