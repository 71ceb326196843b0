"""Device reboots lose nothing; a duplicate is the same message, not the same number. Real
bridge on the embedded broker, devices publishing through paho."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.devices import Device


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[BridgeThread]:
    # a gap that nothing fills is raised after this grace period (provisional until then)
    with BridgeThread(bridge_settings(tmp_path, seq_gap_grace_seconds=1.0)) as b:
        yield b


def body(seq: int, ts_ms: int, boot: str | None = None, **metrics: float) -> bytes:
    message: dict = {"seq": seq, "ts": ts_ms, "patient_id": "p-001", "metrics": metrics or {"heart_rate": 70 + seq}}
    if boot is not None:
        message["boot"] = boot
    return json.dumps(message).encode()


def rows(bridge: BridgeThread, device_id: str) -> list[tuple[str, int, int]]:
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        return db.execute("SELECT boot, seq, ts_ms FROM readings WHERE device_id=? ORDER BY id",
                          (device_id,)).fetchall()


def technical_alarms(bridge: BridgeThread) -> list[str]:
    with bridge.http() as client:
        return [a["rule_id"] for a in client.get("/api/alerts").json()["items"] if a["rule_id"].startswith("device.")]


def processed(bridge: BridgeThread, n: int) -> None:
    wait_until(lambda: bridge.runtime.core.counters["readings_valid"] >= n, what=f"{n} readings processed")


def test_a_device_that_restarts_seq_at_1_without_a_boot_loses_nothing(bridge: BridgeThread) -> None:
    device = Device(bridge.mqtt_port, "mon-reboot", device_type="monitor", will=False)
    t0 = int(time.time() * 1000) - 120_000
    try:
        for seq in range(1, 6):
            device.publish(device.vitals_topic, body(seq, t0 + seq * 1000))
        processed(bridge, 5)
        before = bridge.runtime.store.device("monitor", "mon-reboot")
        assert before is not None and before.last_data_ms is not None
        first_data = before.last_data_ms
        for seq in range(1, 6):  # power cycled: the counter is back at 1, the clock went on
            device.publish(device.vitals_topic, body(seq, t0 + 60_000 + seq * 1000))
        processed(bridge, 10)
        stored = rows(bridge, "mon-reboot")
        assert [s for _, s, _ in stored] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5], "every reading stored"
        assert {b for b, _, _ in stored[5:]} == {f"~{t0 + 61_000}"}, "an implicit boot named after its first reading"
        core = bridge.runtime.core
        assert (core.counters["duplicates"], core.counters["reboots"], core.counters["seq_gaps"]) == (0, 1, 0)
        device_row = core.store.device("monitor", "mon-reboot")
        assert device_row is not None and device_row.last_data_ms is not None
        assert device_row.last_data_ms >= first_data and (device_row.last_seq, device_row.silent) == (5, False)
        assert technical_alarms(bridge) == [], "no false gap or silent alarm"
        import httpx

        assert "firstcare_device_reboots_total 1.0" in httpx.get(bridge.url + "/metrics").text.splitlines()
        with bridge.http() as client:
            readings = client.get("/api/patients/p-001/readings").json()["items"]
        assert len(readings) == 10 and readings[-1]["boot"] == f"~{t0 + 61_000}"
        # a redelivery of a reading from before the reboot is still a duplicate
        device.publish(device.vitals_topic, body(3, t0 + 3000))
        processed(bridge, 11)
        assert core.counters["duplicates"] == 1 and len(rows(bridge, "mon-reboot")) == 10
        # and within the new boot a gap is still a gap
        device.publish(device.vitals_topic, body(8, t0 + 68_000))
        wait_until(lambda: "device.seq_gap" in technical_alarms(bridge), what="gap in the new boot")
        with sqlite3.connect(bridge.settings.sqlite_path) as db:
            assert db.execute("SELECT first_missing, last_missing FROM seq_gaps").fetchall() == [(6, 7)]
    finally:
        device.close()


def test_a_device_announcing_its_boot_starts_a_new_sequence(bridge: BridgeThread) -> None:
    device = Device(bridge.mqtt_port, "mon-boot", device_type="monitor", will=False)
    now = int(time.time() * 1000)
    try:
        device.publish(device.status_topic, b'{"state": "online", "boot": "b1", "ts": %d}' % (now - 60_000),
                       retain=True)
        for seq in (1, 2, 3):
            device.publish(device.vitals_topic, body(seq, now - 60_000 + seq * 1000, boot="b1"))
        device.publish(device.status_topic, b'{"state": "online", "boot": "b2", "ts": %d}' % (now - 10_000),
                       retain=True)
        for seq in (1, 2, 3):  # readings need not repeat the boot the status announced
            device.publish(device.vitals_topic, body(seq, now - 10_000 + seq * 1000, boot="b2" if seq == 2 else None))
        processed(bridge, 6)
        assert [(b, s) for b, s, _ in rows(bridge, "mon-boot")] == [("b1", 1), ("b1", 2), ("b1", 3),
                                                                       ("b2", 1), ("b2", 2), ("b2", 3)]
        with bridge.http() as client:
            assert client.get("/api/devices/monitor/mon-boot").json()["boot"] == "b2"
        assert technical_alarms(bridge) == []
        device.publish(device.vitals_topic, body(2, now - 10_000 + 2000, boot="b2"))  # redelivery
        device.publish(device.vitals_topic, body(5, now - 10_000 + 5000, boot="b2"))  # 4 is missing
        wait_until(lambda: "device.seq_gap" in technical_alarms(bridge), what="a gap within boot b2")
        assert bridge.runtime.core.counters["duplicates"] == 1
    finally:
        device.close()


@pytest.mark.parametrize("boot", [None, "b1"])
def test_same_seq_with_other_content_is_kept_as_a_conflict_never_dropped(bridge: BridgeThread,
                                                                          boot: str | None) -> None:
    device = Device(bridge.mqtt_port, "ox-conflict")
    t0 = int(time.time() * 1000) - 60_000
    try:
        for seq in (1, 2, 3):
            device.publish(device.vitals_topic, body(seq, t0 + seq * 1000, boot=boot, spo2=97))
        other = body(2, t0 + 2000, boot=boot, spo2=88)  # seq 2 again, same time, other value
        device.publish(device.vitals_topic, other)
        processed(bridge, 4)
        wait_until(lambda: bridge.runtime.core.counters["seq_conflicts"] == 1, what="conflict counted")
        assert [s for _, s, _ in rows(bridge, "ox-conflict")] == [1, 2, 3]
        with bridge.http() as client:
            (letter,) = client.get("/api/dead-letters", params={"reason": "seq_conflict"}).json()["items"]
        assert letter["topic"] == device.vitals_topic
        assert "seq 2" in letter["detail"] and "other content" in letter["detail"]
        kept = json.loads(letter["payload"])
        assert (kept["seq"], kept["metrics"], kept.get("boot")) == (2, {"spo2": 88.0}, boot)
        assert bridge.runtime.core.dead_letter_reasons["seq_conflict"] == 1
    finally:
        device.close()


def test_a_restarted_simulation_is_live_at_once(bridge: BridgeThread) -> None:
    """What `make up` twice does: the second run starts at seq 1 again under a new boot, and
    every reading of it is stored (none taken for a duplicate of the first run)."""
    from simulators.runner import SimulationConfig, run_simulation

    config = SimulationConfig(f"mqtt://127.0.0.1:{bridge.mqtt_port}", "h1", patients=1, devices=("monitor",),
                              rate=20, count=5, seed=1, ramp_seconds=0)
    first = run_simulation(config)
    second = run_simulation(config)
    assert first.acknowledged == second.acknowledged == 5
    wait_until(lambda: len(rows(bridge, "monitor-001")) == 10, what="both runs stored in full")
    stored = rows(bridge, "monitor-001")
    assert [s for _, s, _ in stored] == [1, 2, 3, 4, 5] * 2
    boots = [b for b, _, _ in stored]
    assert len(set(boots[:5])) == len(set(boots[5:])) == 1 and boots[0] != boots[5] and "" not in boots
    assert bridge.runtime.core.counters["duplicates"] == 0
    with bridge.http() as client:
        assert client.get("/api/devices/monitor/monitor-001").json()["boot"] == boots[5]
    # each run ends with a clean power-off (device.offline); nothing else is raised
    assert set(technical_alarms(bridge)) <= {"device.offline"}
