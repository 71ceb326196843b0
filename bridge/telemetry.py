"""Prometheus metrics (``/metrics``) and the latency of the alarm and vitals paths.

One :class:`prometheus_client.CollectorRegistry` per app (tests create many apps in one
process). Two kinds of metric live in it:

* **Collected at scrape time** from the owners' snapshots (:class:`StatsCollector`): the
  writer's :class:`bridge.core.CoreSnapshot`, the MQTT consumer's counters, the hub's and the
  realtime layer's figures. Declared names, HELP and TYPE text; labels only from closed sets
  (dead-letter reasons, alert actions, close codes, transports, states, checks), never a
  patient, user, device or room id: ``/metrics`` is unauthenticated.
* **Observed as it happens**: the latency histograms below, fed by :class:`LatencyTracker`.

Latency, per event kind (``alarm``: every ``patient.alert.*`` event, ``vitals``: every
reading event), in seconds, with a ``stage`` label::

    device time --------------------> commit -------------> first delivery to a local subscriber
      |<------- device_to_commit ------->|<- commit_to_delivery ->|
      |<------------------------ device_to_delivery -------------------->|
                 bridge receipt -> commit: receipt_to_commit (bridge clock only)

The objective (README, Operations) is ``device_to_delivery`` p99 under 1 s. Device clocks can be
wrong: a device time later than the bridge's receipt (clock ahead) is observed as 0 and
counted in ``firstcare_device_clock_ahead_total``; a clock behind looks like latency and cannot
be told from a real backlog (a bridge catching up after an outage), which is why the
``receipt_to_commit`` and ``commit_to_delivery`` stages, on the bridge's clock alone, are there
too. Events without a device time (timers, acknowledgements) have only the bridge stages.

Threads: histograms and counters of prometheus_client are thread-safe. The tracker runs on the
event loop only (the fan-out task and the hub's dispatch).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from firstcare.events import Event
from firstcare.mqtt import LinkState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STAGES = ("device_to_commit", "receipt_to_commit", "commit_to_delivery", "device_to_delivery")
PENDING_MAX = 10_000
LABEL_WORD = re.compile(r"[a-z][a-z0-9_]{0,47}")
MQTT_STATES = tuple(LinkState)


def event_kind(event: Event) -> str | None:
    if event.name.startswith("patient.alert."):
        return "alarm"
    if event.name in ("patient.vitals.update", "device.data.update"):
        return "vitals"
    return None


@dataclass(frozen=True, slots=True)
class Marks:
    """When an event was committed (wall and monotonic clock), and its device time."""

    kind: str
    device_ms: int | None
    committed_mono: float


class Telemetry:
    """The app's registry and the metrics observed as they happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.alarm_latency = Histogram(
            "firstcare_alarm_latency_seconds",
            "Alarm path latency: device time of the reading -> alarm committed -> first delivery to a subscriber",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.vitals_latency = Histogram(
            "firstcare_vitals_latency_seconds",
            "Vitals path latency: device time of the reading -> committed -> first delivery to a subscriber",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.clock_ahead = Counter(
            "firstcare_device_clock_ahead",
            "Events whose device time was later than the bridge's receipt (device clock ahead; latency observed as 0)",
            ["kind"], registry=self.registry)
        for stage in STAGES:  # every series exists from the start, so rates never see a gap
            self.alarm_latency.labels(stage)
            self.vitals_latency.labels(stage)
        for kind in ("alarm", "vitals"):
            self.clock_ahead.labels(kind)

    def histogram(self, kind: str) -> Histogram:
        return self.alarm_latency if kind == "alarm" else self.vitals_latency


class LatencyTracker:
    """Matches committed events to their first local delivery and observes the histograms.

    ``committed(event)`` right after the commit (returns the marks to carry with the event);
    ``publishing(marks)`` just before the hub publishes it; ``dispatched(publication, reached)``
    from the hub's dispatch; ``published(publication)`` when the hub's publish returns. The
    memory hub dispatches inside ``publish`` (so the current marks apply); the Redis hub
    dispatches later, from its listener, so marks wait in a bounded table keyed by the
    publication's first (room, id). A publication this process did not commit (another
    process's, over Redis) is not observed here.
    """

    def __init__(self, telemetry: Telemetry, synchronous: bool, clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.t = telemetry
        self.synchronous = synchronous
        self._clock, self._mono = clock, mono
        self._current: Marks | None = None
        self._pending: OrderedDict[tuple[str, str], Marks] = OrderedDict()
        self._early: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self._children: dict[tuple[str, str], Any] = {}

    def committed(self, event: Event) -> Marks | None:
        kind = event_kind(event)
        if kind is None:
            return None
        now_s, mono = self._clock(), self._mono()
        self._stage(kind, "receipt_to_commit").observe(max(0.0, now_s - event.ts_ms / 1000))
        device_ms = event.device_ms
        if device_ms is not None:
            if device_ms > event.ts_ms:
                self.t.clock_ahead.labels(kind).inc()
            self._stage(kind, "device_to_commit").observe(max(0.0, now_s - device_ms / 1000))
        return Marks(kind, device_ms, mono)

    def _stage(self, kind: str, stage: str) -> Any:
        """The histogram child of (kind, stage), looked up once: ``labels()`` takes a lock and
        validates its arguments on every call, and every committed event observes two."""
        child = self._children.get((kind, stage))
        if child is None:
            child = self._children[(kind, stage)] = self.t.histogram(kind).labels(stage)
        return child

    def publishing(self, marks: Marks | None) -> None:
        self._current = marks

    def dispatched(self, publication: Any, reached: int) -> None:
        key = _key(publication)
        if self.synchronous:
            marks, self._current = self._current, None
            if marks is not None and reached:
                self._observe(marks, self._clock(), self._mono())
            return
        if key is None:
            return
        marks = self._pending.pop(key, None)
        if marks is not None:
            if reached:
                self._observe(marks, self._clock(), self._mono())
        elif reached:
            _bounded_put(self._early, key, (self._clock(), self._mono()))

    def published(self, publication: Any) -> None:
        marks, self._current = self._current, None
        key = _key(publication)
        if marks is None or key is None or self.synchronous:
            return
        early = self._early.pop(key, None)
        if early is not None:
            self._observe(marks, *early)
        else:
            _bounded_put(self._pending, key, marks)

    def _observe(self, marks: Marks, now_s: float, mono: float) -> None:
        self._stage(marks.kind, "commit_to_delivery").observe(max(0.0, mono - marks.committed_mono))
        if marks.device_ms is not None:
            self._stage(marks.kind, "device_to_delivery").observe(max(0.0, now_s - marks.device_ms / 1000))


def _key(publication: Any) -> tuple[str, str] | None:
    deliveries = publication.deliveries
    return (deliveries[0].room, deliveries[0].id) if deliveries else None


def _bounded_put(table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    table[key] = value
    while len(table) > PENDING_MAX:
        table.popitem(last=False)


# --- scrape-time figures -------------------------------------------------------------------


def _word(value: object) -> str | None:
    text = str(value)
    return text if LABEL_WORD.fullmatch(text) else None


class StatsCollector(Collector):
    """Builds the figures from ``source()``: the same snapshot-based dictionary as
    ``/realtime/stats`` plus readiness. Every family is declared here, with its help text."""

    def __init__(self, source: Callable[[], Mapping[str, Any]]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # names are fixed below; no describe-time collection of live state

    def collect(self) -> Iterator[Metric]:
        s = self._source()
        ingest, hub, rt, ready = s["ingest"], s["hub"], s["realtime"], s["readiness"]

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"firstcare_{name}", help, value=value)

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"firstcare_{name}", help, value=value)

        def labelled(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, Any],
                     allowed: Any = None) -> CounterMetricFamily | GaugeMetricFamily:
            for key, value in sorted(values.items()):
                label = _word(key) if allowed is None else (str(key) if key in allowed else None)
                if label is not None and isinstance(value, (int, float)):
                    family.add_metric([label], value)
            return family

        g = ingest.get
        yield counter("ingest_messages", "MQTT messages processed by the writer", g("messages", 0))
        yield counter("readings_stored", "Readings stored (new)", g("readings_stored", 0))
        yield counter("readings_duplicate", "Readings already stored with the same identity and content: redeliveries",
                      g("duplicates", 0))
        yield counter("readings_seq_conflict", "Readings whose identity is stored with other content (dead-lettered)",
                      g("seq_conflicts", 0))
        yield counter("device_reboots", "New device boots begun, announced or implicit", g("reboots", 0))
        yield counter("ingest_internal_errors", "Messages our own code failed on, dead-lettered internal_error",
                      g("internal_errors", 0))
        yield counter("ingest_quarantined", "Messages isolated from a failing batch by splitting it",
                      g("quarantined", 0))
        yield counter("ingest_batch_splits", "Times a failing batch was split to isolate one message",
                      g("batch_splits", 0))
        yield counter("status_messages", "Device status messages processed", g("status_messages", 0))
        yield counter("seq_gaps", "Forward jumps in a device's seq (readings missing)", g("seq_gaps", 0))
        yield labelled(CounterMetricFamily("firstcare_dead_letters", "Messages or readings refused, by reason",
                                           labels=["reason"]), ingest.get("dead_letter_reasons", {}))
        from bridge.alerts import ACTIONS

        yield labelled(CounterMetricFamily("firstcare_alert_transitions", "Alarm transitions stored, by action",
                                           labels=["action"]),
                       {a: g(f"alerts_{a}", 0) for a in ACTIONS}, ACTIONS)
        yield gauge("devices", "Devices known", g("devices", 0))
        yield gauge("devices_online", "Devices online", g("devices_online", 0))
        yield gauge("alerts_active", "Alarms not resolved", g("alerts_active", 0))
        yield gauge("ingest_lag_seconds", "Receipt to commit of the oldest message of the latest batch",
                    g("ingest_lag_ms", 0) / 1000)
        yield counter("mqtt_received", "MQTT messages received", g("received", 0))
        yield counter("mqtt_acked", "MQTT messages acknowledged to the broker after their commit", g("acked", 0))
        yield counter("mqtt_stale_acks", "Acknowledgements dropped because the connection had changed",
                      g("stale_acks", 0))
        yield counter("mqtt_connects", "MQTT connections established", g("connects", 0))
        yield counter("mqtt_disconnects", "MQTT connections lost or closed", g("disconnects", 0))
        yield counter("mqtt_sessions_lost", "Reconnects where the broker had lost the bridge's session",
                      g("sessions_lost", 0))
        yield counter("mqtt_session_taken_over", "Disconnects because another client took the session (MQTT 5)",
                      g("taken_over", 0))
        yield counter("mqtt_lease_rivals", "Claims of this client id by another process seen while holding it",
                      g("lease_rivals", 0))
        yield labelled(GaugeMetricFamily("firstcare_mqtt_state", "1 for the MQTT consumer's current state",
                                         labels=["state"]),
                       {st: int(g("mqtt_state") == st) for st in MQTT_STATES}, MQTT_STATES)
        yield counter("ingest_queue_full_waits", "Times the MQTT thread waited for room in the ingest queue",
                      g("queue_full_waits", 0))
        yield counter("store_retries", "Batches retried because the store failed", g("store_retries", 0))
        yield gauge("ingest_queue_depth", "Messages waiting for the writer", g("queue_depth", 0))
        yield gauge("ingest_queue_size", "Bound of the ingest queue", g("queue_size", 0))
        slots = s.get("cluster", {}).get("slots") or {}
        yield gauge("ingest_slots_held", "Ingest slots this bridge consumes (0 without slots)",
                    len(slots.get("held", ())))
        yield gauge("ingest_slots_total", "Ingest slots of the cluster (0: one session, no slots)",
                    slots.get("total", 0))
        yield gauge("ingest_slots_locked", "Ingest slots some bridge of the cluster holds", slots.get("locked", 0))
        yield gauge("cluster_members", "Live bridges the database shows (with ingest slots)", slots.get("members", 0))
        yield counter("ingest_slots_claimed", "Ingest slots this bridge took", slots.get("slots_claimed", 0))
        yield counter("ingest_slots_released", "Ingest slots this bridge handed over (drained first)",
                      slots.get("slots_released", 0))
        yield counter("ingest_slots_lost", "Ingest slots dropped at once because the database session was lost",
                      slots.get("slots_lost", 0))
        yield gauge("ready", "1 when /readyz answers 200", int(bool(ready.get("ready"))))
        yield labelled(GaugeMetricFamily("firstcare_readiness_check", "1 when the readiness check passes",
                                         labels=["check"]),
                       {c: int(v in ("ok", "connected")) for c, v in ready.get("checks", {}).items()},
                       ("mqtt", "store", "hub"))
        yield counter("timer_errors", "Timer ticks (heartbeats, escalation) that failed", s.get("timer_errors", 0))

        yield counter("hub_published", "Events published to the hub", hub.get("published", 0))
        yield counter("hub_delivered", "Deliveries queued to local subscribers", hub.get("delivered", 0))
        yield counter("hub_dropped", "Vitals deliveries dropped (subscriber queue full)", hub.get("dropped", 0))
        yield counter("hub_coalesced", "Vitals deliveries that replaced a queued older one", hub.get("coalesced", 0))
        yield counter("hub_overflowed", "Alerts that did not fit a subscriber queue (connection closed)",
                      hub.get("overflowed", 0))
        yield counter("hub_publish_failures", "Publishes the hub backend refused", hub.get("publish_failures", 0))
        yield counter("hub_outbox_dropped", "Events that did not fit the fan-out outbox (rooms resync)",
                      hub.get("outbox_dropped", 0))
        yield counter("hub_resyncs", "Rooms told to resync because the hub could not record their events",
                      hub.get("resyncs_sent", 0))
        yield counter("hub_epochs_reset", "Rooms started over in a new epoch after missed publications (Redis)",
                      hub.get("backend_epochs_reset", 0))
        yield counter("hub_alerts_caught_up", "Alarm transitions re-published from the database after the hub"
                      " could not take them", hub.get("alerts_caught_up", 0))
        yield counter("hub_alerts_already_published", "Alarm transitions not published again: another bridge (or"
                      " this one's catch-up) had published them (Redis)",
                      hub.get("backend_alerts_already_published", 0))
        yield gauge("hub_alerts_catch_up_pending", "1 while alarm transitions wait to be re-published",
                    int(bool(hub.get("alerts_catch_up_pending"))))
        yield gauge("hub_outbox_depth", "Committed events waiting for the fan-out", hub.get("outbox_depth", 0))
        yield gauge("hub_rooms", "Rooms with a local subscriber", hub.get("rooms", 0))
        yield gauge("hub_subscribers", "Local subscribers", hub.get("subscribers", 0))
        yield gauge("hub_backend_up", "1 when the hub backend is reachable", int(hub.get("backend_state") == "ok"))

        yield labelled(GaugeMetricFamily("firstcare_realtime_connections", "Open streams, by transport",
                                         labels=["transport"]),
                       {"ws": rt.get("connections_ws", 0), "sse": rt.get("connections_sse", 0)}, ("ws", "sse"))
        yield gauge("realtime_users", "Distinct token subjects with an open stream", rt.get("users", 0))
        yield labelled(CounterMetricFamily("firstcare_realtime_connections_opened", "Streams opened, by transport",
                                           labels=["transport"]), rt.get("connections_opened", {}), ("ws", "sse"))
        from bridge.realtime import CLOSE_CODES

        yield labelled(CounterMetricFamily("firstcare_realtime_refused", "Streams refused before streaming, by code",
                                           labels=["code"]), rt.get("refused", {}), CLOSE_CODES)
        yield labelled(CounterMetricFamily("firstcare_realtime_forced_disconnects", "Streams closed by the server,"
                                           " by code", labels=["code"]), rt.get("forced_disconnects", {}), CLOSE_CODES)
        for key, help in (("replay_served", "Replays answered from history"),
                          ("replay_events", "Events sent by replays"),
                          ("replay_resync", "Replays answered with resync"),
                          ("subscribe_refused", "Subscriptions refused"),
                          ("rate_limited", "Client messages refused by the rate limit"),
                          ("sent", "Events sent to clients"),
                          ("live_resync", "Resync messages sent to joined rooms (a gap in the room's history)"),
                          ("rooms_revoked", "Rooms taken from a stream because a refreshed token no longer allows"
                                            " them"),
                          ("presence_announced", "Presence announcements sent to rooms"),
                          ("presence_suppressed", "Presence announcements left out by the per-room bound")):
            yield counter(f"realtime_{key}", help, rt.get(key, 0))
