"""A store that outlives its server: pg_dump/pg_restore of either install kind into the
same cluster or a new one, a physical copy, and a logical-replication cutover lose
nothing, and cursors, checkpoints, parked events, snapshots and order keep their
meaning there. Each restored state is compared with the original, not just counted.

The "new cluster" is a throwaway PostgreSQL 18 (tests/clusters.py); the source is the
server under test (PostgreSQL 15 or 18 in CI), so on 15 this is also a major-version move.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

import meowmx
from clusters import (
    Cluster,
    bin_dir,
    cluster,
    extension_dir,
    initdb,
    run,
    scratch,
    start,
    tool,
)
from meowmx.install import write_extension
from support import (
    STORED_EVENT_COLUMNS,
    call_sql,
    raises_meowmx,
    scalar,
    wait_for_horizon,
    wait_until,
)

Connection = psycopg.Connection[Any]
SUBSCRIBED = ["acct", "order"]

# The state that must survive -------------------------------------------------------------


def build_state(conn: Connection) -> None:
    """Events with ids and metadata in several streams, a 2-partition subscription part-way
    (a checkpoint, a parked event), a subscription that starts at the end, snapshots."""
    for stream in range(1, 7):
        call_sql(conn, "append_events", category="acct", stream_id=str(stream),
                 events=Jsonb([{"type": f"Step{n}", "data": {"n": n}, "metadata": {"s": stream},
                                "id": str(uuid.uuid4())} for n in range(1, 4)]))  # fmt: skip
    call_sql(conn, "append_event", category="order", stream_id="A", event_type="Placed",
             data={"amount": 10.5}, event_id=uuid.uuid4())  # fmt: skip
    call_sql(conn, "append_event", category="misc", stream_id="x", event_type="Noise", data={})
    call_sql(conn, "save_snapshot", category="acct", stream_id="1", version=2, state={"n": 2})
    call_sql(conn, "create_subscription", name="sub", categories=SUBSCRIBED, partitions=2,
             max_attempts=1)  # fmt: skip
    wait_for_horizon(conn)
    call_sql(conn, "create_subscription", name="late", start_at="end")
    # The partition with the acct streams (claims pick partitions at random).
    batch = claim(conn, "w1", 3)
    while len(batch) < 3:
        call_sql(conn, "release", subscription="sub", worker="w1")
        batch = claim(conn, "w1", 3)
    ack(conn, "w1", batch[1])
    assert call_sql(conn, "nack", subscription="sub", worker="w1", partition=batch[2][0],
                    event_position=batch[2][1], error="poison") == [(True,)]  # fmt: skip
    assert call_sql(conn, "release", subscription="sub", worker="w1") == [(1,)]


def claim(conn: Connection, worker: str, max_count: int, sub: str = "sub") -> list[Any]:
    return call_sql(conn, "claim_batch", "partition, position", subscription=sub,
                    worker=worker, max_count=max_count)  # fmt: skip


def ack(conn: Connection, worker: str, row: Any, sub: str = "sub") -> None:
    call_sql(conn, "ack", subscription=sub, worker=worker, partition=row[0], event_position=row[1])


def drain(conn: Connection, sub: str) -> list[int]:
    """Claim and ack until nothing is left: the positions delivered (sorted: partitions
    are claimed in random order)."""
    delivered: list[int] = []
    wait_for_horizon(conn)
    for _ in range(100):
        batch = claim(conn, "drainer", 5, sub)
        if not batch:
            return sorted(delivered)
        delivered += [row[1] for row in batch]
        ack(conn, "drainer", batch[-1], sub)
    pytest.fail("the subscription never ran dry")


def record(conn: Connection) -> dict[str, Any]:
    """Everything stored, and what the read functions make of it."""
    q = conn.execute
    events = q(f"SELECT {', '.join(STORED_EVENT_COLUMNS)} FROM meowmx.events ORDER BY position")
    cursors = q("SELECT cursor FROM meowmx.read_events(max_count => 10000)").fetchall()
    return {
        "events": events.fetchall(),
        "read": [row[0] for row in cursors],
        "after": {
            c: [row[0] for row in q("SELECT position FROM meowmx.read_events(after => %s)", [c])]
            for (c,) in cursors[::4]
        },
        "subscriptions": q("SELECT * FROM meowmx.subscriptions ORDER BY name").fetchall(),
        "partitions": q(
            "SELECT p::text FROM meowmx.subscription_partitions AS p ORDER BY 1"
        ).fetchall(),
        "status": q("SELECT * FROM meowmx.subscription_status()").fetchall(),
        "parked": q("SELECT * FROM meowmx.list_parked(subscription => 'sub')").fetchall(),
        "snapshots": q("SELECT * FROM meowmx.snapshots ORDER BY 1, 2, 3").fetchall(),
        "streams": q("SELECT * FROM meowmx.list_streams(category => 'acct')").fetchall(),
    }


def drain_all(conn: Connection) -> dict[str, list[int]]:
    return {sub: drain(conn, sub) for sub in ("sub", "late")}


def check_continues(
    conn: Connection, before: dict[str, Any], source_drain: dict[str, list[int]] | None
) -> None:
    """The moved store delivers what the original would (`source_drain`: what it delivered
    from the same state), and new events follow every old one: in reads after an old
    cursor, in both subscriptions, in positions and versions."""
    delivered = drain_all(conn)
    if source_drain is not None:
        assert delivered == source_drain
    old_order = [int(cursor.split(":")[1]) for cursor in before["read"]]
    call_sql(conn, "append_event", category="acct", stream_id="1", event_type="Step4",
             data={"n": 4}, expected_version=3)  # fmt: skip
    call_sql(conn, "append_event", category="order", stream_id="new", event_type="Placed", data={})
    wait_for_horizon(conn)
    new = [row[0] for row in call_sql(conn, "read_events", "position", after=before["read"][-1])]
    assert len(new) == 2 and min(new) > max(old_order)
    everything = call_sql(conn, "read_events", "position", max_count=10000)
    assert [row[0] for row in everything] == old_order + new
    assert drain_all(conn) == {"sub": sorted(new), "late": sorted(new)}


# Helpers for the servers -------------------------------------------------------------------


def burn_transaction_ids(dsn: str, past: int) -> None:
    """Use transaction ids on `dsn`'s server until its next id is beyond `past`, so that a
    new cluster's ids are certainly behind the ones the log holds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while int(scalar(conn, "SELECT pg_current_xact_id()::text")) <= past:
            for _ in range(200):
                conn.execute("SELECT pg_current_xact_id()")


def next_xid(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(scalar(conn, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))


def create_database(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


def tool_for(name: str, dsn: str) -> str:
    """The client program of `dsn`'s server's own major version where this machine has
    it, else the embedded wheel's (18). pg_restore 18 sets options 15 lacks, and pg_dump
    18.6 dumps the column option pg_attver that 15.20 keeps but 18.6 cannot restore."""
    with psycopg.connect(dsn) as conn:
        major = int(scalar(conn, "SHOW server_version_num")) // 10000
    own = Path(f"/usr/lib/postgresql/{major}/bin/{name}")
    return str(own) if own.exists() else tool(name)


def copy_roles(source_dsn: str, target: Cluster) -> None:
    """The documented first step on a new cluster: the roles (pg_dumpall --roles-only);
    the ones that exist there already, like postgres, report an error that is harmless."""
    roles = run(*[tool_for("pg_dumpall", source_dsn), "--roles-only", "-d", source_dsn])
    run(*[tool("psql"), "-X", "-q", "-d", target.dsn()], input=roles)


def dump_then_drain(source: str, dump: Path, dump_format: str = "custom") -> tuple[Any, Any]:
    """The source's state, dumped to `dump`; then what the source delivers from it."""
    with psycopg.connect(source, autocommit=True) as conn:
        before = record(conn)
    flag = "-Fc" if dump_format == "custom" else "-Fp"
    run(*[tool_for("pg_dump", source), flag, "-f", str(dump), "-d", source])
    with psycopg.connect(source, autocommit=True) as conn:
        return before, drain_all(conn)


def source_db(extra_db: Callable[[], str]) -> str:
    target = extra_db()
    meowmx.install(target)
    return target


@pytest.fixture(scope="module")
def new_cluster() -> Iterator[Cluster]:
    with cluster() as server:
        yield server


def the_log_is_refused_until_adopted(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with raises_meowmx(meowmx.LogFromAnotherCluster):
            meowmx.Client(conn).read_events_page()
        with raises_meowmx(meowmx.LogFromAnotherCluster):
            meowmx.Client(conn).append("acct", "1", "Early", {})
        with raises_meowmx(meowmx.LogFromAnotherCluster):
            meowmx.Client(conn).claim_batch("sub", "early")
    assert meowmx.install(dsn) == []  # adopts the log: the documented step


# pg_dump / pg_restore ----------------------------------------------------------------------


@pytest.mark.parametrize("dump_format", ["custom", "plain"])
def test_plain_install_survives_a_restore_into_a_new_cluster(
    dump_format: str, extra_db: Callable[[], str], new_cluster: Cluster, tmp_path: Path
) -> None:
    source = source_db(extra_db)
    burn_transaction_ids(source, next_xid(new_cluster.dsn()) + 1000)
    with psycopg.connect(source, autocommit=True) as conn:
        build_state(conn)
    dump = tmp_path / "store.dump"
    before, source_drain = dump_then_drain(source, dump, dump_format)
    copy_roles(source, new_cluster)
    target = create_database(new_cluster.dsn(), f"moved_{dump_format}")
    if dump_format == "custom":
        run(*[tool("pg_restore"), "--exit-on-error", "-d", target, str(dump)])
    else:
        run(*[tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target, "-f", str(dump)])

    the_log_is_refused_until_adopted(target)
    with psycopg.connect(target, autocommit=True) as conn:
        assert record(conn) == before
        check_continues(conn, before, source_drain)


def test_a_restore_into_the_same_cluster_needs_no_step(extra_db: Callable[[], str],
                                                       tmp_path: Path) -> None:  # fmt: skip
    source = source_db(extra_db)
    with psycopg.connect(source, autocommit=True) as conn:
        build_state(conn)
    dump = tmp_path / "store.dump"
    before, source_drain = dump_then_drain(source, dump)
    target = extra_db()
    run(*[tool_for("pg_restore", target), "--exit-on-error", "-d", target, str(dump)])
    with psycopg.connect(target, autocommit=True) as conn:
        assert record(conn) == before  # readable at once: no MX050
        check_continues(conn, before, source_drain)


def test_extension_install_survives_a_restore_into_a_new_cluster(
    extra_db: Callable[[], str], new_cluster: Cluster, tmp_path: Path
) -> None:
    source = extra_db()
    write_extension(extension_dir(source))
    write_extension(extension_dir(new_cluster.dsn()))
    burn_transaction_ids(source, next_xid(new_cluster.dsn()) + 1000)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION meowmx")
        build_state(conn)
    dump = tmp_path / "store.dump"
    before, source_drain = dump_then_drain(source, dump)
    copy_roles(source, new_cluster)
    target = create_database(new_cluster.dsn(), "moved_extension")
    run(*[tool("pg_restore"), "--exit-on-error", "-d", target, str(dump)])

    the_log_is_refused_until_adopted(target)
    with psycopg.connect(target, autocommit=True) as conn:
        assert scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'meowmx'") == (
            str(meowmx.latest_version())
        )
        assert record(conn) == before
        check_continues(conn, before, source_drain)


def test_appends_order_after_the_log_once_this_clusters_own_ids_pass_the_old_ones(
    extra_db: Callable[[], str], new_cluster: Cluster, tmp_path: Path
) -> None:
    """After the move, the new cluster's raw transaction ids keep growing and in time pass
    the old ones: a stream last written before the move must still get shifted ids."""
    source = source_db(extra_db)
    burn_transaction_ids(source, next_xid(new_cluster.dsn()) + 1000)
    with psycopg.connect(source, autocommit=True) as conn:
        build_state(conn)
        old_newest = int(scalar(conn, "SELECT max(transaction_id)::text FROM meowmx.events"))
    dump = tmp_path / "store.dump"
    run(*[tool_for("pg_dump", source), "-Fc", "-f", str(dump), "-d", source])
    copy_roles(source, new_cluster)
    target = create_database(new_cluster.dsn(), "moved_then_caught_up")
    run(*[tool("pg_restore"), "--exit-on-error", "-d", target, str(dump)])

    # Adopted in the session that was refused; its next ids reach past every old id.
    with psycopg.connect(target, autocommit=True) as conn:
        with raises_meowmx(meowmx.LogFromAnotherCluster):
            meowmx.Client(conn).append("order", "after-move", "Placed", {})
        conn.execute("SELECT meowmx.adopt_cluster()")
        burn_transaction_ids(target, old_newest - 100)
        first = meowmx.Client(conn).append("order", "after-move", "Placed", {})
    # Then this cluster's own ids pass the old ones.
    burn_transaction_ids(target, old_newest + 10)
    with psycopg.connect(target, autocommit=True) as conn:
        client = meowmx.Client(conn)
        later = [client.append("acct", "2", "Step4", {}, expected_version=3),  # an old stream
                 client.append("order", "later", "Placed", {})]  # fmt: skip
        wait_for_horizon(conn)
        (first_cursor,) = [e.cursor for e in client.read_stream("order", "after-move")]
        after_first = [e.position for e in client.read_events_page(after=first_cursor)]
        assert after_first == [a.position for a in later]
        assert drain(conn, "late") == sorted([first.position] + after_first)


# A physical copy ---------------------------------------------------------------------------


def test_a_base_backup_keeps_the_transaction_ids_and_needs_no_step() -> None:
    with cluster() as primary, scratch("meowmx-copy-") as base:
        dsn = create_database(primary.dsn(), "store")
        meowmx.install(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            build_state(conn)
            before = record(conn)
        copy = base / "data"
        run(tool("pg_basebackup"), "-D", copy, "-X", "stream", "-c", "fast", "-d", primary.dsn(),
            as_server=True)  # fmt: skip
        with psycopg.connect(dsn, autocommit=True) as conn:
            source_drain = drain_all(conn)
        restored = start(copy)
        try:
            with psycopg.connect(restored.dsn("store"), autocommit=True) as conn:
                assert record(conn) == before
                check_continues(conn, before, source_drain)
        finally:
            restored.stop()


def test_pg_upgrade_keeps_the_transaction_ids_and_needs_no_step() -> None:
    """18 to 18, to show what pg_upgrade keeps: this machine's 15.20 stores a column
    option (pg_attver) that 18.6's pg_dump copies and 18.6 refuses, whatever the schema."""
    with cluster() as old, scratch("meowmx-upgrade-") as base:
        dsn = create_database(old.dsn(), "store")
        meowmx.install(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            build_state(conn)
            before = record(conn)
        old_next = next_xid(old.dsn())
        old.stop()
        new_data = base / "data"
        initdb(new_data)
        run(tool("pg_upgrade"), "-b", bin_dir(), "-B", bin_dir(), "-d", old.data_dir,
            "-D", new_data, "-U", "postgres", "-s", base, as_server=True, cwd=base)  # fmt: skip
        upgraded = start(new_data)
        try:
            assert next_xid(upgraded.dsn()) >= old_next
            with psycopg.connect(upgraded.dsn("store"), autocommit=True) as conn:
                assert record(conn) == before
                check_continues(conn, before, None)
        finally:
            upgraded.stop()


# A logical-replication cutover -------------------------------------------------------------

# meowmx.migrations and meowmx.order_shift stay with each cluster: the subscriber's own
# install writes the first, adopt_cluster() the second.
PUBLISHED = "meowmx.events, meowmx.subscriptions, meowmx.subscription_partitions," \
    " meowmx.parked_events, meowmx.snapshots"  # fmt: skip


def test_a_logical_replication_cutover_keeps_order_cursors_and_checkpoints() -> None:
    logical = {"wal_level": "logical"}
    with cluster(logical) as old, cluster(logical) as new:
        source = create_database(old.dsn(), "store")
        target = create_database(new.dsn(), "store")
        meowmx.install(source)
        meowmx.install(target)
        burn_transaction_ids(source, next_xid(new.dsn()) + 1000)
        with psycopg.connect(source, autocommit=True) as conn:
            build_state(conn)
            conn.execute(f"CREATE PUBLICATION meowmx_move FOR TABLE {PUBLISHED}")
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE SUBSCRIPTION meowmx_move CONNECTION {} PUBLICATION meowmx_move"
                ).format(sql.Literal(source))
            )
        with psycopg.connect(source, autocommit=True) as conn:
            # Writers and workers keep going while the copy catches up.
            call_sql(conn, "append_event", category="order", stream_id="A",
                     event_type="Paid", data={}, expected_version=1)  # fmt: skip
            ack(conn, "w2", claim(conn, "w2", 1)[0])
            call_sql(conn, "release", subscription="sub", worker="w2")
            # The cutover: writers stop; wait until the subscriber has everything.
            wait_for_horizon(conn)
            before = record(conn)
            lsn = scalar(conn, "SELECT pg_current_wal_lsn()::text")
        with psycopg.connect(target, autocommit=True) as conn:
            _wait_for_replay(conn, lsn)
            conn.execute("ALTER SUBSCRIPTION meowmx_move DISABLE")
            conn.execute("ALTER SUBSCRIPTION meowmx_move SET (slot_name = NONE)")
            conn.execute("DROP SUBSCRIPTION meowmx_move")
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('meowmx_move')")
            source_drain = drain_all(conn)

        the_log_is_refused_until_adopted(target)
        with psycopg.connect(target, autocommit=True) as conn:
            assert record(conn) == before
            check_continues(conn, before, source_drain)


def _wait_for_replay(conn: Connection, lsn: str) -> None:
    def caught_up() -> bool:
        synced = scalar(conn, "SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel")
        done = scalar(
            conn,
            "SELECT coalesce(bool_and(latest_end_lsn >= %s::pg_lsn), false)"
            " FROM pg_stat_subscription WHERE relid IS NULL",
            [lsn],
        )
        return bool(synced and done)

    wait_until(caught_up, "the subscriber to replay the publisher's log", timeout=60)
