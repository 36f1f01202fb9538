"""Where a meowmx call gets its connection: a DSN, a connection, or a pool.

Server-side prepared statements are off by default. psycopg prepares a statement
after it ran 5 times on a connection, and behind a transaction-mode pooler (PgBouncer
before 1.21, or without max_prepared_statements) the next run may land on another
server connection, which lacks it ("prepared statement _pg3_0 does not exist"). A
meowmx statement is one function call whose plans PL/pgSQL caches anyway, so
preparing it saves little (see the README's Python API).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

Target = Union[str, psycopg.Connection[Any], "ConnectionPool[Any]"]


def connect(dsn: str, *, prepared_statements: bool = False) -> psycopg.Connection[Any]:
    """A new autocommit connection; without prepared_statements it never prepares."""
    conn = psycopg.connect(dsn, autocommit=True)
    if not prepared_statements:
        conn.prepare_threshold = None
    return conn


@contextmanager
def connection(
    target: Target, *, prepared_statements: bool = False
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
    as it is, and its transactions stay the caller's. `prepare` is what meowmx passes
    as psycopg's execute(prepare=...): False (never prepare) unless prepared
    statements are on, so that a pool's or caller's connection needs no setting.
    """

    def __init__(self, target: Target, *, prepared_statements: bool = False):
        self.target = target
        self.prepared_statements = prepared_statements
        self.prepare: bool | None = None if prepared_statements else False
        self._own: psycopg.Connection[Any] | None = None
        # Re-entrant: a handler may call the client inside a call of the client.
        self._lock = threading.RLock()

    @contextmanager
    def __call__(
        self, conn: psycopg.Connection[Any] | None = None
    ) -> Iterator[psycopg.Connection[Any]]:
        if conn is not None:
            yield conn
        elif isinstance(self.target, str):
            with self._lock:
                if self._own is None or self._own.closed or self._own.broken:
                    self._own = connect(self.target, prepared_statements=self.prepared_statements)
                yield self._own
        else:
            with connection(self.target) as conn:
                yield conn

    def close(self) -> None:
        with self._lock:
            if self._own is not None:
                self._own.close()
                self._own = None
