"""The FHIR R4 read API on a real bridge: every resource it returns, Bundles included, is
validated with fhir.resources (R4B models); mapping, paging, filters, scope and errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.device import Device as FhirDevice
from fhir.resources.R4B.fhirresourcemodel import FHIRResourceModel
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome

from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.devices import Device

MODELS: dict[str, type[FHIRResourceModel]] = {
    "Bundle": Bundle, "CapabilityStatement": CapabilityStatement, "Device": FhirDevice, "Observation": Observation,
    "OperationOutcome": OperationOutcome}
NURSE = {"Authorization": f"Bearer {token('clinician', sub='nurse-fhir', hospitals=('h1',))}"}
T0 = int(time.time() * 1000) - 600_000


def validated(response: httpx.Response, resource_type: str, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == resource_type
    MODELS[resource_type].model_validate(body)
    if resource_type == "Bundle":
        for entry in body.get("entry", []):
            MODELS[entry["resource"]["resourceType"]].model_validate(entry["resource"])
    return body


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path_factory.mktemp("fhir"))) as b:
        monitor = Device(b.mqtt_port, "mon_u1", device_type="monitor")
        cuff = Device(b.mqtt_port, "cuff-1", device_type="bp")
        glucometer = Device(b.mqtt_port, "glu-1", device_type="glucometer")
        scale = Device(b.mqtt_port, "scale-1", device_type="scale")
        other = Device(b.mqtt_port, "mon-h2", device_type="monitor", hospital_id="h2")
        monitor.vitals({"heart_rate": 72, "spo2": 97, "respiratory_rate": 16, "temperature": 36.9,
                        "systolic_bp": 121, "diastolic_bp": 79}, patient_id="p_f1", ts_ms=T0)
        monitor.vitals({"heart_rate": 140, "spo2": 91}, patient_id="p_f1", ts_ms=T0 + 1000)
        cuff.vitals({"systolic_bp": 118}, patient_id="p_f1", ts_ms=T0 + 2000)
        glucometer.vitals({"glucose": 105}, patient_id="p_f1", ts_ms=T0 + 3000)
        scale.vitals({"weight": 71.5}, patient_id="p_f1", ts_ms=T0 + 4000)
        other.vitals({"heart_rate": 80}, patient_id="p-h2", ts_ms=T0)
        monitor.status("online", battery=80)
        wait_until(lambda: b.runtime.core.counters["readings_stored"] == 6, what="seed readings")
        wait_until(lambda: b.runtime.store.news2_history("p_f1", None, None, 10, None).items, what="NEWS2 scores")
        for d in (monitor, cuff, glucometer, scale, other):
            d.close()
        yield b


def get(bridge: BridgeThread, path: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return httpx.get(bridge.url + path, headers=NURSE if headers is None else headers, params=params, timeout=10)


def search_all(bridge: BridgeThread, **params: Any) -> list[dict[str, Any]]:
    resources = []
    body = validated(get(bridge, "/fhir/Observation", patient="Patient/p.f1", **params), "Bundle")
    while True:
        resources += [e["resource"] for e in body.get("entry", [])]
        following = [link["url"] for link in body["link"] if link["relation"] == "next"]
        if not following:
            return resources
        body = validated(httpx.get(following[0], headers=NURSE, timeout=10), "Bundle")


def test_metadata_is_a_capability_statement(bridge: BridgeThread) -> None:
    body = validated(get(bridge, "/fhir/metadata", headers={}), "CapabilityStatement")
    assert body["fhirVersion"] == "4.0.1" and body["format"] == ["application/fhir+json"]
    observation = next(r for r in body["rest"][0]["resource"] if r["type"] == "Observation")
    assert {p["name"] for p in observation["searchParam"]} == {"patient", "code", "category", "date", "_count"}


def test_every_reading_maps_to_coded_observations_with_units_and_profiles(bridge: BridgeThread) -> None:
    resources = search_all(bridge, category="vital-signs,laboratory")
    table: dict[str, Any] = {}
    for r in resources:
        code = r["code"]["coding"][0]["code"]
        unit = r.get("valueQuantity", {}).get("code") or r["component"][0]["valueQuantity"]["code"]
        profile = r.get("meta", {}).get("profile", [None])[0]
        table.setdefault(code, (unit, profile, r["category"][0]["coding"][0]["code"]))
        assert r["subject"]["reference"] == "Patient/p.f1"
    profile = "http://hl7.org/fhir/StructureDefinition/"
    assert table == {
        "8867-4": ("/min", profile + "heartrate", "vital-signs"),
        "2708-6": ("%", profile + "oxygensat", "vital-signs"),
        "9279-1": ("/min", profile + "resprate", "vital-signs"),
        "8310-5": ("Cel", profile + "bodytemp", "vital-signs"),
        "85354-9": ("mm[Hg]", profile + "bp", "vital-signs"),
        "29463-7": ("kg", profile + "bodyweight", "vital-signs"),
        "41653-7": ("mg/dL", None, "laboratory"),  # a glucometer's capillary glucose: not a vital sign
    }
    spo2 = next(r for r in resources if r["code"]["coding"][0]["code"] == "2708-6")
    assert [c["code"] for c in spo2["code"]["coding"]] == ["2708-6", "59408-5"]
    assert spo2["device"]["reference"] == "Device/monitor-mon.u1"


def test_blood_pressure_is_a_panel_with_both_components(bridge: BridgeThread) -> None:
    panels = search_all(bridge, code="http://loinc.org|85354-9")
    assert len(panels) == 2
    full, systolic_only = panels
    assert [(c["code"]["coding"][0]["code"], c["valueQuantity"]["value"]) for c in full["component"]] == [
        ("8480-6", 121), ("8462-4", 79)]
    assert systolic_only["component"][0]["valueQuantity"]["value"] == 118
    assert systolic_only["component"][1]["dataAbsentReason"]["coding"][0]["code"] == "not-performed"


def test_news2_scores_are_survey_observations(bridge: BridgeThread) -> None:
    scores = search_all(bridge, code="http://snomed.info/sct|1104051000000101")
    assert scores and all(s["category"][0]["coding"][0]["code"] == "survey" for s in scores)
    latest = scores[-1]
    assert latest["status"] == "preliminary"  # no oxygen, no ACVPU: never final
    assert "lower bound" in latest["note"][0]["text"]
    absent = [c for c in latest["component"] if "dataAbsentReason" in c]
    assert {c["code"]["coding"][0]["code"] for c in absent} == {"1104331000000105", "1104361000000100"}
    read = validated(get(bridge, f"/fhir/Observation/{latest['id']}"), "Observation")
    assert read == latest


def test_paging_follows_next_links_without_gaps_or_repeats(bridge: BridgeThread) -> None:
    everything = search_all(bridge, _count=500)
    paged = search_all(bridge, _count=2)
    assert [r["id"] for r in paged] == [r["id"] for r in everything]
    assert len({r["id"] for r in paged}) == len(paged) > 8
    times = [r["effectiveDateTime"] for r in paged]
    assert times == sorted(times)


def test_ids_are_stable_and_readable(bridge: BridgeThread) -> None:
    first = search_all(bridge, code="8867-4")
    assert [r["id"] for r in first] == [r["id"] for r in search_all(bridge, code="8867-4")]
    for resource in first:
        assert validated(get(bridge, f"/fhir/Observation/{resource['id']}"), "Observation") == resource


def test_date_filters(bridge: BridgeThread) -> None:
    from firstcare.payloads import format_ts

    late = search_all(bridge, code="8867-4", date=f"ge{format_ts(T0 + 500)}")
    assert [r["valueQuantity"]["value"] for r in late] == [140]
    early = search_all(bridge, code="8867-4", date=[f"ge{format_ts(T0)}", f"lt{format_ts(T0 + 500)}"])
    assert [r["valueQuantity"]["value"] for r in early] == [72]


def test_device_read(bridge: BridgeThread) -> None:
    body = validated(get(bridge, "/fhir/Device/monitor-mon.u1"), "Device")
    assert body["identifier"][0]["value"] == "monitor/mon_u1" and body["status"] == "active"
    assert "patient" not in body and body["owner"]["display"] == "h1"
    bound = httpx.put(f"{bridge.url}/api/devices/bp/cuff-1/binding", headers=NURSE, json={"patient_id": "p_f1"})
    assert bound.status_code == 200
    cuff = validated(get(bridge, "/fhir/Device/bp-cuff-1"), "Device")
    assert cuff["patient"]["reference"] == "Patient/p.f1"


@pytest.mark.parametrize(("path", "params", "headers", "status", "code"), [
    ("/fhir/Observation", {"patient": "p.f1"}, {}, 401, "login"),
    ("/fhir/Observation", {}, None, 400, "required"),
    ("/fhir/Observation", {"patient": "p-nobody"}, None, 404, "not-found"),
    ("/fhir/Observation", {"patient": "p-h2"}, None, 404, "not-found"),  # another hospital: like unknown
    ("/fhir/Observation", {"patient": "p.f1", "_count": "0"}, None, 400, "invalid"),
    ("/fhir/Observation", {"patient": "p.f1", "date": "yesterday"}, None, 400, "invalid"),
    ("/fhir/Observation", {"patient": "p.f1", "_cursor": "1.2"}, None, 400, "invalid"),
    ("/fhir/Observation", {"patient": "p.f1", "value-quantity": "1"}, None, 400, "not-supported"),
    ("/fhir/Observation/r999999-hr", {}, None, 404, "not-found"),
    ("/fhir/Observation/nonsense", {}, None, 404, "not-found"),
    ("/fhir/Device/monitor-mon-h2", {}, None, 404, "not-found"),
    ("/fhir/Patient/p.f1", {}, None, 404, "not-supported"),
])
def test_errors_are_operation_outcomes(bridge: BridgeThread, path: str, params: dict, headers: dict | None,
                                       status: int, code: str) -> None:
    body = validated(get(bridge, path, headers, **params), "OperationOutcome", status)
    assert body["issue"][0]["code"] == code


def test_another_hospitals_observation_is_not_found(bridge: BridgeThread) -> None:
    admin = {"Authorization": f"Bearer {token('admin')}"}
    theirs = validated(get(bridge, "/fhir/Observation", admin, patient="p-h2"), "Bundle")["entry"][0]["resource"]
    validated(get(bridge, f"/fhir/Observation/{theirs['id']}"), "OperationOutcome", 404)


def test_writes_are_refused(bridge: BridgeThread) -> None:
    response = httpx.post(bridge.url + "/fhir/Observation", headers=NURSE, json={"resourceType": "Observation"})
    validated(response, "OperationOutcome", 405)


def test_fhir_reads_are_audited_with_their_patient(bridge: BridgeThread) -> None:
    resource = search_all(bridge, code="8867-4")[0]
    response = get(bridge, f"/fhir/Observation/{resource['id']}", {**NURSE, "X-Request-ID": "req-fhir-read"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-fhir-read"
    admin = {"Authorization": f"Bearer {token('admin')}"}

    def record() -> dict | None:
        items = httpx.get(f"{bridge.url}/api/audit", headers=admin, params={"subject": "nurse-fhir"}).json()["items"]
        return next((r for r in items if r["request_id"] == "req-fhir-read"), None)

    found = wait_until(record, what="the audit record of the FHIR read")
    assert (found["action"], found["patient_id"], found["outcome"]) == ("fhir.observation.read", "p_f1", "success")
    refused = get(bridge, "/fhir/Observation", {"X-Request-ID": "req-fhir-401"}, patient="p.f1")
    assert refused.status_code == 401
    denied = wait_until(lambda: next((r for r in httpx.get(f"{bridge.url}/api/audit", headers=admin,
                                                           params={"outcome": "denied"}).json()["items"]
                                      if r["request_id"] == "req-fhir-401"), None), what="the refused FHIR search")
    assert denied["patient_id"] == "p_f1" and denied["subject"] is None
