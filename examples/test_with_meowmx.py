"""Your own tests, with the fixtures of meowmx's pytest plugin (installed with meowmx):
each test gets a database of its own with meowmx installed.

    pytest examples/test_with_meowmx.py                       # an embedded PostgreSQL
    pytest examples/test_with_meowmx.py --meowmx-dsn "$DSN"   # or MEOWMX_TEST_DSN
"""

import meowmx


def test_placing_an_order(meowmx_client: meowmx.Client) -> None:
    meowmx_client.append("order", "1", "Placed", {"total": 10})
    assert [e.event_type for e in meowmx_client.read_stream("order", "1")] == ["Placed"]


def test_each_test_starts_with_an_empty_store(meowmx_client: meowmx.Client) -> None:
    assert list(meowmx_client.read_events()) == []  # not the event of the test above


def test_the_database_is_the_tests_own(meowmx_dsn: str) -> None:
    with meowmx.Client(meowmx_dsn) as client:
        assert client.schema_version() == meowmx.latest_version()
