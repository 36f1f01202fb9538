"""meowmx: an event store in PostgreSQL.

The logic lives in SQL functions; this package installs them and calls them.
"""

from meowmx import errors
from meowmx.client import (
    Appended,
    ClaimedEvent,
    Client,
    HorizonBlocker,
    NewEvent,
    ParkedEvent,
    PartitionClaim,
    PartitionStatus,
    RecordedEvent,
    Snapshot,
    StreamSummary,
)
from meowmx.errors import *  # noqa: F403  (the typed exceptions are part of the API)
from meowmx.install import install, latest_version, script
from meowmx.worker import Worker

__all__ = [
    "Appended",
    "ClaimedEvent",
    "Client",
    "HorizonBlocker",
    "NewEvent",
    "ParkedEvent",
    "PartitionClaim",
    "PartitionStatus",
    "RecordedEvent",
    "Snapshot",
    "StreamSummary",
    "Worker",
    "install",
    "latest_version",
    "script",
    *errors.__all__,
]
