"""Where a meowmx call gets its connection: a DSN, a connection, or a pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import psycopg

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

Target = Union[str, psycopg.Connection[Any], "ConnectionPool[Any]"]


@contextmanager
def connection(target: Target) -> Iterator[psycopg.Connection[Any]]:
    """A connection for one call: a new autocommit one for a DSN (closed after),
    the pool's for a pool, or the given connection itself (never committed here)."""
    if isinstance(target, str):
        with psycopg.connect(target, autocommit=True) as conn:
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
    as it is, and its transactions stay the caller's.
    """

    def __init__(self, target: Target):
        self.target = target
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
                    self._own = psycopg.connect(self.target, autocommit=True)
                yield self._own
        else:
            with connection(self.target) as conn:
                yield conn

    def close(self) -> None:
        with self._lock:
            if self._own is not None:
                self._own.close()
                self._own = None
