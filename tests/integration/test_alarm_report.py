"""GET /api/reports/alarms on a real bridge: alarms raised, escalated, acknowledged and
self-clearing through the real rule book, counted per patient-day; scope."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.devices import Device

NURSE = {"Authorization": f"Bearer {token('clinician', sub='nurse-rep', hospitals=('h1',))}"}


def active(bridge: BridgeThread, rule: str) -> dict | None:
    items = httpx.get(f"{bridge.url}/api/alerts", headers=NURSE, params={"patient_id": "p-rep"}).json()["items"]
    return next((a for a in items if a["rule_id"] == rule), None)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path_factory.mktemp("reports"), escalation_seconds=1)) as b:
        device = Device(b.mqtt_port, "mon-rep", device_type="monitor")
        now = int(time.time() * 1000)
        for i in range(2):  # severe tachycardia: high, latched; escalates after 1 s; then acknowledged
            device.vitals({"heart_rate": 170}, patient_id="p-rep", ts_ms=now - 60_000 + i * 1000)
        wait_until(lambda: (active(b, "heart_rate.high.critical") or {}).get("state") == "escalated",
                   what="an escalated alarm")
        alarm = active(b, "heart_rate.high.critical")
        assert alarm is not None
        assert httpx.post(f"{b.url}/api/alerts/{alarm['id']}/ack", headers=NURSE).status_code == 200
        for i in range(3):  # SpO2 88-91 over 12 s: medium spo2.low, then back to normal at once
            device.vitals({"spo2": 90}, patient_id="p-rep", ts_ms=now - 50_000 + i * 6000)
        wait_until(lambda: active(b, "spo2.low"), what="spo2.low raised")
        device.vitals({"spo2": 97, "heart_rate": 70}, patient_id="p-rep", ts_ms=now - 30_000)
        wait_until(lambda: (active(b, "spo2.low") or {}).get("state") == "resolved", what="spo2.low cleared by itself")
        device.close()
        yield b


def report(bridge: BridgeThread, headers: dict[str, str] = NURSE, **params: Any) -> httpx.Response:
    return httpx.get(f"{bridge.url}/api/reports/alarms", headers=headers, params=params, timeout=10)


def test_the_ward_report(bridge: BridgeThread) -> None:
    response = report(bridge, hospital_id="h1")
    assert response.status_code == 200, response.text
    body = response.json()
    rules = {r["rule_id"]: r for r in body["by_rule"]}
    assert body["patient_days"] == 1
    critical = rules["heart_rate.high.critical"]
    assert (critical["alarms"], critical["escalated"], critical["acknowledged"]) == (1, 1, 1)
    assert critical["time_to_acknowledge_s"]["median"] > 0
    assert critical["nuisance_candidates"] == 0
    spo2 = rules["spo2.low"]
    assert (spo2["alarms"], spo2["nuisance_candidates"], spo2["acknowledged"]) == (1, 1, 0)
    assert any(e["rule_id"] == "spo2.low" for e in body["nuisance_examples"])
    assert body["total"]["per_patient_day"] == body["total"]["alarms"]


def test_a_window_without_alarms(bridge: BridgeThread) -> None:
    body = report(bridge, hospital_id="h1", since="2001-01-01T00:00:00Z", until="2001-01-02T00:00:00Z").json()
    assert body["total"]["alarms"] == 0 and body["patient_days"] == 0


@pytest.mark.parametrize(("headers", "params", "status"), [
    ({"Authorization": f"Bearer {token('clinician', hospitals=('h2',))}"}, {"hospital_id": "h1"}, 403),
    ({"Authorization": f"Bearer {token('patient', patients=('p-rep',))}"}, {}, 403),
    ({}, {}, 401),
    (NURSE, {"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}, 400),
    (NURSE, {"nuisance_seconds": "0"}, 422),
])
def test_scope_and_parameters(bridge: BridgeThread, headers: dict, params: dict, status: int) -> None:
    assert report(bridge, headers, **params).status_code == status


def test_a_clinician_without_a_hospital_parameter_sees_only_its_own(bridge: BridgeThread) -> None:
    other = {"Authorization": f"Bearer {token('clinician', hospitals=('h2',))}"}
    assert report(bridge, other).json()["total"]["alarms"] == 0
    assert report(bridge).json()["total"]["alarms"] >= 2
