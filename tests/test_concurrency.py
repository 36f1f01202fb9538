"""Concurrency with several real connections and threads.

Racing writers, transactions that commit late, the stale-transaction guard, and event
ids taken by a concurrent append. Nothing here asserts on timing: threads are lined up
with barriers, and a transaction is known to wait when pg_stat_activity says so.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

import meowmx
from meowmx import Client, NewEvent, RecordedEvent
from support import (
    call_sql,
    raises_meowmx,
    stream_versions,
    wait_for_horizon,
    wait_until_blocked,
)

Connect = Callable[..., psycopg.Connection[Any]]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=10) as executor:
        yield executor


def read_all(client: Client, after: str | None = None, **filters: Any) -> list[RecordedEvent]:
    return list(client.read_events(after=after, page_size=7, **filters))


def tags(events: list[RecordedEvent]) -> list[str]:
    return [event.data["tag"] for event in events]


# (a) Racing writers -----------------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 3], ids=["single-events", "batches"])
def test_racing_writers_get_consecutive_versions(
    connect: Connect, pool: ThreadPoolExecutor, max_batch: int
) -> None:
    writers, appends_each = 8, 8
    clients = [Client(connect()) for _ in range(writers)]
    start = threading.Barrier(writers)
    wins: list[tuple[int, list[int], list[str]]] = []  # expected_version, versions, tags
    lock = threading.Lock()

    def writer(k: int) -> int:
        client, rng, conflicts = clients[k], random.Random(k), 0
        start.wait()
        for i in range(appends_each):
            batch = [f"w{k}-{i}-{j}" for j in range(rng.randint(1, max_batch))]
            events = [NewEvent("Added", {"tag": tag}) for tag in batch]
            while True:
                version = client.stream_version("cart", "1")
                try:
                    appended = client.append_many("cart", "1", events, expected_version=version)
                except meowmx.WrongExpectedVersion as error:
                    assert error.expected == version and error.actual is not None
                    assert error.actual > version
                    conflicts += 1
                    continue
                with lock:
                    wins.append((version, [a.version for a in appended], batch))
                break
        return conflicts

    conflicts = sum(f.result() for f in [pool.submit(writer, k) for k in range(writers)])

    stored = list(clients[0].read_stream("cart", "1"))
    total = len(stored)
    assert [e.version for e in stored] == list(range(1, total + 1))
    assert len(wins) == writers * appends_each  # every append succeeded exactly once
    assert sorted(v for v, _, _ in wins) == sorted({v for v, _, _ in wins}), "a version won twice"
    for expected, versions, batch in wins:
        # Each batch landed right after the version it expected, contiguous and whole.
        assert versions == list(range(expected + 1, expected + 1 + len(batch)))
        assert [stored[v - 1].data["tag"] for v in versions] == batch
    assert sum(len(batch) for _, _, batch in wins) == total
    print(f"{conflicts} conflicts retried")


def test_concurrent_retries_of_one_append_write_it_once(
    connect: Connect, pool: ThreadPoolExecutor
) -> None:
    """The same batch sent by several clients at once (retries racing): written once."""
    batch = [NewEvent("Added", {"tag": f"t{i}"}, id=uuid.uuid4()) for i in range(3)]
    clients = [Client(connect()) for _ in range(6)]
    start = threading.Barrier(len(clients))

    def send(client: Client) -> list[meowmx.Appended]:
        start.wait()
        return client.append_many("cart", "1", batch, expected_version=0)

    results = [f.result() for f in [pool.submit(send, c) for c in clients]]
    assert all(result == results[0] for result in results)
    assert [a.version for a in results[0]] == [1, 2, 3]
    assert [e.data["tag"] for e in clients[0].read_stream("cart", "1")] == ["t0", "t1", "t2"]


# (b) Late commits -------------------------------------------------------------------------


def append_tagged(conn: psycopg.Connection[Any], category: str, stream_id: str, *tags: str) -> None:
    Client(conn).append_many(category, stream_id, [NewEvent("Tagged", {"tag": t}) for t in tags])


def read_sql(conn: psycopg.Connection[Any], after: str | None) -> list[tuple[str, str]]:
    """(tag, cursor) of every visible event after ``after``, paging with SQL."""
    seen: list[tuple[str, str]] = []
    while True:
        rows = call_sql(conn, "read_events", "data ->> 'tag', cursor", after=after, max_count=2)
        seen += [(row[0], row[1]) for row in rows]
        if not rows:
            return seen
        after = rows[-1][1]


def read_python(conn: psycopg.Connection[Any], after: str | None) -> list[tuple[str, str]]:
    return [(e.data["tag"], e.cursor) for e in Client(conn).read_events(after=after, page_size=2)]


@pytest.mark.parametrize("read", [read_sql, read_python], ids=["sql", "python"])
@pytest.mark.parametrize(
    "xid_first",
    [False, True],
    ids=["late-appends-first", "late-takes-xid-first-appends-last"],
)
def test_a_transaction_that_commits_late_is_not_skipped(
    connect: Connect,
    read: Callable[[psycopg.Connection[Any], str | None], list[tuple[str, str]]],
    xid_first: bool,
) -> None:
    late, other, reader = connect(autocommit=False), connect(), connect()
    append_tagged(other, "early", "1", "e1", "e2")
    wait_for_horizon(reader)
    before = read(reader, None)
    assert [tag for tag, _ in before] == ["e1", "e2"]
    cursor = before[-1][1]

    if xid_first:
        # The late transaction writes something first: its id is older than the others',
        # but its event gets a higher position than theirs.
        late.execute("SELECT pg_current_xact_id()")
        append_tagged(other, "quick", "1", "q1", "q2")
        append_tagged(other, "quick", "2", "q3")
        append_tagged(late, "late", "1", "L")
    else:
        append_tagged(late, "late", "1", "L")
        append_tagged(other, "quick", "1", "q1", "q2")
        append_tagged(other, "quick", "2", "q3")

    # The late transaction is open: nothing that committed after it started is returned.
    assert read(reader, cursor) == []

    late.commit()
    wait_for_horizon(reader)
    after_commit = read(reader, cursor)
    assert [tag for tag, _ in after_commit] == ["L", "q1", "q2", "q3"]

    # From the beginning: every event exactly once, in the order the reader got them.
    assert read(reader, None) == before + after_commit
    if xid_first:
        positions = {e.data["tag"]: e.position for e in Client(reader).read_events()}
        assert positions["L"] > positions["q3"], "position order differs from read order"


def test_a_polling_reader_never_skips_an_event(connect: Connect, pool: ThreadPoolExecutor) -> None:
    """Writers commit in random interleavings while readers poll with their cursors.

    Some writer transactions take their id early and append late (so positions are not
    in commit order), some roll back, and writers share streams, retrying a whole
    transaction refused as stale. Every reader sees every committed event exactly once,
    and each stream's versions in read order.
    """
    writers, transactions_each = 4, 15
    conns = [connect(autocommit=False) for _ in range(writers)]
    full_reader, cart_reader = Client(connect()), Client(connect())
    committed: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    stale_retries = Counter[int]()

    def writer(k: int) -> None:
        conn, rng = conns[k], random.Random(1000 + k)
        client = Client(conn)
        for t in range(transactions_each):
            batch = [f"w{k}-t{t}-{i}" for i in range(rng.randint(1, 3))]
            category = rng.choice(["cart", "order"])
            stream_id = str(rng.randint(1, 3))
            rollback = rng.random() < 0.15
            while True:
                try:
                    if rng.random() < 0.4:
                        conn.execute("SELECT pg_current_xact_id()")  # take an id early
                        time.sleep(rng.random() * 0.004)
                    client.append_many(
                        category, stream_id, [NewEvent("Tagged", {"tag": x}) for x in batch]
                    )
                    time.sleep(rng.random() * 0.004)  # commit later, or sooner, than others
                except meowmx.StaleTransaction:
                    conn.rollback()
                    stale_retries[k] += 1
                    continue
                if rollback:
                    conn.rollback()
                else:
                    conn.commit()
                    with lock:
                        committed.extend(batch)
                break

    def poll(client: Client, categories: list[str] | None) -> list[RecordedEvent]:
        seen: list[RecordedEvent] = []
        after = None
        while not done.is_set():
            page = client.read_events_page(after=after, max_count=5, categories=categories)
            seen += page
            after = page[-1].cursor if page else after
        return seen + read_all(client, after, categories=categories)  # the rest, once settled

    readers = [pool.submit(poll, full_reader, None), pool.submit(poll, cart_reader, ["cart"])]
    for f in [pool.submit(writer, k) for k in range(writers)]:
        f.result()
    wait_for_horizon(connect())
    done.set()
    seen_all, seen_carts = readers[0].result(), readers[1].result()

    assert Counter(tags(seen_all)) == Counter(committed), "each committed event exactly once"
    assert tags(seen_all) == tags(read_all(full_reader)), "the same order as a fresh read"
    carts = [e for e in seen_all if e.category == "cart"]
    assert tags(seen_carts) == tags(carts)
    for category in ("cart", "order"):
        for stream_id in ("1", "2", "3"):
            in_read_order = [
                e.version for e in seen_all if (e.category, e.stream_id) == (category, stream_id)
            ]
            assert in_read_order == list(range(1, len(in_read_order) + 1)), (category, stream_id)
    print(f"{len(committed)} events committed, stale transactions retried: {dict(stale_retries)}")


# (c) The stale-transaction guard ----------------------------------------------------------


def test_an_append_older_than_the_streams_last_is_refused(connect: Connect) -> None:
    older, newer = connect(autocommit=False), connect()
    Client(older).append("other", "1", "Written", {"tag": "o"})  # holds a transaction id now
    Client(newer).append("cart", "1", "Created", {"tag": "n"})  # a younger id, committed

    with raises_meowmx(meowmx.StaleTransaction) as info, older.transaction():  # a savepoint
        Client(older).append("cart", "1", "Added", {"tag": "stale"})
    assert info.value.detail and "cart/1" in info.value.detail

    # Nothing of that call was written; the transaction's earlier write is still there.
    older.commit()
    assert stream_versions(newer, "cart", "1") == [1]
    assert stream_versions(newer, "other", "1") == [1]

    # As the hint says, retrying the whole transaction works.
    with older.transaction():
        Client(older).append("other", "1", "Written", {"tag": "o2"})
        assert Client(older).append("cart", "1", "Added", {"tag": "retried"}).version == 2
    wait_for_horizon(newer)
    assert tags(read_all(Client(newer))) == ["o", "n", "o2", "retried"]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_an_older_transaction_that_waited_for_the_stream_lock(
    connect: Connect, pool: ThreadPoolExecutor, outcome: str
) -> None:
    """The hazard of the design: a transaction holding an id waits for another appender
    of the same stream. If that appender commits, the waiter would write a later version
    under an older id, so it is refused; if it rolls back, the waiter goes ahead."""
    older, holder, observer = connect(autocommit=False), connect(autocommit=False), connect()
    Client(older).append("other", "1", "Written", {"tag": "o"})
    Client(holder).append("cart", "1", "Created", {"tag": "h"})  # holds the stream

    def append_in_savepoint() -> int:
        with older.transaction():
            return Client(older).append("cart", "1", "Added", {"tag": "waited"}).version

    waiting: Future[int] = pool.submit(append_in_savepoint)
    wait_until_blocked(observer, older.info.backend_pid)
    holder.commit() if outcome == "commit" else holder.rollback()

    if outcome == "commit":
        with raises_meowmx(meowmx.StaleTransaction):
            waiting.result()
        expected = ["h"]
    else:
        assert waiting.result() == 1
        expected = ["waited"]
    older.commit()
    stored = list(Client(observer).read_stream("cart", "1"))
    assert [e.data["tag"] for e in stored] == expected
    wait_for_horizon(observer)
    events = read_all(Client(observer))
    cart = [e.version for e in events if e.category == "cart"]
    assert cart == sorted(cart), "global order agrees with the stream's versions"


# (d) Event ids taken concurrently ---------------------------------------------------------


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_an_event_id_taken_by_an_open_transaction(
    connect: Connect, pool: ThreadPoolExecutor, outcome: str
) -> None:
    first, second, observer = connect(autocommit=False), connect(), connect()
    event_id = uuid.uuid4()
    Client(first).append("cart", "1", "Created", {"tag": "first"}, event_id=event_id)

    racing = pool.submit(
        Client(second).append_many,
        "cart",
        "2",
        [
            NewEvent("Created", {"tag": "own"}, id=uuid.uuid4()),
            NewEvent("Created", {"tag": "second"}, id=event_id),
        ],
    )
    wait_until_blocked(observer, second.info.backend_pid)
    first.commit() if outcome == "commit" else first.rollback()

    if outcome == "commit":
        with raises_meowmx(meowmx.EventIdConflict):
            racing.result()
        assert (stream_versions(observer, "cart", "1"), stream_versions(observer, "cart", "2")) == (
            [1],
            [],
        )
    else:
        assert [a.version for a in racing.result()] == [1, 2]
        assert (stream_versions(observer, "cart", "1"), stream_versions(observer, "cart", "2")) == (
            [],
            [1, 2],
        )


@pytest.mark.parametrize("batch", [False, True], ids=["append_event", "append_events"])
def test_racing_appends_of_one_new_event_id_to_different_streams(
    connect: Connect, pool: ThreadPoolExecutor, batch: bool
) -> None:
    event_id = uuid.uuid4()
    clients = [Client(connect()) for _ in range(6)]
    start = threading.Barrier(len(clients))

    def append(k: int) -> str:
        start.wait()
        try:
            if batch:
                own = NewEvent("Created", {"tag": f"own{k}"}, id=uuid.uuid4())
                clients[k].append_many("cart", str(k), [own, NewEvent("Created", {}, id=event_id)])
            else:
                clients[k].append("cart", str(k), "Created", {}, event_id=event_id)
        except meowmx.EventIdConflict as error:
            assert isinstance(error.__cause__, psycopg.Error)
            assert error.__cause__.sqlstate == "MX002"
            return "conflict"
        return "ok"

    outcomes = [f.result() for f in [pool.submit(append, k) for k in range(len(clients))]]
    assert sorted(outcomes) == ["conflict"] * (len(clients) - 1) + ["ok"]
    winner = outcomes.index("ok")
    observer = connect()
    for k in range(len(clients)):
        assert len(stream_versions(observer, "cart", str(k))) == (
            (2 if batch else 1) if k == winner else 0
        )
    (count,) = observer.execute(
        "SELECT count(*) FROM meowmx.events WHERE event_id = %s", [event_id]
    ).fetchone()  # type: ignore[misc]
    assert count == 1
