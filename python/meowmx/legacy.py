"""Import a meowmx 0.4 database (the SQLAlchemy package: tables es_aggregates, es_events,
es_event_subscriptions) into this store: ``meowmx import-legacy --from-dsn ...``.

- Each aggregate becomes a stream: category = aggregate_type, stream id = aggregate id.
  Versions, 0-based there, are 1-based here: event v becomes version v + 1. A stream
  whose oldest events were deleted there starts at version 1 here (it is counted as
  renumbered).
- Events come in the old store's commit order (transaction id, then event id), in
  transactions of about 1,000 events, so they keep that order here.
- Each event gets an id derived from (aggregate id, version): running the import again
  adds only what is new, and a crash midway loses nothing (run it again).
- A subscription there continues here: a subscription of the same name (to every
  category, as the old table does not say which) starts after the last event it had
  handled. Re-create it with filters if it had some (its start is in the summary).

Stop the old store's writers first: what commits there during the import comes next time.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from meowmx.client import Client, NewEvent
from meowmx.connection import Target

# Ids of imported events: uuid5 of "aggregate id/version" in this namespace.
LEGACY_EVENTS = uuid.UUID("6f1c2d7e-5a43-4b0e-9c8f-0d2b7a91e3c5")
CHUNK = 1000  # events per transaction


@dataclass
class Imported:
    """What import_legacy did."""

    appended: int = 0  # events written now
    already: int = 0  # events a previous import wrote
    streams: int = 0
    renumbered: set[str] = field(default_factory=set)  # streams whose versions moved
    subscriptions: dict[str, str] = field(default_factory=dict)  # name: where it starts

    def summary(self) -> str:
        line = (
            f"imported {self.appended} events into {self.streams} streams"
            f" ({self.already} already there); {len(self.subscriptions)} subscriptions"
        )
        if self.renumbered:
            line += f"; {len(self.renumbered)} streams renumbered from version 1"
        return line


_EVENTS = """
SELECT a.aggregate_type, rtrim(e.aggregate_id::text), e.version, e.event_type,
    e.json_data::text, e.transaction_id::text, e.id,
    min(e.version) OVER (PARTITION BY e.aggregate_id)
FROM es_events AS e JOIN es_aggregates AS a ON a.id = e.aggregate_id
ORDER BY e.transaction_id, e.id
"""


def import_legacy(source_dsn: str, target: Target) -> Imported:
    """Copy a meowmx 0.4 database's events and subscriptions into `target`."""
    done = Imported()
    versions: dict[tuple[str, str], int] = {}  # each stream's version here, once looked up
    last_of: dict[str, tuple[str, str, int]] = {}  # subscription: its last event, here
    with Client(target) as client, psycopg.connect(source_dsn) as source:
        source.read_only = True  # one snapshot of the old store
        source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with source.transaction():
            checkpoints = source.execute(
                "SELECT subscription_name, last_transaction_id::text::numeric, last_event_id"
                " FROM es_event_subscriptions ORDER BY 1"
            ).fetchall()
            with source.cursor(name="meowmx_import") as rows:
                rows.execute(_EVENTS)
                chunk: list[Any] = []
                for row in rows:
                    chunk.append(row)
                    if len(chunk) >= CHUNK:
                        _append_chunk(client, chunk, done, versions)
                        chunk = []
                    for name, tx, event_id in checkpoints:
                        if (int(row[5]), row[6]) <= (tx, event_id):
                            last_of[name] = (row[0], row[1], row[2] - row[7] + 1)
                _append_chunk(client, chunk, done, versions)
        done.streams = len(versions)
        for name, _, _ in checkpoints:
            start = "beginning"
            if name in last_of:
                category, stream_id, version = last_of[name]
                page = client.read_stream_page(
                    category, stream_id, from_version=version, max_count=1
                )
                start = page[0].cursor
            client.create_subscription(name, start_at=start)
            done.subscriptions[name] = start
    return done


def _append_chunk(
    client: Client, chunk: list[Any], done: Imported, versions: dict[tuple[str, str], int]
) -> None:
    """One transaction: the chunk's events, a batch per run of one stream's events."""
    if not chunk:
        return
    with client._connect() as conn, conn.transaction():
        start = 0
        while start < len(chunk):
            end = start
            while end < len(chunk) and chunk[end][:2] == chunk[start][:2]:
                end += 1
            _append_run(client, conn, chunk[start:end], done, versions)
            start = end


def _append_run(
    client: Client,
    conn: Any,
    run: list[Any],
    done: Imported,
    versions: dict[tuple[str, str], int],
) -> None:
    category, stream_id, _, _, _, _, _, oldest = run[0]
    if oldest != 0:
        done.renumbered.add(f"{category}/{stream_id}")
    first = run[0][2] - oldest  # the version before the run's first event, here
    # Looked up once per stream (a round trip per run doubled an interleaved import's);
    # after that only this import writes it.
    stream = (category, stream_id)
    if stream not in versions:
        versions[stream] = client.stream_version(category, stream_id, conn=conn)
    current = versions[stream]
    skip = min(max(current - first, 0), len(run))  # imported before
    done.already += skip
    events = [
        NewEvent(event_type, _object(json_text), id=uuid.uuid5(LEGACY_EVENTS, f"{aid}/{v}"))
        for _, aid, v, event_type, json_text, *_ in run[skip:]
    ]
    if events:
        client.append_many(category, stream_id, events, expected_version=first + skip, conn=conn)
        done.appended += len(events)
    versions[stream] = max(current, first + len(run))


def _object(json_text: str) -> dict[str, Any]:
    """Event data here is a JSON object: another JSON value comes as {"value": ...}."""
    value = json.loads(json_text)
    return value if isinstance(value, dict) else {"value": value}
