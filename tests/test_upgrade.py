"""Upgrading from every earlier schema version keeps every event, checkpoint and parked
event, and the upgraded database works and has the same schema as a fresh install.

For each earlier version k, the migrations 1..k are applied with ``psql -1`` (as a
user of another stack would), data that version supports is written with SQL calls,
and ``meowmx.install`` upgrades the database.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

import meowmx
from catalog import catalog_of, differences
from support import STORED_EVENT_COLUMNS, call_sql, wait_for_horizon

Connection = psycopg.Connection[Any]

LATEST = meowmx.latest_version()
EARLIER = list(range(1, LATEST))
SUBSCRIBED = ["acct", "order"]  # the categories of the subscription; "misc" is not in it
STORED = ", ".join(STORED_EVENT_COLUMNS)  # what an upgrade must keep of each event


def install_version(psql: Any, target: str, version: int) -> None:
    """Apply migrations 1..version as one transaction through psql."""
    psql(meowmx.script(after=0, upto=version), target, args=["-1", "-f", "-"])
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT meowmx.version()").fetchone() == (version,)


def write_events(conn: Connection) -> None:
    """Events in several streams and categories, with ids and metadata (version 1 API)."""
    for stream in range(1, 9):  # acct/7 and acct/8 hash to partition 1 of 2, the rest to 0
        call_sql(
            conn,
            "append_events",
            category="acct",
            stream_id=str(stream),
            expected_version=0,
            events=Jsonb(
                [
                    {
                        "type": f"Step{n}",
                        "data": {"stream": stream, "n": n},
                        "metadata": {"trace": f"{stream}-{n}"},
                        "id": str(uuid.uuid4()),
                    }
                    for n in range(1, 4)
                ]
            ),
        )
    for n in range(1, 3):
        call_sql(
            conn,
            "append_event",
            category="order",
            stream_id="A",
            event_type="Placed" if n == 1 else "Paid",
            data={"amount": n * 10.5, "nested": {"list": [1, "two", None]}},
            metadata=None if n == 1 else {"user": "tom"},
            event_id=uuid.uuid4(),
        )
        call_sql(conn, "append_event", category="misc", stream_id="x", event_type="Noise", data={})


class Progress:
    """What the workers did: acked and parked positions, and a batch still in flight."""

    def __init__(self) -> None:
        self.acked: set[int] = set()
        self.parked: set[int] = set()
        self.in_flight: tuple[str, int, int] | None = None  # worker, partition, position


def run_subscription(conn: Connection) -> Progress:
    """A 2-partition subscription part-way through: checkpoints mid-batch and at a batch
    end, a parked event (max_attempts 1), and a batch in flight under a long lease."""
    progress = Progress()
    created = call_sql(
        conn,
        "create_subscription",
        name="upg",
        categories=SUBSCRIBED,
        partitions=2,
        max_attempts=1,
    )
    assert created == [(True,)]
    call_sql(conn, "create_subscription", name="idle", event_types=["Paid"], start_at="end")
    wait_for_horizon(conn)

    def claim(worker: str, max_count: int) -> list[Any]:
        return call_sql(
            conn,
            "claim_batch",
            "partition, position",
            subscription="upg",
            worker=worker,
            max_count=max_count,
            lease="1 hour",
        )

    first = claim("w1", 3)
    assert len(first) == 3
    part_a = first[0][0]
    call_sql(
        conn, "ack", subscription="upg", worker="w1", partition=part_a, event_position=first[1][1]
    )
    parked = call_sql(
        conn,
        "nack",
        subscription="upg",
        worker="w1",
        partition=part_a,
        event_position=first[2][1],
        error="poison pill",
    )
    assert parked == [(True,)]
    progress.acked |= {first[0][1], first[1][1]}
    progress.parked.add(first[2][1])

    # w1 still leases partition A, so w2 gets the other one.
    second = claim("w2", 2)
    assert len(second) == 2 and second[0][0] != part_a
    part_b = second[0][0]
    call_sql(
        conn, "ack", subscription="upg", worker="w2", partition=part_b, event_position=second[1][1]
    )
    progress.acked |= {row[1] for row in second}
    third = claim("w2", 1)
    assert len(third) == 1 and third[0][0] == part_b
    progress.in_flight = ("w2", part_b, third[0][1])
    assert call_sql(conn, "release", subscription="upg", worker="w1") == [(1,)]
    return progress


def record(conn: Connection, version: int) -> dict[str, Any]:
    """Everything stored that an upgrade must keep."""
    state: dict[str, Any] = {
        "events": conn.execute(f"SELECT {STORED} FROM meowmx.events ORDER BY position").fetchall(),
        "versions": conn.execute(
            "SELECT category, stream_id, meowmx.stream_version(category, stream_id)"
            " FROM meowmx.events GROUP BY category, stream_id ORDER BY 1, 2"
        ).fetchall(),
        "migrations": conn.execute(
            "SELECT version, name, applied_at FROM meowmx.migrations ORDER BY version"
        ).fetchall(),
    }
    if version >= 2:
        state["subscriptions"] = conn.execute(
            "SELECT * FROM meowmx.subscriptions ORDER BY name"
        ).fetchall()
        state["partitions"] = conn.execute(
            "SELECT p::text FROM meowmx.subscription_partitions AS p"
            " ORDER BY subscription, partition"
        ).fetchall()
        state["parked_events"] = conn.execute(
            "SELECT * FROM meowmx.parked_events ORDER BY subscription, position"
        ).fetchall()
        state["status"] = conn.execute(
            # The columns of the first release (later ones add columns).
            "SELECT subscription, partition, checkpoint, events_behind, lease_owner,"
            " lease_expires_at, attempts, last_error, retry_at, parked"
            " FROM meowmx.subscription_status() ORDER BY subscription, partition"
        ).fetchall()
        state["list_parked"] = call_sql(conn, "list_parked", subscription="upg")
    return state


def subscribed_positions(conn: Connection) -> set[int]:
    rows = conn.execute(
        "SELECT position FROM meowmx.events WHERE category = ANY(%s)", [SUBSCRIBED]
    ).fetchall()
    return {row[0] for row in rows}


def drain(conn: Connection, worker: str) -> list[tuple[int, int, str, int]]:
    """Claim and ack until nothing is left; returns (partition, position, stream, version)."""
    delivered: list[tuple[int, int, str, int]] = []
    wait_for_horizon(conn)
    for _ in range(200):
        batch = call_sql(
            conn,
            "claim_batch",
            "partition, position, category || '/' || stream_id, version",
            subscription="upg",
            worker=worker,
            max_count=4,
        )
        if not batch:
            return delivered
        delivered.extend(batch)
        partition, position = batch[-1][0], batch[-1][1]
        call_sql(
            conn, "ack", subscription="upg", worker=worker, partition=partition,
            event_position=position,
        )  # fmt: skip
    pytest.fail("the subscription never ran dry")


@pytest.mark.parametrize("k", EARLIER, ids=[f"from-v{k}" for k in EARLIER])
def test_upgrade_keeps_data_and_works(k: int, extra_db: Callable[[], str], psql: Any) -> None:
    target = extra_db()
    install_version(psql, target, k)
    with psycopg.connect(target, autocommit=True) as conn:
        write_events(conn)
        progress = run_subscription(conn) if k >= 2 else None
        before = record(conn, k)

    assert meowmx.install(target) == list(range(k + 1, LATEST + 1))
    assert meowmx.install(target) == []

    with psycopg.connect(target, autocommit=True) as conn:
        assert conn.execute("SELECT meowmx.version()").fetchone() == (LATEST,)
        after = record(conn, k)
        after["migrations"] = after["migrations"][:k]
        assert after == before, "the upgrade changed stored data"
        assert [row[0] for row in conn.execute("SELECT version FROM meowmx.migrations")] == list(
            range(1, LATEST + 1)
        )
        old_events = before["events"]

        # Appends continue the streams' versions.
        appended = call_sql(
            conn,
            "append_event",
            "version, position",
            category="acct",
            stream_id="1",
            event_type="Step4",
            data={},
            expected_version=3,
        )
        assert appended[0][0] == 4 and appended[0][1] > old_events[-1][0]
        call_sql(
            conn,
            "append_events",
            category="order",
            stream_id="B",
            expected_version=0,
            events=Jsonb([{"type": "Placed", "data": {}}, {"type": "Paid", "data": {}}]),
        )
        # An idempotent retry of an event stored before the upgrade returns its result.
        first = old_events[0]
        retry = call_sql(
            conn,
            "append_event",
            "version, position",
            category=first[2],
            stream_id=first[3],
            event_type="ignored",
            data={},
            event_id=first[8],
        )
        assert retry == [(first[4], first[0])]

        if progress is None:
            progress = run_subscription(conn)
        # The batch in flight across the upgrade can still be acked by its worker.
        assert progress.in_flight is not None
        worker, partition, position = progress.in_flight
        call_sql(
            conn, "ack", subscription="upg", worker=worker, partition=partition,
            event_position=position,
        )  # fmt: skip
        progress.acked.add(position)
        call_sql(conn, "release", subscription="upg", worker=worker)

        # Claims continue after the checkpoints: nothing acked comes back, nothing is skipped.
        delivered = drain(conn, "w3")
        positions = [row[1] for row in delivered]
        assert len(positions) == len(set(positions)), "an event was delivered twice"
        assert not set(positions) & progress.acked, "an acked event was delivered again"
        assert not set(positions) & progress.parked, "a parked event was delivered"
        assert set(positions) | progress.acked | progress.parked == subscribed_positions(conn)
        by_stream: dict[str, list[int]] = {}
        for _, _, stream, version in delivered:
            by_stream.setdefault(stream, []).append(version)
        assert all(v == sorted(v) for v in by_stream.values()), "stream order was kept"

        # The parked event can be requeued: it comes back first in its partition.
        (parked,) = progress.parked
        assert call_sql(conn, "requeue_parked", subscription="upg", event_position=parked) == [(1,)]
        assert call_sql(conn, "list_parked", subscription="upg") == []
        again = call_sql(
            conn, "claim_batch", "position", subscription="upg", worker="w3", max_count=1
        )
        assert again == [(parked,)]
        assert call_sql(conn, "subscription_status", "count(*)", name="idle") == [(1,)]

        # The functions of later migrations work on the old data.
        versions = {(c, s): v for c, s, v in before["versions"]}
        listed = call_sql(conn, "list_streams", "stream_id, version", category="acct")
        expected = sorted((s, v) for (c, s), v in versions.items() if c == "acct")
        expected = [(s, 4 if s == "1" else v) for s, v in expected]
        assert listed == expected
        call_sql(conn, "save_snapshot", category="acct", stream_id="2", version=3, state={"n": 3})
        assert call_sql(
            conn, "load_snapshot", "version, state", category="acct", stream_id="2"
        ) == [(3, {"n": 3})]
        assert call_sql(
            conn, "delete_stream", category="acct", stream_id="3", before_version=3
        ) == [(2,)]
        assert call_sql(conn, "read_stream", "version", category="acct", stream_id="3") == [(3,)]
        assert call_sql(conn, "delete_stream", category="order", stream_id="A") == [(2,)]
        assert call_sql(conn, "stream_version", category="order", stream_id="A") == [(0,)]
        kept = conn.execute(
            f"SELECT {STORED} FROM meowmx.events WHERE position <= %s ORDER BY position",
            [old_events[-1][0]],
        ).fetchall()
        gone = {(r[2], r[3], r[4]) for r in old_events} - {(r[2], r[3], r[4]) for r in kept}
        assert gone == {("acct", "3", 1), ("acct", "3", 2), ("order", "A", 1), ("order", "A", 2)}
        assert kept == [r for r in old_events if (r[2], r[3], r[4]) not in gone]


@pytest.mark.parametrize("k", EARLIER, ids=[f"from-v{k}" for k in EARLIER])
def test_upgraded_schema_equals_a_fresh_install(
    k: int, extra_db: Callable[[], str], psql: Any
) -> None:
    fresh, upgraded = extra_db(), extra_db()
    meowmx.install(fresh)
    install_version(psql, upgraded, k)
    with psycopg.connect(upgraded, autocommit=True) as conn:
        write_events(conn)  # data in the tables must not change their definitions
    meowmx.install(upgraded)
    assert differences(catalog_of(fresh), catalog_of(upgraded)) == []
