"""The README's install lines: a wheel built from this checkout installs into a fresh
virtualenv with its SQL, its command and its pytest plugin."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import meowmx
from clusters import missing

ROOT = Path(__file__).resolve().parent.parent


def test_a_built_wheel_installs_and_runs(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if built.returncode != 0:
        missing(
            f"cannot build the wheel (its build backend comes from the registry):"
            f" {built.stderr[-300:]}"
        )
    [wheel] = tmp_path.glob("meowmx-*.whl")
    assert wheel.name == "meowmx-1.0.0-py3-none-any.whl"  # above the older package's 0.4.1

    home = tmp_path / "venv"
    venv.create(home, with_pip=True)
    python, script = home / "bin" / "python", home / "bin" / "meowmx"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{wheel}[pool]", "psycopg[binary]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if installed.returncode != 0:
        missing(f"cannot install the wheel's dependencies: {installed.stderr[-300:]}")

    version = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"meowmx 1.0.0 (schema version {meowmx.latest_version()})"
    printed = subprocess.run([str(script), "sql"], capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stdout == meowmx.script()  # the SQL ships
    plugin = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print([e.value for e in"
         " m.entry_points(group='pytest11') if e.name == 'meowmx'])"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert plugin.stdout.strip() == "['meowmx.testing']"
