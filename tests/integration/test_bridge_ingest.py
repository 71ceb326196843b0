"""The bridge on the embedded amqtt broker: MQTT in, stored rows and hub events out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.devices import Device


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path, device_silent_seconds=1.5, device_offline_seconds=3)) as b:
        yield b


@pytest.fixture
def device(bridge: BridgeThread) -> Iterator[Device]:
    d = Device(bridge.mqtt_port, "ox-1")
    yield d
    d.close()


def stored(bridge: BridgeThread) -> int:
    return bridge.runtime.store.counts()["readings"]


def test_reading_is_stored_and_published_to_its_rooms(bridge: BridgeThread, device: Device) -> None:
    sub = bridge.subscribe("patient:p-001:vitals")
    device.vitals({"spo2": 97, "heart_rate": 72, "temperature": {"value": 98.6, "unit": "[degF]"}})
    (delivery,) = bridge.receive(sub, 1)
    envelope = json.loads(delivery.data)
    assert envelope["type"] == "vitals_update"
    assert envelope["event"] == "patient.vitals.update"
    assert envelope["room"] == "patient:p-001:vitals"
    assert envelope["data"]["metrics"] == {"spo2": 97.0, "heart_rate": 72.0, "temperature": 37.0}
    assert envelope["data"]["units"]["temperature"] == "Cel"
    with bridge.http() as client:
        page = client.get("/api/patients/p-001/readings").json()
        latest = client.get("/api/patients/p-001/vitals/latest").json()
    assert [r["seq"] for r in page["items"]] == [1]
    assert latest["metrics"]["temperature"]["value"] == 37.0


def test_duplicates_are_stored_once(bridge: BridgeThread, device: Device) -> None:
    t0 = int(time.time() * 1000) - 60_000
    for seq in (1, 2, 2, 3, 1, 3):  # a redelivery is the same message: same seq, time and values
        device.vitals({"heart_rate": 70 + seq}, seq=seq, ts_ms=t0 + seq * 1000)
    wait_until(lambda: bridge.runtime.core.counters["readings_valid"] == 6, what="6 readings processed")
    assert stored(bridge) == 3
    assert bridge.runtime.core.counters["duplicates"] == 3
    with bridge.http() as client:
        assert [r["seq"] for r in client.get("/api/patients/p-001/readings").json()["items"]] == [1, 2, 3]


BAD_INPUTS = [
    ("fc/v1/h1/oximeter/ox-1/vitals", b"not json", "payload_not_json"),
    ("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 1, "ts": 1790000000000}', "schema_invalid"),
    ("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 9, "ts": 1790000000000, "metrics": {"mood": 3}}', "metric_unknown"),
    ("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 9, "ts": 1790000000000, "metrics": {"spo2": 140}}',
     "value_out_of_range"),
    ("fc/v1/h1/oximeter/ox-1/vitals",
     b'{"seq": 9, "ts": 1790000000000, "metrics": {"temperature": {"value": 37, "unit": "F"}}}', "unit_unknown"),
    ("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 9, "ts": "2026-01-01T10:00:00", "metrics": {"spo2": 95}}',
     "ts_invalid"),
    ("fc/v1/h1/toaster/ox-1/vitals", b'{}', "device_type_unknown"),
    ("fc/v1/h1/oximeter/ox-1/telemetry", b'{}', "topic_unknown"),
    ("fc/v1/h1/oximeter/ox-1/status", b'{"state": "sleepy"}', "schema_invalid"),
    ("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 9, "ts": 1790000000000, "metrics": {"spo2": 95}, "pad": "'
     + b"x" * (64 * 1024) + b'"}', "payload_too_large"),
]


def test_each_bad_input_is_dead_lettered_with_its_reason_while_valid_traffic_flows(
        bridge: BridgeThread, device: Device) -> None:
    for i, (topic, payload, _) in enumerate(BAD_INPUTS):
        device.publish(topic, payload)
        device.vitals({"spo2": 96}, seq=100 + i)
    wait_until(lambda: stored(bridge) == len(BAD_INPUTS), what="all valid readings stored")
    wait_until(lambda: bridge.runtime.core.counters["dead_letters"] == len(BAD_INPUTS), what="dead letters")
    with bridge.http() as client:
        letters = client.get("/api/dead-letters", params={"limit": 100}).json()["items"]
    assert sorted(d["reason"] for d in letters) == sorted(reason for _, _, reason in BAD_INPUTS)
    oversized = next(d for d in letters if d["reason"] == "payload_too_large")
    assert oversized["truncated"] and oversized["payload_size"] > 64 * 1024
    assert bridge.runtime.core.dead_letter_reasons["payload_not_json"] == 1
    assert bridge.runtime.readiness()["ready"]


def test_a_bad_reading_in_a_gateway_batch_does_not_cost_the_good_ones(bridge: BridgeThread, device: Device) -> None:
    batch = {"readings": [
        {"seq": 1, "ts": 1790000000000, "patient_id": "p-001", "metrics": {"spo2": 97}},
        {"seq": 2, "ts": 1790000001000, "patient_id": "p-001", "metrics": {"spo2": 170}},
        {"seq": 3, "ts": 1790000002000, "patient_id": "p-001", "metrics": {"spo2": 96}},
    ]}
    device.publish(device.vitals_topic, json.dumps(batch))
    wait_until(lambda: stored(bridge) == 2, what="two good readings")
    with bridge.http() as client:
        (letter,) = client.get("/api/dead-letters").json()["items"]
    assert (letter["reason"], letter["index"]) == ("value_out_of_range", 1)


def test_abnormal_series_raises_one_alert_after_the_delay_ack_records_who_recovery_resolves(
        bridge: BridgeThread, device: Device) -> None:
    sub = bridge.subscribe("patient:p-001:alerts")
    critical = next(r for r in bridge.runtime.core.rules if r.id == "spo2.low.critical")
    for _ in range(critical.delay_readings - 1):
        device.vitals({"spo2": 80})
    wait_until(lambda: bridge.runtime.core.counters["readings_stored"] == critical.delay_readings - 1,
               what="readings before the delay")
    with bridge.http() as client:
        assert client.get("/api/alerts", params={"patient_id": "p-001"}).json()["items"] == []
        for _ in range(3):
            device.vitals({"spo2": 80})
        (raised,) = bridge.receive(sub, 1)
        raised = json.loads(raised.data)
        assert raised["event"] == "patient.alert.raised"
        alert = raised["data"]
        assert (alert["rule_id"], alert["priority"]) == ("spo2.low.critical", "high")
        wait_until(lambda: bridge.runtime.core.counters["readings_stored"] == critical.delay_readings + 2,
                   what="further abnormal readings")
        active = client.get("/api/alerts", params={"patient_id": "p-001", "state": "active"}).json()["items"]
        assert [a["rule_id"] for a in active] == ["spo2.low.critical"]

        with bridge.http("clinician", sub="dr-house", hospitals=("h1",)) as doctor:
            acked = doctor.post(f"/api/alerts/{alert['id']}/ack").json()
        assert (acked["state"], acked["acknowledged_by"]) == ("acknowledged", "dr-house")
        assert json.loads(bridge.receive(sub, 1)[0].data)["event"] == "patient.alert.acknowledged"

        device.vitals({"spo2": 97})
        resolved = json.loads(bridge.receive(sub, 1)[0].data)
        assert (resolved["event"], resolved["data"]["id"]) == ("patient.alert.resolved", alert["id"])
        history = client.get(f"/api/alerts/{alert['id']}").json()["history"]
    assert [h["action"] for h in history][0] == "raised"
    assert [h["action"] for h in history][-2:] == ["acknowledged", "resolved"]
    assert bridge.pending(sub) == 0


def is_state(state: str):
    return lambda e: e["event"] == "device.status.change" and e["data"]["state"] == state


def test_dropped_connection_goes_offline_through_the_will(bridge: BridgeThread) -> None:
    sub = bridge.subscribe("device:oximeter:ox-will")
    device = Device(bridge.mqtt_port, "ox-will")
    device.status("online", battery=90)
    bridge.receive_until(sub, is_state("online"))
    device.drop()
    event = bridge.receive_until(sub, is_state("offline"))
    assert event["data"]["device_id"] == "ox-will"
    with bridge.http() as client:
        alerts = client.get("/api/alerts", params={"state": "active"}).json()["items"]
        device_row = client.get("/api/devices/oximeter/ox-will").json()
    assert "device.offline" in [a["rule_id"] for a in alerts]
    assert (device_row["state"], device_row["battery"]) == ("offline", 90)


def test_silent_device_goes_silent_then_offline_by_heartbeat_timeout(bridge: BridgeThread) -> None:
    sub = bridge.subscribe("device:monitor:mon-quiet")
    device = Device(bridge.mqtt_port, "mon-quiet", device_type="monitor", will=False)
    device.vitals({"heart_rate": 70})
    silent = bridge.receive_until(sub, lambda e: e["event"] == "patient.alert.raised")
    assert silent["data"]["rule_id"] == "device.silent"
    bridge.receive_until(sub, is_state("offline"))
    with bridge.http() as client:
        rules = {a["rule_id"]: a["state"] for a in client.get("/api/alerts").json()["items"]}
    assert rules["device.offline"] == "raised"
    device.close()


def test_a_patient_id_used_by_another_hospital_is_dead_lettered_not_mixed_in(bridge: BridgeThread,
                                                                              device: Device) -> None:
    device.vitals({"spo2": 97}, patient_id="p-owned")
    intruder = Device(bridge.mqtt_port, "ox-other", hospital_id="h2")
    intruder.vitals({"spo2": 80}, patient_id="p-owned")
    wait_until(lambda: bridge.runtime.core.counters["dead_letters"] == 1, what="the foreign reading refused")
    with bridge.http() as client:
        (letter,) = client.get("/api/dead-letters").json()["items"]
        assert (letter["reason"], letter["topic"]) == ("patient_hospital_mismatch", "fc/v1/h2/oximeter/ox-other/vitals")
        assert [r["hospital_id"] for r in client.get("/api/patients/p-owned/readings").json()["items"]] == ["h1"]
    with bridge.http("clinician", hospitals=("h2",)) as other:
        assert other.get("/api/patients/p-owned/readings").status_code == 404
        taken = other.put("/api/devices/monitor/evil/binding", json={"patient_id": "p-owned", "hospital_id": "h2"})
        assert (taken.status_code, taken.json()["error"]) == (409, "patient_conflict")
    intruder.close()


def test_a_database_that_refuses_writes_makes_the_bridge_degraded_and_loses_nothing(
        bridge: BridgeThread, device: Device) -> None:
    import sqlite3

    import httpx

    blocker = sqlite3.connect(bridge.settings.sqlite_path, timeout=1)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        for seq in range(1, 6):
            device.vitals({"spo2": 97}, seq=seq)
        degraded = wait_until(lambda: (r := httpx.get(bridge.url + "/readyz")).status_code == 503 and r,
                              timeout=90, what="degraded while the database refuses writes")
        assert degraded.json()["checks"]["store"].startswith("error:")
        assert stored(bridge) == 0
    finally:
        blocker.rollback()
        blocker.close()
    wait_until(lambda: stored(bridge) == 5, timeout=60, what="everything stored once the database is back")
    wait_until(lambda: httpx.get(bridge.url + "/readyz").status_code == 200, what="ready again")
