"""Output shared by the command line and the demo: JSON lines, tables, durations.

Plain text when piped (tab-separated values, one JSON object a line), aligned columns
on a terminal.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import IO, Any

from meowmx.client import HorizonBlocker, RecordedEvent


def is_tty(stream: IO[str]) -> bool:
    """False also for streams that cannot tell (closed, or replaced by a test)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def event_json(event: RecordedEvent) -> str:
    """One event as a JSON line."""
    return json.dumps(
        {
            "position": event.position,
            "transaction_id": event.transaction_id,
            "category": event.category,
            "stream_id": event.stream_id,
            "version": event.version,
            "event_type": event.event_type,
            "data": event.data,
            "metadata": event.metadata,
            "event_id": None if event.event_id is None else str(event.event_id),
            "recorded_at": event.recorded_at.isoformat(),
            "cursor": event.cursor,
        },
        ensure_ascii=False,
        default=str,
    )


def plain(value: Any) -> Any:
    """A value JSON can hold: timestamps as ISO text, intervals as seconds."""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def json_lines(out: IO[str], objects: Iterable[Any]) -> None:
    """Each dataclass instance as one JSON object a line."""
    for obj in objects:
        row = {k: plain(v) for k, v in dataclasses.asdict(obj).items()}
        print(json.dumps(row, ensure_ascii=False, default=str), file=out)


def table(
    out: IO[str],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    empty: str,
    tty: bool | None = None,
) -> None:
    """Aligned columns on a terminal (or `empty` when there are no rows); tab-separated
    values with a header line when piped."""
    tty = is_tty(out) if tty is None else tty
    if not tty:
        print("\t".join(headers), file=out)
        for row in rows:
            cells = ("" if v is None else re.sub(r"\s+", " ", str(plain(v))) for v in row)
            print("\t".join(cells), file=out)
        return
    if not rows:
        print(empty, file=out)
        return
    shown = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in shown)) for i, h in enumerate(headers)]
    for line in [list(headers), *shown]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime.datetime):
        return _relative(value)
    if isinstance(value, datetime.timedelta):
        return duration(value.total_seconds())
    text = re.sub(r"\s+", " ", str(value))
    return text if len(text) <= 60 else text[:59] + "…"


def _relative(at: datetime.datetime) -> str:
    seconds = (at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return f"in {duration(seconds)}" if seconds >= 0 else f"{duration(-seconds)} ago"


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


HORIZON_HEADERS = ["pid", "state", "age", "transaction", "user", "database", "application", "query"]


def horizon_rows(blockers: Iterable[HorizonBlocker]) -> list[list[Any]]:
    """The rows of `meowmx horizon` and of the console's horizon page."""
    return [
        [
            b.pid,
            b.state,
            b.transaction_age,
            b.transaction_id,
            b.username,
            b.database,
            b.application_name,
            b.query,
        ]
        for b in blockers
    ]
