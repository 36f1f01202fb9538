"""A hot standby of a primary of our own (pg_basebackup -R, streaming replication).

Every read function works on the standby; a transaction that commits late on the
primary is not skipped by a reader on the standby (the standby's snapshots know the
primary's running transactions); `Client(read_target=standby)` reads there; `meowmx
tail` polls there (LISTEN is refused during recovery); `meowmx horizon` says that the
blockers are on the primary. Workers that read their batches on the standby (and claim
and ack on the primary) handle every event once, in stream order, wait for a lagging
standby instead of skipping, are fenced after a takeover, and retry and park failures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import meowmx
from clusters import Cluster, scratch, standby_of, start, wait_replayed
from meowmx import ClaimedEvent, Client, Worker
from support import call_sql, raises_meowmx, wait_until

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


# Workers that read their batches on the standby --------------------------------------------


def append_round_robin(client: Client, streams: int, per_stream: int) -> None:
    for version in range(1, per_stream + 1):
        for stream in range(streams):
            client.append("order", str(stream), "Step", {"v": version})


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
def test_workers_reading_on_the_standby_handle_every_event_once_in_stream_order(
    servers: tuple[Cluster, Cluster],
    primary_conn: Connection,
    standby_conn: Connection,
    transactional: bool,
) -> None:
    primary, standby = servers
    primary_conn.execute("DROP TABLE IF EXISTS handled")
    primary_conn.execute("CREATE TABLE handled (worker text, stream text, version int, pos int)")
    handled: list[tuple[str, str, int, int]] = []
    lock = threading.Lock()

    def handler_for(name: str) -> Callable[..., None]:
        def handler(event: ClaimedEvent, tx: Connection | None = None) -> None:
            row = (name, event.stream_id, event.version, event.position)
            if tx is not None:  # written in the transaction that acks
                tx.execute("INSERT INTO handled VALUES (%s, %s, %s, %s)", row)
            with lock:
                handled.append(row)

        return handler

    with Client(primary.dsn(DB), read_target=standby.dsn(DB)) as client:
        client.create_subscription("ship", categories=["order"], partitions=3)
        late = psycopg.connect(primary.dsn(DB))  # commits after the others
        Client(late).append("order", "late", "Late", {})
        team = [
            Worker(primary.dsn(DB), "ship", handler_for(f"w{i}"), name=f"w{i}", batch_size=20,
                   read_target=standby.dsn(DB), poll_interval=0.05, transactional=transactional)
            for i in range(3)
        ]  # fmt: skip
        threads = [threading.Thread(target=w.run, kwargs={"handle_signals": False}) for w in team]
        for thread in threads:
            thread.start()
        try:
            append_round_robin(client, streams=12, per_stream=25)
            wait_replayed(primary_conn, standby_conn)
            time.sleep(0.5)
            assert handled == []  # they committed after the late one began: it holds them
            late.commit()
            wait_until(lambda: len(handled) >= 301, "301 events handled", timeout=60)
            time.sleep(0.3)  # anything handled twice would show up now
        finally:
            late.close()
            for w in team:
                w.stop()
            for thread in threads:
                thread.join(timeout=15)
        positions = sorted(p for *_, p in handled)
        assert positions == [e.position for e in client.read_events(categories=["order"])]
        assert len(set(positions)) == 301  # each once
        versions: dict[str, list[int]] = {}
        for _, stream, version, _ in handled:
            versions.setdefault(stream, []).append(version)
        assert all(v == list(range(1, len(v) + 1)) for v in versions.values())
        assert [p.events_behind for p in client.subscription_status("ship")] == [0, 0, 0]
        if transactional:
            rows = primary_conn.execute("SELECT pos FROM handled ORDER BY pos").fetchall()
            assert [r[0] for r in rows] == positions


def test_a_lagging_standby_delays_the_batch_and_skips_nothing(
    servers: tuple[Cluster, Cluster], primary_conn: Connection, standby_conn: Connection
) -> None:
    primary, standby = servers
    seen: list[int] = []
    with Client(primary.dsn(DB), read_target=standby.dsn(DB)) as client:
        client.create_subscription("lag", categories=["order"])
        worker = Worker(client, "lag", lambda e: seen.append(e.position), name="lagging")
        wait_replayed(primary_conn, standby_conn)  # the subscription is there
        standby_conn.execute("SELECT pg_wal_replay_pause()")
        try:
            appended = [client.append("order", "1", "Step", {}).position for _ in range(5)]
            assert worker.run_once() == 0  # leased on the primary, not on the standby yet
            [status] = client.subscription_status("lag")
            assert (status.lease_owner, status.events_behind) == ("lagging", 5)
        finally:
            standby_conn.execute("SELECT pg_wal_replay_resume()")
        wait_replayed(primary_conn, standby_conn)
        assert worker.run_once() == 5
        assert seen == appended
        assert client.subscription_status("lag")[0].events_behind == 0


def test_an_ack_after_the_lease_was_taken_over_is_refused(
    servers: tuple[Cluster, Cluster], primary_conn: Connection, standby_conn: Connection
) -> None:
    primary, standby = servers
    with Client(primary.dsn(DB), read_target=standby.dsn(DB)) as client:
        client.create_subscription("fence", categories=["order"])
        for _ in range(3):
            client.append("order", "1", "Step", {})
        wait_replayed(primary_conn, standby_conn)
        slow = client.claim_partition("fence", "slow", lease=timedelta(milliseconds=300))
        assert slow is not None
        batch = client.read_partition("fence", slow.partition, after=slow.after, until=slow.until)
        assert len(batch) == 3
        time.sleep(0.4)  # the lease expires
        thief = client.claim_partition("fence", "thief")
        assert thief is not None and thief.after == slow.after
        with raises_meowmx(meowmx.LeaseLost):
            client.ack_through("fence", "slow", slow.partition, batch[-1].cursor)
        [status] = client.subscription_status("fence")
        assert (status.lease_owner, status.checkpoint, status.events_behind) == (
            "thief", slow.after, 3
        )  # fmt: skip
        client.ack_through("fence", "thief", thief.partition, batch[-1].cursor)
        assert client.subscription_status("fence")[0].events_behind == 0


def test_a_failing_event_read_on_the_standby_is_retried_then_parked(
    servers: tuple[Cluster, Cluster], primary_conn: Connection, standby_conn: Connection
) -> None:
    primary, standby = servers
    tries: list[tuple[int, int]] = []
    with Client(primary.dsn(DB), read_target=standby.dsn(DB)) as client:
        client.create_subscription("poison", categories=["order"], max_attempts=2)
        positions = [client.append("order", "1", "Step", {"n": n}).position for n in range(3)]

        def handler(event: ClaimedEvent) -> None:
            tries.append((event.position, event.attempts))
            if event.data["n"] == 1:
                raise ValueError("poison")

        worker = Worker(client, "poison", handler, backoff=lambda attempt: timedelta(0))
        wait_replayed(primary_conn, standby_conn)
        assert worker.run_once() == 1  # the first; then the failure
        assert worker.run_once() == 0  # the failure again: parked (max_attempts 2)
        assert worker.run_once() == 1  # the one after it
        first, poison, last = positions
        assert tries == [(first, 0), (poison, 0), (poison, 1), (last, 0)]
        assert [p.position for p in client.list_parked("poison")] == [poison]


DOOMED = """
import sys, time
from datetime import timedelta
import psycopg, meowmx

primary, standby = sys.argv[1], sys.argv[2]
record = psycopg.connect(primary, autocommit=True)

def handler(event):
    record.execute("INSERT INTO handled VALUES (%s)", [event.position])
    if event.version == 3:
        time.sleep(3600)  # stuck mid-batch until killed

meowmx.Worker(primary, "kill", handler, name="doomed", lease=timedelta(seconds=1),
              read_target=standby, poll_interval=0.05).run()
"""


def test_a_worker_killed_mid_batch_loses_nothing_and_its_late_ack_is_fenced(
    servers: tuple[Cluster, Cluster],
    primary_conn: Connection,
    standby_conn: Connection,
    tmp_path: Path,
) -> None:
    primary, standby = servers
    primary_conn.execute("DROP TABLE IF EXISTS handled")
    primary_conn.execute("CREATE TABLE handled (position bigint)")
    script = tmp_path / "doomed.py"
    script.write_text(DOOMED)
    package_root = str(Path(meowmx.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *sys.path])}
    with Client(primary.dsn(DB), read_target=standby.dsn(DB)) as client:
        client.create_subscription("kill", categories=["order"])
        events = [client.append("order", "1", "Step", {}).position for _ in range(10)]
        wait_replayed(primary_conn, standby_conn)
        doomed = subprocess.Popen(
            [sys.executable, str(script), primary.dsn(DB), standby.dsn(DB)], env=env
        )
        try:
            wait_until(lambda: primary_conn.execute("SELECT count(*) FROM handled").fetchone()
                       == (3,), "the worker to hang at its third event")  # fmt: skip
            doomed.kill()  # SIGKILL: no ack, no release
            assert doomed.wait(timeout=10) == -signal.SIGKILL
        finally:
            if doomed.poll() is None:
                doomed.kill()
        [status] = client.subscription_status("kill")
        assert status.lease_owner == "doomed"
        acked = 10 - status.events_behind  # a heartbeat ack may have come before the hang

        seen: list[int] = []
        heir = Worker(client, "kill", lambda e: seen.append(e.position), name="heir")
        wait_until(lambda: heir.run_once() >= 0 and len(seen) >= 10 - acked, "the heir to finish")
        assert seen == events[acked:]  # every unacknowledged event, the third included
        [status] = client.subscription_status("kill")
        assert (status.lease_owner, status.events_behind) == ("heir", 0)
        with raises_meowmx(meowmx.LeaseLost):  # the dead worker's ack, arriving late
            client.ack_through("kill", "doomed", 0, client.end_cursor())
