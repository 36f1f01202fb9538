"""Every example in README.md runs, in order, and prints what the README shows.

A ```sql or ```python block followed by a ```text block must print exactly that text
(psql's aligned output, trailing spaces ignored); a block with no ```text after it
must run without error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.S | re.M)


def examples() -> list[tuple[str, str, str | None]]:
    """(language, code, expected output or None) for each sql/python block, in order."""
    blocks = [
        (m.group(1), m.group(2), m.end(), m.start()) for m in BLOCK.finditer(README.read_text())
    ]
    found = []
    for i, (lang, code, end, _) in enumerate(blocks):
        if lang not in ("sql", "python"):
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        adjacent = (
            after is not None
            and after[0] == "text"
            and README.read_text()[end : after[3]].strip() == ""
        )
        found.append((lang, code, after[1] if adjacent and after else None))
    return found


def normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def run_psql(psql: Callable[..., subprocess.CompletedProcess[str]], code: str, dsn: str) -> str:
    # Aligned output with headers, like an interactive session; errors without CONTEXT.
    result = psql(
        "\\pset format aligned\n\\pset tuples_only off\n\\set VERBOSITY default\n"
        "\\set SHOW_CONTEXT never\n\\set ON_ERROR_STOP 0\n" + code,
        dsn,
        check=False,
        args=["-q"],
    )
    return result.stdout + result.stderr


def run_python(code: str, dsn: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MEOWMX_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_examples_run_and_print_what_the_readme_shows(
    dsn: str, psql: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    blocks = examples()
    assert len(blocks) >= 15
    for lang, code, expected in blocks:
        output = run_psql(psql, code, dsn) if lang == "sql" else run_python(code, dsn)
        if expected is None:
            assert "ERROR" not in output, f"{code}\n---\n{output}"
        else:
            assert normalized(output) == normalized(expected), f"{code}\n--- printed:\n{output}"


@pytest.mark.parametrize("lang, code, expected", [b for b in examples() if b[0] == "sql"])
def test_readme_sql_uses_named_arguments(lang: str, code: str, expected: str | None) -> None:
    # The contract: callers name their arguments, so the README shows them named.
    for call in re.findall(r"meowmx\.\w+\(([^()]*)\)", code):
        assert call == "" or "=>" in call, call


def test_the_python_reference_names_every_public_name() -> None:
    """Each name of meowmx.__all__ (the errors have their own table) and each public
    method of the clients and workers is in the README's Python reference."""
    import meowmx
    from meowmx import errors

    text = README.read_text()
    reference = text[text.index("### Python reference") : text.index("## Command line")]
    errors_table = text[text.index("## Errors") : text.index("## Python API")]
    names = {n for n in meowmx.__all__ if n not in errors.__all__}
    methods = {
        name
        for cls in (meowmx.Client, meowmx.AsyncClient, meowmx.Worker, meowmx.AsyncWorker)
        for name in dir(cls)  # the inherited methods too
        if callable(getattr(cls, name)) and not name.startswith("_")
    }
    missing = sorted(n for n in names | methods if not re.search(rf"\b{n}\b", reference))
    assert missing == []
    assert all(f"`{cls.__name__}`" in errors_table for cls in errors.ERRORS.values())
