"""meowmx through PgBouncer in transaction mode (the Debian package, started here on a
loopback port in front of the test server).

psycopg prepares a statement after 5 runs; behind PgBouncer < 1.21 the next run lands
on another server connection ("prepared statement _pg3_0 does not exist"), so meowmx
prepares nothing behind a pooler by default (it does on a direct connection). LISTEN
would sit on a pooled server connection that nobody reads: a worker finds out (the
pid the pooler reports is not the server's) and polls, saying so once, unless given
listen_dsn, a direct connection.

Locally without PgBouncer these tests skip; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import meowmx
from clusters import PgBouncer, scratch, start_pgbouncer
from meowmx import ClaimedEvent, Client, NewEvent, Worker
from support import raises_meowmx, scalar, wait_until

Connection = psycopg.Connection[Any]


@pytest.fixture(scope="module")
def bouncer(server_dsn: str) -> Iterator[PgBouncer]:
    with scratch("meowmx-pgbouncer-") as work:
        running = start_pgbouncer(server_dsn, work)
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def pooled(bouncer: PgBouncer, dsn: str) -> str:
    """The test database, through PgBouncer."""
    with psycopg.connect(bouncer.dsn(dsn), autocommit=True) as conn:
        pid = scalar(conn, "SELECT pg_backend_pid()")
        assert pid != conn.info.backend_pid, "not through a pooler?"
    return bouncer.dsn(dsn)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def worker_log() -> Iterator[list[str]]:
    recorder = Recorder()
    logger = logging.getLogger("meowmx.worker")
    logger.addHandler(recorder)
    try:
        yield recorder.messages
    finally:
        logger.removeHandler(recorder)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meowmx", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_writers_three_workers_and_the_cli_through_pgbouncer(
    pooled: str, dsn: str, connect: Any, worker_log: list[str]
) -> None:
    direct = connect()
    direct.execute("DROP TABLE IF EXISTS pooled_handled")
    direct.execute("CREATE TABLE pooled_handled (position bigint NOT NULL, worker text)")
    with Client(pooled) as admin:
        admin.create_subscription("pooled", categories=["order"], partitions=3)

    def handler_for(name: str) -> Any:
        def handle(event: ClaimedEvent, tx: Connection) -> None:
            tx.execute(
                "INSERT INTO pooled_handled (position, worker) VALUES (%s, %s)",
                [event.position, name],
            )

        return handle

    workers = [
        Worker(
            pooled,
            "pooled",
            handler_for(f"w{n}"),
            name=f"w{n}",
            transactional=True,
            batch_size=20,
            lease=timedelta(seconds=10),
            poll_interval=0.2,
        )
        for n in range(3)
    ]
    threads = [threading.Thread(target=w.run, kwargs={"handle_signals": False}) for w in workers]
    positions: list[int] = []
    failures: list[BaseException] = []

    def write(n: int) -> None:
        try:
            with Client(pooled) as client:
                for i in range(40):
                    batch = [NewEvent("Placed", {"i": i}, id=uuid.uuid4()) for _ in range(5)]
                    appended = client.append_many("order", f"{n}-{i % 7}", batch)
                    positions.extend(a.position for a in appended)
        except BaseException as error:  # noqa: BLE001  (reported below)
            failures.append(error)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    try:
        for thread in [*threads, *writers]:
            thread.start()
        for thread in writers:
            thread.join(60)
        assert failures == []
        assert len(positions) == 600

        def handled() -> int:
            return int(scalar(direct, "SELECT count(*) FROM pooled_handled"))

        wait_until(lambda: handled() >= 600, "every event to be handled", timeout=60)
        assert all(t.is_alive() for t in threads), "a worker died"
    finally:
        for w in workers:
            w.stop()
        for thread in threads:
            thread.join(30)
    rows = direct.execute("SELECT position FROM pooled_handled ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == sorted(positions), "each event exactly once"
    assert not [m for m in worker_log if "prepared statement" in m], worker_log
    for n in range(3):
        said = [m for m in worker_log if m.startswith(f"worker w{n}:") and "pooler" in m]
        assert len(said) == 1, worker_log  # polling, said once

    # The command line through the pooler.
    done = cli("append", "order", "cli-1", "Placed", '{"via": "cli"}', "--dsn", pooled)
    assert done.returncode == 0, done.stderr
    done = cli("read", "--category", "order", "--dsn", pooled)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 601
    done = cli("tail", "--category", "order", "--timeout", "1", "--poll", "0.2", "--dsn", pooled)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 601
    assert "pooler" in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    done = cli("subscriptions", "pooled", "--dsn", pooled)
    assert done.returncode == 0 and "pooled" in done.stdout, done.stderr
    direct.execute("DROP TABLE pooled_handled")


def test_fencing_through_pgbouncer(pooled: str) -> None:
    with Client(pooled) as client:
        client.create_subscription("fence")
        appended = client.append("order", "f", "Placed", {})
        deadline = time.monotonic() + 30
        while not (batch := client.claim_batch("fence", "w1", lease=timedelta(seconds=0.2))):
            assert time.monotonic() < deadline, "the event never became visible"
        lease_end = client.subscription_status("fence")[0].lease_expires_at
        with psycopg.connect(pooled, autocommit=True) as conn:  # w1 stalls: its lease runs out
            wait_until(
                lambda: scalar(conn, "SELECT clock_timestamp() > %s", [lease_end]),
                "the lease to expire",
            )
        [taken] = client.claim_batch("fence", "w2")
        assert taken.position == batch[0].position == appended.position
        with raises_meowmx(meowmx.LeaseLost):
            client.ack("fence", "w1", 0, appended.position)
        client.ack("fence", "w2", 0, appended.position)
        assert client.subscription_status("fence")[0].events_behind == 0


def test_listen_dsn_gives_prompt_delivery_behind_a_pooler(
    pooled: str, dsn: str, connect: Any, worker_log: list[str]
) -> None:
    observer = connect()
    with Client(pooled) as client:
        client.create_subscription("prompt")
    seen: list[int] = []
    worker = Worker(
        pooled, "prompt", lambda e: seen.append(e.position), listen_dsn=dsn, poll_interval=30
    )
    thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False})
    thread.start()
    try:
        wait_until(
            lambda: scalar(
                observer,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND query = 'LISTEN meowmx' AND state = 'idle'",
            ),
            "the worker to LISTEN on its direct connection",
        )
        with Client(pooled) as client:
            appended = client.append("order", "p", "Placed", {})
        # Polling every 30 s would take far longer: the NOTIFY woke it.
        wait_until(lambda: seen, "the event to arrive", timeout=15)
        assert seen == [appended.position]
    finally:
        worker.stop()
        thread.join(30)
    assert not [m for m in worker_log if "pooler" in m], worker_log


PREPARED = "SELECT count(*) FROM pg_prepared_statements WHERE statement ~ 'meowmx.append_event'"


def test_statements_are_prepared_on_a_direct_connection_only(dsn: str, bouncer: PgBouncer) -> None:
    """By default prepared directly (it saves the parse and plan of every call), never
    through the pooler; prepared_statements=False turns it off."""
    for prepared_statements, expected in [(None, 1), (False, 0)]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            client = Client(conn, prepared_statements=prepared_statements)
            for _ in range(8):  # psycopg prepares after 5 runs
                client.append("prep", str(uuid.uuid4()), "Added", {})
            assert scalar(conn, PREPARED) == expected, prepared_statements
    with psycopg.connect(bouncer.dsn(dsn), autocommit=True) as pooled:
        assert Client(pooled)._connect.prepare(pooled) is False
