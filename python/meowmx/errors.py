"""Typed exceptions: one class per meowmx SQLSTATE, and the one place that maps them.

Also the one place that says which database errors are worth retrying
(`retryable`), and how a worker names an error in its log (`describe`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg


class MeowmxError(Exception):
    """Base class of every meowmx error. Keeps the server's SQLSTATE, DETAIL and HINT,
    and `facts`: the values the DETAIL names, as the server sent them (a dict)."""

    sqlstate: str | None = None

    def __init__(
        self,
        message: str,
        detail: str | None = None,
        hint: str | None = None,
        facts: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.detail = detail or None
        self.hint = hint or None
        self.facts = facts or {}

    def __str__(self) -> str:
        parts = [self.message]
        if self.detail:
            parts.append(f"DETAIL: {self.detail}")
        if self.hint:
            parts.append(f"HINT: {self.hint}")
        return "\n".join(parts)


class Conflict(MeowmxError):
    """A write that lost a race with another writer and wrote nothing: read again,
    decide again, and retry (meowmx.retry_on_conflict does that). WrongExpectedVersion
    and StaleTransaction are the two."""


class WrongExpectedVersion(Conflict):
    """The stream is not at the version the append expected; nothing was written."""

    sqlstate = "MX001"

    @property
    def expected(self) -> int | None:
        expected: int | None = self.facts.get("expected_version")
        return expected

    @property
    def actual(self) -> int | None:
        actual: int | None = self.facts.get("actual_version")
        return actual


class EventIdConflict(MeowmxError):
    """An event id of the append is already stored in another stream."""

    sqlstate = "MX002"


class PartialRetry(MeowmxError):
    """Some, not all, of the append's event ids are already stored in the stream."""

    sqlstate = "MX003"


class StaleTransaction(Conflict):
    """The transaction took its id before the stream's last append: retry the transaction."""

    sqlstate = "MX004"


class InvalidStream(MeowmxError):
    sqlstate = "MX010"


class InvalidEventType(MeowmxError):
    sqlstate = "MX011"


class InvalidEventData(MeowmxError):
    sqlstate = "MX012"


class InvalidEvents(MeowmxError):
    """The events array of append_events is malformed."""

    sqlstate = "MX013"


class InvalidMaxCount(MeowmxError):
    sqlstate = "MX014"


class InvalidCursor(MeowmxError):
    sqlstate = "MX015"


class InvalidExpectedVersion(MeowmxError):
    sqlstate = "MX016"


class InvalidStreamRead(MeowmxError):
    """read_stream's from_version is below 1, or backwards is NULL."""

    sqlstate = "MX017"


class InvalidFilter(MeowmxError):
    sqlstate = "MX018"


class InvalidBeforeVersion(MeowmxError):
    """delete_stream's before_version is below 1."""

    sqlstate = "MX019"


class SubscriptionNotFound(MeowmxError):
    sqlstate = "MX020"


class SubscriptionConflict(MeowmxError):
    """A subscription of that name exists with another definition."""

    sqlstate = "MX021"


class LeaseLost(MeowmxError):
    """The worker no longer holds the partition's lease: drop the batch and claim again."""

    sqlstate = "MX022"


class NotInBatch(MeowmxError):
    """The acked or nacked position is not among the worker's unacknowledged events."""

    sqlstate = "MX023"


class NotParked(MeowmxError):
    sqlstate = "MX025"


class InvalidSubscriptionArgument(MeowmxError):
    """Base of the errors for a bad argument of a subscription call (one SQLSTATE each)."""


class InvalidSubscriptionName(InvalidSubscriptionArgument):
    sqlstate = "MX024"


class InvalidPartitions(InvalidSubscriptionArgument):
    sqlstate = "MX026"


class InvalidMaxAttempts(InvalidSubscriptionArgument):
    sqlstate = "MX027"


class InvalidStartAt(InvalidSubscriptionArgument):
    """start_at is not 'beginning', 'end' or a cursor."""

    sqlstate = "MX028"


class InvalidWorkerName(InvalidSubscriptionArgument):
    sqlstate = "MX040"


class InvalidLease(InvalidSubscriptionArgument):
    sqlstate = "MX041"


class UnknownPartition(InvalidSubscriptionArgument):
    sqlstate = "MX042"


class InvalidRetryAfter(InvalidSubscriptionArgument):
    sqlstate = "MX043"


class InvalidSnapshot(MeowmxError):
    """The snapshot's version is not one the stream has reached."""

    sqlstate = "MX030"


class InvalidSnapshotMaxVersion(MeowmxError):
    """load_snapshot's max_version is below 1."""

    sqlstate = "MX031"


class InvalidSnapshotState(MeowmxError):
    """The snapshot's state is not a JSON object."""

    sqlstate = "MX032"


class LogFromAnotherCluster(MeowmxError):
    """The event log was restored or replicated from another cluster and not adopted
    yet: run ``meowmx install`` or ``SELECT meowmx.adopt_cluster()`` as the owner."""

    sqlstate = "MX050"


class InvalidRolePrefix(MeowmxError):
    """meowmx.role_prefix (install's `role_prefix`) is not a valid prefix of role names."""

    sqlstate = "MX060"


class RolePrefixConflict(MeowmxError):
    """The database was installed with another role prefix; its grants went to those roles."""

    sqlstate = "MX061"


class SchemaTooNew(MeowmxError):
    """The database holds a newer meowmx schema than this package knows."""

    sqlstate = "MX090"


class UndecodableEvent(MeowmxError):
    """A stored event whose data or metadata this Python cannot decode (JSON nested
    deeper than its recursion limit). Raised when a read event's data or metadata is
    first accessed; a Worker nacks such an event without calling its handler, so that
    it is parked after max_attempts, and goes on."""

    def __init__(self, position: int, reason: str):
        super().__init__(
            f"event {position} cannot be decoded: {reason}",
            facts={"position": position},
        )
        self.position = position
        self.reason = reason


def _classes(base: type[MeowmxError]) -> Iterator[type[MeowmxError]]:
    for cls in base.__subclasses__():
        yield cls
        yield from _classes(cls)


ERRORS: dict[str, type[MeowmxError]] = {
    cls.sqlstate: cls for cls in _classes(MeowmxError) if cls.sqlstate is not None
}

__all__ = [
    "MeowmxError",
    "Conflict",
    "InvalidSubscriptionArgument",
    "UndecodableEvent",
    "retryable",
    "describe",
    *(cls.__name__ for cls in ERRORS.values()),
]


def from_psycopg(error: psycopg.Error) -> MeowmxError | None:
    """The typed exception for a meowmx SQLSTATE, or None for any other error."""
    cls = ERRORS.get(error.sqlstate or "")
    if cls is None:
        return None
    diag = error.diag
    # meowmx._fail sends the facts as a JSON object in the CONSTRAINT field.
    facts = json.loads(diag.constraint_name) if diag.constraint_name else None
    return cls(diag.message_primary or str(error), diag.message_detail, diag.message_hint, facts)


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise meowmx errors from the server as their typed exceptions."""
    try:
        yield
    except psycopg.Error as error:
        typed = from_psycopg(error)
        if typed is None:
            raise
        raise typed from error


# Errors that are not meowmx's, by SQLSTATE or its class (first two characters):
# the condition passes, so the same call may succeed later. Anything else (bad SQL,
# a constraint, writing on a read replica: 25006) fails again the same way.
_RETRYABLE = {
    "08": "connection exception",
    "40001": "serialization failure",
    "40P01": "deadlock",
    "53": "insufficient resources (disk full, out of memory, too many connections)",
    "55P03": "lock not available (lock_timeout)",
    "57014": "query canceled (statement_timeout, or a cancel request)",
    "57P01": "server shutting down",
    "57P02": "server crashed",
    "57P03": "server starting up or in recovery",
    "57P05": "idle session timeout",
    "25P03": "idle-in-transaction timeout",
    "25P04": "transaction timeout",
    "58": "system error (I/O)",
    "MX004": "StaleTransaction: retry the transaction",
    "MX022": "LeaseLost: claim again",
    "MX023": "NotInBatch: claim again",
}


def retryable(error: BaseException) -> bool:
    """True if the failed call (or transaction) may succeed when tried again: a lost
    connection, a serialization failure or deadlock, a statement or lock timeout,
    disk full and other resource shortages, a server restart, and meowmx's MX004,
    MX022 and MX023. Retry appends with the same event ids, so a retry of an append
    that did commit returns the stored result instead of writing it twice."""
    if isinstance(error, MeowmxError):
        return error.sqlstate in _RETRYABLE
    if not isinstance(error, psycopg.Error):
        return False
    state = error.sqlstate
    if state is None:  # no answer from a server: the connection broke or never came up
        return isinstance(error, psycopg.OperationalError)
    return state in _RETRYABLE or state[:2] in _RETRYABLE


def describe(error: BaseException) -> str:
    """One line naming the error: its class, SQLSTATE and message."""
    state = getattr(error, "sqlstate", None)
    if isinstance(error, MeowmxError):
        message = error.message
    elif isinstance(error, psycopg.Error) and error.diag.message_primary:
        message = error.diag.message_primary
    else:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}{f' ({state})' if state else ''}: {message}"
