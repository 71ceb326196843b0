"""NEWS2 end to end on a real bridge and a real SQLite: readings and clinician observations in,
scores, alarms and events out; scope, validation, freshness, paging."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.devices import Device

SEPTIC = {"respiratory_rate": 27, "spo2": 95, "systolic_bp": 88, "heart_rate": 125, "temperature": 39.2}
# RR 27 -> 3, SpO2 95 -> 1, SBP 88 -> 3, pulse 125 -> 2, 39.2 -> 2: 11 without oxygen and ACVPU
WELL = {"respiratory_rate": 16, "spo2": 97, "systolic_bp": 125, "heart_rate": 72, "temperature": 36.8}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path_factory.mktemp("news2"))) as b:
        seed = Device(b.mqtt_port, "mon-seed", device_type="monitor", hospital_id="h1")
        seed.vitals(WELL, patient_id="p-known")
        seed.vitals(WELL, patient_id="p-other")
        seed.close()
        wait_until(lambda: b.runtime.core.counters["readings_stored"] == 2, what="seed readings")
        yield b


@pytest.fixture(scope="module")
def monitor(bridge: BridgeThread) -> Iterator[Device]:
    device = Device(bridge.mqtt_port, "mon-news2", device_type="monitor", hospital_id="h1")
    yield device
    device.close()


def clinician(hospital: str = "h1", sub: str = "nurse-ann") -> dict[str, str]:
    return {"Authorization": f"Bearer {token('clinician', sub=sub, hospitals=(hospital,))}"}


def news2_of(bridge: BridgeThread, pid: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{bridge.url}/api/patients/{pid}/news2", headers=clinician(), params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def scored(bridge: BridgeThread, pid: str, **params: Any) -> dict[str, Any]:
    """:func:`news2_of` for polling: empty until the bridge has stored the patient's first reading
    (404 until then)."""
    response = httpx.get(f"{bridge.url}/api/patients/{pid}/news2", headers=clinician(), params=params, timeout=10)
    if response.status_code == 404:
        return {"current": {"parameters": {}, "total": None}, "items": []}
    assert response.status_code == 200, response.text
    return response.json()


def active_alerts(bridge: BridgeThread, pid: str) -> dict[str, dict]:
    items = httpx.get(f"{bridge.url}/api/alerts", headers=clinician(),
                      params={"patient_id": pid, "state": "active"}, timeout=10).json()["items"]
    return {a["rule_id"]: a for a in items}


def observe(bridge: BridgeThread, pid: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{bridge.url}/api/patients/{pid}/observations", json=body, headers=headers or clinician(),
                      timeout=10)


def test_a_septic_patient_scores_high_raises_the_alarm_and_publishes_updates(bridge: BridgeThread,
                                                                              monitor: Device) -> None:
    events = bridge.subscribe("hospital:h1")
    for _ in range(3):
        monitor.vitals(SEPTIC, patient_id="p-sepsis")
    wait_until(lambda: "news2.high" in active_alerts(bridge, "p-sepsis"), what="the NEWS2 high alarm")
    body = news2_of(bridge, "p-sepsis")
    current = body["current"]
    assert (current["total"], current["band"], current["complete"], current["lower_bound"]) == (11, "high", False, True)
    assert current["missing"] == ["supplemental_oxygen", "consciousness"]
    assert {k: v["score"] for k, v in current["parameters"].items()} == {
        "respiratory_rate": 3, "spo2": 1, "systolic_bp": 3, "heart_rate": 2, "temperature": 2}
    assert current["parameters"]["heart_rate"]["source"] == "monitor/mon-news2"
    assert body["items"][0]["total"] == 11 and body["items"][0]["complete"] is False
    alarm = active_alerts(bridge, "p-sepsis")["news2.high"]
    assert (alarm["priority"], alarm["metric"], alarm["value"], alarm["device_type"]) == ("high", "news2", 11, None)
    update = bridge.receive_until(events, lambda e: e["event"] == "patient.news2.update"
                                  and e["data"]["patient_id"] == "p-sepsis")
    assert update["type"] == "news2_update" and update["room"] == "hospital:h1"
    assert update["data"]["band"] == "high" and update["data"]["complete"] is False


def test_observations_complete_the_score_and_name_who_recorded_them(bridge: BridgeThread, monitor: Device) -> None:
    monitor.vitals(SEPTIC, patient_id="p-obs")
    wait_until(lambda: scored(bridge, "p-obs")["current"]["parameters"], what="the first score")
    response = observe(bridge, "p-obs", {"consciousness": "C", "supplemental_oxygen": True, "note": "drowsy"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert [(o["kind"], o["value"], o["recorded_by"]) for o in body["observations"]] == [
        ("consciousness", "C", "nurse-ann"), ("supplemental_oxygen", True, "nurse-ann")]
    assert body["news2"]["complete"] is True and body["news2"]["total"] == 11 + 3 + 2
    assert body["news2"]["parameters"]["consciousness"]["source"] == "observation:nurse-ann"
    history = news2_of(bridge, "p-obs")["items"]
    assert history[0]["complete"] is True and history[0]["total"] == 16


def test_scale_2_with_oxygen_scores_high_saturations(bridge: BridgeThread, monitor: Device) -> None:
    monitor.vitals({**WELL, "spo2": 97}, patient_id="p-copd")
    wait_until(lambda: scored(bridge, "p-copd")["current"]["parameters"], what="the first score")
    response = observe(bridge, "p-copd", {"spo2_scale": 2, "supplemental_oxygen": True, "consciousness": "A"})
    assert response.status_code == 201
    current = news2_of(bridge, "p-copd")["current"]
    assert current["spo2_scale"] == 2 and current["parameters"]["spo2"]["score"] == 3  # 97 % on oxygen, scale 2
    assert current["total"] == 5 and current["band"] == "medium" and current["complete"]


def test_a_complete_normal_score_clears_what_a_partial_one_could_not(bridge: BridgeThread, monitor: Device) -> None:
    start = int(time.time() * 1000) - 60_000
    for i in range(3):  # 3 + 2 + 2 = 7 over 3 readings 12 s apart: high and medium, on a partial score
        monitor.vitals({**WELL, "respiratory_rate": 26, "heart_rate": 115, "systolic_bp": 98}, patient_id="p-clear",
                       ts_ms=start + i * 6000)
    wait_until(lambda: {"news2.high", "news2.medium"} <= set(active_alerts(bridge, "p-clear")), what="alarms")
    for i in range(3):
        monitor.vitals(WELL, patient_id="p-clear", ts_ms=start + 30_000 + i * 6000)
    wait_until(lambda: scored(bridge, "p-clear")["current"]["total"] == 0, what="a partial score of 0")
    assert "news2.medium" in active_alerts(bridge, "p-clear")  # a partial 0 proves nothing
    assert observe(bridge, "p-clear", {"consciousness": "A", "supplemental_oxygen": False}).status_code == 201
    wait_until(lambda: "news2.medium" not in active_alerts(bridge, "p-clear"), what="medium cleared")
    high = active_alerts(bridge, "p-clear")["news2.high"]  # high latches until acknowledged
    assert high["condition_active"] is False


def test_stale_inputs_are_named_and_never_counted(bridge: BridgeThread, monitor: Device) -> None:
    two_hours_ago = int(time.time() * 1000) - 2 * 3600 * 1000
    monitor.vitals(SEPTIC, patient_id="p-stale", ts_ms=two_hours_ago)
    wait_until(lambda: scored(bridge, "p-stale")["items"], what="a score")
    current = news2_of(bridge, "p-stale")["current"]
    # RR, SpO2 and pulse are fresh for 1 h, SBP and temperature for 4 h
    assert current["stale"] == ["respiratory_rate", "spo2", "heart_rate"]
    assert set(current["parameters"]) == {"systolic_bp", "temperature"}
    assert current["total"] == 5 and current["complete"] is False


def test_history_pages_newest_first_without_repeats(bridge: BridgeThread, monitor: Device) -> None:
    for hr in (72, 95, 115, 135, 95):  # each changes the pulse score: five stored scores
        monitor.vitals({**WELL, "heart_rate": hr}, patient_id="p-pages")
    wait_until(lambda: len(scored(bridge, "p-pages", limit=5000)["items"]) == 5, what="five scores")
    seen, cursor = [], None
    while True:
        body = news2_of(bridge, "p-pages", limit=2, **({"cursor": cursor} if cursor else {}))
        seen += body["items"]
        cursor = body["next"]
        if cursor is None:
            break
    assert [s["parameters"]["heart_rate"]["value"] for s in seen] == [95, 135, 115, 95, 72]
    assert len({s["id"] for s in seen}) == 5


@pytest.mark.parametrize(("headers", "pid", "status"), [
    ({"Authorization": f"Bearer {token('patient', patients=('p-known',))}"}, "p-known", 403),
    (clinician("h2"), "p-known", 404),
    (clinician(), "p-unknown", 404),
    ({}, "p-known", 401),
])
def test_who_may_post_observations(bridge: BridgeThread, headers: dict, pid: str, status: int) -> None:
    response = observe(bridge, pid, {"consciousness": "A"}, headers=headers or {"X-None": "1"})
    assert response.status_code == status


@pytest.mark.parametrize("body", [
    {}, {"note": "only a note"}, {"consciousness": "alert"}, {"supplemental_oxygen": "yes"}, {"spo2_scale": 3},
    {"consciousness": "A", "extra": 1} | {"note": "x" * 501},
])
def test_bad_observations_are_refused(bridge: BridgeThread, body: dict) -> None:
    response = observe(bridge, "p-known", body)
    assert response.status_code == 422 and response.json()["error"] == "bad_request"


@pytest.mark.parametrize("ts", ["2000-01-01T00:00:00Z", str(int(time.time() * 1000) + 3_600_000), "yesterday"],
                         ids=["long ago", "an hour ahead", "not a time"])  # the same ids on every xdist worker
def test_observation_times_must_be_recent(bridge: BridgeThread, ts: str) -> None:
    response = observe(bridge, "p-known", {"consciousness": "A", "ts": ts})
    assert response.status_code == 400


def test_a_patient_token_reads_its_own_score_only(bridge: BridgeThread) -> None:
    own = httpx.get(f"{bridge.url}/api/patients/p-known/news2",
                    headers={"Authorization": f"Bearer {token('patient', patients=('p-known',))}"}, timeout=10)
    other = httpx.get(f"{bridge.url}/api/patients/p-obs/news2",
                      headers={"Authorization": f"Bearer {token('patient', patients=('p-known',))}"}, timeout=10)
    assert own.status_code == 200 and other.status_code == 404


def test_scores_survive_a_restart(tmp_path) -> None:
    settings = bridge_settings(tmp_path)
    with BridgeThread(settings) as b:
        device = Device(b.mqtt_port, "mon-restart", device_type="monitor")
        device.vitals(SEPTIC, patient_id="p-restart")
        wait_until(lambda: scored(b, "p-restart")["items"], what="a score")
        device.close()
    with BridgeThread(settings) as b:
        body = news2_of(b, "p-restart")
        assert body["items"][0]["total"] == 11
        assert b.runtime.store.patient_news2_inputs("p-restart").inputs["heart_rate"].value == 125
        assert json.loads(json.dumps(body["current"]))["total"] == 11


def test_the_simulated_sepsis_patient_reaches_high_and_raises_its_alarm(bridge: BridgeThread) -> None:
    """`firstcare simulate --scenario sepsis`: only what a monitor sends (no oxygen, no ACVPU),
    and the partial score is already high, so the alarm rises without waiting for a nurse."""
    import threading

    from simulators.runner import SimulationConfig, run_simulation

    stop = threading.Event()
    config = SimulationConfig(mqtt_url=f"mqtt://127.0.0.1:{bridge.mqtt_port}", hospital_id="h1", patients=1,
                              devices=("monitor",), rate=4, scenario="sepsis", ramp_seconds=5, duration=60,
                              patient_prefix="sim-sepsis-", seed=3)
    runner = threading.Thread(target=run_simulation, args=(config,), kwargs={"stop_event": stop}, daemon=True)
    runner.start()
    try:
        alarm = wait_until(lambda: active_alerts(bridge, "sim-sepsis-001").get("news2.high"), timeout=45,
                           what="the sepsis patient's NEWS2 high alarm")
    finally:
        stop.set()
        runner.join(15)
    assert alarm["priority"] == "high" and alarm["value"] >= 7
    history = news2_of(bridge, "sim-sepsis-001", limit=5000)["items"]
    assert any(s["band"] == "high" for s in history)
    assert all(s["complete"] is False for s in history)  # never shown as complete without oxygen and ACVPU
