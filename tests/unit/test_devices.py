"""Device status rules (bridge/devices.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.devices import (
    SPOT_CHECK_OFFLINE_MS,
    is_continuous,
    new_device,
    offline_after_ms,
    on_binding,
    on_reading,
    on_status,
    sweep,
)
from bridge.records import DeviceRecord, DeviceState, SeqGap
from firstcare.payloads import Reading, StatusReport

T0 = 1_795_688_130_120
SILENT_MS = 60_000
OFFLINE_MS = 180_000
HOUR_MS = 3_600_000


def reading(seq: int, received_ms: int = T0, device_type: str = "monitor", device_id: str = "m1") -> Reading:
    return Reading("h1", device_type, device_id, seq, received_ms - 100, received_ms, "p1", {"heart_rate": 70.0})


def status(state: str, received_ms: int = T0, battery: int | None = None, firmware: str | None = None,
           device_type: str = "monitor") -> StatusReport:
    return StatusReport("h1", device_type, "m1", state, battery, firmware, received_ms, received_ms)


def online(device_type: str = "monitor", at: int = T0, **changes) -> DeviceRecord:
    base = DeviceRecord(device_type, "m1", "h1", state=DeviceState.ONLINE, last_seen_ms=at, last_data_ms=at,
                        last_seq=10)
    return replace(base, **changes)


# ------------------------------------------------------------------------------- on_reading


@pytest.mark.parametrize(
    ("last_seq", "seq", "gap", "last_after"),
    [
        (None, 0, None, 0),
        (None, 500, None, 500),  # first reading ever: nothing to compare with
        (5, 6, None, 6),
        (5, 7, (6, 6), 7),
        (5, 9, (6, 8), 9),
        (0, 1000, (1, 999), 1000),
        (9, 7, None, 9),  # late, older reading fills a hole: no gap, last_seq not lowered
        (9, 0, None, 9),
        (9, 9, None, 9),
    ],
)
def test_on_reading_gaps_and_last_seq(last_seq, seq, gap, last_after) -> None:
    device = replace(new_device("monitor", "m1", "h1"), last_seq=last_seq)
    updated, found = on_reading(device, reading(seq, T0 + 5))
    expected_gap = None if gap is None else SeqGap("monitor", "m1", gap[0], gap[1], T0 + 5)
    assert found == expected_gap
    assert updated.last_seq == last_after


@pytest.mark.parametrize(
    "before",
    [
        new_device("monitor", "m1", None),
        DeviceRecord("monitor", "m1", "h0", state=DeviceState.OFFLINE, last_seen_ms=T0 - HOUR_MS,
                     last_data_ms=T0 - HOUR_MS),
        DeviceRecord("monitor", "m1", "h1", state=DeviceState.ONLINE, silent=True, last_seen_ms=T0 - HOUR_MS),
    ],
    ids=["new", "offline", "silent"],
)
def test_on_reading_sets_online(before: DeviceRecord) -> None:
    updated, _ = on_reading(before, reading(1, T0))
    assert (updated.state, updated.silent, updated.hospital_id) == ("online", False, "h1")
    assert (updated.last_seen_ms, updated.last_data_ms) == (T0, T0)


def test_on_reading_never_moves_clocks_backwards() -> None:
    device = online(at=T0)
    updated, _ = on_reading(device, reading(11, T0 - 5000))
    assert (updated.last_seen_ms, updated.last_data_ms) == (T0, T0)


# ------------------------------------------------------------------------------- on_status


@pytest.mark.parametrize(
    ("before", "report", "expected"),
    [
        (new_device("monitor", "m1", None), status("online", T0, 87, "1.4.2"),
         {"state": "online", "battery": 87, "firmware": "1.4.2", "last_seen_ms": T0, "hospital_id": "h1"}),
        (online(at=T0 - 1000, battery=50, firmware="1.0"), status("offline", T0),
         {"state": "offline", "silent": False, "battery": 50, "firmware": "1.0", "last_seen_ms": T0,
          "last_data_ms": T0 - 1000}),
        (online(at=T0 - 1000, silent=True), status("offline", T0),
         {"state": "offline", "silent": False}),
        (online(at=T0 - 1000, battery=50), status("online", T0, battery=12),
         {"state": "online", "battery": 12, "last_seen_ms": T0}),
        (online(at=T0 - 1000, firmware="1.0"), status("online", T0, firmware="1.1"),
         {"firmware": "1.1"}),
        (DeviceRecord("monitor", "m1", "h1", state=DeviceState.OFFLINE, last_seen_ms=T0 - HOUR_MS,
                      last_data_ms=T0 - HOUR_MS), status("online", T0),
         # came back online: its silence clock restarts
         {"state": "online", "last_seen_ms": T0, "last_data_ms": T0}),
    ],
    ids=["first-online", "offline-keeps-battery", "offline-clears-silent", "battery", "firmware", "back-online"],
)
def test_on_status(before: DeviceRecord, report: StatusReport, expected: dict) -> None:
    updated = on_status(before, report)
    assert {k: getattr(updated, k) for k in expected} == expected


def test_periodic_online_status_does_not_hide_a_silent_monitor() -> None:
    """A monitor that keeps publishing battery status (state "online") but has stopped sending
    data must still go silent: DESIGN.md defines silence as "no data for its timeout"."""
    device = online("monitor", at=T0)  # last data at T0
    device = on_status(device, status("online", T0 + 50_000, battery=80))  # heartbeat, no data
    swept = sweep(device, T0 + SILENT_MS + 1, SILENT_MS, OFFLINE_MS)
    assert swept is not None and swept.silent is True


def test_on_binding() -> None:
    device = online()
    assert on_binding(device, "p9", "h2").patient_id == "p9"
    assert on_binding(device, "p9", None).hospital_id == "h1"
    assert on_binding(device, None, None).patient_id is None


# ------------------------------------------------------------------------------- sweep


@pytest.mark.parametrize("device_type", ["monitor", "oximeter"])
@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (0, None),
        (SILENT_MS - 1, None),
        (SILENT_MS, ("online", True)),
        (OFFLINE_MS - 1, ("online", True)),
        (OFFLINE_MS, ("offline", False)),
        (10 * OFFLINE_MS, ("offline", False)),
    ],
)
def test_sweep_continuous_device(device_type: str, elapsed: int, expected) -> None:
    assert is_continuous(device_type)
    swept = sweep(online(device_type), T0 + elapsed, SILENT_MS, OFFLINE_MS)
    assert (None if swept is None else (swept.state, swept.silent)) == expected


def test_sweep_continuous_silent_then_offline_sequence() -> None:
    silent = sweep(online("oximeter"), T0 + SILENT_MS, SILENT_MS, OFFLINE_MS)
    assert silent is not None and (silent.state, silent.silent) == ("online", True)
    assert sweep(silent, T0 + SILENT_MS + 1000, SILENT_MS, OFFLINE_MS) is None  # already silent
    offline = sweep(silent, T0 + OFFLINE_MS, SILENT_MS, OFFLINE_MS)
    assert offline is not None and (offline.state, offline.silent) == ("offline", False)
    assert sweep(offline, T0 + 10 * OFFLINE_MS, SILENT_MS, OFFLINE_MS) is None  # already offline


@pytest.mark.parametrize("device_type", ["bp", "thermometer", "glucometer", "scale"])
@pytest.mark.parametrize(
    ("elapsed", "offline_ms", "expected_state"),
    [
        (SILENT_MS, OFFLINE_MS, None),
        (OFFLINE_MS, OFFLINE_MS, None),
        (24 * HOUR_MS, OFFLINE_MS, None),
        (25 * HOUR_MS - 1, OFFLINE_MS, None),
        (25 * HOUR_MS, OFFLINE_MS, "offline"),
        (48 * HOUR_MS, OFFLINE_MS, "offline"),
        (29 * HOUR_MS, 30 * HOUR_MS, None),  # a longer configured timeout still applies
        (30 * HOUR_MS, 30 * HOUR_MS, "offline"),
    ],
)
def test_sweep_spot_check_device(device_type: str, elapsed: int, offline_ms: int, expected_state) -> None:
    assert not is_continuous(device_type)
    assert offline_after_ms(device_type, offline_ms) == max(offline_ms, SPOT_CHECK_OFFLINE_MS)
    swept = sweep(online(device_type), T0 + elapsed, SILENT_MS, offline_ms)
    assert (None if swept is None else swept.state) == expected_state
    if swept is not None:
        assert swept.silent is False


@pytest.mark.parametrize(
    "device",
    [
        DeviceRecord("monitor", "m1", "h1", state=DeviceState.OFFLINE, last_seen_ms=T0, last_data_ms=T0),
        DeviceRecord("monitor", "m1", "h1", state=DeviceState.UNKNOWN),
        DeviceRecord("monitor", "m1", "h1", state=DeviceState.ONLINE, last_seen_ms=None),
        DeviceRecord("scale", "m1", "h1", state=DeviceState.OFFLINE, last_seen_ms=T0),
    ],
    ids=["offline", "unknown", "never-seen", "offline-scale"],
)
def test_sweep_leaves_non_online_devices_alone(device: DeviceRecord) -> None:
    assert sweep(device, T0 + 100 * HOUR_MS, SILENT_MS, OFFLINE_MS) is None


def test_a_reading_older_than_the_offline_status_does_not_bring_the_device_back() -> None:
    offline = on_status(online(), status("offline", received_ms=T0 + 10_000))
    backlog = Reading("h1", "monitor", "m1", 5, T0 + 5_000, T0 + 20_000, "p1", {"heart_rate": 70.0})
    old, _ = on_reading(offline, backlog)  # taken before the offline status, forwarded after it
    assert old.state == "offline"
    assert old.last_seq == max(offline.last_seq or 0, 5)
    fresh_reading = Reading("h1", "monitor", "m1", 6, T0 + 30_000, T0 + 30_100, "p1", {"heart_rate": 70.0})
    assert on_reading(offline, fresh_reading)[0].state == "online"


def test_an_older_status_arriving_late_does_not_override_a_newer_one() -> None:
    newer = on_status(online(), status("offline", received_ms=T0 + 10_000))
    late = on_status(newer, status("online", received_ms=T0 + 5_000))
    assert (late.state, late.status_ms) == ("offline", T0 + 10_000)
