"""The error contract: the README's table, the SQLSTATEs the SQL raises and the Python
registry name the same codes, each with one class; facts arrive as data."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

import meowmx
from meowmx.errors import ERRORS
from meowmx.install import schema_files
from support import raises_meowmx

README = Path(__file__).resolve().parent.parent / "README.md"
INSTALLER_ONLY = {"MX090"}  # raised by the Python installer, not by SQL


def readme_table() -> dict[str, str]:
    """SQLSTATE -> Python class name, from the README's Errors table."""
    section = README.read_text(encoding="utf-8").split("## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(MX\d{3})` \| [^|]+ \| `(\w+)`", section, re.MULTILINE)
    assert len(rows) == len(dict(rows)), "a SQLSTATE is listed twice"
    return dict(rows)


def raised_by_sql() -> set[str]:
    text = "".join(sql for _, sql in schema_files())
    return set(re.findall(r"'(MX\d{3})'", text))


def test_readme_sql_and_python_name_the_same_errors() -> None:
    documented = readme_table()
    raised = raised_by_sql()
    assert raised, "found no meowmx._fail calls"
    assert set(documented) == raised | INSTALLER_ONLY, "README table vs SQL"
    assert set(ERRORS) == set(documented), "Python registry vs README table"
    for sqlstate, name in documented.items():
        assert ERRORS[sqlstate].__name__ == name, sqlstate
        assert getattr(meowmx, name) is ERRORS[sqlstate], f"meowmx.{name} is not exported"


def test_each_sqlstate_has_one_class() -> None:
    names = [cls.__name__ for cls in ERRORS.values()]
    assert len(names) == len(set(names))
    for sqlstate, cls in ERRORS.items():
        assert re.fullmatch(r"MX\d{3}", sqlstate) and cls.sqlstate == sqlstate


def test_wrong_expected_version_carries_its_facts(dsn: str) -> None:
    client = meowmx.Client(dsn)
    client.append("cart", "A/1", "Created", {})
    with raises_meowmx(meowmx.WrongExpectedVersion) as info:
        client.append("cart", "A/1", "Renamed", {}, expected_version=5)
    assert info.value.facts == {
        "category": "cart",
        "stream_id": "A/1",
        "expected_version": 5,
        "actual_version": 1,
    }
    assert (info.value.expected, info.value.actual) == (5, 1)
    client.close()


def test_facts_reach_psql_users_in_the_constraint_field(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT meowmx.append_event('cart', '1', 'Created', '{}')")
        try:
            conn.execute("SELECT meowmx.append_event('cart', '1', 'Renamed', '{}', 0)")
        except psycopg.Error as error:
            assert error.sqlstate == "MX001"
            assert error.diag.constraint_name == (
                '{"category": "cart", "stream_id": "1", "actual_version": 1, "expected_version": 0}'
            )
        else:
            raise AssertionError("the append should have been refused")


def test_subscription_argument_errors_share_a_base_class() -> None:
    children = {
        cls.sqlstate
        for cls in ERRORS.values()
        if issubclass(cls, meowmx.InvalidSubscriptionArgument)
    }
    assert children == {"MX024", "MX026", "MX027", "MX028", "MX040", "MX041", "MX042", "MX043"}
