"""The SQL API from plain psql: named arguments, a conflict, reads, cursors in variables."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import psycopg

from support import event_count, wait_for_horizon

Psql = Callable[..., subprocess.CompletedProcess[str]]

APPENDS = """
SELECT version FROM meowmx.append_event(
    category => 'cart', stream_id => 'alice', event_type => 'Created',
    data => '{"currency": "EUR"}', expected_version => 0);
SELECT version FROM meowmx.append_events(
    category => 'cart', stream_id => 'alice', expected_version => 1,
    events => '[{"type": "ItemAdded", "data": {"sku": "tea", "qty": 2}},
                {"type": "ItemAdded", "data": {"sku": "mug", "qty": 1},
                 "metadata": {"user": "alice"}}]');
SELECT version FROM meowmx.append_event(
    category => 'order', stream_id => '7', event_type => 'Placed', data => '{}');
"""


def lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return done.stdout.splitlines()


def appended(dsn: str, psql: Psql) -> list[str]:
    """Run APPENDS, then wait until reads see them (another session may hold the horizon)."""
    done = psql(APPENDS, dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_for_horizon(conn)
    return lines(done)


def test_append_and_read_from_psql(dsn: str, psql: Psql) -> None:
    assert appended(dsn, psql) == ["1", "2", "3", "1"]
    done = psql(
        """
SELECT meowmx.stream_version(category => 'cart', stream_id => 'alice');
SELECT version, event_type, data, metadata
FROM meowmx.read_stream(category => 'cart', stream_id => 'alice');
SELECT version, event_type
FROM meowmx.read_stream(
    category => 'cart', stream_id => 'alice', backwards => true, max_count => 1);
SELECT category, stream_id, version, event_type FROM meowmx.read_events();
SELECT stream_id, event_type FROM meowmx.read_events(categories => ARRAY['order']);
""",
        dsn,
    )
    assert lines(done) == [
        "3",
        '1|Created|{"currency": "EUR"}|',
        '2|ItemAdded|{"qty": 2, "sku": "tea"}|',
        '3|ItemAdded|{"qty": 1, "sku": "mug"}|{"user": "alice"}',
        "3|ItemAdded",
        "cart|alice|1|Created",
        "cart|alice|2|ItemAdded",
        "cart|alice|3|ItemAdded",
        "order|7|1|Placed",
        "7|Placed",
    ]


def test_a_conflict_stops_a_psql_script(dsn: str, psql: Psql) -> None:
    psql(APPENDS, dsn)
    done = psql(
        r"""
\set VERBOSITY verbose
SELECT 'before';
SELECT version FROM meowmx.append_event(
    category => 'cart', stream_id => 'alice', event_type => 'Created',
    data => '{}', expected_version => 0);
SELECT 'after';
""",
        dsn,
        check=False,
    )
    assert done.returncode == 3  # psql: an error stopped the script (ON_ERROR_STOP)
    assert lines(done) == ["before"]
    assert "ERROR:  MX001: wrong expected version" in done.stderr
    assert "DETAIL:  stream cart/alice: expected version 0, actual version 3" in done.stderr
    assert "HINT:  " in done.stderr
    with psycopg.connect(dsn) as conn:
        assert event_count(conn) == 4  # the conflict wrote nothing


def test_psql_sees_the_sqlstate_without_parsing_messages(dsn: str, psql: Psql) -> None:
    """A psql script can branch on the SQLSTATE (LAST_ERROR_SQLSTATE), not on text."""
    done = psql(
        r"""
\set ON_ERROR_STOP off
SELECT version FROM meowmx.append_events(
    category => 'cart', stream_id => 'bob', expected_version => -1,
    events => '[{"type": "ItemAdded", "data": {}}]');
\echo :LAST_ERROR_SQLSTATE
SELECT version FROM meowmx.append_events(
    category => 'cart', stream_id => 'bob', events => '[{"type": "ItemAdded"}]');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM meowmx.read_events(after => 'not a cursor');
\echo :LAST_ERROR_SQLSTATE
""",
        dsn,
    )
    assert lines(done) == ["MX001", "MX013", "MX015"]
    assert done.stderr.count("ERROR:") == 3
    assert done.stderr.count("HINT:") == 3


def test_paging_with_a_cursor_in_a_psql_variable(dsn: str, psql: Psql) -> None:
    appended(dsn, psql)
    done = psql(
        r"""
SELECT cursor AS last FROM meowmx.read_events(max_count => 2)
ORDER BY transaction_id DESC, position DESC LIMIT 1 \gset
SELECT stream_id, version FROM meowmx.read_events(after => :'last');
""",
        dsn,
    )
    assert lines(done)[-2:] == ["alice|3", "7|1"]
