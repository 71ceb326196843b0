"""Pure parts of the operations layer: the latency tracker's matching and clamping, the lease's
claim and freshness rules, the session-lost alarm, the writer's online count."""

from __future__ import annotations

import pytest

from bridge.alerts import INGEST_SESSION_LOST, AlertBook
from bridge.hub import Delivery, Publication
from bridge.telemetry import LatencyTracker, Telemetry
from firstcare.events import make_event
from firstcare.lease import Claim, is_fresh, lease_topic, watch_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pub(room: str = "hospital:h1:alerts", id: str = "e:1") -> Publication:
    return Publication((Delivery(room, id, b"{}", True),))


def count(t: Telemetry, kind: str, stage: str) -> float:
    return t.registry.get_sample_value(f"firstcare_{kind}_latency_seconds_count", {"stage": stage}) or 0.0


def total(t: Telemetry, kind: str, stage: str) -> float:
    return t.registry.get_sample_value(f"firstcare_{kind}_latency_seconds_sum", {"stage": stage}) or 0.0


def alarm(device_ms: int | None = 999_000, received_ms: int = 999_500):
    return make_event("patient.alert.raised", {"patient_id": "p1", "hospital_id": "h1"}, received_ms, device_ms)


def test_memory_hub_dispatch_inside_publish_is_the_current_event() -> None:
    t, clock = Telemetry(), Clock()
    tracker = LatencyTracker(t, synchronous=True, clock=clock, mono=clock)
    marks = tracker.committed(alarm())
    assert total(t, "alarm", "device_to_commit") == pytest.approx(1.0)
    assert total(t, "alarm", "receipt_to_commit") == pytest.approx(0.5)
    clock.now += 0.25
    tracker.publishing(marks)
    tracker.dispatched(pub(), reached=1)
    tracker.published(pub())
    assert total(t, "alarm", "commit_to_delivery") == pytest.approx(0.25)
    assert total(t, "alarm", "device_to_delivery") == pytest.approx(1.25)


def test_no_subscriber_no_delivery_observed() -> None:
    t, clock = Telemetry(), Clock()
    tracker = LatencyTracker(t, synchronous=True, clock=clock, mono=clock)
    tracker.publishing(tracker.committed(alarm()))
    tracker.dispatched(pub(), reached=0)
    tracker.published(pub())
    assert count(t, "alarm", "commit_to_delivery") == 0


@pytest.mark.parametrize("dispatch_first", [False, True])
def test_redis_hub_matches_a_later_or_earlier_dispatch_by_room_and_id(dispatch_first: bool) -> None:
    t, clock = Telemetry(), Clock()
    tracker = LatencyTracker(t, synchronous=False, clock=clock, mono=clock)
    tracker.dispatched(pub(id="other:7"), reached=1)  # another process's event: not ours
    tracker.publishing(tracker.committed(alarm()))
    clock.now += 0.5
    if dispatch_first:
        tracker.dispatched(pub(), reached=2)
        tracker.published(pub())
    else:
        tracker.published(pub())
        tracker.dispatched(pub(), reached=2)
    assert count(t, "alarm", "commit_to_delivery") == 1
    assert total(t, "alarm", "commit_to_delivery") == pytest.approx(0.5)


def test_a_device_clock_ahead_is_clamped_and_counted() -> None:
    t, clock = Telemetry(), Clock()
    tracker = LatencyTracker(t, synchronous=True, clock=clock, mono=clock)
    event = make_event("patient.vitals.update", {}, 999_000, device_ms=1_005_000)  # 5 s in the future
    tracker.committed(event)
    assert total(t, "vitals", "device_to_commit") == 0
    assert t.registry.get_sample_value("firstcare_device_clock_ahead_total", {"kind": "vitals"}) == 1


def test_events_other_than_alarms_and_vitals_are_not_measured() -> None:
    tracker = LatencyTracker(Telemetry(), synchronous=True)
    assert tracker.committed(make_event("device.status.change", {}, 1)) is None


def test_claims_round_trip_and_freshness() -> None:
    claim = Claim("n1", "host", 42, 1_000, 5_000, 2.0, 10.0, None)
    assert Claim.decode(claim.encode()) == claim
    assert Claim.decode(b"") is None and Claim.decode(b"{bad") is None and Claim.decode(b"{}") is None
    assert is_fresh(claim, 5_000 + 9_999) and not is_fresh(claim, 5_000 + 10_000)
    assert watch_seconds(claim) == 5.0
    assert lease_topic("firstcare-bridge") == "firstcare/lease/firstcare-bridge"


def test_session_lost_is_latched_per_hospital_and_counts_repeats() -> None:
    ids = iter(str(i) for i in range(100))
    book = AlertBook([], new_id=lambda: next(ids))
    (raised,) = book.session_lost("h1", "broker x forgot", 10)
    assert (raised.action, raised.alert.rule_id, raised.alert.hospital_id) == ("raised", INGEST_SESSION_LOST, "h1")
    assert raised.alert.kind == "technical" and raised.alert.patient_id is None and not raised.alert.condition_active
    assert "broker x forgot" in raised.alert.message
    (again,) = book.session_lost("h1", "again", 20)
    assert (again.action, again.alert.count) == ("updated", 2)
    (other,) = book.session_lost("h2", "x", 30)
    assert other.action == "raised"
    ack = book.acknowledge(raised.alert.id, "nurse", 40)
    assert [t.action for t in ack] == ["acknowledged", "resolved"]
