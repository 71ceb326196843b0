"""The gateway's ``/metrics`` (Prometheus text format): one registry per app, collected at scrape
time from :meth:`edge.gateway.Gateway.stats`. Labels only from closed sets (discard and
quarantine reasons): ``/metrics`` is unauthenticated and carries no device, patient or topic."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.spool import QUARANTINE_REASONS

UPSTREAM_COUNTERS = ("published", "acked", "connects", "disconnects", "republished", "split", "refusals", "drops")
WARD_COUNTERS = ("received", "acked", "store_retries", "poison_isolated")


class EdgeCollector(Collector):
    def __init__(self, source: Callable[[], Mapping[str, Any]]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        s = self._source()
        spool, upstream, ward, quarantine = s["spool"], s["upstream"], s["ward"], s["quarantine"]

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"firstcare_edge_{name}", help, value=value)

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"firstcare_edge_{name}", help, value=value)

        yield gauge("spool_depth", "Messages in the spool waiting for the upstream", spool["depth"])
        yield gauge("spool_bytes", "Payload bytes in the spool", spool["bytes"])
        yield gauge("spool_max_bytes", "The spool's bound (0: none)", spool["max_bytes"])
        yield gauge("spool_oldest_age_seconds", "Age of the oldest spooled message", spool["oldest_age_s"])
        discarded = CounterMetricFamily("firstcare_edge_spool_discarded_total",
                                        "Vitals the spool's bounds discarded", labels=["reason"])
        discarded.add_metric(["full"], spool.get("discarded_full", 0))
        discarded.add_metric(["too_old"], spool.get("discarded_too_old", 0))
        yield discarded
        yield counter("accepted_total", "Messages committed to the spool", spool.get("accepted", 0))
        yield counter("forwarded_total", "Spooled messages the upstream acknowledged", spool.get("forwarded", 0))
        yield counter("dead_letters_total", "Device messages refused at the gateway", spool.get("dead_letters", 0))
        yield gauge("quarantine_depth", "Messages held in the quarantine", quarantine["depth"])
        yield gauge("quarantine_oldest_age_seconds", "Age of the oldest quarantined message",
                    quarantine["oldest_age_s"])
        quarantined = CounterMetricFamily("firstcare_edge_quarantined_total",
                                          "Messages moved to the quarantine, by reason", labels=["reason"])
        for reason in QUARANTINE_REASONS:
            quarantined.add_metric([reason], quarantine["by_reason_total"].get(reason, 0))
        yield quarantined
        yield gauge("upstream_connected", "1 while the upstream connection is up", upstream["state"] == "connected")
        yield gauge("upstream_inflight", "Publishes waiting for the upstream's PUBACK", upstream["inflight"])
        for name in UPSTREAM_COUNTERS:
            yield counter(f"upstream_{name}_total", f"Upstream {name.replace('_', ' ')}", upstream.get(name, 0))
        yield gauge("ward_up", "1 while the ward side accepts device messages",
                    ward["state"] in ("listening", "connected"))
        for name in WARD_COUNTERS:
            yield counter(f"ward_{name}_total", f"Ward {name.replace('_', ' ')}", ward.get(name, 0))


def registry_for(source: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(source))
    return registry
