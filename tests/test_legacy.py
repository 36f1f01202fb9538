"""`meowmx import-legacy` from a database that the real meowmx 0.4.1 package (the
SQLAlchemy one, from the package registry, in a virtualenv of its own) wrote."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path
from typing import Any

import psycopg
import pytest

from clusters import missing
from meowmx import Client, cli

WRITE = """
import json, sys
import psycopg, sqlalchemy, meowmx

dsn, step = sys.argv[1], sys.argv[2]
engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
store = meowmx.Client(engine=engine)

def new(kind, data):
    return [meowmx.NewEvent(event_type=kind, json=json.dumps(data))]

if step == "first":
    store.setup_tables("TEXT")
    for n in range(3):
        store.save_events("order", f"o{n}", new("Placed", {"n": n}), version=0)
    store.save_events("order", "o0", new("Paid", {"amount": 10}), version=1)
    store.save_events("invoice", "i1", new("Sent", [1, 2]), version=0)  # not an object
    handled = []
    store._handle_subscription_events("billing", meowmx.All(), 3, lambda s, e: handled.append(e))
    assert len(handled) == 3
else:
    store.save_events("order", "o1", new("Paid", {"amount": 5}), version=1)
"""


@pytest.fixture(scope="module")
def legacy_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with meowmx 0.4.1 from the package registry."""
    home = tmp_path_factory.mktemp("meowmx-0.4.1")
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "meowmx==0.4.1", "psycopg[binary]>=3.2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        missing(f"cannot install meowmx 0.4.1 from the package registry: {done.stderr[-300:]}")
    return python


def write_legacy(python: Path, dsn: str, step: str, tmp_path: Path) -> None:
    script = tmp_path / "write_legacy.py"
    script.write_text(WRITE)
    done = subprocess.run([str(python), str(script), dsn, step], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr


def legacy_order(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT a.aggregate_type, e.aggregate_id, e.version + 1, e.event_type"
            " FROM es_events AS e JOIN es_aggregates AS a ON a.id = e.aggregate_id"
            " ORDER BY e.transaction_id, e.id"
        )
        return [tuple(row) for row in rows]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_legacy_keeps_order_versions_and_subscription_positions(
    legacy_python: Path,
    extra_db: Any,
    dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = extra_db()
    write_legacy(legacy_python, source, "first", tmp_path)

    code, out, err = run(capsys, "import-legacy", "--from-dsn", source, "--dsn", dsn)
    assert code == 0, err
    assert out.splitlines()[0] == (
        "imported 5 events into 4 streams (0 already there); 1 subscriptions"
    )
    with Client(dsn) as client:
        events = list(client.read_events())
        assert [(e.category, e.stream_id, e.version, e.event_type) for e in events] == (
            legacy_order(source)
        )
        assert [(e.version, e.data) for e in client.read_stream("order", "o0")] == [
            (1, {"n": 0}),
            (2, {"amount": 10}),
        ]
        assert next(client.read_stream("invoice", "i1")).data == {"value": [1, 2]}
        # billing had handled the first 3 events there: here it continues with the rest.
        claimed = client.claim_batch("billing", "w", max_count=10)
        assert [e.position for e in claimed] == [e.position for e in events[3:]]
        client.release("billing", "w")

        # Again: nothing twice. Then what the old store wrote since.
        code, out, _ = run(capsys, "import-legacy", "--from-dsn", source, "--dsn", dsn)
        assert out.splitlines()[0].startswith("imported 0 events into 4 streams (5 already")
        write_legacy(legacy_python, source, "more", tmp_path)
        code, out, _ = run(capsys, "import-legacy", "--from-dsn", source, "--dsn", dsn)
        assert code == 0 and out.splitlines()[0].startswith("imported 1 events into 4 streams")
        assert [e.event_type for e in client.read_stream("order", "o1")] == ["Placed", "Paid"]
        assert len(list(client.read_events())) == 6


def test_import_legacy_from_a_database_without_its_tables(
    extra_db: Any, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "import-legacy", "--from-dsn", extra_db(), "--dsn", dsn)
    assert code == 1 and "has no meowmx 0.4 tables" in err and "Traceback" not in err
