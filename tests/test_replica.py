"""A hot standby of a primary of our own (pg_basebackup -R, streaming replication).

Every read function works on the standby; a transaction that commits late on the
primary is not skipped by a reader on the standby (the standby's snapshots know the
primary's running transactions); `Client(read_target=standby)` reads there; `meowmx
tail` polls there (LISTEN is refused during recovery); `meowmx horizon` says that the
blockers are on the primary.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import meowmx
from clusters import Cluster, scratch, standby_of, start, wait_replayed
from meowmx import Client
from support import call_sql

Connection = psycopg.Connection[Any]
DB = "meowmx_replica"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Cluster, Cluster]]:
    with scratch("meowmx-replica-") as base:
        primary = start(base / "primary", {"max_connections": "30"})
        try:
            with psycopg.connect(primary.dsn(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DB}")
            meowmx.install(primary.dsn(DB))
            standby = standby_of(primary, base / "standby")
            try:
                yield primary, standby
            finally:
                standby.stop()
        finally:
            primary.stop()


@pytest.fixture
def primary_conn(servers: tuple[Cluster, Cluster]) -> Iterator[Connection]:
    with psycopg.connect(servers[0].dsn(DB), autocommit=True) as conn:
        conn.execute("TRUNCATE meowmx.events, meowmx.subscriptions CASCADE")
        yield conn


@pytest.fixture
def standby_conn(servers: tuple[Cluster, Cluster]) -> Iterator[Connection]:
    with psycopg.connect(servers[1].dsn(DB), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        yield conn


def test_every_read_function_works_on_the_standby(
    servers: tuple[Cluster, Cluster], primary_conn: Connection, standby_conn: Connection
) -> None:
    primary, standby = servers
    with Client(primary.dsn(DB), read_target=standby.dsn(DB)) as client:
        client.append("order", "1", "Placed", {"n": 1})
        client.append("order", "1", "Paid", {"n": 2})
        client.save_snapshot("order", "1", 2, {"paid": True})
        client.create_subscription("billing", categories=["order"])
        wait_replayed(primary_conn, standby_conn)

        # Through the read target: the standby.
        assert [e.event_type for e in client.read_events()] == ["Placed", "Paid"]
        assert [e.version for e in client.read_stream("order", "1", backwards=True)] == [2, 1]
        assert client.stream_version("order", "1") == 2
        assert [s.stream_id for s in client.list_streams("order")] == ["1"]
        snapshot = client.load_snapshot("order", "1")
        assert snapshot is not None and snapshot.state == {"paid": True}
        end = client.end_cursor()
        assert client.read_events_page(after=end) == []

    # The other read-only functions, called on the standby itself.
    with Client(standby.dsn(DB)) as replica:
        [status] = replica.subscription_status("billing")
        assert status.events_behind == 2
        assert replica.list_parked("billing") == []
        assert replica.horizon_blockers() == []
        assert replica.schema_version() == meowmx.latest_version()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            replica.append("order", "2", "Placed", {})
        assert not meowmx.retryable(_last_error(replica))


def _last_error(client: Client) -> BaseException:
    try:
        client.append("order", "2", "Placed", {})
    except psycopg.Error as error:
        return error
    raise AssertionError("an append on a standby must fail")


def test_a_late_commit_on_the_primary_is_not_skipped_on_the_standby(
    servers: tuple[Cluster, Cluster], primary_conn: Connection, standby_conn: Connection
) -> None:
    primary, _ = servers
    with psycopg.connect(primary.dsn(DB)) as late:  # a transaction left open
        event = {"category": "acct", "event_type": "E", "data": {}}
        call_sql(late, "append_event", **{**event, "stream_id": "a", "event_type": "Late"})
        call_sql(primary_conn, "append_event", **{**event, "stream_id": "b", "event_type": "Early"})
        wait_replayed(primary_conn, standby_conn)
        # The later transaction committed, but the earlier one may still commit:
        # the standby's reader must not pass it.
        assert call_sql(standby_conn, "read_events", "event_type") == []
        late.commit()
    wait_replayed(primary_conn, standby_conn)
    assert call_sql(standby_conn, "read_events", "event_type") == [("Late",), ("Early",)]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meowmx", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_tail_polls_and_horizon_points_to_the_primary_on_a_standby(
    servers: tuple[Cluster, Cluster], primary_conn: Connection, standby_conn: Connection
) -> None:
    primary, standby = servers
    with Client(primary.dsn(DB)) as client:
        client.append("order", "7", "Placed", {})
    wait_replayed(primary_conn, standby_conn)
    done = _cli("tail", "--dsn", standby.dsn(DB), "--timeout", "1.5", "--poll", "0.2")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if '"stream_id": "7"' in line]
    assert "hot standby" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr

    with psycopg.connect(primary.dsn(DB)) as open_tx:  # holds both horizons back
        call_sql(open_tx, "append_event", category="x", stream_id="1", event_type="T", data={})
        done = _cli("horizon", "--dsn", standby.dsn(DB))
        assert done.returncode == 0, done.stderr
        assert "hot standby" in done.stderr and "primary" in done.stderr
        on_primary = _cli("horizon", "--dsn", primary.dsn(DB))
        assert str(open_tx.info.backend_pid) in on_primary.stdout
        open_tx.rollback()
