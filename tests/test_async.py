"""What only asyncio users have: AsyncClient in the caller's AsyncConnection transaction
and on an AsyncConnectionPool, AsyncWorker tasks sharing a loop, LISTEN, `async with`.

The scenarios the sync binding is tested with run against the async one too (the
`clients` and `kind` fixtures, through support.Blocking); these are the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import meowmx
from meowmx import AsyncClient, AsyncWorker, ClaimedEvent, NewEvent
from meowmx.errors import WrongExpectedVersion
from meowmx.follower import CHANNEL
from support import raises_meowmx, scalar, wait_for_horizon

SUB = "projector"
NO_BACKOFF: Callable[[int], timedelta] = lambda attempt: timedelta(0)  # noqa: E731
Connection = psycopg.Connection[Any]
AsyncConn = psycopg.AsyncConnection[Any]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


@pytest.fixture
def conn(connect: Callable[..., Connection]) -> Connection:
    return connect()


@pytest.fixture
def read_model(conn: Connection) -> Callable[[], list[int]]:
    conn.execute("DROP TABLE IF EXISTS read_model")
    conn.execute("CREATE TABLE read_model (position bigint PRIMARY KEY)")
    return lambda: [r[0] for r in conn.execute("SELECT position FROM read_model ORDER BY 1")]


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_appends_commit_or_roll_back_with_the_callers_async_transaction(dsn: str) -> None:
    async def scenario() -> None:
        async with (
            AsyncClient(dsn) as client,
            await psycopg.AsyncConnection.connect(dsn) as tx,
        ):
            async with tx.transaction(force_rollback=True):
                await client.append("order", "1", "Placed", {"n": 1}, conn=tx)
                # The caller's transaction sees its own event; no one else does yet.
                assert await client.stream_version("order", "1", conn=tx) == 1
                assert await client.stream_version("order", "1") == 0
            assert await client.stream_version("order", "1") == 0  # rolled back
            async with tx.transaction():
                await client.append_many(
                    "order", "1", [NewEvent("Placed", {}), NewEvent("Paid", {})], conn=tx
                )
                await client.save_snapshot("order", "1", 2, {"paid": True}, conn=tx)
            events = [e async for e in client.read_stream("order", "1", page_size=1)]
            assert [e.event_type for e in events] == ["Placed", "Paid"]
            snapshot = await client.load_snapshot("order", "1")
            assert snapshot is not None and snapshot.state == {"paid": True}

    run(scenario)


def test_concurrent_appends_on_a_pool_keep_one_version_each(dsn: str) -> None:
    """20 tasks race for version 1 of one stream: one wins, 19 get the typed conflict."""

    async def scenario() -> None:
        async with AsyncConnectionPool(
            dsn, min_size=4, max_size=4, kwargs={"autocommit": True}, open=False
        ) as pool:
            client = AsyncClient(pool)

            async def attempt(n: int) -> str:
                try:
                    await client.append("order", "race", "Placed", {"n": n}, expected_version=0)
                except WrongExpectedVersion:
                    return "conflict"
                return "won"

            outcomes = await asyncio.gather(*(attempt(n) for n in range(20)))
            assert sorted(outcomes) == ["conflict"] * 19 + ["won"]
            assert await client.stream_version("order", "race") == 1
            with raises_meowmx(WrongExpectedVersion):
                await client.append("order", "race", "Placed", {}, expected_version=0)

    run(scenario)


def test_retry_on_conflict_async_rereads_and_appends(dsn: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(dsn) as client, AsyncClient(dsn) as rival:
            await client.append("cart", "1", "Added", {})
            tries = 0

            async def add_once() -> meowmx.Appended:
                nonlocal tries
                tries += 1
                version = await client.stream_version("cart", "1")
                if tries == 1:  # someone else appends between our read and our append
                    await rival.append("cart", "1", "Added", {})
                return await client.append("cart", "1", "Added", {}, expected_version=version)

            appended = await meowmx.retry_on_conflict_async(add_once)
            assert (tries, appended.version) == (2, 3)

    run(scenario)


def test_an_async_client_refuses_a_sync_connection(dsn: str, conn: Connection) -> None:
    async def scenario() -> None:
        async with AsyncClient(dsn) as client:
            with pytest.raises(TypeError, match="AsyncConnection"):
                await client.append("cart", "1", "Added", {}, conn=conn)  # type: ignore[arg-type]
            assert await client.stream_version("cart", "1") == 0

    run(scenario)
    with pytest.raises(TypeError, match="AsyncConnection"):
        AsyncClient(conn)  # type: ignore[arg-type]


def test_async_workers_in_one_loop_share_a_subscription(conn: Connection, dsn: str) -> None:
    """Two AsyncWorker tasks, four partitions: every event once, each stream in order,
    while the events are appended; stop() ends both and releases their leases."""

    async def scenario() -> None:
        async with AsyncClient(dsn) as client:
            await client.create_subscription(SUB, partitions=4)
            handled: list[tuple[str, str, int]] = []

            def handler_of(name: str) -> Callable[[ClaimedEvent], Awaitable[None]]:
                async def handle(event: ClaimedEvent) -> None:
                    handled.append((name, event.stream_id, event.version))
                    await asyncio.sleep(0)  # let the other task in

                return handle

            team = [
                AsyncWorker(dsn, SUB, handler_of(f"w{n}"), name=f"w{n}", batch_size=20)
                for n in range(2)
            ]
            tasks = [asyncio.create_task(w.run(handle_signals=False)) for w in team]
            # Both wait for events before the first arrives: a worker keeps the leases of
            # the partitions it drained, so one that starts late can find all four taken.
            listening = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            listening += f" AND query = 'LISTEN {CHANNEL}'"
            await until(lambda: conn.execute(listening).fetchone() == (2,), "both to LISTEN")
            for round_ in range(5):
                await asyncio.gather(
                    *(
                        client.append_many(
                            "order", f"s{s}", [NewEvent("Placed", {"r": round_})] * 10
                        )
                        for s in range(20)
                    )
                )
            await until(lambda: len(handled) >= 1000, "1000 events to be handled")
            await asyncio.sleep(0.2)  # anything handled twice would show up now
            for w in team:
                w.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
            assert len(handled) == 1000
            versions: dict[str, list[int]] = {}
            owners: dict[str, set[str]] = {}
            for name, stream_id, version in handled:
                versions.setdefault(stream_id, []).append(version)
                owners.setdefault(stream_id, set()).add(name)
            assert all(v == list(range(1, 51)) for v in versions.values())
            assert all(len(o) == 1 for o in owners.values())
            assert {name for name, _, _ in handled} == {"w0", "w1"}
            status = await client.subscription_status(SUB)
            assert [(p.events_behind, p.lease_owner) for p in status] == [(0, None)] * 4

    run(scenario)


def test_listen_wakes_an_async_worker_promptly(conn: Connection, dsn: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(dsn) as client:
            await client.create_subscription(SUB)
            arrived: list[float] = []

            async def handle(event: ClaimedEvent) -> None:
                arrived.append(time.monotonic())

            worker = AsyncWorker(dsn, SUB, handle, poll_interval=5.0)
            task = asyncio.create_task(worker.run(handle_signals=False))
            await until(
                lambda: scalar(
                    conn,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query = 'LISTEN meowmx' AND state = 'idle'",
                ),
                "the worker to LISTEN",
            )
            await asyncio.sleep(0.3)  # into its wait
            appended = time.monotonic()
            await client.append("order", "1", "Placed", {})
            await asyncio.to_thread(wait_for_horizon, conn)
            visible = time.monotonic()
            await until(lambda: arrived, "the event to arrive", timeout=15)
            assert arrived[0] - max(appended, visible - 0.05) < 2.0
            stopped = time.monotonic()
            worker.stop()
            await asyncio.wait_for(task, timeout=10)
            assert time.monotonic() - stopped < 2.5  # not the 5 s poll

    run(scenario)


def test_async_transactional_handler_writes_commit_with_the_ack_on_a_pool(
    conn: Connection, dsn: str, read_model: Callable[[], list[int]]
) -> None:
    """A coroutine handler writes through the batch's AsyncConnection; a failure mid-
    batch rolls its writes back, the events before it commit once, and it is nacked."""

    async def scenario() -> None:
        async with AsyncClient(dsn) as client:
            await client.create_subscription(SUB)
            appended = await client.append_many("order", "s1", [NewEvent("Placed", {})] * 8)
        events = [a.position for a in appended]
        await asyncio.to_thread(wait_for_horizon, conn)
        failures = [events[5]]

        async def project(event: ClaimedEvent, tx: AsyncConn) -> None:
            await tx.execute("INSERT INTO read_model (position) VALUES (%s)", [event.position])
            if event.position in failures:
                failures.remove(event.position)
                raise ValueError("flaky")

        async with AsyncConnectionPool(
            dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False
        ) as pool:
            async with AsyncWorker(
                pool, SUB, project, transactional=True, backoff=NO_BACKOFF, listen=False
            ) as worker:
                assert await worker.run_once() == 5
                assert read_model() == events[:5]
                drained = await worker.run_until_idle()
                assert drained == meowmx.Drained(handled=3, failed=0, parked=0)
            assert read_model() == events  # each exactly once
            status = await AsyncClient(pool).subscription_status(SUB)
            assert [(p.attempts, p.events_behind, p.lease_owner) for p in status] == [(0, 0, None)]

    run(scenario)


def test_async_with_releases_the_leases_for_the_next_worker(dsn: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(dsn) as client:
            await client.create_subscription(SUB)
            await client.append_many("order", "1", [NewEvent("Placed", {})] * 3)
            seen: list[str] = []

            async def note(event: ClaimedEvent) -> None:
                seen.append(event.cursor)

            async with AsyncWorker(dsn, SUB, note, name="brief", batch_size=1) as worker:
                assert await worker.run_once() == 1
                [status] = await client.subscription_status(SUB)
                assert status.lease_owner == "brief"
            [status] = await client.subscription_status(SUB)
            assert (status.lease_owner, status.events_behind) == (None, 2)
            async with AsyncWorker(dsn, SUB, note, name="next") as heir:
                assert await heir.run_once() == 2  # at once, not after the 30 s lease

    run(scenario)


def test_an_async_worker_refuses_what_it_cannot_run(
    dsn: str, connect: Callable[..., Connection]
) -> None:
    async def plain(event: ClaimedEvent) -> None:
        pass

    async def scenario() -> None:
        with pytest.raises(TypeError, match="transactional=True"):
            AsyncWorker(dsn, SUB, plain, transactional=True)
        async with await psycopg.AsyncConnection.connect(dsn) as not_autocommit:
            with pytest.raises(ValueError, match="autocommit"):
                AsyncWorker(not_autocommit, SUB, plain)
        with pytest.raises(TypeError, match="Worker"):
            AsyncWorker(meowmx.Client(dsn), SUB, plain)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="AsyncWorker"):
            meowmx.Worker(AsyncClient(dsn), SUB, lambda event: None)  # type: ignore[arg-type]

    run(scenario)


def test_cancelling_a_running_async_worker_releases_its_leases(dsn: str) -> None:
    """A service shutting down cancels its tasks: the batch in hand stops where it is
    (unacknowledged, so it comes again) and the leases are released at once."""

    async def scenario() -> None:
        async with AsyncClient(dsn) as client:
            await client.create_subscription(SUB)
            await client.append_many("order", "1", [NewEvent("Placed", {})] * 3)
            started = asyncio.Event()

            async def stuck(event: ClaimedEvent) -> None:
                started.set()
                await asyncio.sleep(3600)

            worker = AsyncWorker(dsn, SUB, stuck, name="cancelled")
            task = asyncio.create_task(worker.run(handle_signals=False))
            await asyncio.wait_for(started.wait(), timeout=15)
            [status] = await client.subscription_status(SUB)
            assert status.lease_owner == "cancelled"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=15)
            [status] = await client.subscription_status(SUB)
            assert (status.lease_owner, status.events_behind) == (None, 3)

    run(scenario)
