"""REST API over a real server: auth, scope across hospitals, paging, bindings, operations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.support.bridge import SECRET, BridgeThread, bridge_settings, token, wait_until
from tests.support.devices import Device


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path_factory.mktemp("api"))) as b:
        h1 = Device(b.mqtt_port, "ox-h1", hospital_id="h1")
        h2 = Device(b.mqtt_port, "ox-h2", hospital_id="h2")
        base = 1_790_000_000_000
        for i in range(1, 26):
            h1.vitals({"spo2": 97, "heart_rate": 70}, patient_id="p-h1", ts_ms=base + i * 1000)
        h2.vitals({"spo2": 97}, patient_id="p-h2")
        h2.status("online", battery=55)
        wait_until(lambda: b.runtime.core.counters["readings_stored"] == 26, what="seed readings")
        yield b
        h1.close()
        h2.close()


def get(bridge: BridgeThread, path: str, auth: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    return httpx.get(bridge.url + path, headers=headers, params=params, timeout=10)


def expired_token() -> str:
    return jwt.encode({"sub": "x", "role": "admin", "exp": int(time.time()) - 3600}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(("auth", "error"), [
    (None, "token_missing"),
    ("garbage", "token_invalid"),
    (jwt.encode({"sub": "x", "role": "admin", "exp": 4102444800}, "another-secret-of-sufficient-length!", "HS256"),
     "token_invalid"),
    (jwt.encode({"sub": "x", "role": "admin"}, SECRET, algorithm="HS256"), "token_invalid"),
    ("expired", "token_expired"),
])
def test_bad_tokens_get_401_with_a_reason(bridge: BridgeThread, auth: str | None, error: str) -> None:
    response = get(bridge, "/api/devices", expired_token() if auth == "expired" else auth)
    assert response.status_code == 401
    assert response.json()["error"] == error
    assert response.headers["www-authenticate"] == "Bearer"


def test_token_in_query_parameter_is_accepted(bridge: BridgeThread) -> None:
    response = httpx.get(bridge.url + "/api/devices", params={"token": token()})
    assert response.status_code == 200


@pytest.mark.parametrize(("claims", "patient", "visible"), [
    ({"role": "clinician", "hospitals": ("h1",)}, "p-h1", True),
    ({"role": "clinician", "hospitals": ("h1",)}, "p-h2", False),
    ({"role": "clinician", "hospitals": ("h1",)}, "p-nobody", False),
    ({"role": "patient", "patients": ("p-h2",)}, "p-h2", True),
    ({"role": "patient", "patients": ("p-h2",)}, "p-h1", False),
    ({"role": "admin"}, "p-h2", True),
])
def test_patients_of_other_hospitals_look_exactly_like_unknown_ones(
        bridge: BridgeThread, claims: dict, patient: str, visible: bool) -> None:
    response = get(bridge, f"/api/patients/{patient}/vitals/latest", token(**claims))
    if visible:
        assert response.status_code == 200
        assert response.json()["metrics"]["spo2"]["value"] == 97
    else:
        assert response.status_code == 404
        assert response.json() == {"error": "not_found", "detail": f"patient {patient!r} not found"}


def test_readings_page_in_time_order_without_gaps_or_repeats(bridge: BridgeThread) -> None:
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 10, "metric": "heart_rate", **({"cursor": cursor} if cursor else {})}
        body = get(bridge, "/api/patients/p-h1/readings", token(), **params).json()
        seen += [r["seq"] for r in body["items"]]
        assert all(set(r["metrics"]) == {"heart_rate"} for r in body["items"])
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert (seen, pages) == (list(range(1, 26)), 3)
    window = get(bridge, "/api/patients/p-h1/readings", token(),
                 since="2026-09-21T14:13:25Z", until=str(1_790_000_010_000)).json()["items"]
    assert [r["seq"] for r in window] == list(range(5, 10))


@pytest.mark.parametrize(("params", "status"), [
    ({"metric": "mood"}, 400), ({"since": "yesterday"}, 400), ({"cursor": "x.y"}, 400), ({"limit": 0}, 422),
])
def test_bad_query_parameters_are_clear_errors(bridge: BridgeThread, params: dict, status: int) -> None:
    assert get(bridge, "/api/patients/p-h1/readings", token(), **params).status_code == status


def test_device_listing_is_scoped_to_the_clinicians_hospitals(bridge: BridgeThread) -> None:
    items = get(bridge, "/api/devices", token("clinician", hospitals=("h2",))).json()["items"]
    assert [(d["device_id"], d["battery"], d["state"]) for d in items] == [("ox-h2", 55, "online")]
    assert get(bridge, "/api/devices/oximeter/ox-h1", token("clinician", hospitals=("h2",))).status_code == 404


def test_binding_attributes_readings_without_patient_id(bridge: BridgeThread) -> None:
    doctor = token("clinician", hospitals=("h1",))
    response = httpx.put(bridge.url + "/api/devices/monitor/mon-bed-7/binding", json={"patient_id": "p-bed7"},
                         headers={"Authorization": f"Bearer {doctor}"})
    assert response.status_code == 400  # never seen: hospital_id required
    response = httpx.put(bridge.url + "/api/devices/monitor/mon-bed-7/binding",
                         json={"patient_id": "p-bed7", "hospital_id": "h1"},
                         headers={"Authorization": f"Bearer {doctor}"})
    assert response.status_code == 200 and response.json()["patient_id"] == "p-bed7"
    foreign = httpx.put(bridge.url + "/api/devices/monitor/mon-bed-7/binding", json={"patient_id": "p-x"},
                        headers={"Authorization": f"Bearer {token('clinician', hospitals=('h2',))}"})
    assert foreign.status_code == 404
    device = Device(bridge.mqtt_port, "mon-bed-7", device_type="monitor")
    device.vitals({"heart_rate": 88}, patient_id=None)
    latest = wait_until(lambda: get(bridge, "/api/patients/p-bed7/vitals/latest", doctor).json()["metrics"],
                        what="bound reading")
    assert latest["heart_rate"]["value"] == 88
    device.close()


def test_dead_letters_are_for_admins_only(bridge: BridgeThread) -> None:
    assert get(bridge, "/api/dead-letters", token("clinician", hospitals=("h1",))).status_code == 403
    assert get(bridge, "/api/dead-letters", token()).status_code == 200


def test_acknowledging_unknown_alert_is_404(bridge: BridgeThread) -> None:
    response = httpx.post(bridge.url + "/api/alerts/nope/ack", headers={"Authorization": f"Bearer {token()}"})
    assert (response.status_code, response.json()["error"]) == (404, "not_found")


def test_health_readiness_stats_and_openapi(bridge: BridgeThread) -> None:
    assert httpx.get(bridge.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(bridge.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"mqtt": "connected", "store": "ok", "hub": "ok"}
    stats = get(bridge, "/realtime/stats", token()).json()
    assert stats["ingest"]["readings_stored"] >= 26 and stats["ingest"]["mqtt_state"] == "connected"
    paths = httpx.get(bridge.url + "/openapi.json").json()["paths"]
    assert {"/api/patients/{patient_id}/readings", "/api/alerts/{alert_id}/ack",
            "/api/devices/{device_type}/{device_id}/binding", "/api/dead-letters"} <= set(paths)


@pytest.mark.parametrize(("path", "params"), [
    ("/api/patients/p-h1/readings", {"cursor": "99999999999999999999.1"}),
    ("/api/patients/p-h1/readings", {"since": "99999999999999999999"}),
    ("/api/patients/p-h1/readings", {"since": "²"}),
    ("/api/alerts", {"cursor": "99999999999999999999.1"}),
    ("/api/dead-letters", {"cursor": "99999999999999999999"}),
])
def test_out_of_range_numbers_are_400_not_500(bridge: BridgeThread, path: str, params: dict) -> None:
    response = get(bridge, path, token(), **params)
    assert (response.status_code, response.json()["error"]) == (400, "bad_request")


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), [
    ("GET", "/api/patients/p%20x/readings", None, 422, "bad_request"),
    ("GET", "/api/alerts?limit=abc", None, 422, "bad_request"),
    ("PUT", "/api/devices/monitor/m9/binding", {"patient_id": "bad id/../x", "hospital_id": "h1"}, 422, "bad_request"),
    ("GET", "/api/nothing-here", None, 404, "not_found"),
])
def test_every_error_has_the_documented_shape(bridge: BridgeThread, method: str, path: str, body: object,
                                               status: int, error: str) -> None:
    response = httpx.request(method, bridge.url + path, json=body, headers={"Authorization": f"Bearer {token()}"})
    assert response.status_code == status
    assert response.json()["error"] == error and isinstance(response.json()["detail"], str)


def test_patient_list_is_scoped_to_the_callers_hospitals(bridge: BridgeThread) -> None:
    listed = get(bridge, "/api/patients", token("clinician", hospitals=("h2",))).json()["items"]
    assert [(p["patient_id"], p["hospital_id"]) for p in listed] == [("p-h2", "h2")]
    everyone = {p["patient_id"] for p in get(bridge, "/api/patients", token()).json()["items"]}
    assert {"p-h1", "p-h2"} <= everyone
    mine = get(bridge, "/api/patients", token("patient", patients=("p-h1",))).json()["items"]
    assert [p["patient_id"] for p in mine] == ["p-h1"]
