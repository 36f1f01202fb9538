"""Subscriptions through SQL (named arguments, psql) and the Client, with several connections.

Definitions, claims of one partition in commit order, acks and
checkpoints, leases and fencing, nack / retry / parking / requeue, start places and
resets, lag, late-committing writers, horizon blockers, and index use on a rare category.
No timing assertions: waits poll, and leases that must expire are kept short.
Bad arguments are in test_bad_input.py's catalogue.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb

from meowmx import Client
from meowmx.errors import (
    LeaseLost,
    NotInBatch,
    SubscriptionConflict,
)
from support import (
    HORIZON_PROBE,
    call_sql,
    raises_meowmx,
    scalar,
    wait_for_horizon,
    wait_until,
    wait_until_blocked,
)

Connection = psycopg.Connection[Any]


SUB = "projector"


# Helpers -------------------------------------------------------------------------


def named(c: Connection) -> Connection:
    """The connection, with attribute access to the columns of its rows."""
    c.row_factory = namedtuple_row
    return c


@pytest.fixture
def conn(connect: Callable[..., Connection]) -> Connection:
    """An autocommit connection whose rows have attribute access."""
    return named(connect())


def partition_of(category: str, stream_id: str, partitions: int) -> int:
    """The documented, platform-independent hash: md5 of category/stream_id, first 32 bits."""
    digest = hashlib.md5(f"{category}/{stream_id}".encode()).hexdigest()
    return int(digest[:8], 16) % partitions


def streams_in(partition: int, partitions: int, count: int, prefix: str = "s") -> list[str]:
    """`count` stream ids of category 'order' that hash to `partition`."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        if partition_of("order", f"{prefix}{i}", partitions) == partition:
            found.append(f"{prefix}{i}")
        i += 1
    return found


def append(
    conn: Connection, stream_id: str, count: int = 1, category: str = "order", kind: str = "Placed"
) -> list[int]:
    """Append `count` events to one stream via SQL; returns their positions."""
    events = [{"type": kind, "data": {"n": i}} for i in range(count)]
    rows = call_sql(
        conn,
        "append_events",
        "position",
        category=category,
        stream_id=stream_id,
        events=Jsonb(events),
    )
    return [row[0] for row in rows]


def create(conn: Connection, name: str = SUB, **args: Any) -> bool:
    return bool(call_sql(conn, "create_subscription", "*", name=name, **args)[0][0])


def claim(
    conn: Connection,
    worker: str,
    *,
    name: str = SUB,
    max_count: int = 100,
    lease: str = "30 seconds",
) -> list[Any]:
    return conn.execute(
        "SELECT partition, position, transaction_id::text::numeric AS xid, category, stream_id,"
        " version, event_type, cursor FROM meowmx.claim_batch(subscription => %s, worker => %s,"
        " max_count => %s, lease => %s::interval)",
        [name, worker, max_count, lease],
    ).fetchall()


def ack(conn: Connection, worker: str, row: Any, *, name: str = SUB) -> None:
    conn.execute(
        "SELECT meowmx.ack(subscription => %s, worker => %s, partition => %s,"
        " event_position => %s)",
        [name, worker, row.partition, row.position],
    )


def nack(
    conn: Connection,
    worker: str,
    row: Any,
    error: str = "boom",
    retry_after: str = "0",
    *,
    name: str = SUB,
) -> bool:
    return bool(
        scalar(
            conn,
            "SELECT meowmx.nack(subscription => %s, worker => %s, partition => %s,"
            " event_position => %s, error => %s, retry_after => %s::interval)",
            [name, worker, row.partition, row.position, error, retry_after],
        )
    )


def status(conn: Connection, name: str = SUB) -> dict[int, Any]:
    rows = conn.execute("SELECT * FROM meowmx.subscription_status(name => %s)", [name])
    return {row.partition: row for row in rows.fetchall()}


def positions(rows: list[Any]) -> list[int]:
    return [row.position for row in rows]


def cursor_of(conn: Connection, position: int) -> str:
    row = conn.execute(
        "SELECT transaction_id::text || ':' || position FROM meowmx.events WHERE position = %s",
        [position],
    ).fetchone()
    assert row is not None
    return str(row[0])


def state(conn: Connection) -> list[Any]:
    """Everything subscriptions store, to check that a failed call changed nothing."""
    return [
        conn.execute(f"SELECT * FROM meowmx.{table} ORDER BY 1, 2").fetchall()
        for table in ("subscriptions", "subscription_partitions", "parked_events")
    ]


# Definitions ---------------------------------------------------------------------


def test_create_is_idempotent_and_a_different_definition_conflicts(
    conn: Connection, clients: Callable[[], Client]
) -> None:
    definition: dict[str, Any] = dict(
        categories=["order", "invoice"],
        event_types=None,
        partitions=4,
        start_at="beginning",
        max_attempts=5,
    )
    assert create(conn, **definition) is True
    before = state(conn)
    assert create(conn, **definition) is False
    # Filters are sets: order and duplicates don't make another definition.
    assert create(conn, **{**definition, "categories": ["invoice", "order", "order"]}) is False
    client = clients()
    assert (
        client.create_subscription(
            SUB, categories=["order", "invoice"], partitions=4, max_attempts=5
        )
        is False
    )
    for change in (
        {"categories": ["order"]},
        {"categories": None},
        {"event_types": ["Placed"]},
        {"partitions": 3},
        {"start_at": "end"},
        {"max_attempts": 6},
    ):
        with raises_meowmx(SubscriptionConflict) as info:
            client.create_subscription(SUB, **{**definition, **change})
        assert SUB in (info.value.detail or "")
    assert state(conn) == before
    # A different name is a different subscription.
    assert client.create_subscription("other", partitions=2) is True
    assert sorted(status(conn, "other")) == [0, 1]


# Claims --------------------------------------------------------------------------


def test_partition_hash_is_the_documented_md5(conn: Connection) -> None:
    pairs = [("order", "1"), ("order", "abc"), ("invoice", "ünïcödé"), ("a/b", "c/d")]
    for category, stream_id in pairs:
        for partitions in (1, 2, 7, 1024):
            got = scalar(
                conn,
                "SELECT meowmx._partition_of(%s, %s, %s)",
                [category, stream_id, partitions],
            )
            assert got == partition_of(category, stream_id, partitions)
    # Pinned values: the same on every platform and PostgreSQL version, forever.
    pinned = scalar(
        conn,
        "SELECT array_agg(meowmx._partition_of('order', s, 1024) ORDER BY s)"
        " FROM unnest(ARRAY['1', '2', '3']) AS s",
    )
    assert pinned == [840, 32, 824]


def test_claim_returns_one_partition_in_commit_order(conn: Connection) -> None:
    partitions = 4
    create(conn, partitions=partitions)
    streams = [f"s{i}" for i in range(40)]
    for round_ in range(5):  # interleave the streams in commit order
        for stream_id in streams:
            append(conn, stream_id, 1 + round_ % 2)
    wait_for_horizon(conn)
    total = scalar(conn, "SELECT count(*) FROM meowmx.events")

    seen: dict[int, list[Any]] = {}
    for w in range(partitions):
        rows = claim(conn, f"w{w}", max_count=1000)
        assert rows, f"w{w} found no free partition with work"
        [partition] = {row.partition for row in rows}  # one partition per batch
        assert partition not in seen
        seen[partition] = rows
        assert [(r.xid, r.position) for r in rows] == sorted((r.xid, r.position) for r in rows)
        for row in rows:
            assert partition_of(row.category, row.stream_id, partitions) == partition
        versions: dict[str, list[int]] = {}
        for row in rows:
            versions.setdefault(row.stream_id, []).append(row.version)
        for stream_id, got in versions.items():
            assert got == list(range(1, len(got) + 1)), stream_id
    assert claim(conn, "w9") == []  # every partition is leased
    delivered = [row.position for rows in seen.values() for row in rows]
    assert len(delivered) == len(set(delivered)) == total
    # Each stream went to exactly one partition, with all of its events (1+2+1+2+1).
    per_stream = {row.stream_id for rows in seen.values() for row in rows}
    assert per_stream == set(streams)


def test_concurrent_claims_never_share_a_partition(
    conn: Connection, connect: Callable[..., Connection]
) -> None:
    create(conn, partitions=4)
    for i in range(40):
        append(conn, f"s{i}", 2)
    wait_for_horizon(conn)
    conns = [named(connect()) for _ in range(8)]
    barrier = threading.Barrier(len(conns))
    results: dict[int, list[Any]] = {}

    def claimer(i: int) -> None:
        barrier.wait()
        results[i] = claim(conns[i], f"w{i}", max_count=1000)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == len(conns)
    batches = [rows for rows in results.values() if rows]
    partitions = [rows[0].partition for rows in batches]
    assert len(partitions) == len(set(partitions))  # no partition handed out twice
    delivered = [r.position for rows in batches for r in rows]
    assert len(delivered) == len(set(delivered))
    owners = {p: row.lease_owner for p, row in status(conn).items() if row.lease_owner}
    assert sorted(owners) == sorted(partitions)


def test_a_psql_user_drives_a_subscription_by_hand(
    psql: Callable[..., Any], conn: Connection
) -> None:
    psql("""SELECT count(*) FROM meowmx.append_events(category => 'order', stream_id => '42',
    events => '[{"type": "Placed", "data": {"total": 10}},
                {"type": "Paid", "data": {"total": 10}},
                {"type": "Shipped", "data": {}}]');""")
    wait_for_horizon(conn)  # on a shared server another session may hold it back a moment
    script = """
SELECT meowmx.create_subscription(name => 'by_hand', categories => ARRAY['order']);
SELECT max(position) AS last, count(*) AS got
FROM meowmx.claim_batch(subscription => 'by_hand', worker => 'me', max_count => 2) \\gset
\\echo claimed :got
SELECT meowmx.ack(subscription => 'by_hand', worker => 'me', partition => 0,
    event_position => :last);
SELECT events_behind, lease_owner FROM meowmx.subscription_status(name => 'by_hand');
SELECT version || ' ' || event_type AS next
FROM meowmx.claim_batch(subscription => 'by_hand', worker => 'me', max_count => 2) \\gset
\\echo next :next
"""
    out = psql(script).stdout.splitlines()
    assert out == ["t", "claimed 2", "", "1|me", "next 3 Shipped"]


def test_ack_moves_the_checkpoint_and_the_next_claim_continues(conn: Connection) -> None:
    create(conn)
    pos = append(conn, "s1", 10)
    wait_for_horizon(conn)
    assert status(conn)[0].events_behind == 10

    batch = claim(conn, "w1", max_count=4, lease="1 minute")
    assert positions(batch) == pos[:4]
    claimed = status(conn)[0]
    assert claimed.events_behind == 10  # claimed is not done
    assert claimed.lease_owner == "w1"
    ack(conn, "w1", batch[1])  # the second: it and the first are done
    st = status(conn)[0]
    assert (st.checkpoint, st.events_behind) == (cursor_of(conn, pos[1]), 8)
    assert st.lease_expires_at > claimed.lease_expires_at  # an ack renews the lease

    batch = claim(conn, "w1", max_count=4)
    assert positions(batch) == pos[2:6]
    ack(conn, "w1", batch[-1])
    assert status(conn)[0].events_behind == 4
    batch = claim(conn, "w1", max_count=100)
    assert positions(batch) == pos[6:]
    ack(conn, "w1", batch[-1])
    st = status(conn)[0]
    assert (st.checkpoint, st.events_behind) == (cursor_of(conn, pos[-1]), 0)
    assert claim(conn, "w1") == []


def test_a_claim_without_ack_is_delivered_again(
    conn: Connection, connect: Callable[..., Connection]
) -> None:
    other = named(connect())
    create(conn)
    pos = append(conn, "s1", 3)
    wait_for_horizon(conn)
    assert positions(claim(conn, "w1")) == pos
    assert positions(claim(conn, "w1")) == pos  # same worker claims again: same events
    assert claim(other, "w2") == []  # leased to w1
    assert call_sql(conn, "release", "*", subscription=SUB, worker="w1")[0][0] == 1
    assert status(conn)[0].lease_owner is None
    assert positions(claim(other, "w2")) == pos  # released: the next worker gets them


def test_fencing_a_taken_over_lease_rejects_the_old_owner(
    clients: Callable[[], Client], conn: Connection
) -> None:
    a, b = clients(), clients()
    a.create_subscription(SUB)
    pos = append(conn, "s1", 3)
    wait_for_horizon(conn)
    assert [e.position for e in a.claim_batch(SUB, "A")] == pos
    assert b.claim_batch(SUB, "B") == []  # A's 30 s lease holds
    short = timedelta(milliseconds=200)
    batch = a.claim_batch(SUB, "A", lease=short)  # A claims again with a short lease
    assert [e.position for e in batch] == pos
    lease_end = status(conn)[0].lease_expires_at
    wait_until(
        lambda: scalar(conn, "SELECT clock_timestamp() > %s", [lease_end]),
        "A's lease to expire",
    )
    taken = b.claim_batch(SUB, "B")
    assert [e.position for e in taken] == pos  # at-least-once: the same events again
    before = status(conn)[0]
    with raises_meowmx(LeaseLost) as info:
        a.ack(SUB, "A", batch[-1].partition, batch[-1].position)
    assert "'B'" in (info.value.detail or "")
    with raises_meowmx(LeaseLost):
        a.nack(SUB, "A", batch[0].partition, batch[0].position, "late")
    after = status(conn)[0]
    assert (after.checkpoint, after.events_behind, after.lease_owner, after.attempts) == (
        before.checkpoint,
        3,
        "B",
        0,
    )
    b.ack(SUB, "B", taken[-1].partition, taken[-1].position)
    assert status(conn)[0].events_behind == 0
    # A released or reset lease fences too.
    assert b.release(SUB, "B") == 1
    with raises_meowmx(LeaseLost):
        b.ack(SUB, "B", taken[-1].partition, taken[-1].position)


def test_ack_or_nack_outside_the_batch_is_rejected(
    conn: Connection, clients: Callable[[], Client]
) -> None:
    client = clients()
    client.create_subscription(SUB, categories=["order"], partitions=2)
    mine = streams_in(0, 2, 1, "p0-")[0]
    theirs = streams_in(1, 2, 1, "p1-")[0]
    own = append(conn, mine, 4)
    other = append(conn, theirs, 1)
    [foreign] = append(conn, mine, 1, category="invoice")
    wait_for_horizon(conn)
    with raises_meowmx(LeaseLost):  # nothing claimed yet: no lease
        client.ack(SUB, "w1", 0, own[0])
    # Claim until w1 holds partition 0 (a claim picks a random free partition).
    while (batch := client.claim_batch(SUB, "w1", max_count=2))[0].partition != 0:
        client.release(SUB, "w1")
    assert [e.position for e in batch] == own[:2]
    client.ack(SUB, "w1", 0, own[0])
    before = status(conn)[0]
    for position in (own[0], own[2], own[3], other[0], foreign, 10**12):
        with raises_meowmx(NotInBatch):
            client.ack(SUB, "w1", 0, position)
        with raises_meowmx(NotInBatch):
            client.nack(SUB, "w1", 0, position, "nope")
    assert status(conn)[0] == before
    client.ack(SUB, "w1", 0, own[1])  # the batch itself is still good
    with raises_meowmx(NotInBatch):
        client.ack(SUB, "w1", 0, own[1])  # each once


# Failures ------------------------------------------------------------------------


def test_nack_retries_after_retry_after_and_holds_the_partition(
    conn: Connection, connect: Callable[..., Connection]
) -> None:
    other = named(connect())
    create(conn)
    pos = append(conn, "s1", 5)
    wait_for_horizon(conn)
    batch = claim(conn, "A")
    assert nack(conn, "A", batch[2], "boom 1", "1.5 seconds") is False
    st = status(conn)[0]
    assert (st.attempts, st.last_error, st.events_behind, st.lease_owner) == (1, "boom 1", 3, "A")
    assert st.retry_at is not None
    # Held while waiting: neither the owner nor anybody else gets the partition.
    assert claim(conn, "A") == []
    assert claim(other, "B") == []
    still_waiting = scalar(conn, "SELECT clock_timestamp() < %s", [st.retry_at])
    assert still_waiting, "the machine was too slow to observe the retry wait"

    retry = wait_until(lambda: claim(conn, "A"), "the retry", timeout=15)
    assert scalar(conn, "SELECT clock_timestamp() >= %s", [st.retry_at])
    assert positions(retry) == pos[2:]  # order kept: the failed event first
    assert claim(other, "B") == []  # A keeps the lease
    assert nack(conn, "A", retry[0], "boom 2") is False
    st = status(conn)[0]
    assert (st.attempts, st.last_error) == (2, "boom 2")
    retry = claim(conn, "A")
    assert positions(retry) == pos[2:]
    ack(conn, "A", retry[0])
    st = status(conn)[0]
    assert (st.attempts, st.last_error, st.retry_at, st.events_behind) == (0, None, None, 2)


def test_a_poison_event_is_parked_and_the_partition_moves_on(conn: Connection) -> None:
    create(conn, partitions=2, max_attempts=3)
    a = streams_in(0, 2, 2, "a")
    b = streams_in(1, 2, 1, "b")[0]
    before = append(conn, a[0], 1)
    [poison] = append(conn, a[0], 1, kind="Poison")
    after = append(conn, a[0], 1) + append(conn, a[1], 2)
    elsewhere = append(conn, b, 3)
    wait_for_horizon(conn)

    handled: list[int] = []
    nacks = 0
    while batch := claim(conn, "w1", max_count=10):
        for row in batch:
            if row.event_type == "Poison":
                nacks += 1
                parked = nack(conn, "w1", row, f"bad event (try {nacks})")
                assert parked is (nacks == 3)
                break
            handled.append(row.position)
            ack(conn, "w1", row)
    assert nacks == 3
    assert sorted(handled) == sorted(before + after + elsewhere)  # each exactly once
    [dead] = call_sql(conn, "list_parked", "*", subscription=SUB)
    assert (
        dead.position,
        dead.partition,
        dead.stream_id,
        dead.version,
        dead.event_type,
        dead.attempts,
        dead.error,
    ) == (poison, 0, a[0], 2, "Poison", 3, "bad event (try 3)")
    st = status(conn)
    assert [(p.parked, p.events_behind, p.attempts) for p in st.values()] == [(1, 0, 0), (0, 0, 0)]

    # Requeue: the partition rewinds to just before it; it and what followed come again.
    assert call_sql(conn, "requeue_parked", "*", subscription=SUB, event_position=poison)[0][0] == 1
    assert call_sql(conn, "list_parked", "*", subscription=SUB) == []
    assert status(conn)[0].events_behind == 1 + len(after)
    again = claim(conn, "w1")
    assert positions(again) == [poison, *after]
    ack(conn, "w1", again[-1])
    assert status(conn)[0].events_behind == 0
    assert claim(conn, "w1") == []


def test_max_attempts_one_parks_at_the_first_failure(conn: Connection) -> None:
    create(conn, max_attempts=1)
    pos = append(conn, "s1", 2)
    wait_for_horizon(conn)
    first = claim(conn, "w1")[0]
    assert nack(conn, "w1", first, "nope", "1 hour") is True  # parked: no wait
    assert positions(claim(conn, "w1")) == pos[1:]


# Start places, resets, lag ---------------------------------------------------------


def test_start_at_end_skips_history_and_reset_replays(conn: Connection) -> None:
    history = append(conn, "s1", 5)
    wait_for_horizon(conn)  # 'end' is the read horizon: let it pass the history
    create(conn, start_at="end")
    assert status(conn)[0].events_behind == 0
    assert claim(conn, "w1") == []
    new = append(conn, "s1", 3)
    wait_for_horizon(conn)
    assert status(conn)[0].events_behind == 3
    batch = claim(conn, "w1")
    assert positions(batch) == new

    # A cursor start: everything after that event.
    create(conn, "from_cursor", start_at=cursor_of(conn, history[2]))
    assert positions(claim(conn, "w1", name="from_cursor")) == history[3:] + new

    # Reset to the beginning replays everything and drops the lease.
    call_sql(conn, "reset_subscription", "*", name=SUB, start_at="beginning")
    st = status(conn)[0]
    assert (st.lease_owner, st.events_behind) == (None, 8)
    with pytest.raises(psycopg.Error) as info:
        ack(conn, "w1", batch[-1])
    assert info.value.sqlstate == "MX022"
    replay = claim(conn, "w2")
    assert positions(replay) == history + new
    ack(conn, "w2", replay[-1])
    call_sql(conn, "reset_subscription", "*", name=SUB, start_at="end")
    assert status(conn)[0].events_behind == 0
    assert claim(conn, "w2") == []


def test_a_claim_that_waits_out_a_reset_starts_where_the_reset_put_the_partition(
    conn: Connection, connect: Callable[..., Connection]
) -> None:
    """claim_batch scans before it locks the partition row; a reset that commits while
    the claim waits for that lock moves the checkpoint back, and the claim must scan
    again from there, not hand out its scan from the old checkpoint (which acks would
    then move past the replayed events)."""
    events = append(conn, "s1", 6)
    wait_for_horizon(conn)
    create(conn)
    ack(conn, "w1", claim(conn, "w1", max_count=3)[-1])
    call_sql(conn, "release", "*", subscription=SUB, worker="w1")

    resetter, claimer = named(connect()), named(connect())
    resetter.execute("BEGIN")
    call_sql(resetter, "reset_subscription", "*", name=SUB, start_at="beginning")
    (claimer_pid,) = claimer.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
    got: list[list[Any]] = []
    thread = threading.Thread(target=lambda: got.append(claim(claimer, "w2")))
    thread.start()
    wait_until_blocked(conn, claimer_pid)  # on the partition row, after its scan
    resetter.execute("COMMIT")
    thread.join(timeout=30)
    assert [positions(batch) for batch in got] == [events]
    ack(conn, "w2", got[0][-1])
    assert status(conn)[0].events_behind == 0


def test_status_shows_the_true_lag_per_partition(conn: Connection) -> None:
    create(conn, partitions=3)
    expected = {0: 0, 1: 0, 2: 0}
    for i in range(30):
        append(conn, f"s{i}", 1 + i % 3)
        expected[partition_of("order", f"s{i}", 3)] += 1 + i % 3
    wait_for_horizon(conn)
    st = status(conn)
    assert {p: row.events_behind for p, row in st.items()} == expected
    assert all(row.lease_owner is None and row.parked == 0 for row in st.values())

    batch = claim(conn, "w1")
    part = batch[0].partition
    assert len(batch) == expected[part]
    st = status(conn)
    assert st[part].lease_owner == "w1" and st[part].lease_expires_at is not None
    assert st[part].events_behind == expected[part]
    ack(conn, "w1", batch[len(batch) // 2])
    assert status(conn)[part].events_behind == expected[part] - len(batch) // 2 - 1
    ack(conn, "w1", batch[-1])
    st = status(conn)
    assert {p: row.events_behind for p, row in st.items()} == {**expected, part: 0}


# Commit order and the read horizon --------------------------------------------------


def test_a_late_committing_writer_is_not_skipped(
    conn: Connection, connect: Callable[..., Connection], clients: Callable[[], Client]
) -> None:
    worker = clients()
    worker.create_subscription(SUB)
    early = append(conn, "early", 2)
    wait_for_horizon(conn)

    late = connect(autocommit=False)
    [late_event] = append(late, "late", 1)  # its transaction stays open
    after = append(conn, "other", 2) + append(conn, "early", 1)
    assert late_event < after[0]  # it took its position before them

    batch = worker.claim_batch(SUB, "w1")
    assert [e.position for e in batch] == early  # nothing past the open transaction
    worker.ack(SUB, "w1", 0, batch[-1].position)
    assert worker.claim_batch(SUB, "w1") == []
    # True lag counts the committed events the horizon holds back.
    assert status(conn)[0].events_behind == len(after)

    late.commit()
    wait_for_horizon(conn)
    delivered = worker.claim_batch(SUB, "w1")
    assert [e.position for e in delivered] == [late_event, *after]
    worker.ack(SUB, "w1", 0, delivered[-1].position)
    assert worker.claim_batch(SUB, "w1") == []


def test_a_transaction_that_wrote_first_and_appends_last_is_not_skipped(
    conn: Connection, connect: Callable[..., Connection]
) -> None:
    create(conn)
    late = connect(autocommit=False)
    late.execute("SELECT pg_current_xact_id()")  # an old transaction id ...
    meanwhile = append(conn, "s1", 2)
    [late_event] = append(late, "s2", 1)  # ... with a newer position
    assert claim(conn, "w1") == []
    late.commit()
    wait_for_horizon(conn)
    batch = claim(conn, "w1")
    assert positions(batch) == [late_event, *meanwhile]  # (transaction id, position) order


def test_horizon_blockers_names_open_writing_transactions(
    conn: Connection, connect: Callable[..., Connection], clients: Callable[[], Client]
) -> None:
    # Two open writers: any writing transaction holds the horizon, meowmx's or not.
    # The younger one's id is at or above the snapshot's xmax (which is the latest
    # *completed* id + 1), and must still be reported exactly.
    other = connect(autocommit=False)
    other_xid = int(scalar(other, "SELECT pg_current_xact_id()::text"))
    writer = connect(autocommit=False)
    xid = int(
        scalar(
            writer,
            "SELECT pg_current_xact_id()::text, meowmx.append_event(category => 'order',"
            " stream_id => 'slow', event_type => 'Placed', data => '{}')",
        )
    )
    pids = {writer.info.backend_pid: xid, other.info.backend_pid: other_xid}

    def ours() -> list[Any]:
        rows = conn.execute("SELECT * FROM meowmx.horizon_blockers()").fetchall()
        return [row for row in rows if row.pid in pids]

    rows = ours()
    assert [(row.pid, int(row.transaction_id)) for row in rows] == sorted(
        pids.items(), key=lambda item: item[1]
    )  # exact ids, oldest first
    row = rows[-1]
    assert row.state == "idle in transaction"
    assert "append_event" in row.query
    assert row.transaction_age >= timedelta(0)
    [blocker] = [b for b in clients().horizon_blockers() if b.pid == writer.info.backend_pid]
    assert blocker.transaction_id == xid and "append_event" in (blocker.query or "")

    writer.commit()
    other.commit()
    assert ours() == []
    # A session that only reads holds no transaction id and blocks nothing.
    writer.execute("SELECT count(*) FROM meowmx.events")
    assert ours() == []
    writer.rollback()


# Scale -----------------------------------------------------------------------------


def _plan_buffers(conn: Connection, sql: str, params: Any = ()) -> tuple[int, int]:
    """Run `sql` under EXPLAIN (ANALYZE, BUFFERS): the buffers it touched and its rows."""
    plan = scalar(conn, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)[0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], plan["Actual Rows"]


def _nested_plans(conn: Connection, sql: str, params: Any = ()) -> str:
    """The plans of every statement `sql` runs, functions included (auto_explain)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
        conn.execute(f"SET auto_explain.{setting}")
    conn.execute(sql, params)
    conn.execute("RESET auto_explain.log_min_duration")
    return "\n".join(notices)


@pytest.mark.parametrize("sampled", [True, False], ids=["analyzed", "unsampled"])
def test_a_rare_category_among_200k_events_is_claimed_through_its_index(
    conn: Connection, sampled: bool
) -> None:
    """10 events of category 'rare' among 200k of one big category, then ANALYZE. Whether
    ANALYZE's sample caught a 'rare' row is luck (about 80 % with the default statistics
    target); "unsampled" makes missing them near certain with a tiny statistics target,
    as for any category that is new since the last (auto)analyze."""
    bulk = (
        "INSERT INTO meowmx.events (category, stream_id, version, event_type, data)"
        " SELECT 'common', 'c' || (i %% 1000), i / 1000 + %s, 'Noise', '{}'"
        " FROM generate_series(0, 99999) AS i"
    )
    conn.execute(bulk, [1])
    rare = [p for i in range(5) for p in append(conn, f"r{i}", 2, category="rare")]
    conn.execute(bulk, [101])
    if not sampled:  # a 300-row sample: 10 in 200k are almost never in it
        conn.execute("ALTER TABLE meowmx.events ALTER COLUMN category SET STATISTICS 1")
    conn.execute("ANALYZE meowmx.events")
    create(conn, categories=["rare"])
    wait_for_horizon(conn)

    claim_sql = (
        "SELECT * FROM meowmx.claim_batch(subscription => %s, worker => 'w1', max_count => 100)"
    )
    assert positions(claim(conn, "w1")) == rare  # also warms the caches
    plans = _nested_plans(conn, claim_sql, [SUB])
    read_plan = "\n".join(
        p for p in plans.split("duration:") if " on events " in p and HORIZON_PROBE not in p
    )
    assert "events_category_idx" in read_plan, f"the category read scans elsewhere:\n{read_plan}"
    assert not re.search(r"Seq Scan on events|events_commit_order_idx", read_plan), read_plan
    buffers, rows = _plan_buffers(conn, claim_sql, [SUB])  # claimed again: not acked yet
    assert rows == 10
    assert buffers < 300, f"claiming 10 events touched {buffers} buffers"
    [last] = claim(conn, "w1")[-1:]
    ack(conn, "w1", last)
    buffers, rows = _plan_buffers(conn, claim_sql, [SUB])
    assert rows == 0
    assert buffers < 300, f"an empty claim touched {buffers} buffers"
    assert status(conn)[0].events_behind == 0


def test_a_partition_without_events_moves_its_checkpoint_past_the_others(
    conn: Connection, connect: Callable[..., Connection]
) -> None:
    create(conn, partitions=2)
    busy = streams_in(0, 2, 10)
    for stream_id in busy:
        append(conn, stream_id, 30)
    wait_for_horizon(conn)
    # A takes the busy partition 0 (a claim may look at empty partition 1 on the way).
    wait_until(
        lambda: [r for r in claim(conn, "A", max_count=10) if r.partition == 0],
        "A to claim partition 0",
    )
    last = 0
    for stream_id in busy:  # more events, all in partition 0
        last = append(conn, stream_id, 20)[-1]
    wait_for_horizon(conn)
    assert status(conn)[1].checkpoint != cursor_of(conn, last)

    other = named(connect())
    assert claim(other, "B", max_count=10) == []  # only partition 1 is free: nothing there
    st = status(conn)
    assert st[1].checkpoint == cursor_of(conn, last)  # moved past 500 events of partition 0
    assert (st[1].events_behind, st[1].lease_owner) == (0, None)
    assert st[0].lease_owner == "A" and st[0].events_behind == 500


def test_read_partition_returns_its_partition_and_ends_on_the_scans_last_event(
    conn: Connection,
) -> None:
    """The batch read on a standby (read_partition works on any server): the partition's
    events in order, then, when the scan ends on other partitions' events, the last of
    them, so that ack_through moves the checkpoint past the whole scan."""
    create(conn, partitions=2)
    (mine,), (theirs,) = streams_in(0, 2, 1), streams_in(1, 2, 1)
    first = append(conn, mine, 2)
    others = append(conn, theirs, 5)
    wait_for_horizon(conn)
    [(partition, after, until, failing, attempts)] = call_sql(
        conn, "claim_partition", "*", subscription=SUB, worker="A"
    )
    if partition == 1:  # the claim picks at random: hand partition 1 back, take 0
        call_sql(conn, "ack_through", subscription=SUB, worker="A", partition=1,
                 cursor=cursor_of(conn, others[-1]))  # fmt: skip
        [(partition, after, until, failing, attempts)] = call_sql(
            conn, "claim_partition", "*", subscription=SUB, worker="A"
        )
    assert (partition, failing, attempts) == (0, None, 0)

    rows = call_sql(conn, "read_partition", "partition, position", subscription=SUB,
                    partition=0, after=after, until=until, max_count=3)  # fmt: skip
    # A scan of 3 x 2 events: both of partition 0, then the last of partition 1 it saw.
    scanned_to = others[3]
    assert rows == [(0, first[0]), (0, first[1]), (1, scanned_to)]
    # A full batch needs no such row: max_count events of the partition end the read.
    rows = call_sql(conn, "read_partition", "position", subscription=SUB, partition=0,
                    after=after, until=until, max_count=1)  # fmt: skip
    assert rows == [(first[0],)]

    call_sql(conn, "ack_through", subscription=SUB, worker="A", partition=0,
             cursor=cursor_of(conn, scanned_to))  # fmt: skip
    assert status(conn)[0].checkpoint == cursor_of(conn, scanned_to)
    assert status(conn)[0].events_behind == 0
    # Before `until` only: an event appended since the claim is not in its batch.
    later = append(conn, mine)[0]
    wait_for_horizon(conn)
    assert call_sql(conn, "read_partition", "position", subscription=SUB, partition=0,
                    after=cursor_of(conn, scanned_to), until=until) == [(others[-1],)]  # fmt: skip
    with pytest.raises(psycopg.Error) as info:
        call_sql(conn, "ack_through", subscription=SUB, worker="A", partition=0,
                 cursor=cursor_of(conn, later))  # fmt: skip
    assert info.value.sqlstate == NotInBatch.sqlstate
