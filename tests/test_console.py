"""The operator's view: `meowmx metrics` scraped over HTTP and parsed with
prometheus_client's parser, and `meowmx web` driven in a real headless Chromium.

Both run as their commands do in production (a process on a free port) against a real
database with events, a subscription with a parked event, and an open transaction
holding the read horizon back. The browser tests skip locally without Debian's
chromium and chromium-driver (and fail in CI). Set MEOWMX_SCREENSHOTS to a folder to
keep the pages' screenshots (the README's come from there).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import meowmx
import meowmx.metrics
from clusters import need
from support import wait_for_horizon, wait_until

Connection = psycopg.Connection[Any]
SUB = "shipping"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def store(dsn: str, connect: Callable[..., Connection]) -> Iterator[dict[str, Any]]:
    """60 orders in 60 streams, an invoice, subscription SUB (2 partitions) with one
    parked event, and a transaction left open (it holds the read horizon back)."""
    with meowmx.Client(dsn) as client:
        for n in range(60):
            client.append("order", f"o{n:02}", "Placed", {"total": n, "items": [{"sku": "cat"}]})
        client.append("invoice", "i1", "Issued", {"total": 30}, metadata={"by": "billing"})
        client.create_subscription(SUB, categories=["order"], partitions=2, max_attempts=1)
        wait_for_horizon(connect())
        [first, *_] = client.claim_batch(SUB, "w1", max_count=1)
        client.nack(SUB, "w1", first.partition, first.position, "ValueError: no address")
        client.release(SUB, "w1")
        holder = connect(autocommit=False)
        holder.execute("SELECT pg_current_xact_id()")  # open, with a transaction id
        yield {
            "client": client,
            "parked": first,
            "holder_pid": holder.info.backend_pid,
            "end_holder": holder.rollback,
        }
        holder.rollback()


@pytest.fixture
def serve(dsn: str) -> Iterator[Callable[..., str]]:
    """Start `meowmx COMMAND --port P ...` on `dsn`; returns its base URL once it answers."""
    started: list[subprocess.Popen[str]] = []

    def start(command: str, *options: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "meowmx", command, "--dsn", dsn, "--port", str(port), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                urllib.request.urlopen(url + ("/metrics" if command == "metrics" else "/"))
            except (urllib.error.URLError, ConnectionError):
                return False
            return True

        wait_until(answers, f"meowmx {command} to answer")
        return url

    yield start
    for proc in started:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err  # SIGTERM is a normal stop
        assert "Traceback" not in err


# Metrics ------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, list[Any]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_a_scrape_shows_lag_dead_letters_and_the_horizon(
    store: dict[str, Any], serve: Callable[..., str]
) -> None:
    client: meowmx.Client = store["client"]
    url = serve("metrics")
    found = wait_until(
        lambda: (f := scrape(url))["meowmx_events"][0].value >= 61 and f,
        "the table statistics to count the 61 events",
    )
    assert found["meowmx_up"][0].value == 1
    assert found["meowmx_schema_version"][0].value == meowmx.latest_version()
    assert found["meowmx_events_inserted"][0].value >= 61  # a counter: parsed without _total
    behind = {s.labels["partition"]: s.value for s in found["meowmx_subscription_events_behind"]}
    status = client.subscription_status(SUB)
    assert behind == {str(p.partition): float(p.events_behind) for p in status}
    assert sum(behind.values()) == 59  # 60 orders, one parked
    parked = store["parked"]
    assert {s.labels["partition"]: s.value for s in found["meowmx_subscription_parked"]} == {
        str(parked.partition): 1.0,
        str(1 - parked.partition): 0.0,
    }
    ages = [s.value for s in found["meowmx_subscription_checkpoint_age_seconds"]]
    assert all(age > 0 for age in ages)  # both partitions have events waiting
    [oldest] = found["meowmx_horizon_oldest_transaction_age_seconds"]
    assert oldest.labels["pid"] == str(store["holder_pid"]) and oldest.value > 0
    assert found["meowmx_horizon_blockers"][0].value >= 1
    assert "meowmx_subscription_lease_expiry_timestamp_seconds" not in found  # released

    leased = client.claim_batch(SUB, "w2", max_count=5)
    [lease] = scrape(url)["meowmx_subscription_lease_expiry_timestamp_seconds"]
    assert lease.labels == {
        "subscription": SUB,
        "partition": str(leased[0].partition),
        "owner": "w2",
    }
    assert 0 < lease.value - time.time() <= 30


def test_a_collector_says_down_when_the_database_is_unreachable() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    unreachable = f"host=127.0.0.1 port={free_port()} connect_timeout=2"
    text = generate_latest(meowmx.metrics.registry(unreachable)).decode()
    [family] = text_string_to_metric_families(text)
    assert (family.name, family.samples[0].value) == ("meowmx_up", 0)


def test_the_commands_refuse_a_busy_port(dsn: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        for command in ("metrics", "web"):
            result = subprocess.run(
                [sys.executable, "-m", "meowmx", command, "--dsn", dsn, "--port", port],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 2
            assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
            assert "Traceback" not in result.stderr


# The console in a browser ----------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    need(
        shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER),
        "Chromium is not installed (Debian: apt-get install -y chromium chromium-driver)",
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root, and nothing that reaches for the network.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,800",
    ):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="meowmx-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shoot(tmp_path: Path) -> Callable[[Any, str], None]:
    folder = Path(os.environ.get("MEOWMX_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def save(driver: Any, name: str) -> None:
        path = folder / f"console-{name}.png"
        assert driver.save_screenshot(str(path))
        assert path.read_bytes().startswith(b"\x89PNG")

    return save


def text_of(driver: Any) -> str:
    """The page's text ("" while a page replaces another, as after a click)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.TAG_NAME, "main").text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_the_console_shows_streams_events_and_the_live_log(
    store: dict[str, Any], serve: Callable[..., str], browser: Any, shoot: Callable[..., None]
) -> None:
    from selenium.webdriver.common.by import By

    client: meowmx.Client = store["client"]
    url = serve("web")
    browser.get(url + "/")
    assert "read-only" in text_of(browser)
    shoot(browser, "overview")

    browser.get(url + "/streams?category=order")
    page = text_of(browser)
    assert "o00" in page and "o49" in page and "o50" not in page  # 50 a page
    browser.find_element(By.LINK_TEXT, "next page").click()
    assert "o50" in text_of(browser) and "o59" in text_of(browser)
    shoot(browser, "streams")

    browser.get(url + "/streams?category=order&stream_id=o07")  # search: to the stream
    assert browser.current_url.endswith("/streams/order/o07")
    page = text_of(browser)
    assert "Placed" in page and '"total": 7' in page and '"sku": "cat"' in page
    shoot(browser, "stream")

    store["end_holder"]()  # else the new event would wait for it, beyond the horizon
    browser.get(url + "/log")
    wait_until(lambda: "following after" in text_of(browser), "the log page to follow")
    client.append("order", "live", "Shipped", {"carrier": "cat post"})
    wait_until(lambda: "order / live" in text_of(browser), "the new event to show live")
    assert "cat post" in text_of(browser)
    shoot(browser, "log")

    # A reconnecting browser sends the last event's cursor: it goes on after that one.
    first_two = client.read_events_page(max_count=2)
    request = urllib.request.Request(
        url + "/log/live?after=", headers={"Last-Event-ID": first_two[0].cursor}
    )
    with urllib.request.urlopen(request) as live:
        assert live.readline().decode() == f"id: {first_two[1].cursor}\n"

    browser.get(url + "/log?after=")  # from the beginning: a page, then the rest live
    assert text_of(browser).index("order / o00") < text_of(browser).index("order / o49")
    wait_until(lambda: "invoice / i1" in text_of(browser), "the events after the first page")

    browser.get(url + "/streams/invoice/i1")
    assert '"by": "billing"' in text_of(browser)  # metadata beside the data


def test_the_console_shows_lag_dead_letters_and_the_horizon(
    store: dict[str, Any], serve: Callable[..., str], browser: Any, shoot: Callable[..., None]
) -> None:
    from selenium.webdriver.common.by import By

    url = serve("web", "--sample-every", "0.5")
    browser.get(url + "/subscriptions")
    wait_until(
        lambda: (browser.refresh() or True) and browser.find_elements(By.TAG_NAME, "polyline"),
        "the lag chart",
        timeout=20,
    )
    assert f"{SUB} (59)" in text_of(browser)  # the chart's legend: events behind now
    client: meowmx.Client = store["client"]
    handled = 0
    for _ in range(4):  # a worker catches up, 10 events at a time: the line falls
        batch = client.claim_batch(SUB, "w3", max_count=10)
        handled += len(batch)
        client.ack(SUB, "w3", batch[-1].partition, batch[-1].position)
        seen = len(browser.find_elements(By.TAG_NAME, "circle"))
        wait_until(
            lambda seen=seen: (
                (browser.refresh() or True)
                and len(browser.find_elements(By.TAG_NAME, "circle")) > seen + 1
            ),
            "the console to sample the lag again",
        )
    assert f"{SUB} ({59 - handled})" in text_of(browser)
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert sorted(row.split()[-1] for row in rows) == ["0", "1"]  # parked: one event
    shoot(browser, "subscriptions")

    browser.find_element(By.LINK_TEXT, SUB).click()
    page = text_of(browser)
    assert "Dead letters" in page and "ValueError: no address" in page
    assert browser.find_elements(By.TAG_NAME, "button") == []  # read-only: no requeue
    shoot(browser, "dead-letters")

    browser.get(url + "/horizon")
    assert str(store["holder_pid"]) in text_of(browser)
    shoot(browser, "horizon")

    # A requeue sent anyway is refused, and changes nothing.
    parked = store["parked"].position
    request = urllib.request.Request(
        f"{url}/subscriptions/{SUB}/requeue", data=f"position={parked}".encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 403
    assert [p.position for p in store["client"].list_parked(SUB)] == [parked]


def test_an_admin_console_requeues_a_dead_letter(
    store: dict[str, Any], serve: Callable[..., str], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    url = serve("web", "--admin")
    parked = store["parked"].position
    forged = urllib.request.Request(
        f"{url}/subscriptions/{SUB}/requeue",
        data=f"position={parked}".encode(),
        headers={"Origin": "http://elsewhere.invalid"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged)  # another site's page, through the operator's browser
    assert refused.value.code == 403
    assert [p.position for p in store["client"].list_parked(SUB)] == [parked]
    browser.get(f"{url}/subscriptions/{SUB}")
    browser.find_element(By.TAG_NAME, "button").click()
    wait_until(lambda: "No parked events" in text_of(browser), "the requeue to take effect")
    assert store["client"].list_parked(SUB) == []


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/streams/order/nope", 404, "No stream nope in order"),
        ("/streams/order/o01?from_version=0", 400, "from_version must be a positive integer"),
        ("/log?after=not-a-cursor", 400, "cursor"),
        ("/subscriptions/nope", 404, "no subscription is named &#x27;nope&#x27;"),
        ("/no/such/page", 404, "Not Found"),
    ],
)
def test_bad_input_gets_a_page_that_says_so(
    store: dict[str, Any], serve: Callable[..., str], path: str, status: int, says: str
) -> None:
    url = serve("web")
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(url + path)
    body = failed.value.read().decode()
    assert failed.value.code == status
    assert says in body and "Traceback" not in body and "<nav>" in body


def test_the_grafana_dashboard_uses_only_figures_meowmx_serves(
    store: dict[str, Any], connect: Callable[..., Connection]
) -> None:
    import json
    import re

    client: meowmx.Client = store["client"]
    client.claim_batch(SUB, "w9", max_count=1)  # a lease: every family is present
    connect().execute("ANALYZE meowmx.events")  # the category estimates
    served = {m.metric for m in client.metrics()} | {"meowmx_up"}
    dashboard = json.loads(
        (Path(__file__).parent.parent / "examples/grafana/meowmx.json").read_text()
    )
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmeowmx_\w+", target["expr"])
    }
    assert used and used <= served, used - served
    assert served - used == {"meowmx_events"}  # the dashboard draws the rate instead
