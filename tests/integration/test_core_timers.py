"""BridgeCore's timing on a fake clock: heartbeat and silence timeouts, escalation, alarm
delays and hysteresis, the sequence-gap grace period and the reorder window.

A real SQLite store in the test's directory and the core's injectable clock (``clock=``), so
each timer is tested at the millisecond on either side of its deadline, with no sleep and no
MQTT or HTTP in between. The same behaviour through the broker and the server, in real time
with short timers, is in test_bridge_ingest.py, test_alarm_report.py and test_reboot.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.alerts import default_rules
from bridge.core import BridgeCore, CoreSettings
from bridge.records import DeviceRecord
from bridge.store_sqlite import SQLiteStore
from firstcare.events import Event
from firstcare.payloads import Inbound, encode_vitals

T0 = 1_796_000_000_000  # 2026-12-01
S = 1000
SILENT, OFFLINE, ESCALATION, GRACE, REORDER = 60 * S, 180 * S, 120 * S, 30 * S, 30 * S
NORMAL = {"heart_rate": 80.0, "spo2": 97.0, "respiratory_rate": 16.0, "temperature": 37.0, "systolic_bp": 120.0}


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def device_of(core: BridgeCore, device_type: str, device_id: str) -> DeviceRecord:
    device = core.store.device(device_type, device_id)
    assert device is not None, (device_type, device_id)
    return device


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path: Path, clock: Clock) -> Iterator[BridgeCore]:
    store = SQLiteStore(str(tmp_path / "core.db"))
    yield BridgeCore(store, default_rules(), CoreSettings(silent_ms=SILENT, offline_ms=OFFLINE,
                                                          escalation_ms=ESCALATION, seq_gap_grace_ms=GRACE,
                                                          reorder_ms=REORDER), clock=clock)
    store.close()


def vitals(seq: int, ts: int, device: str = "m1", device_type: str = "monitor", patient: str | None = "p1",
           **metrics: float) -> Inbound:
    return Inbound(f"fc/v1/h1/{device_type}/{device}/vitals", encode_vitals(seq, ts, {**NORMAL, **metrics}, patient),
                   ts + 50)


def receive(core: BridgeCore, clock: Clock, *messages: Inbound) -> list[Event]:
    """The batch arrives when its last message was received."""
    clock.now = max(clock.now, max(m.received_ms for m in messages))
    return core.process(list(messages))


def tick_at(core: BridgeCore, clock: Clock, at: int) -> list[Event]:
    clock.now = at
    return core.tick()


def alerts(core: BridgeCore, rule: str | None = None) -> list[dict[str, Any]]:
    items = core.store.alerts(None, None, None, None, 1000, None).items
    return [a for a in items if rule is None or a["rule_id"] == rule]


def only(core: BridgeCore, rule: str) -> dict[str, Any]:
    (alert,) = alerts(core, rule)
    return alert


def alert_events(events: list[Event], *rules: str) -> list[tuple[str, str]]:
    """(event, rule) of the alarm events, of ``rules`` only when given (a test that moves the
    clock by minutes also lets the device's silence and heartbeat timers fire)."""
    return [(e.name, e.data["rule_id"]) for e in events
            if e.name.startswith("patient.alert.") and (not rules or e.data["rule_id"] in rules)]


def device_states(events: list[Event]) -> list[str]:
    return [e.data["state"] for e in events if e.name == "device.status.change"]


# --- heartbeat and silence --------------------------------------------------------------------

def test_a_monitor_goes_silent_at_the_silence_timeout_and_offline_at_the_heartbeat_timeout(
        core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0))
    last_seen = T0 + 50  # the reading's receive time is when the device was last heard
    assert tick_at(core, clock, last_seen + SILENT - 1) == []
    assert device_of(core, "monitor", "m1").silent is False

    events = tick_at(core, clock, last_seen + SILENT)
    assert alert_events(events) == [("patient.alert.raised", "device.silent")]
    assert device_states(events) == [], "silent is not a state change: the device is still online"
    assert device_of(core, "monitor", "m1").silent is True
    assert tick_at(core, clock, last_seen + OFFLINE - 1) == [], "fired once"

    events = tick_at(core, clock, last_seen + OFFLINE)
    assert device_states(events) == ["offline"]
    assert ("patient.alert.raised", "device.offline") in alert_events(events)
    assert device_of(core, "monitor", "m1").state == "offline"
    assert device_states(tick_at(core, clock, last_seen + 10 * OFFLINE)) == [], "offline once"

    events = receive(core, clock, vitals(2, last_seen + 10 * OFFLINE))  # it comes back
    assert device_states(events) == ["online"]
    assert {(a["rule_id"], a["state"]) for a in alerts(core)} == {("device.silent", "resolved"),
                                                                  ("device.offline", "resolved")}


def test_a_reading_before_the_timeout_restarts_it(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0))
    receive(core, clock, vitals(2, T0 + SILENT - 10 * S))
    assert tick_at(core, clock, T0 + 50 + SILENT) == [], "silence counts from the newest reading"
    assert alert_events(tick_at(core, clock, T0 + SILENT - 10 * S + 50 + SILENT)) == [
        ("patient.alert.raised", "device.silent")]


def test_a_spot_check_device_is_never_silent_and_offline_only_after_a_day(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0, device="bp1", device_type="bp", patient="p2"))
    assert device_states(tick_at(core, clock, T0 + 50 + OFFLINE)) == []
    assert device_of(core, "bp", "bp1").silent is False
    assert device_states(tick_at(core, clock, T0 + 50 + 25 * 3600 * S - 1)) == []
    events = tick_at(core, clock, T0 + 50 + 25 * 3600 * S)
    assert device_states(events) == ["offline"]
    assert alert_events(events) == [], "technical alarms are for continuous monitors only"


def test_a_follower_runs_no_timer(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0))
    clock.now = T0 + 10 * OFFLINE
    assert core.tick(lead=False) == []
    assert device_of(core, "monitor", "m1").state == "online"
    assert device_states(core.tick()) == ["offline"], "the leader does"


# --- escalation -----------------------------------------------------------------------------------

def raise_critical(core: BridgeCore, clock: Clock, at: int = T0) -> dict[str, Any]:
    """Severe tachycardia: two readings raise the high-priority alarm."""
    events = receive(core, clock, vitals(1, at, heart_rate=160), vitals(2, at + S, heart_rate=160))
    assert ("patient.alert.raised", "heart_rate.high.critical") in alert_events(events)
    return only(core, "heart_rate.high.critical")


def test_an_unacknowledged_alarm_escalates_once_at_the_escalation_timeout(core: BridgeCore, clock: Clock) -> None:
    raise_critical(core, clock)
    raised_at = clock.now
    critical = "heart_rate.high.critical"
    assert alert_events(tick_at(core, clock, raised_at + ESCALATION - 1), critical) == []
    events = tick_at(core, clock, raised_at + ESCALATION)
    assert alert_events(events, critical) == [("patient.alert.escalated", critical)]
    assert only(core, critical)["state"] == "escalated"
    assert alert_events(tick_at(core, clock, raised_at + 3 * ESCALATION), critical) == [], "escalated once"


def test_an_acknowledged_alarm_does_not_escalate(core: BridgeCore, clock: Clock) -> None:
    alarm = raise_critical(core, clock)
    clock.now += ESCALATION - S
    core.acknowledge(alarm["id"], "dr-h")
    assert alert_events(tick_at(core, clock, clock.now + 2 * ESCALATION), "heart_rate.high.critical") == []
    assert only(core, "heart_rate.high.critical")["state"] == "acknowledged"


def test_medium_alarms_escalate_low_ones_never(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, *[vitals(n, T0 + (n - 1) * 5 * S, heart_rate=130) for n in (1, 2, 3)])
    receive(core, clock, vitals(1, T0, device="t1", device_type="thermometer", patient="p2", temperature=38.6))
    assert (only(core, "heart_rate.high")["priority"], only(core, "temperature.high")["priority"]) == ("medium", "low")
    events = tick_at(core, clock, clock.now + 10 * ESCALATION)
    assert alert_events(events, "heart_rate.high", "temperature.high") == [
        ("patient.alert.escalated", "heart_rate.high")]
    assert only(core, "temperature.high")["state"] == "raised"


# --- alarm delays and hysteresis (on the readings' own time, whatever the clock says) -------------

def test_a_medium_alarm_waits_for_three_readings_spanning_ten_seconds(core: BridgeCore, clock: Clock) -> None:
    rule = next(r for r in core.rules if r.id == "heart_rate.high")
    assert (rule.delay_readings, rule.delay_seconds) == (3, 10)
    receive(core, clock, *[vitals(n, T0 + (n - 1) * 2 * S, heart_rate=130) for n in (1, 2, 3, 4, 5)])
    assert alerts(core, "heart_rate.high") == [], "five readings over 8 s: not yet"
    events = receive(core, clock, vitals(6, T0 + 10 * S, heart_rate=130))
    assert alert_events(events) == [("patient.alert.raised", "heart_rate.high")]


def test_one_normal_reading_restarts_the_delay(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0, heart_rate=130), vitals(2, T0 + 5 * S, heart_rate=130),
            vitals(3, T0 + 6 * S, heart_rate=80), vitals(4, T0 + 10 * S, heart_rate=130))
    assert alerts(core, "heart_rate.high") == []
    receive(core, clock, vitals(5, T0 + 15 * S, heart_rate=130))
    assert alerts(core, "heart_rate.high") == [], "two abnormal since the normal one"
    receive(core, clock, vitals(6, T0 + 20 * S, heart_rate=130))
    assert only(core, "heart_rate.high")["state"] == "raised"


def test_hysteresis_holds_a_medium_alarm_in_the_band_and_clears_it_at_the_clear_point(
        core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, *[vitals(n, T0 + (n - 1) * 5 * S, heart_rate=130) for n in (1, 2, 3)])
    receive(core, clock, vitals(4, T0 + 15 * S, heart_rate=118), vitals(5, T0 + 20 * S, heart_rate=116))
    assert only(core, "heart_rate.high")["state"] == "raised", "116-120 is the band: no flapping"
    events = receive(core, clock, vitals(6, T0 + 25 * S, heart_rate=115))
    assert alert_events(events) == [("patient.alert.resolved", "heart_rate.high")]


def test_a_high_alarm_latches_until_acknowledged(core: BridgeCore, clock: Clock) -> None:
    alarm = raise_critical(core, clock)
    receive(core, clock, vitals(3, T0 + 2 * S, heart_rate=80), vitals(4, T0 + 3 * S, heart_rate=80))
    latched = only(core, "heart_rate.high.critical")
    assert (latched["state"], latched["condition_active"]) == ("raised", False)
    clock.now += 5 * S
    _, events = core.acknowledge(alarm["id"], "dr-h")
    assert [e.name for e in events] == ["patient.alert.acknowledged", "patient.alert.resolved"]


# --- sequence gaps: provisional for the grace period --------------------------------------------

def test_a_gap_filled_within_the_grace_period_raises_nothing(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0), vitals(2, T0 + S), vitals(4, T0 + 3 * S))
    assert core.counters["seq_gaps_provisional"] == 1
    seen_at = clock.now
    assert alert_events(tick_at(core, clock, seen_at + GRACE - 1), "device.seq_gap") == []
    receive(core, clock, vitals(3, T0 + 2 * S))  # late, but within the grace period
    assert core.counters["seq_gaps_filled"] == 1
    assert alert_events(tick_at(core, clock, seen_at + 10 * GRACE), "device.seq_gap") == []
    assert alerts(core, "device.seq_gap") == []


def test_a_gap_still_open_after_the_grace_period_raises_once_with_what_is_missing(
        core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(1, T0), vitals(5, T0 + 4 * S))  # 2, 3 and 4 missing
    seen_at = clock.now
    assert alert_events(tick_at(core, clock, seen_at + GRACE - 1), "device.seq_gap") == []
    events = tick_at(core, clock, seen_at + GRACE)
    assert alert_events(events, "device.seq_gap") == [("patient.alert.raised", "device.seq_gap")]
    gap = only(core, "device.seq_gap")
    assert (gap["count"], gap["subject"]) == (3, "device:monitor:m1")
    assert core.counters["seq_gaps"] == 1
    assert alert_events(tick_at(core, clock, seen_at + 5 * GRACE), "device.seq_gap") == [], "confirmed once"


# --- the reorder window --------------------------------------------------------------------------

def test_a_late_reading_within_the_window_may_raise_but_never_clears(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(10, T0 + 60 * S, spo2=80), vitals(11, T0 + 61 * S, spo2=80))
    assert only(core, "spo2.low.critical")["state"] == "raised"
    receive(core, clock, vitals(9, T0 + 59 * S, spo2=98))  # older than the newest, normal
    assert core.counters["readings_late"] == 1
    assert only(core, "spo2.low.critical")["condition_active"] is True, "a late normal value clears nothing"


def test_a_reading_older_than_the_window_is_stored_but_not_evaluated(core: BridgeCore, clock: Clock) -> None:
    receive(core, clock, vitals(10, T0 + 60 * S))
    receive(core, clock, vitals(1, T0 + 60 * S - REORDER - 1, heart_rate=170),
            vitals(2, T0 + 60 * S - REORDER, heart_rate=170))
    assert core.counters["readings_late_unevaluated"] == 1 and core.counters["readings_late"] == 1
    assert core.counters["readings_stored"] == 3
    assert alerts(core, "heart_rate.high.critical") == [], "one evaluated reading is not two"
