"""meowmx: an event store in PostgreSQL.

The logic lives in SQL functions; this package installs them and calls them.
"""

from meowmx import errors
from meowmx.client import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    Appended,
    AsyncClient,
    ClaimedEvent,
    Client,
    HorizonBlocker,
    Metric,
    NewEvent,
    ParkedEvent,
    PartitionClaim,
    PartitionStatus,
    RecordedEvent,
    Snapshot,
    StreamSummary,
    default_json_dumps,
    default_json_loads,
    retry_on_conflict,
    retry_on_conflict_async,
)
from meowmx.errors import *  # noqa: F403  (the typed exceptions are part of the API)
from meowmx.install import install, latest_version, script
from meowmx.worker import AsyncWorker, Drained, Worker

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Appended",
    "AsyncClient",
    "AsyncWorker",
    "ClaimedEvent",
    "Client",
    "Drained",
    "HorizonBlocker",
    "Metric",
    "NewEvent",
    "ParkedEvent",
    "PartitionClaim",
    "PartitionStatus",
    "RecordedEvent",
    "Snapshot",
    "StreamSummary",
    "Worker",
    "default_json_dumps",
    "default_json_loads",
    "install",
    "latest_version",
    "retry_on_conflict",
    "retry_on_conflict_async",
    "script",
    *errors.__all__,
]
