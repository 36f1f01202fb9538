"""meowmx's figures for monitoring, in the Prometheus text format (`meowmx[metrics]`).

Every scrape is one call of meowmx.metrics(), which says each family's kind and help
itself, so this module only regroups its rows. To serve them from an application of
your own, register a collector on your registry:

    prometheus_client.REGISTRY.register(meowmx.metrics.Collector(dsn))

`meowmx metrics --port P` serves them by itself (see serve).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as _Collector

from meowmx.client import Client
from meowmx.connection import Target
from meowmx.errors import MeowmxError, describe

log = logging.getLogger("meowmx.metrics")


class Collector(_Collector):
    """Collects meowmx.metrics() at each scrape, on `target` (a DSN, connection or pool,
    or a Client). `meowmx_up` says whether the scrape reached the database: a failed
    one is logged and gives `meowmx_up 0` alone, not an error page."""

    def __init__(self, target: Target | Client):
        self.client = target if isinstance(target, Client) else Client(target)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("meowmx_up", "Whether the last scrape reached the database.")
        try:
            samples = self.client.metrics()
        except (psycopg.Error, MeowmxError) as error:
            log.warning("meowmx metrics: %s", describe(error))
            up.add_metric([], 0)
            yield up
            return
        families: dict[str, Any] = {}
        for sample in samples:
            names = sorted(sample.labels)
            family = families.get(sample.metric)
            if family is None:
                if sample.kind == "counter":  # prometheus_client adds the _total itself
                    name = sample.metric.removesuffix("_total")
                    family = CounterMetricFamily(name, sample.help, labels=names)
                else:
                    family = GaugeMetricFamily(sample.metric, sample.help, labels=names)
                families[sample.metric] = family
            family.add_metric([sample.labels[name] for name in names], sample.value)
        up.add_metric([], 1)
        yield up
        yield from families.values()


def registry(target: Target | Client) -> CollectorRegistry:
    """A registry holding just meowmx's figures (no process or Python ones)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(Collector(target))
    return found


def serve(target: Target | Client, port: int, address: str = "127.0.0.1") -> Any:
    """Serve meowmx's figures at http://address:port/metrics from a thread; returns the
    server (call its shutdown() to stop)."""
    server, _thread = start_http_server(port, addr=address, registry=registry(target))
    return server
