"""A pytest plugin for your own tests: a real PostgreSQL with meowmx, a clean database each.

Installed with meowmx (entry point ``pytest11``), so its fixtures are there in any test:

    def test_placing_an_order(meowmx_client):
        meowmx_client.append("order", "1", "Placed", {"total": 10})
        assert [e.event_type for e in meowmx_client.read_stream("order", "1")] == ["Placed"]

- ``meowmx_dsn``: a libpq URI of a database of this test's own, with meowmx installed
  and nothing in it; dropped after the test.
- ``meowmx_client``: a ``meowmx.Client`` on it, closed after the test.

The server is ``--meowmx-dsn`` (or the ``MEOWMX_TEST_DSN`` environment variable): a role
that may CREATE DATABASE; it gets databases ``meowmx_test_<hex>`` only. Without one, a
throwaway embedded PostgreSQL 18 (``pip install 'meowmx[embedded]'``) runs for the
session. Each test's database is a copy of one installed once per session, so a test
costs a CREATE DATABASE, not an install.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import meowmx
from meowmx.embedded import embedded_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--meowmx-dsn",
        default=None,
        help="PostgreSQL server for the meowmx fixtures (default: $MEOWMX_TEST_DSN, else"
        " an embedded PostgreSQL for the session)",
    )


@pytest.fixture(scope="session")
def meowmx_server_dsn(pytestconfig: pytest.Config) -> Iterator[str]:
    """The server the meowmx fixtures make their databases on."""
    given = pytestconfig.getoption("--meowmx-dsn") or os.environ.get("MEOWMX_TEST_DSN")
    if given:
        yield given
        return
    with embedded_server() as uri:
        yield uri


def _create(server_dsn: str, name: str, template: str) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return make_conninfo(server_dsn, dbname=name)


def _drop(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def _meowmx_template(meowmx_server_dsn: str) -> Iterator[str]:
    """A database with meowmx installed, copied for each test."""
    name = f"meowmx_test_{secrets.token_hex(6)}"
    dsn = _create(meowmx_server_dsn, name, "template0")
    try:
        meowmx.install(dsn)
        yield name
    finally:
        _drop(meowmx_server_dsn, name)


@pytest.fixture
def meowmx_dsn(meowmx_server_dsn: str, _meowmx_template: str) -> Iterator[str]:
    """A database of this test's own with meowmx installed; dropped after the test."""
    name = f"meowmx_test_{secrets.token_hex(6)}"
    dsn = _create(meowmx_server_dsn, name, _meowmx_template)
    try:
        yield dsn
    finally:
        _drop(meowmx_server_dsn, name)


@pytest.fixture
def meowmx_client(meowmx_dsn: str) -> Iterator[meowmx.Client]:
    """A meowmx.Client on the test's database."""
    with meowmx.Client(meowmx_dsn) as client:
        yield client
