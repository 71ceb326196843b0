"""Stored readings and NEWS2 scores as HL7 FHIR R4 resources: pure mapping, no I/O.

One reading (a device's message: several metrics at one time) becomes one Observation per vital
sign, with a stable id made of the reading's database id and a short kind::

    reading 1042 {heart_rate, spo2, systolic_bp, diastolic_bp}
      -> Observation/r1042-hr    8867-4   heart rate              /min    heartrate profile
      -> Observation/r1042-spo2  2708-6 + 59408-5 SpO2            %       oxygensat profile
      -> Observation/r1042-bp    85354-9  BP panel, components 8480-6 / 8462-4 mm[Hg]   bp profile
    NEWS2 score 7 -> Observation/news2-7  SNOMED CT 1104051000000101, valueInteger, a component per parameter

FHIR ids allow ``[A-Za-z0-9.-]``: an ``_`` of our ids (patients, devices) is written ``.``,
which our ids never contain, so the mapping is reversible. A device is ``Device/{type}-{id}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from firstcare.payloads import format_ts

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
PROFILE = "http://hl7.org/fhir/StructureDefinition/"
FHIR_VERSION = "4.0.1"
CONTENT_TYPE = "application/fhir+json"
ID_SYSTEM = "urn:firstcare"


def category(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": CATEGORY_SYSTEM, "code": code, "display": display}], "text": display}


VITAL_SIGNS = category("vital-signs", "Vital Signs")
LABORATORY = category("laboratory", "Laboratory")
SURVEY = category("survey", "Survey")


@dataclass(frozen=True, slots=True)
class Kind:
    """How one vital sign maps: its slug in Observation ids, metrics, codes, unit, profile."""

    slug: str
    metrics: tuple[str, ...]
    codings: tuple[tuple[str, str], ...]  # (LOINC code, display)
    text: str
    unit: str  # UCUM code
    unit_display: str
    profile: str | None
    category: str = "vital-signs"


KINDS: tuple[Kind, ...] = (
    Kind("hr", ("heart_rate",), (("8867-4", "Heart rate"),), "Heart rate", "/min", "beats/minute", "heartrate"),
    Kind("spo2", ("spo2",), (("2708-6", "Oxygen saturation in Arterial blood"),
                             ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry")),
         "Oxygen saturation (SpO2)", "%", "%", "oxygensat"),
    Kind("rr", ("respiratory_rate",), (("9279-1", "Respiratory rate"),), "Respiratory rate", "/min",
         "breaths/minute", "resprate"),
    Kind("temp", ("temperature",), (("8310-5", "Body temperature"),), "Body temperature", "Cel", "Cel", "bodytemp"),
    Kind("bp", ("systolic_bp", "diastolic_bp"), (("85354-9", "Blood pressure panel with all children optional"),),
         "Blood pressure", "mm[Hg]", "mmHg", "bp"),
    Kind("weight", ("weight",), (("29463-7", "Body weight"),), "Body weight", "kg", "kg", "bodyweight"),
    # glucose is not a vital sign: a point-of-care laboratory result, LOINC chosen by specimen and method
    Kind("glucose", ("glucose",), (("2339-0", "Glucose [Mass/volume] in Blood"),), "Glucose", "mg/dL", "mg/dL", None,
         "laboratory"),
)
KIND_BY_SLUG = {k.slug: k for k in KINDS}
GLUCOMETER_GLUCOSE = ("41653-7", "Glucose [Mass/volume] in Capillary blood by Glucometer")
BP_COMPONENTS = {"systolic_bp": ("8480-6", "Systolic blood pressure"),
                 "diastolic_bp": ("8462-4", "Diastolic blood pressure")}

NEWS2_TOTAL = ("1104051000000101", "Royal College of Physicians National Early Warning Score 2 - total score")
NEWS2_PARTS: Mapping[str, tuple[str, str]] = {
    "respiratory_rate": ("1104301000000104", "NEWS2 - respiration rate score"),
    "spo2_scale_1": ("1104311000000102", "NEWS2 - oxygen saturation scale 1 score"),
    "spo2_scale_2": ("1104321000000108", "NEWS2 - oxygen saturation scale 2 score"),
    "supplemental_oxygen": ("1104331000000105", "NEWS2 - air or oxygen score"),
    "systolic_bp": ("1104341000000101", "NEWS2 - systolic blood pressure score"),
    "heart_rate": ("1104351000000103", "NEWS2 - pulse score"),
    "consciousness": ("1104361000000100", "NEWS2 - consciousness score"),
    "temperature": ("1104371000000107", "NEWS2 - temperature score"),
}
NEWS2_CODE = f"{SNOMED}|{NEWS2_TOTAL[0]}"


# ------------------------------------------------------------------------------------ ids


def fhir_id(value: str) -> str:
    """Our id (``[A-Za-z0-9_-]``) as a FHIR id (``[A-Za-z0-9.-]``)."""
    return value.replace("_", ".")


def our_id(value: str) -> str:
    return value.replace(".", "_")


def device_fhir_id(device_type: str, device_id: str) -> str:
    """``{type}-{id}``; device types hold no ``-``, so the first one separates. Past FHIR's 64
    characters, a hash (looked up by scanning the devices: such ids are rare)."""
    plain = f"{device_type}-{fhir_id(device_id)}"
    if len(plain) <= 64:
        return plain
    return "h-" + hashlib.sha256(f"{device_type}/{device_id}".encode()).hexdigest()[:40]


def parse_device_fhir_id(value: str) -> tuple[str, str] | None:
    """(type, id) of a plain device FHIR id; None for a hashed or malformed one."""
    device_type, sep, rest = value.partition("-")
    if not sep or not rest or device_type == "h":
        return None
    return device_type, our_id(rest)


def observation_id(reading_id: int, slug: str) -> str:
    return f"r{reading_id}-{slug}"


def parse_observation_id(value: str) -> tuple[str, int, str] | None:
    """``("reading", id, slug)`` or ``("news2", id, "")``; None when it is not one of ours."""
    if value.startswith("news2-") and value[6:].isdigit():
        return "news2", int(value[6:]), ""
    head, sep, slug = value.partition("-")
    if sep and head[:1] == "r" and head[1:].isdigit() and slug in KIND_BY_SLUG and len(head) < 19:
        return "reading", int(head[1:]), slug
    return None


def patient_reference(patient_id: str) -> dict[str, Any]:
    return {"reference": f"Patient/{fhir_id(patient_id)}",
            "identifier": {"system": f"{ID_SYSTEM}:patient", "value": patient_id}}


def device_reference(device_type: str, device_id: str) -> dict[str, Any]:
    return {"reference": f"Device/{device_fhir_id(device_type, device_id)}", "display": f"{device_type} {device_id}"}


# ---------------------------------------------------------------------------- observations


def kinds_of(metrics: Mapping[str, float]) -> list[Kind]:
    """The Observations one reading makes, in KINDS order."""
    return [k for k in KINDS if any(m in metrics for m in k.metrics)]


def _quantity(value: float, unit: str, display: str) -> dict[str, Any]:
    return {"value": value, "unit": display, "system": UCUM, "code": unit}


def _codeable(codings: Sequence[tuple[str, str]], text: str, system: str = LOINC) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": c, "display": d} for c, d in codings], "text": text}


def reading_observation(reading: Mapping[str, Any], kind: Kind) -> dict[str, Any]:
    """One Observation of a stored reading (``id``, ``patient_id``, ``device_type``,
    ``device_id``, ``ts_ms``, ``received_ms``, ``metrics``)."""
    metrics = reading["metrics"]
    codings = kind.codings
    if kind.slug == "glucose" and reading["device_type"] == "glucometer":
        codings = (GLUCOMETER_GLUCOSE,)
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id(reading["id"], kind.slug),
        "status": "final",
        "category": [VITAL_SIGNS if kind.category == "vital-signs" else LABORATORY],
        "code": _codeable(codings, kind.text),
        "effectiveDateTime": format_ts(reading["ts_ms"]),
        "issued": format_ts(reading["received_ms"]),
        "device": device_reference(reading["device_type"], reading["device_id"]),
        "identifier": [{"system": f"{ID_SYSTEM}:reading",
                        "value": f"{reading['device_type']}/{reading['device_id']}/{reading['seq']}/{kind.slug}"}],
    }
    if reading.get("patient_id"):
        resource["subject"] = patient_reference(reading["patient_id"])
        if kind.profile:  # the vital-signs profiles need a Patient subject
            resource["meta"] = {"profile": [PROFILE + kind.profile]}
    if kind.slug == "bp":
        resource["component"] = [_bp_component(metric, metrics.get(metric)) for metric in kind.metrics]
    else:
        resource["valueQuantity"] = _quantity(metrics[kind.metrics[0]], kind.unit, kind.unit_display)
    return resource


def _bp_component(metric: str, value: float | None) -> dict[str, Any]:
    component: dict[str, Any] = {"code": _codeable([BP_COMPONENTS[metric]], BP_COMPONENTS[metric][1])}
    if value is None:  # the profile wants both: say which one the device did not send
        component["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": "not-performed"}],
                                         "text": "not measured by the device"}
    else:
        component["valueQuantity"] = _quantity(value, "mm[Hg]", "mmHg")
    return component


def news2_observation(score: Mapping[str, Any]) -> dict[str, Any]:
    """A stored NEWS2 score (``GET /api/patients/{pid}/news2`` item) as an Observation.
    ``final`` when complete; ``preliminary`` (with a note naming what is missing or stale, the
    total being a lower bound) otherwise."""
    parts = score["parameters"]
    components = []
    for name in ("respiratory_rate", "spo2", "supplemental_oxygen", "systolic_bp", "heart_rate", "consciousness",
                 "temperature"):
        key = f"spo2_scale_{score['spo2_scale']}" if name == "spo2" else name
        code = NEWS2_PARTS[key]
        component: dict[str, Any] = {"code": _codeable([code], code[1], SNOMED)}
        if name in parts:
            component["valueInteger"] = parts[name]["score"]
        else:
            reason = "stale" if name in score["stale"] else "missing"
            component["dataAbsentReason"] = {"coding": [{"system": DATA_ABSENT, "code": "unknown"}],
                                             "text": f"{reason}: not counted"}
        components.append(component)
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"news2-{score['id']}",
        "status": "final" if score["complete"] else "preliminary",
        "category": [SURVEY],
        "code": _codeable([NEWS2_TOTAL], "NEWS2 total score", SNOMED),
        "subject": patient_reference(score["patient_id"]),
        "effectiveDateTime": score["computed_at"],
        "valueInteger": score["total"],
        "interpretation": [{"text": f"{score['band']} clinical risk"}],
        "component": components,
    }
    if not score["complete"]:
        absent = [*(f"{n} missing" for n in score["missing"]), *(f"{n} stale" for n in score["stale"])]
        resource["note"] = [{"text": f"Incomplete score ({', '.join(absent)}): the total is a lower bound."}]
    return resource


# ------------------------------------------------------------------------- other resources


DEVICE_STATUS = {"online": "active", "offline": "inactive"}


def device_resource(device: Mapping[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": device_fhir_id(device["device_type"], device["device_id"]),
        "identifier": [{"system": f"{ID_SYSTEM}:device", "value": f"{device['device_type']}/{device['device_id']}"}],
        "status": DEVICE_STATUS.get(device["state"], "unknown"),
        "deviceName": [{"name": device["device_id"], "type": "user-friendly-name"}],
        "type": {"text": device["device_type"]},
    }
    if device.get("firmware"):
        resource["version"] = [{"value": device["firmware"]}]
    if device.get("patient_id"):
        resource["patient"] = patient_reference(device["patient_id"])
    if device.get("hospital_id"):
        resource["owner"] = {"identifier": {"system": f"{ID_SYSTEM}:hospital", "value": device["hospital_id"]},
                             "display": device["hospital_id"]}
    return resource


def capability_statement(base_url: str, version: str, now_ms: int) -> dict[str, Any]:
    profiles = [PROFILE + k.profile for k in KINDS if k.profile]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_ts(now_ms),
        "publisher": "FirstCare Realtime",
        "kind": "instance",
        "software": {"name": "FirstCare Realtime", "version": version},
        "implementation": {"description": "Vital signs and NEWS2 scores of remote patient monitoring (read only)",
                           "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": [CONTENT_TYPE],
        "rest": [{
            "mode": "server",
            "security": {"description": "A JWT as 'Authorization: Bearer <token>', scoped by hospital like the "
                                        "REST API: a resource the token may not see answers 404."},
            "resource": [
                {"type": "Observation", "profile": PROFILE + "vitalsigns", "supportedProfile": profiles,
                 "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [
                     {"name": "patient", "type": "reference", "documentation": "required: Patient/<id> or <id>"},
                     {"name": "code", "type": "token", "documentation": "LOINC (or SNOMED CT for NEWS2), comma = or"},
                     {"name": "category", "type": "token", "documentation": "vital-signs, laboratory or survey"},
                     {"name": "date", "type": "date", "documentation": "eq, ge, gt, le, lt; repeat for a range"},
                     {"name": "_count", "type": "number", "documentation": "page size, 1..500 (default 50)"},
                 ]},
                {"type": "Device", "interaction": [{"code": "read"}]},
            ],
        }],
    }


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def bundle(self_url: str, next_url: str | None, entries: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"fullUrl": url, "resource": resource, "search": {"mode": "match"}}
                      for url, resource in entries]}
