"""The ``meowmx`` command line: install, read, tail, subscriptions, workers and the demo.

Run ``meowmx COMMAND --help``. Every command takes ``--dsn`` (default: ``$MEOWMX_DSN``).
Output is plain text (tab-separated tables, JSON lines) when piped, and aligned tables on
a terminal. Exit status: 0 done, 1 an error reported by the database (or a failed demo
check), 2 bad usage, no database given, or no connection, 130 interrupted (143 on
SIGTERM; for `tail`, Ctrl-C and SIGTERM are the normal way to stop: 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from types import FrameType
from typing import Any, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from meowmx import demo
from meowmx.client import Client, RecordedEvent
from meowmx.connection import connect
from meowmx.errors import MeowmxError
from meowmx.follower import CHANNEL, Follower, stop_on_signals
from meowmx.install import applied_versions, install, latest_version, migrations, script
from meowmx.legacy import import_legacy
from meowmx.output import HORIZON_HEADERS, event_json, horizon_rows, is_tty, json_lines, table
from meowmx.worker import Worker

PROG = "meowmx"
CONNECT_TIMEOUT = 10  # seconds, unless the DSN or PGCONNECT_TIMEOUT says otherwise


class CliError(Exception):
    """An expected failure: printed as one line ``meowmx: <message>``, exit `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message = message
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


# Entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
        sys.stdout.flush()
        return code
    except CliError as error:
        _say(error.message)
        return error.code
    except MeowmxError as error:  # UndecodableEvent has no SQLSTATE: the client raised it
        state = f" ({error.sqlstate})" if error.sqlstate else ""
        _say(f"{error.message}{state}", error.detail, error.hint)
        return 1
    except psycopg.Error as error:
        _say(*_describe(error))
        return 1
    except BrokenPipeError:  # `meowmx read | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except KeyboardInterrupt as interrupt:
        _say("interrupted")
        return 143 if isinstance(interrupt, Terminated) else 130


def _say(message: str, detail: str | None = None, hint: str | None = None) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    if detail:
        print(f"DETAIL: {detail}", file=sys.stderr)
    if hint:
        print(f"HINT: {hint}", file=sys.stderr)


def _describe(error: psycopg.Error) -> tuple[str, str | None, str | None]:
    """Message, DETAIL and HINT for a database error that is not one of meowmx's own."""
    diag = error.diag
    message = diag.message_primary or _one_line(error)
    hint = diag.message_hint
    if error.sqlstate == "3F000" and "meowmx" in message:  # invalid_schema_name
        message = "meowmx is not installed in this database"
        hint = "Run: meowmx install --dsn ..."
    elif error.sqlstate == "42883" and "meowmx." in message:  # undefined_function
        hint = hint or "The meowmx schema may be older than this package: run meowmx install."
    elif error.sqlstate is None:  # lost connection and the like
        return f"database error: {_one_line(error)}", None, None
    return f"{message} ({error.sqlstate})", diag.message_detail, hint


def _one_line(error: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return re.sub(r"^connection (failed|is bad): ", "", text)


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# Arguments ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr, not the usage text plus a line."""

    def error(self, message: str) -> NoReturn:
        unknown = re.match(
            r"argument COMMAND: invalid choice: (.*?) \(choose from (.*)\)$", message
        )
        if unknown:
            commands = unknown[2].replace("'", "")
            message = f"unknown command {unknown[1]} (commands: {commands})"
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_natural.__name__ = "non-negative integer"


def _role_prefix(text: str) -> str:
    if not text:  # the server checks the rest (MX060)
        raise ValueError(text)
    return text


_role_prefix.__name__ = "role prefix"


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError(text)
    return value


_seconds.__name__ = "number of seconds"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meowmx")
    except PackageNotFoundError:
        return "(not installed)"


def _parser() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--dsn",
        default=argparse.SUPPRESS,
        help="PostgreSQL connection string (default: $MEOWMX_DSN)",
    )
    parser = _Parser(
        prog=PROG,
        description="meowmx: an event store in PostgreSQL. Every command takes --dsn "
        "(default: $MEOWMX_DSN).",
        epilog="New here? Run `meowmx demo`: it starts a throwaway PostgreSQL and runs an "
        "orders example end to end.",
    )
    parser.add_argument("--dsn", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PROG} {_package_version()} (schema version {latest_version()})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str, **kw: Any) -> Any:
        sub = commands.add_parser(
            name, parents=[common], help=help, description=kw.pop("description", help), **kw
        )
        sub.set_defaults(run=run)
        return sub

    p = command(
        "install",
        _install,
        "apply pending migrations",
        aliases=["migrate"],
        description="Apply the migrations this package ships that the database lacks, in "
        "one transaction. Idempotent; safe when several processes install at once.",
    )
    p.add_argument("action", nargs="?", choices=["status"], help="status: same as --status")
    p.add_argument(
        "--status", action="store_true", help="list the migrations and whether each is applied"
    )
    p.add_argument(
        "--role-prefix",
        type=_role_prefix,
        metavar="PREFIX",
        help="name this database's group roles PREFIX_reader, _writer, _worker, _admin "
        "(default: meowmx); read on the first install only",
    )

    p = command(
        "sql",
        _sql,
        "print the install script for other stacks (needs no database)",
        description="Print the SQL for psql (meowmx sql | psql -v ON_ERROR_STOP=1 -1 -f - DSN) "
        "or another stack's migrations: without --from, the current schema for an empty "
        "database; with --from N, the frozen upgrades after version N. Run it in one "
        "transaction.",
    )
    p.add_argument(
        "--role-prefix",
        type=_role_prefix,
        metavar="PREFIX",
        help="start the script with SET meowmx.role_prefix = PREFIX: the group roles are "
        "PREFIX_reader, _writer, _worker, _admin (default: meowmx)",
    )
    p.add_argument(
        "--from",
        dest="after",
        type=_natural,
        default=None,
        metavar="N",
        help="print the upgrades that follow schema version N (0: all of them, from 1)",
    )
    p.add_argument(
        "--to",
        dest="upto",
        type=_natural,
        default=None,
        metavar="M",
        help=f"stop at schema version M (default: the latest, {latest_version()})",
    )

    p = command(
        "append",
        _append,
        "append an event to a stream",
        description="Append one event; prints its version and position as JSON. DATA_JSON "
        "is a JSON object; without it (or with -) it is read from stdin.",
        epilog="example: meowmx append order 42 OrderPlaced '{\"amount\": 25}' "
        "--expected-version 0",
    )
    p.add_argument("category", metavar="CATEGORY")
    p.add_argument("stream_id", metavar="STREAM_ID")
    p.add_argument("event_type", metavar="TYPE")
    p.add_argument("data", metavar="DATA_JSON", nargs="?")
    p.add_argument("--metadata", metavar="JSON", help="event metadata: a JSON object")
    p.add_argument(
        "--expected-version",
        type=int,
        metavar="N",
        help="0: the stream must not exist; -1: it must exist; N: it must be at version N",
    )
    p.add_argument(
        "--id", type=uuid.UUID, metavar="UUID", help="event id: makes a retry idempotent"
    )

    p = command(
        "read",
        _read,
        "print events as JSON lines",
        description="Print events as JSON lines: all events, or some categories or types, in "
        "commit order (each line's cursor continues with --after); or the events of "
        "streams in version order.",
    )
    p.add_argument("--category", action="append", metavar="C", help="only category C (repeat)")
    p.add_argument(
        "--type", action="append", dest="types", metavar="T", help="only event type T (repeat)"
    )
    p.add_argument(
        "--stream",
        action="append",
        dest="streams",
        metavar="CATEGORY/STREAM_ID",
        help="the events of this stream (repeat for several)",
    )
    p.add_argument("--stream-id", metavar="ID", help="with one --category: that stream")
    p.add_argument("--after", metavar="CURSOR", help="continue after this cursor")
    p.add_argument(
        "--from-version", type=_positive_int, metavar="V", help="streams: start at version V"
    )
    p.add_argument("--backwards", action="store_true", help="streams: newest first")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="print at most N events")

    p = command(
        "tail",
        _tail,
        "follow new events live, as JSON lines",
        description=f"Print events as JSON lines as they commit (LISTEN {CHANNEL}, and polling), "
        "until Ctrl-C or SIGTERM. Starts at the beginning unless --after or --from-end.",
    )
    p.add_argument("--category", action="append", metavar="C", help="only category C (repeat)")
    p.add_argument(
        "--type", action="append", dest="types", metavar="T", help="only event type T (repeat)"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--after", metavar="CURSOR", help="start after this cursor")
    start.add_argument("--from-end", action="store_true", help="only events from now on")
    p.add_argument("--max-events", type=_positive_int, metavar="N", help="stop after N events")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--poll",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="look for events at least every S seconds (default 1)",
    )

    p = command(
        "subscriptions",
        _subscriptions,
        "subscription status, one row per partition",
        description="Show each partition of each subscription (or of NAME): checkpoint, "
        "events behind, lease, failures, parked events.",
    )
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    p = command(
        "subscription",
        _subscription,
        "create, reset or drop a subscription",
        description="create: a subscription to some categories or event types (or all), "
        "split into partitions; it starts at the beginning, the end or a cursor. reset: "
        "move every partition to the beginning, the end or a cursor. drop: the "
        "subscription with its checkpoints and parked events.",
    )
    p.add_argument("action", choices=["create", "reset", "drop"], metavar="create|reset|drop")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--category", action="append", metavar="C", help="create: category C (repeat)")
    p.add_argument(
        "--type", action="append", dest="types", metavar="T", help="create: event type T (repeat)"
    )
    p.add_argument(
        "--partitions", type=_positive_int, default=1, metavar="N", help="create: N partitions (1)"
    )
    p.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=10,
        metavar="N",
        help="create: park an event after N failures (10)",
    )
    p.add_argument(
        "--start-at",
        default="beginning",
        metavar="WHERE",
        help="create, reset: beginning (default), end, or a cursor",
    )

    p = command(
        "worker",
        _worker,
        "run a handler over a subscription, as a service",
        description="Import FUNCTION from MODULE (as python -c 'from MODULE import FUNCTION' "
        "would, with the current directory on the path) and run it over the subscription's "
        "events until SIGTERM or Ctrl-C: each process finishes its batch, releases its "
        "leases and exits 0. Logs go to stderr. Exit status 2: the handler cannot be "
        "imported or called; 1: the subscription is missing.",
        epilog="example: meowmx worker shipping.handlers:on_order --subscription shipping "
        "--processes 4",
    )
    p.add_argument("handler", metavar="MODULE:FUNCTION")
    p.add_argument("--subscription", required=True, metavar="NAME")
    p.add_argument(
        "--processes", type=_positive_int, default=1, metavar="N", help="worker processes (1)"
    )
    p.add_argument(
        "--transactional",
        action="store_true",
        help="call FUNCTION(event, conn) in the transaction that acks its batch",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=100, metavar="N", help="events per batch (100)"
    )
    p.add_argument(
        "--lease", type=_seconds, default=30.0, metavar="S", help="lease of a batch, seconds (30)"
    )

    p = command(
        "import-legacy",
        _import_legacy,
        "copy a meowmx 0.4 database's events and subscriptions into this store",
        description="Copy the events of a meowmx 0.4 database (the SQLAlchemy package's "
        "tables es_aggregates, es_events, es_event_subscriptions) into this one: each "
        "aggregate a stream (category = aggregate type), in the old commit order, version "
        "v as v + 1; each subscription continues after the last event it handled. Run it "
        "again to copy what is new. Stop the old store's writers first.",
    )
    p.add_argument("--from-dsn", required=True, metavar="DSN", help="the meowmx 0.4 database")

    p = command(
        "dead-letters",
        _dead_letters,
        "list or requeue parked events",
        description="List the events a subscription parked after too many failures, or "
        "requeue one: its partition replays from that event.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--requeue", type=_positive_int, metavar="POSITION", help="requeue this event")
    p.add_argument(
        "--limit", type=_positive_int, default=100, metavar="N", help="list at most N (100)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    p = command(
        "horizon",
        _horizon,
        "show transactions holding the read horizon back",
        description="Reads and subscriptions deliver nothing past the oldest transaction "
        "still running anywhere in the cluster. These are they, oldest first.",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    for name, run, what, default_port in (
        ("metrics", _metrics, "serve meowmx's figures for Prometheus", 9464),
        ("web", _web, "serve the web console (read-only unless --admin)", 8080),
    ):
        p = command(
            name,
            run,
            what,
            description=f"{what[0].upper()}{what[1:]} at http://ADDRESS:PORT/ until SIGTERM or"
            " Ctrl-C."
            + (" Needs meowmx[metrics]." if name == "metrics" else " Needs meowmx[web]."),
        )
        p.add_argument("--port", type=_positive_int, default=default_port, help=f"({default_port})")
        p.add_argument(
            "--address", default="127.0.0.1", help="where to listen (127.0.0.1: this machine only)"
        )
        if name == "web":
            p.add_argument(
                "--admin", action="store_true", help="allow requeueing dead letters from the pages"
            )
            p.add_argument(
                "--sample-every",
                type=_seconds,
                default=5.0,
                metavar="SECONDS",
                help="how often to sample the lag the subscriptions page draws (5)",
            )

    p = command(
        "demo",
        _demo,
        "run the orders example end to end",
        description="Writers place, confirm and ship orders (racing on the same orders, so "
        "conflicts happen and are retried) while workers build a read model table; then "
        "check the read model against the event log. Without --dsn or $MEOWMX_DSN it "
        "starts a throwaway PostgreSQL. With one, it uses table demo_orders and "
        "subscription orders-read-model there (both recreated).",
    )
    p.add_argument(
        "--seconds", type=_seconds, default=12.0, metavar="S", help="write for S seconds (12)"
    )
    p.add_argument("--writers", type=_positive_int, default=4, metavar="N", help="writers (4)")
    p.add_argument("--workers", type=_positive_int, default=3, metavar="N", help="workers (3)")
    p.add_argument(
        "--orders",
        type=_positive_int,
        default=32,
        metavar="N",
        help="orders in flight at once: fewer means more conflicts (32)",
    )
    return parser


# Connections ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to connect: `dsn` has defaults added; `shown` is as given, password hidden."""

    dsn: str
    shown: str

    def connect(self) -> psycopg.Connection[Any]:
        """An autocommit connection, or a one-line CliError saying why there is none."""
        try:
            return connect(self.dsn)  # prepares nothing: fine behind a pooler
        except psycopg.Error as error:
            raise CliError(f"cannot connect to {self.shown}: {_one_line(error)}", 2) from None


def resolve(args: argparse.Namespace, *, required: bool = True) -> Target | None:
    """--dsn or $MEOWMX_DSN, with an application_name and a connect timeout if unset."""
    raw = args.dsn or os.environ.get("MEOWMX_DSN") or None
    if raw is None:
        if required:
            raise CliError("no database given: pass --dsn or set MEOWMX_DSN", 2)
        return None
    try:
        given = conninfo_to_dict(raw)
    except psycopg.ProgrammingError as error:
        raise CliError(f"invalid DSN {redact(raw)!r}: {_one_line(error)}", 2) from None
    extra: dict[str, Any] = {}
    if "application_name" not in given and "PGAPPNAME" not in os.environ:
        extra["application_name"] = f"{PROG}-{args.command}"
    if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ:
        extra["connect_timeout"] = CONNECT_TIMEOUT
    return Target(make_conninfo(raw, **extra) if extra else raw, redact(raw))


@contextmanager
def _database(args: argparse.Namespace) -> Iterator[tuple[Target, psycopg.Connection[Any]]]:
    target = resolve(args)
    assert target is not None
    with target.connect() as conn:
        yield target, conn


def redact(dsn: str) -> str:
    """The DSN with any password replaced by ***."""
    dsn = re.sub(r"^(\w+://[^:/@?]*):[^@/?]*@", r"\1:***@", dsn)
    dsn = re.sub(r"([?&]password=)[^&]*", r"\1***", dsn)
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


# Commands -------------------------------------------------------------------------------


def _install(args: argparse.Namespace) -> int:
    with _database(args) as (_, conn):
        if args.status or args.action == "status":
            return _install_status(conn)
        with _notices_said():
            applied = install(conn, role_prefix=args.role_prefix)
    shipped = {m.version: m.name for m in migrations()}
    if applied:
        names = ", ".join(f"{v:04d}_{shipped[v]}" for v in applied)
        print(f"applied {names}: meowmx schema version {applied[-1]}")
    else:
        print(f"nothing to apply: meowmx schema version {latest_version()} is up to date")
    return 0


@contextmanager
def _notices_said() -> Iterator[None]:
    """Print the installer's notices (the group roles it could not create, and what an
    administrator runs) on stderr, like errors; install() logs them."""

    class Say(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notice = getattr(record, "notice", None)
            if notice is None:
                _say(record.getMessage())
            else:
                _say(*notice)

    logger = logging.getLogger("meowmx.install")
    handler, propagate = Say(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # printed here, not again by logging's last resort
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _install_status(conn: psycopg.Connection[Any]) -> int:
    applied_at: dict[int, datetime.datetime] = {}
    if applied_versions(conn):
        rows = conn.execute("SELECT version, applied_at FROM meowmx.migrations").fetchall()
        applied_at = {version: at for version, at in rows}
    tty = is_tty(sys.stdout)

    def row(version: int, name: str) -> list[Any]:
        at = applied_at.pop(version, None)
        shown = at.isoformat(timespec="seconds") if tty and at else at  # a date, not an age
        return [f"{version:04d}", name, "no" if at is None else "yes", shown]

    rows = [row(m.version, m.name) for m in migrations()]
    rows += [row(v, "(newer than this package)") for v in sorted(applied_at)]
    table(sys.stdout, ["version", "name", "applied", "applied at"], rows, empty="", tty=tty)
    return 0


def _sql(args: argparse.Namespace) -> int:
    latest = latest_version()
    upto = latest if args.upto is None else args.upto
    after = 0 if args.after is None else args.after
    if upto > latest or after > latest:
        raise CliError(f"this package ships schema versions 1 to {latest}", 2)
    if after > upto:
        raise CliError(f"--from {after} is past --to {upto}", 2)
    if args.role_prefix is not None:
        # Session-wide, not SET LOCAL: it must hold even where each statement commits.
        quoted = "'" + args.role_prefix.replace("'", "''") + "'"
        sys.stdout.write(f"SET meowmx.role_prefix = {quoted};\n")
    if after == upto:  # a valid, empty script
        sys.stdout.write(f"-- meowmx schema: nothing to apply after version {upto}\n")
    else:
        sys.stdout.write(script(after=args.after, upto=upto))
    return 0


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(
            f"{what} is not valid JSON: {error.msg} (line {error.lineno} column {error.colno})",
            2,
        ) from None
    except RecursionError:
        raise CliError(f"{what} is nested too deeply for Python to read", 2) from None


def _append(args: argparse.Namespace) -> int:
    if args.data is not None and args.data != "-":
        data = _parse_json(args.data, "DATA_JSON")
    elif args.data is None and is_tty(sys.stdin):
        raise CliError("give DATA_JSON, or pipe it on stdin (pass '{}' for no data)", 2)
    else:
        data = _parse_json(sys.stdin.read(), "the data on stdin")
    metadata = None if args.metadata is None else _parse_json(args.metadata, "--metadata")
    with _database(args) as (_, conn):
        appended = Client(conn).append(
            args.category,
            args.stream_id,
            args.event_type,
            data,
            expected_version=args.expected_version,
            metadata=metadata,
            event_id=args.id,
        )
    print(json.dumps({"version": appended.version, "position": appended.position}))
    return 0


def _streams(args: argparse.Namespace) -> list[tuple[str, str]]:
    streams = []
    for text in args.streams or ():
        category, slash, stream_id = text.partition("/")
        if not slash or not category or not stream_id:
            raise CliError(f"--stream {text!r}: expected CATEGORY/STREAM_ID", 2)
        streams.append((category, stream_id))
    if args.stream_id is not None:
        if len(args.category or ()) != 1:
            raise CliError("--stream-id needs exactly one --category", 2)
        streams.append((args.category[0], args.stream_id))
        args.category = None
    if streams and (args.category or args.types or args.after):
        raise CliError("a stream read takes no --category, --type or --after", 2)
    if not streams and (args.from_version or args.backwards):
        raise CliError("--from-version and --backwards need --stream", 2)
    return streams


def _read(args: argparse.Namespace) -> int:
    streams = _streams(args)
    page = min(1000, args.limit or 1000)
    with _database(args) as (_, conn):
        client = Client(conn)
        events: Iterable[RecordedEvent]
        if streams:
            events = (
                event
                for category, stream_id in streams
                for event in client.read_stream(
                    category,
                    stream_id,
                    from_version=args.from_version,
                    backwards=args.backwards,
                    page_size=page,
                )
            )
        else:
            events = client.read_events(
                after=args.after, categories=args.category, event_types=args.types, page_size=page
            )
        out, shown = sys.stdout, 0
        for event in islice(events, args.limit):
            out.write(event_json(event) + "\n")
            shown += 1
        if args.limit is None or shown < args.limit:  # it read up to the horizon
            _say_held_back(client, set())
    return 0


HELD_BACK_AFTER = datetime.timedelta(seconds=1)  # younger transactions are just writes


def _say_held_back(client: Client, said: set[int | None]) -> None:
    """On stderr: the transactions, open for over a second, that hold reads back (each
    once: `said` keeps their pids). Reads end where the oldest running one began."""
    try:
        blockers = client.horizon_blockers()
    except (psycopg.Error, MeowmxError):
        return  # not allowed here, or on a standby: nothing to say
    for b in blockers:
        age = b.transaction_age
        if age is None or age < HELD_BACK_AFTER or b.pid in said:
            continue
        said.add(b.pid)
        who = ", ".join(x for x in (b.application_name, b.state, b.username) if x)
        _say(
            f"a transaction open for {age.total_seconds():.1f} s holds reads back (pid"
            f" {b.pid}{f', {who}' if who else ''}): events that committed after it began"
            " show once it ends; see meowmx horizon"
        )


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into a KeyboardInterrupt (Terminated) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tail(args: argparse.Namespace) -> int:
    stop = threading.Event()  # Ctrl-C or SIGTERM: the normal way to stop
    with (
        _database(args) as (target, conn),
        Follower(
            target.connect, poll_interval=args.poll, stop=stop, notice=lambda message: _say(message)
        ) as follower,
    ):
        follower.listen()  # before the first read, so that no append falls in between
        client = Client(conn)
        after = client.end_cursor() if args.from_end else args.after
        if is_tty(sys.stderr) and is_tty(sys.stdout):
            print(f"{PROG}: following events; Ctrl-C to stop", file=sys.stderr)
        with stop_on_signals(stop):
            said: set[int | None] = set()
            follow(
                client,
                follower,
                after=after,
                categories=args.category,
                event_types=args.types,
                timeout=args.timeout,
                max_events=args.max_events,
                emit=_print_flushed,
                stop=stop,
                idle=lambda: _say_held_back(client, said),
            )
    return 0


def _print_flushed(event: RecordedEvent) -> None:
    sys.stdout.write(event_json(event) + "\n")
    sys.stdout.flush()


def follow(
    client: Client,
    follower: Follower,
    *,
    after: str | None,
    categories: Sequence[str] | None,
    event_types: Sequence[str] | None,
    timeout: float | None,
    max_events: int | None,
    emit: Callable[[RecordedEvent], None],
    stop: threading.Event,
    idle: Callable[[], None] = lambda: None,
) -> int:
    """Pass events to `emit` as they pass the read horizon, until `stop`; returns how many.
    `idle` runs whenever it caught up, before it waits."""
    page_size = 1000
    deadline = None if timeout is None else time.monotonic() + timeout
    count = 0
    while not stop.is_set():
        page = client.read_events_page(
            after=after, max_count=page_size, categories=categories, event_types=event_types
        )
        for event in page:
            if stop.is_set():
                return count
            emit(event)
            after = event.cursor
            count += 1
            if max_events is not None and count >= max_events:
                return count
        if len(page) == page_size:
            continue
        idle()
        if deadline is None:
            follower.wait()
        elif (left := deadline - time.monotonic()) > 0:
            follower.wait(left)
        else:
            return count
    return count


def _subscriptions(args: argparse.Namespace) -> int:
    with _database(args) as (_, conn):
        status = Client(conn).subscription_status(args.name)
    if args.json:
        json_lines(sys.stdout, status)
        return 0
    headers = [
        "subscription",
        "partition",
        "checkpoint",
        "behind",
        "lease owner",
        "lease expires",
        "attempts",
        "last error",
        "parked",
        "worker transaction",
    ]
    rows = [
        [
            s.subscription,
            s.partition,
            s.checkpoint,
            s.events_behind,
            s.lease_owner,
            s.lease_expires_at,
            s.attempts,
            s.last_error,
            s.parked,
            s.worker_transaction_age,
        ]
        for s in status
    ]
    table(sys.stdout, headers, rows, empty="no subscriptions")
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    with _database(args) as (_, conn):
        client = Client(conn)
        if args.requeue is not None:
            removed = client.requeue_parked(args.name, args.requeue)
            print(
                f"requeued event {args.requeue} of {args.name}: its partition replays from it "
                f"({removed} parked event{'' if removed == 1 else 's'} cleared)"
            )
            return 0
        parked = client.list_parked(args.name, max_count=args.limit)
    if args.json:
        json_lines(sys.stdout, parked)
        return 0
    headers = ["position", "partition", "stream", "version", "type", "attempts", "error", "parked"]
    rows = [
        [
            p.position,
            p.partition,
            f"{p.category}/{p.stream_id}",
            p.version,
            p.event_type,
            p.attempts,
            p.error,
            p.parked_at,
        ]
        for p in parked
    ]
    table(sys.stdout, headers, rows, empty=f"no parked events in {args.name}")
    return 0


def _subscription(args: argparse.Namespace) -> int:
    if args.action != "create" and (args.category or args.types):
        raise CliError(f"subscription {args.action} takes no --category or --type", 2)
    with _database(args) as (_, conn):
        client = Client(conn)
        if args.action == "create":
            created = client.create_subscription(
                args.name,
                categories=args.category,
                event_types=args.types,
                partitions=args.partitions,
                start_at=args.start_at,
                max_attempts=args.max_attempts,
            )
            what = "created" if created else "exists already, the same:"
            print(f"{what} subscription {args.name} ({args.partitions} partitions)")
        elif args.action == "reset":
            client.reset_subscription(args.name, args.start_at)
            print(f"reset subscription {args.name} to {args.start_at}")
        elif client.drop_subscription(args.name):
            print(f"dropped subscription {args.name}")
        else:
            raise CliError(f"no subscription is named {args.name!r}: nothing dropped")
    return 0


def _import_legacy(args: argparse.Namespace) -> int:
    target = resolve(args)
    assert target is not None
    source = Target(args.from_dsn, redact(args.from_dsn))
    source.connect().close()  # a clear error now if it cannot be reached
    try:
        done = import_legacy(args.from_dsn, target.dsn)
    except psycopg.errors.UndefinedTable as error:
        raise CliError(
            f"{source.shown} has no meowmx 0.4 tables: {error.diag.message_primary}"
        ) from None
    print(done.summary())
    for name, start in done.subscriptions.items():
        print(f"subscription {name} starts at {start}")
    return 0


def _handler(spec: str) -> Callable[..., None]:
    """MODULE:FUNCTION, imported with the current directory on the path."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise CliError(f"handler {spec!r}: expected MODULE:FUNCTION", 2)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001  (whatever the module raises on import)
        raise CliError(f"cannot import {module_name}: {type(error).__name__}: {error}", 2) from None
    handler = getattr(module, name, None)
    if not callable(handler):
        raise CliError(f"{module_name} has no function {name}", 2)
    return handler  # type: ignore[no-any-return]


def _worker(args: argparse.Namespace) -> int:
    target = resolve(args)
    assert target is not None
    handler = _handler(args.handler)
    with target.connect() as conn:
        Client(conn).subscription_status(args.subscription)  # MX020 now, not in a loop
    if args.processes > 1:
        return _worker_processes(args, target.dsn)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        worker = Worker(
            target.dsn,
            args.subscription,
            handler,
            batch_size=args.batch_size,
            lease=datetime.timedelta(seconds=args.lease),
            transactional=args.transactional,
        )
    except TypeError as error:  # a handler of the other kind (see Worker)
        raise CliError(str(error), 2) from None
    logging.getLogger("meowmx.worker").info(
        "worker %s runs %s over %s", worker.name, args.handler, args.subscription
    )
    worker.run()  # until SIGTERM or Ctrl-C: then the batch in hand ends, leases released
    return 0


def _worker_processes(args: argparse.Namespace, dsn: str) -> int:
    """N processes of one worker each; SIGTERM and Ctrl-C go to all of them. Exits 0 if
    every one stopped cleanly, else with the first other status."""
    argv = [sys.executable, "-m", "meowmx", "worker", args.handler]
    argv += ["--subscription", args.subscription, "--batch-size", str(args.batch_size)]
    argv += ["--lease", str(args.lease)] + (["--transactional"] if args.transactional else [])
    env = {**os.environ, "MEOWMX_DSN": dsn}  # not in argv, where ps shows a password
    children = [subprocess.Popen(argv, env=env) for _ in range(args.processes)]

    stops = (signal.SIGTERM, signal.SIGINT)
    stopping = threading.Event()

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A process still starting when the stop came dies of it, with nothing in hand.
    stopped = {-sig for sig in stops} if stopping.is_set() else set()
    return next((code for code in codes if code != 0 and code not in stopped), 0)


def _serving(args: argparse.Namespace, module: str, needs: str) -> tuple[Target, Any]:
    """For `meowmx metrics` and `meowmx web`: the target and the module that serves, or a
    one-line CliError now (the extra not installed, no database, the port taken) rather
    than a server's own log line later."""
    target = resolve(args)
    assert target is not None
    try:
        served = importlib.import_module(f"meowmx.{module}")
    except ImportError:
        raise CliError(
            f"meowmx {args.command} needs {needs}: pip install 'meowmx[{module}]'", 2
        ) from None
    target.connect().close()  # a bad DSN fails now, with its reason
    try:
        socket.create_server((args.address, args.port)).close()
    except OSError as error:
        raise CliError(
            f"cannot listen on {args.address}:{args.port}: {error.strerror}", 2
        ) from None
    return target, served


def _metrics(args: argparse.Namespace) -> int:
    target, metrics = _serving(args, "metrics", "prometheus_client")
    server = metrics.serve(target.dsn, args.port, args.address)
    _say(f"serving metrics at http://{args.address}:{args.port}/metrics")
    stop = threading.Event()
    with stop_on_signals(stop):
        while not stop.wait(1):
            pass
    server.shutdown()
    return 0


def _web(args: argparse.Namespace) -> int:
    target, web = _serving(args, "web", "Starlette and uvicorn")
    _say(f"console at http://{args.address}:{args.port}/" + (" (admin)" if args.admin else ""))
    web.serve(
        target.dsn,
        port=args.port,
        address=args.address,
        admin=args.admin,
        sample_every=args.sample_every,
    )
    return 0


def _horizon(args: argparse.Namespace) -> int:
    with _database(args) as (_, conn):
        if conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,):
            # A standby's horizon follows the primary's transactions, which it cannot list.
            _say(
                "this server is a hot standby: the transactions holding its read horizon"
                " back run on the primary; run meowmx horizon against the primary"
            )
            return 0
        blockers = Client(conn).horizon_blockers()
    if args.json:
        json_lines(sys.stdout, blockers)
        return 0
    headers, rows = HORIZON_HEADERS, horizon_rows(blockers)
    table(sys.stdout, headers, rows, empty="no transaction is holding the read horizon back")
    return 0


def _demo(args: argparse.Namespace) -> int:
    target = resolve(args, required=False)
    if target is not None:
        target.connect().close()  # a clear error now rather than from a thread later
    try:
        with sigterm_interrupts():
            return demo.run(
                None if target is None else target.dsn,
                seconds=args.seconds,
                writers=args.writers,
                workers=args.workers,
                orders=args.orders,
                out=sys.stdout,
            )
    except demo.DemoError as error:
        raise CliError(str(error), error.code) from None


if __name__ == "__main__":
    sys.exit(main())
