"""Typed exceptions: one class per meowmx SQLSTATE, and the one place that maps them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


class MeowmxError(Exception):
    """Base class of every meowmx error. Keeps the server's SQLSTATE, DETAIL and HINT."""

    sqlstate: str | None = None

    def __init__(self, message: str, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail or None
        self.hint = hint or None

    def __str__(self) -> str:
        parts = [self.message]
        if self.detail:
            parts.append(f"DETAIL: {self.detail}")
        if self.hint:
            parts.append(f"HINT: {self.hint}")
        return "\n".join(parts)


class WrongExpectedVersion(MeowmxError):
    """The stream is not at the version the append expected; nothing was written."""

    sqlstate = "MX001"

    @property
    def expected(self) -> int | None:
        return self._versions()[0]

    @property
    def actual(self) -> int | None:
        return self._versions()[1]

    def _versions(self) -> tuple[int | None, int | None]:
        # The DETAIL ends with the versions; the stream id before them may be any text.
        found = re.search(r"expected version (-?\d+), actual version (\d+)$", self.detail or "")
        return (int(found[1]), int(found[2])) if found else (None, None)


class EventIdConflict(MeowmxError):
    """An event id of the append is already stored in another stream."""

    sqlstate = "MX002"


class PartialRetry(MeowmxError):
    """Some, not all, of the append's event ids are already stored in the stream."""

    sqlstate = "MX003"


class StaleTransaction(MeowmxError):
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
    sqlstate = "MX017"


class InvalidFilter(MeowmxError):
    sqlstate = "MX018"


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


class InvalidSubscriptionArgument(MeowmxError):
    sqlstate = "MX024"


class NotParked(MeowmxError):
    sqlstate = "MX025"


class InvalidSnapshot(MeowmxError):
    """The snapshot's version is not one the stream has reached."""

    sqlstate = "MX030"


class SchemaTooNew(MeowmxError):
    """The database holds a newer meowmx schema than this package knows."""

    sqlstate = "MX090"


ERRORS: dict[str, type[MeowmxError]] = {
    cls.sqlstate: cls for cls in MeowmxError.__subclasses__() if cls.sqlstate is not None
}

__all__ = ["MeowmxError", *(cls.__name__ for cls in ERRORS.values())]


def from_psycopg(error: psycopg.Error) -> MeowmxError | None:
    """The typed exception for a meowmx SQLSTATE, or None for any other error."""
    cls = ERRORS.get(error.sqlstate or "")
    if cls is None:
        return None
    diag = error.diag
    return cls(diag.message_primary or str(error), diag.message_detail, diag.message_hint)


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
