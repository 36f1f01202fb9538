"""The meowmx command line, against a real PostgreSQL.

Most tests call ``main([...])`` in-process and read what it printed; a few run the real
console script. Every failure must be a short message on stderr, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import meowmx
from meowmx import Client, cli, output
from support import EVENT_COLUMNS, wait_until

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"
Capsys = pytest.CaptureFixture[str]


@pytest.fixture(autouse=True)
def _no_ambient_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEOWMX_DSN", raising=False)


def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def assert_clean_failure(code: int, err: str, expected: str, status: int | None = None) -> None:
    assert code != 0
    if status is not None:
        assert code == status
    assert "Traceback" not in err
    assert expected in err
    assert err.startswith("meowmx")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# Install and sql ------------------------------------------------------------------------


def test_install_status_and_idempotence(empty_dsn: str, capsys: Capsys) -> None:
    code, out, _ = run(capsys, "install", "--status", "--dsn", empty_dsn)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split("\t") == ["version", "name", "applied", "applied at"]
    assert len(lines) == 1 + meowmx.latest_version()
    assert all(line.split("\t")[2] == "no" for line in lines[1:])

    code, out, _ = run(capsys, "install", "--dsn", empty_dsn)
    assert code == 0
    assert "0001_core" in out and f"schema version {meowmx.latest_version()}" in out

    code, out, _ = run(capsys, "migrate", "--dsn", empty_dsn)
    assert code == 0 and "nothing to apply" in out

    code, out, _ = run(capsys, "migrate", "status", "--dsn", empty_dsn)
    assert code == 0
    assert all(line.split("\t")[2] == "yes" for line in out.splitlines()[1:])


def test_sql_output_applies_with_psql(
    extra_db: Callable[[], str],
    psql: Callable[..., subprocess.CompletedProcess[str]],
    capsys: Capsys,
) -> None:
    latest = meowmx.latest_version()
    code, whole, _ = run(capsys, "sql")  # no database needed: the current schema
    assert code == 0 and whole == meowmx.script() and "-- schema/01_schema.sql" in whole
    _, chain, _ = run(capsys, "sql", "--from", "0")  # every upgrade, for other stacks
    assert "-- upgrades/0001_core.sql" in chain and "-- schema/" not in chain
    target = extra_db()
    psql(whole, target, args=["-1", "-f", "-"])
    assert psql("SELECT meowmx.version()", target).stdout.strip() == str(latest)

    # In two steps: up to 1, then what follows 1.
    _, first, _ = run(capsys, "sql", "--to", "1")
    _, rest, _ = run(capsys, "sql", "--from", "1")
    stepwise = extra_db()
    psql(first, stepwise, args=["-1", "-f", "-"])
    assert psql("SELECT meowmx.version()", stepwise).stdout.strip() == "1"
    psql(rest, stepwise, args=["-1", "-f", "-"])
    assert psql("SELECT meowmx.version()", stepwise).stdout.strip() == str(latest)


def test_sql_rejects_versions_it_does_not_ship(capsys: Capsys) -> None:
    code, out, err = run(capsys, "sql", "--to", "99")
    assert_clean_failure(code, err, "ships schema versions 1 to", 2)
    assert out == ""
    code, _, err = run(capsys, "sql", "--from", "2", "--to", "1")
    assert_clean_failure(code, err, "--from 2 is past --to 1", 2)


# Append and read ------------------------------------------------------------------------


def test_append_then_read_in_every_shape(
    dsn: str, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(
        capsys,
        "append",
        "order",
        "42",
        "OrderPlaced",
        '{"amount": 25.5}',
        "--expected-version",
        "0",
        "--dsn",
        dsn,
    )
    assert code == 0
    first = json.loads(out)
    assert first["version"] == 1 and isinstance(first["position"], int)

    # DATA from stdin, with metadata and an event id; the retry is idempotent.
    event_id = str(uuid.uuid4())
    args = ["append", "order", "42", "OrderConfirmed", "--metadata", '{"by": "cli"}']
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.StringIO('{"note": "ok"}\n'))
        code, out, _ = run(capsys, *args, "--id", event_id, "--dsn", dsn)
        assert code == 0
        assert json.loads(out)["version"] == 2
    run(capsys, "append", "invoice", "7", "InvoiceSent", "{}", "--dsn", dsn)

    code, out, _ = run(capsys, "read", "--dsn", dsn)
    assert code == 0
    events = json_lines(out)
    assert [(e["category"], e["version"]) for e in events] == [
        ("order", 1),
        ("order", 2),
        ("invoice", 1),
    ]
    assert all(set(e) == set(EVENT_COLUMNS) for e in events)
    assert events[0]["data"] == {"amount": 25.5}
    assert events[1]["metadata"] == {"by": "cli"} and events[1]["event_id"] == event_id
    assert events[0]["recorded_at"][:4].isdigit()  # ISO 8601

    def read(*more: str) -> list[dict[str, Any]]:
        code, out, err = run(capsys, "read", "--dsn", dsn, *more)
        assert code == 0, err
        return json_lines(out)

    assert read("--after", events[0]["cursor"]) == events[1:]
    assert read("--limit", "1") == events[:1]
    assert read("--category", "invoice") == events[2:]
    assert read("--type", "OrderConfirmed", "--type", "InvoiceSent") == events[1:]
    assert read("--stream", "order/42") == events[:2]
    assert read("--category", "order", "--stream-id", "42") == events[:2]
    assert read("--stream", "order/42", "--backwards", "--limit", "1") == events[1:2]
    assert read("--stream", "order/42", "--stream", "invoice/7") == events
    assert read("--stream", "order/nothing") == []


def test_append_and_read_refuse_bad_input(
    dsn: str, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["append", "order", "1", "OrderPlaced"]
    code, _, err = run(capsys, *base, "{not json", "--dsn", dsn)
    assert_clean_failure(code, err, "DATA_JSON is not valid JSON", 2)
    code, _, err = run(capsys, *base, "{}", "--metadata", "[", "--dsn", dsn)
    assert_clean_failure(code, err, "--metadata is not valid JSON", 2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = run(capsys, *base, "--dsn", dsn)
    assert_clean_failure(code, err, "the data on stdin is not valid JSON", 2)
    monkeypatch.setattr(sys, "stdin", FakeTTY())
    code, _, err = run(capsys, *base, "--dsn", dsn)
    assert_clean_failure(code, err, "give DATA_JSON, or pipe it on stdin", 2)
    code, _, err = run(capsys, *base, "{}", "--id", "not-a-uuid", "--dsn", dsn)
    assert_clean_failure(code, err, "invalid UUID value", 2)

    # Refused by the server: SQLSTATE, DETAIL and HINT.
    code, _, err = run(capsys, *base, "[1, 2]", "--dsn", dsn)
    assert_clean_failure(code, err, "event data must be a JSON object (MX012)", 1)
    assert "\nHINT: " in err
    run(capsys, *base, "{}", "--dsn", dsn)
    code, _, err = run(capsys, *base, "{}", "--expected-version", "0", "--dsn", dsn)
    assert_clean_failure(code, err, "wrong expected version (MX001)", 1)
    assert "DETAIL: stream order/1: expected version 0, actual version 1" in err

    code, out, err = run(capsys, "read", "--after", "bogus", "--dsn", dsn)
    assert_clean_failure(code, err, "malformed cursor (MX015)", 1)
    assert "DETAIL: cursor is 'bogus'" in err and "HINT: " in err
    assert out == ""
    code, _, err = run(capsys, "read", "--stream", "no-slash", "--dsn", dsn)
    assert_clean_failure(code, err, "expected CATEGORY/STREAM_ID", 2)
    code, _, err = run(capsys, "read", "--stream-id", "1", "--dsn", dsn)
    assert_clean_failure(code, err, "--stream-id needs exactly one --category", 2)
    code, _, err = run(capsys, "read", "--limit", "0", "--dsn", dsn)
    assert_clean_failure(code, err, "invalid positive integer value: '0'", 2)


def test_usage_errors_are_one_line(capsys: Capsys) -> None:
    code, out, err = run(capsys, "frobnicate")
    assert_clean_failure(code, err, "unknown command 'frobnicate'", 2)
    assert len(err.splitlines()) == 1 and out == ""
    code, _, err = run(capsys, "append", "order")
    assert_clean_failure(code, err, "the following arguments are required", 2)
    assert len(err.splitlines()) == 1
    code, out, _ = run(capsys, "read", "--help")
    assert code == 0 and "--after CURSOR" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["install"],
        ["install", "--status"],
        ["append", "order", "1", "OrderPlaced", "{}"],
        ["read"],
        ["tail", "--timeout", "1"],
        ["subscriptions"],
        ["dead-letters", "sub"],
        ["horizon"],
    ],
    ids=lambda argv: argv[0] + ("-status" if "--status" in argv else ""),
)
def test_commands_need_a_dsn_and_a_server(argv: list[str], capsys: Capsys) -> None:
    code, out, err = run(capsys, *argv)
    assert_clean_failure(code, err, "no database given: pass --dsn or set MEOWMX_DSN", 2)
    assert out == "" and len(err.splitlines()) == 1

    code, out, err = run(capsys, *argv, "--dsn", UNREACHABLE)
    assert_clean_failure(code, err, f"meowmx: cannot connect to {UNREACHABLE}: ", 2)
    assert "Connection refused" in err and len(err.splitlines()) == 1 and out == ""


def test_dsn_from_the_environment_and_passwords_hidden(
    dsn: str, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEOWMX_DSN", dsn)
    code, out, _ = run(capsys, "read")
    assert code == 0 and out == ""
    code, _, err = run(capsys, "read", "--dsn", "postgresql://cat:s3cret@127.0.0.1:1/x")
    assert_clean_failure(code, err, "cannot connect to postgresql://cat:***@127.0.0.1:1/x", 2)
    assert "s3cret" not in err
    code, _, err = run(capsys, "read", "--dsn", "not a dsn")
    assert_clean_failure(code, err, "invalid DSN", 2)


def test_database_without_meowmx(empty_dsn: str, capsys: Capsys) -> None:
    code, _, err = run(capsys, "read", "--dsn", empty_dsn)
    assert_clean_failure(code, err, "meowmx is not installed in this database", 1)
    assert "meowmx install" in err


# Tail -------------------------------------------------------------------------------------


def test_tail_follows_events_appended_meanwhile(dsn: str, capsys: Capsys) -> None:
    with Client(dsn) as client:
        client.append("order", "old", "OrderPlaced", {})

    def append_later() -> None:
        with Client(dsn) as client:
            for n in range(3):
                time.sleep(0.2)
                client.append("order", "new", "OrderPlaced" if n == 0 else "Noted", {"n": n})
            client.append("invoice", "new", "InvoiceSent", {})

    appender = threading.Thread(target=append_later)
    started = time.monotonic()
    appender.start()
    try:
        code, out, err = run(
            capsys, "tail", "--dsn", dsn, "--from-end", "--category", "order",
            "--max-events", "3", "--timeout", "30", "--poll", "10",
        )  # fmt: skip
    finally:
        appender.join()
    assert code == 0, err
    events = json_lines(out)
    assert [(e["stream_id"], e["data"]) for e in events] == [("new", {"n": n}) for n in range(3)]
    # Woken by NOTIFY, not by the 10-second poll.
    assert time.monotonic() - started < 8

    # From the beginning (the default), with a type filter, stopping at the timeout.
    code, out, _ = run(capsys, "tail", "--dsn", dsn, "--type", "Noted", "--timeout", "0.3")
    assert code == 0
    assert [e["data"] for e in json_lines(out)] == [{"n": 1}, {"n": 2}]
    code, out, _ = run(
        capsys, "tail", "--dsn", dsn, "--after", events[-1]["cursor"], "--timeout", "0.3"
    )
    assert [e["event_type"] for e in json_lines(out)] == ["InvoiceSent"]
    code, _, err = run(capsys, "tail", "--dsn", dsn, "--after", "x", "--timeout", "1")
    assert_clean_failure(code, err, "malformed cursor (MX015)", 1)


# Subscriptions, dead letters, horizon ---------------------------------------------------


def test_subscriptions_and_dead_letters(
    dsn: str, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(dsn) as client:
        client.create_subscription("billing", partitions=2, max_attempts=1)
        appended = client.append("order", "1", "OrderPlaced", {})
        client.append("order", "1", "OrderConfirmed", {})
        deadline = time.monotonic() + 30
        while not (batch := client.claim_batch("billing", "w1")):
            assert time.monotonic() < deadline, "events never became visible"
        assert client.nack("billing", "w1", batch[0].partition, appended.position, "boom")

    code, out, _ = run(capsys, "subscriptions", "--dsn", dsn)
    assert code == 0
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header == [
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
    assert [(r[0], r[1]) for r in rows] == [("billing", "0"), ("billing", "1")]
    busy = next(r for r in rows if r[4] == "w1")
    assert busy[8] == "1" and busy[3] == "1"  # one parked, one behind

    code, out, _ = run(capsys, "subscriptions", "billing", "--json", "--dsn", dsn)
    status = json_lines(out)
    assert sum(s["parked"] for s in status) == 1
    assert {s["lease_owner"] for s in status} == {"w1", None}

    monkeypatch.setattr(sys, "stdout", FakeTTY())  # aligned table on a terminal
    assert cli.main(["subscriptions", "--dsn", dsn]) == 0
    table = sys.stdout.getvalue().splitlines()  # type: ignore[attr-defined]
    monkeypatch.undo()
    assert table[0].split()[:2] == ["subscription", "partition"]
    assert "\t" not in "".join(table) and "w1" in table[1] + table[2]
    code, _, err = run(capsys, "subscriptions", "nope", "--dsn", dsn)
    assert_clean_failure(code, err, "subscription not found (MX020)", 1)

    code, out, _ = run(capsys, "dead-letters", "billing", "--dsn", dsn)
    assert code == 0
    header, row = [line.split("\t") for line in out.splitlines()]
    assert header[:3] == ["position", "partition", "stream"]
    assert row[0] == str(appended.position) and row[2] == "order/1" and row[6] == "boom"
    code, out, _ = run(capsys, "dead-letters", "billing", "--json", "--dsn", dsn)
    assert json_lines(out)[0]["error"] == "boom"

    requeue = ["dead-letters", "billing", "--requeue", str(appended.position), "--dsn", dsn]
    code, out, _ = run(capsys, *requeue)
    assert code == 0 and f"requeued event {appended.position} of billing" in out
    code, out, _ = run(capsys, "dead-letters", "billing", "--json", "--dsn", dsn)
    assert out == ""
    code, _, err = run(capsys, *requeue)
    assert_clean_failure(code, err, "event is not parked (MX025)", 1)


def test_horizon_names_the_blocking_transaction(
    dsn: str, connect: Callable[..., psycopg.Connection[Any]], capsys: Capsys
) -> None:
    blocker = connect(autocommit=False)
    blocker.execute("SELECT pg_current_xact_id()")
    pid = blocker.info.backend_pid

    code, out, _ = run(capsys, "horizon", "--json", "--dsn", dsn)
    assert code == 0
    mine = [b for b in json_lines(out) if b["pid"] == pid]
    assert len(mine) == 1
    assert mine[0]["query"] == "SELECT pg_current_xact_id()"
    assert mine[0]["state"] == "idle in transaction"
    assert isinstance(mine[0]["transaction_age"], float)

    code, out, _ = run(capsys, "horizon", "--dsn", dsn)
    assert code == 0
    assert out.splitlines()[0].split("\t")[:3] == ["pid", "state", "age"]
    assert any(line.split("\t")[0] == str(pid) for line in out.splitlines()[1:])


def test_table_layout() -> None:
    out = FakeTTY()
    output.table(out, ["a", "long header"], [[1, None], ["wide value", "x\ty"]], empty="none")
    assert out.getvalue().splitlines() == [
        "a           long header",
        "1           -",
        "wide value  x y",
    ]
    out = FakeTTY()
    output.table(out, ["a"], [], empty="nothing here")
    assert out.getvalue() == "nothing here\n"
    piped = io.StringIO()
    output.table(piped, ["a", "b"], [[1, None]], empty="none")
    assert piped.getvalue() == "a\tb\n1\t\n"


# The demo ---------------------------------------------------------------------------------


def test_demo_runs_and_passes(dsn: str, capsys: Capsys) -> None:
    started = time.monotonic()
    code, out, err = run(
        capsys, "demo", "--dsn", dsn, "--seconds", "3", "--writers", "3", "--workers", "2"
    )
    assert code == 0, out + err
    assert "Traceback" not in out + err
    summary = out[out.index("\nsummary\n") :]
    numbers = {
        line[:20].strip(): line[20:].split()[0].replace(",", "")
        for line in summary.splitlines()[2:]
        if line.startswith("  ")
    }
    assert numbers["final lag"] == "0"
    assert int(numbers["events written"]) > 0
    assert numbers["events handled"] == numbers["events written"]
    assert "conflicts retried" in numbers
    assert "consistency check  PASS" in summary
    assert "worker-1" in summary and "worker-2" in summary
    assert time.monotonic() - started < 20
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), sum(version) FROM demo_orders").fetchone()
    assert row is not None and row[0] > 0 and row[1] == int(numbers["events written"])


def test_demo_fails_when_the_read_model_is_wrong(
    dsn: str, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meowmx import demo

    correct = demo.projector

    def lossy(prefix: str, handled: Any, worker: str) -> Any:
        project = correct(prefix, handled, worker)

        def handler(event: meowmx.ClaimedEvent, conn: psycopg.Connection[Any]) -> None:
            if event.event_type != "OrderShipped":  # forgets shipments
                project(event, conn)

        return handler

    monkeypatch.setattr(demo, "projector", lossy)
    code, out, err = run(capsys, "demo", "--dsn", dsn, "--seconds", "1", "--workers", "1")
    assert code == 1, out + err
    assert "consistency check  FAIL: " in out
    assert "mismatch: order " in out and "Traceback" not in out + err


def test_demo_without_the_embedded_extra(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import meowmx.embedded

    def missing() -> Any:
        raise RuntimeError(meowmx.embedded._MISSING)

    monkeypatch.setattr(meowmx.embedded, "embedded_server", missing)
    code, _, err = run(capsys, "demo", "--seconds", "1")
    assert_clean_failure(code, err, "meowmx: embedded PostgreSQL is not installed", 2)
    assert len(err.splitlines()) == 1
    code, _, err = run(capsys, "demo", "--dsn", UNREACHABLE)
    assert_clean_failure(code, err, f"cannot connect to {UNREACHABLE}", 2)


# The real console script ------------------------------------------------------------------


def _console_script() -> str:
    found = Path(sys.executable).with_name("meowmx")
    if found.exists():
        return str(found)
    which = shutil.which("meowmx")
    if which is None:
        pytest.skip("the meowmx console script is not installed")
    return which


def test_console_script(dsn: str) -> None:
    script = _console_script()
    env = {k: v for k, v in os.environ.items() if k != "MEOWMX_DSN"}

    def meowmx_cli(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, *argv], capture_output=True, text=True, env=env, timeout=60, **kw
        )

    done = meowmx_cli("append", "cart", "1", "ItemAdded", input='{"sku": "cat-tree"}')
    assert done.returncode == 2  # no DSN yet
    assert done.stderr == "meowmx: no database given: pass --dsn or set MEOWMX_DSN\n"

    env["MEOWMX_DSN"] = dsn
    done = meowmx_cli("append", "cart", "1", "ItemAdded", input='{"sku": "cat-tree"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == 1
    done = meowmx_cli("read", "--stream", "cart/1")
    assert json.loads(done.stdout)["data"] == {"sku": "cat-tree"}

    for argv, message in [
        (["read", "--after", "nope"], "meowmx: malformed cursor (MX015)\n"),
        (["read", "--dsn", UNREACHABLE], f"meowmx: cannot connect to {UNREACHABLE}: "),
        (["frob"], "meowmx: unknown command 'frob'"),
        (["append", "cart", "1", "X", "{"], "meowmx: DATA_JSON is not valid JSON"),
    ]:
        done = meowmx_cli(*argv)
        assert done.returncode != 0
        assert done.stderr.startswith(message), done.stderr
        assert "Traceback" not in done.stderr

    # tail stops cleanly (exit 0) on SIGTERM or Ctrl-C, whenever it comes: at once after
    # the first line the signal often lands mid-query (a KeyboardInterrupt raised there
    # used to leave the connection busy, and 1 stop in 6 failed).
    for round, sig in enumerate([signal.SIGTERM, signal.SIGINT] * 4):
        tail = subprocess.Popen(
            [script, "tail"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            assert tail.stdout is not None and tail.stderr is not None
            assert json.loads(tail.stdout.readline())["stream_id"] == "1"  # it is following
            if round >= 6:
                time.sleep(0.3)  # and when it waits for the next event
            tail.send_signal(sig)
            assert tail.wait(timeout=10) == 0, tail.stderr.read()
            assert tail.stderr.read() == ""
        finally:
            tail.kill()
            tail.wait()


def test_python_dash_m_meowmx_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meowmx", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("meowmx ") and "schema version" in done.stdout


def test_demo_does_not_import_the_cli() -> None:
    # The CLI imports the demo; the reverse would make a cycle.
    code = "import sys, meowmx.demo; assert 'meowmx.cli' not in sys.modules, 'cycle'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_subscription_status_as_json(dsn: str, capsys: Capsys) -> None:
    with Client(dsn) as client:
        client.create_subscription("lagging")
        client.append("order", "9", "OrderPlaced", {})
        deadline = time.monotonic() + 30
        while not client.claim_batch("lagging", "w", lease=timedelta(seconds=5)):
            assert time.monotonic() < deadline, "the event never became visible"
    code, out, _ = run(capsys, "subscriptions", "lagging", "--json", "--dsn", dsn)
    assert code == 0
    (status,) = json_lines(out)
    assert status["subscription"] == "lagging" and status["partition"] == 0
    assert status["events_behind"] == 1 and status["lease_owner"] == "w"
    assert status["lease_expires_at"][:4].isdigit()  # ISO 8601


# Subscriptions and workers as commands ----------------------------------------------------


def test_subscription_create_reset_and_drop(dsn: str, capsys: Capsys) -> None:
    create = ["subscription", "create", "ship", "--category", "order", "--partitions", "2"]
    code, out, _ = run(capsys, *create, "--dsn", dsn)
    assert (code, out) == (0, "created subscription ship (2 partitions)\n")
    code, out, _ = run(capsys, *create, "--dsn", dsn)
    assert (code, out) == (0, "exists already, the same: subscription ship (2 partitions)\n")
    code, _, err = run(capsys, *create, "--max-attempts", "3", "--dsn", dsn)
    assert_clean_failure(code, err, "(MX021)", 1)  # another definition
    with Client(dsn) as client:
        client.append("order", "1", "Placed", {})
        assert [s.partition for s in client.subscription_status("ship")] == [0, 1]
        code, out, _ = run(
            capsys, "subscription", "reset", "ship", "--start-at", "end", "--dsn", dsn
        )
        assert (code, out) == (0, "reset subscription ship to end\n")
        assert all(s.checkpoint == client.end_cursor() for s in client.subscription_status("ship"))
    code, _, err = run(capsys, "subscription", "reset", "ship", "--category", "x", "--dsn", dsn)
    assert_clean_failure(code, err, "subscription reset takes no --category or --type", 2)
    code, out, _ = run(capsys, "subscription", "drop", "ship", "--dsn", dsn)
    assert (code, out) == (0, "dropped subscription ship\n")
    code, _, err = run(capsys, "subscription", "drop", "ship", "--dsn", dsn)
    assert_clean_failure(code, err, "no subscription is named 'ship': nothing dropped", 1)


HANDLERS = """
import os, psycopg

record = psycopg.connect(os.environ["MEOWMX_DSN"], autocommit=True)

def on_order(event):
    record.execute("INSERT INTO handled VALUES (%s, %s)", [os.getpid(), event.position])

def in_transaction(event, conn):
    conn.execute("INSERT INTO handled VALUES (%s, %s)", [os.getpid(), event.position])
"""


def test_worker_command_runs_processes_until_sigterm(
    dsn: str, connect: Callable[..., psycopg.Connection[Any]], tmp_path: Path
) -> None:
    (tmp_path / "handlers.py").write_text(HANDLERS)
    conn = connect()
    conn.execute("CREATE TABLE handled (pid int, position bigint)")
    script = _console_script()
    env = {**os.environ, "MEOWMX_DSN": dsn}

    def worker(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, "worker", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)  # fmt: skip

    for argv, status, message in [
        (["handlers", "--subscription", "ship"], 2, "expected MODULE:FUNCTION"),
        (["nothere:f", "--subscription", "ship"], 2, "cannot import nothere: ModuleNotFound"),
        (["handlers:absent", "--subscription", "ship"], 2, "handlers has no function absent"),
        (["handlers:on_order", "--subscription", "nope"], 1, "subscription not found (MX020)"),
    ]:
        done = worker(*argv)
        assert (done.returncode, "Traceback" in done.stderr) == (status, False), done.stderr
        assert message in done.stderr
    with Client(dsn) as client:
        client.create_subscription("ship", categories=["order"], partitions=4)
        done = worker("handlers:in_transaction", "--subscription", "ship")  # not --transactional
        assert done.returncode == 2 and "runs with transactional=True" in done.stderr

        positions = [client.append("order", str(n % 8), "Placed", {}).position for n in range(80)]
        service = subprocess.Popen(
            [script, "worker", "handlers:in_transaction", "--subscription", "ship",
             "--transactional", "--processes", "3"],
            env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: conn.execute("SELECT count(*) FROM handled").fetchone() == (80,),
                       "80 events handled")  # fmt: skip
            service.send_signal(signal.SIGTERM)
            assert service.wait(timeout=30) == 0  # every process stopped cleanly
        finally:
            service.kill()
            _, log = service.communicate()
        rows = conn.execute("SELECT pid, position FROM handled ORDER BY position").fetchall()
        assert [r[1] for r in rows] == positions  # each once
        assert "runs handlers:in_transaction over ship" in log
        assert {s.lease_owner for s in client.subscription_status("ship")} == {None}  # released


def test_read_says_which_open_transaction_holds_it_back(
    dsn: str, connect: Callable[..., psycopg.Connection[Any]], capsys: Capsys
) -> None:
    blocker = connect(autocommit=False)
    blocker.execute("SELECT pg_current_xact_id()")
    with Client(dsn) as client:
        client.append("order", "1", "Placed", {})  # committed after the blocker began
    time.sleep(1.1)
    code, out, err = run(capsys, "read", "--dsn", dsn)
    assert (code, out) == (0, "")
    assert f"holds reads back (pid {blocker.info.backend_pid}" in err
    assert "see meowmx horizon" in err
    blocker.rollback()
    code, out, err = run(capsys, "read", "--dsn", dsn)
    assert len(out.splitlines()) == 1 and err == ""
