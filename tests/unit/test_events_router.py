"""Event envelope (firstcare/events.py) and the router's event -> rooms table (bridge/router.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from bridge.router import rooms_for
from firstcare.events import (
    ALERT_EVENTS,
    EVENT_TYPES,
    encode_envelope,
    envelope,
    event_id,
    make_event,
    parse_event_id,
)
from firstcare.rooms import parse_room

T0 = 1_795_688_130_120  # 2026-11-26T10:15:30.120Z

# The dotted names DESIGN.md fixes (section "Events and rooms"), spelled out here so a rename in
# either place fails this test.
DESIGN_NAMES = [
    "patient.vitals.update",
    "patient.alert.raised",
    "patient.alert.acknowledged",
    "patient.alert.resolved",
    "patient.alert.escalated",
    "patient.status.change",
    "patient.news2.update",  # added with NEWS2 (a patient's early-warning score changed)
    "device.data.update",
    "device.status.change",
    "hospital.alert",
    "hospital.capacity.update",
    "hospital.emergency",
    "system.maintenance",
    "system.alert",
]
PRESENCE_NAMES = ["presence.join", "presence.leave"]  # ephemeral: who comes and goes in a room


# ------------------------------------------------------------------------------- events


@pytest.mark.parametrize("name", DESIGN_NAMES)
def test_every_design_name_maps_to_a_type(name: str) -> None:
    event = make_event(name, {}, T0)
    assert event.type == EVENT_TYPES[name]
    assert re.fullmatch(r"[a-z][a-z0-9_]*", event.type)


def test_event_types_are_exactly_the_design_names_and_unique() -> None:
    assert sorted(EVENT_TYPES) == sorted(DESIGN_NAMES + PRESENCE_NAMES)
    assert len(set(EVENT_TYPES.values())) == len(EVENT_TYPES)


def test_design_example_type() -> None:
    assert EVENT_TYPES["patient.vitals.update"] == "vitals_update"


@pytest.mark.parametrize(
    "name",
    ["", "patient.vitals", "patient.alert.updated", "Patient.vitals.update", "vitals_update",
     "patient.vitals.update ", "system.*", "hospital"],
)
def test_make_event_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ValueError):
        make_event(name, {"patient_id": "p1"}, T0)


@pytest.mark.parametrize(
    ("name", "is_alert"),
    [
        ("patient.alert.raised", True),
        ("patient.alert.acknowledged", True),
        ("patient.alert.resolved", True),
        ("patient.alert.escalated", True),
        ("hospital.alert", True),
        ("system.alert", True),
        ("patient.vitals.update", False),
        ("device.data.update", False),
        ("device.status.change", False),
        ("hospital.capacity.update", False),
        ("system.maintenance", False),
    ],
)
def test_is_alert(name: str, is_alert: bool) -> None:
    assert make_event(name, {}, T0).is_alert is is_alert
    assert (name in ALERT_EVENTS) is is_alert


def test_make_event_defaults_ts_to_now() -> None:
    event = make_event("system.maintenance", {"message": "x"})
    assert isinstance(event.ts_ms, int) and event.ts_ms > T0 - 10 * 365 * 86_400_000


@pytest.mark.parametrize("name", DESIGN_NAMES)
def test_envelope_shape(name: str) -> None:
    data = {"patient_id": "p-001", "hospital_id": "h1", "value": 1.5}
    event = make_event(name, data, T0)
    env = envelope(event, "patient:p-001:vitals", "ab12cd34:7")
    assert list(env) == ["type", "event", "room", "id", "ts", "data"]
    assert env == {
        "type": EVENT_TYPES[name], "event": name, "room": "patient:p-001:vitals",
        "id": "ab12cd34:7", "ts": "2026-11-26T10:15:30.120Z", "data": data,
    }
    assert json.loads(encode_envelope(event, "patient:p-001:vitals", "ab12cd34:7")) == env


@pytest.mark.parametrize(
    ("epoch", "offset"),
    [("ab12cd34", 0), ("ab12cd34", 1), ("e", 10**15), ("a-b_c", 42), ("with:colon", 3)],
)
def test_event_id_round_trip(epoch: str, offset: int) -> None:
    value = event_id(epoch, offset)
    assert value == f"{epoch}:{offset}"
    assert parse_event_id(value) == (epoch, offset)


@pytest.mark.parametrize(
    "value",
    [
        "", ":", "abc", "abc:", ":5", "abc:-1", "abc:+1", "abc:1.5", "abc:1e3", "abc: 1", "abc:1 ",
        "abc:x", "abc:0x10", "abc:\u00b2",
        "abc:\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() is True but it is not an offset
        "abc:\uff11",  # FULLWIDTH DIGIT ONE
    ],
)
def test_parse_event_id_rejects_malformed(value: str) -> None:
    with pytest.raises(ValueError):
        parse_event_id(value)


# ------------------------------------------------------------------------------- router

VITALS = {"patient_id": "p", "hospital_id": "h", "device_type": "monitor", "device_id": "m1"}
DEVICE = {"patient_id": None, "hospital_id": "h", "device_type": "monitor", "device_id": "m1"}
ALERT = {"patient_id": "p", "hospital_id": "h", "device_type": "monitor", "device_id": "m1", "kind": "clinical"}
TECH_PATIENT = {**ALERT, "kind": "technical"}
TECH_NO_PATIENT = {**ALERT, "kind": "technical", "patient_id": None}


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("patient.vitals.update", VITALS,
         ["patient:p:vitals", "patient:p", "hospital:h", "device:monitor:m1"]),
        ("device.data.update", DEVICE, ["device:monitor:m1"]),
        ("patient.alert.raised", ALERT, ["patient:p:alerts", "patient:p", "hospital:h:alerts"]),
        ("patient.alert.acknowledged", ALERT, ["patient:p:alerts", "patient:p", "hospital:h:alerts"]),
        ("patient.alert.resolved", ALERT, ["patient:p:alerts", "patient:p", "hospital:h:alerts"]),
        ("patient.alert.escalated", ALERT,
         ["patient:p:alerts", "patient:p", "hospital:h:alerts", "hospital:h"]),
        ("patient.alert.raised", TECH_PATIENT,
         ["patient:p:alerts", "patient:p", "hospital:h:alerts", "device:monitor:m1"]),
        ("patient.alert.escalated", TECH_PATIENT,
         ["patient:p:alerts", "patient:p", "hospital:h:alerts", "hospital:h", "device:monitor:m1"]),
        ("patient.alert.raised", TECH_NO_PATIENT, ["hospital:h:alerts", "device:monitor:m1"]),
        ("patient.alert.escalated", TECH_NO_PATIENT, ["hospital:h:alerts", "hospital:h", "device:monitor:m1"]),
        ("device.status.change", DEVICE, ["device:monitor:m1", "hospital:h"]),
        ("device.status.change", {**DEVICE, "patient_id": "p"}, ["device:monitor:m1", "hospital:h", "patient:p"]),
        ("device.status.change", {**DEVICE, "hospital_id": None}, ["device:monitor:m1"]),
        ("patient.status.change", {"patient_id": "p", "hospital_id": "h"}, ["patient:p", "hospital:h"]),
        ("patient.news2.update", {"patient_id": "p", "hospital_id": "h", "total": 7}, ["patient:p", "hospital:h"]),
        ("system.maintenance", {"message": "upgrade at 02:00"}, ["system"]),
        ("system.alert", {"message": "broker down"}, ["system"]),
        ("hospital.alert", {"hospital_id": "h"}, ["hospital:h"]),
        ("hospital.capacity.update", {"hospital_id": "h", "beds_free": 3}, ["hospital:h"]),
        ("hospital.emergency", {"hospital_id": "h", "code": "red"}, ["hospital:h"]),
        ("presence.join", {"room": "patient:p:vitals", "user": "u", "connections": 1}, ["patient:p:vitals"]),
        ("presence.leave", {"room": "hospital:h", "user": "u", "connections": 0}, ["hospital:h"]),
    ],
)
def test_rooms_for_table(name: str, data: dict, expected: list[str]) -> None:
    got = rooms_for(make_event(name, data, T0))
    assert got == expected
    assert len(set(got)) == len(got)
    for room in got:
        parse_room(room)  # every routed room is a valid room name


@pytest.mark.parametrize("name", [n for n in EVENT_TYPES if not n.startswith("system.")])
@pytest.mark.parametrize("missing", [None, ""])
def test_rooms_for_never_builds_a_room_from_a_missing_id(name: str, missing: str | None) -> None:
    """An event without a patient, hospital or device goes to the rooms it has ids for, never
    to ``patient:None`` or ``hospital:``; the other rooms are unaffected."""
    for key in ("patient_id", "hospital_id", "device_type", "device_id", "room"):
        data: dict[str, Any] = {**VITALS, "kind": "technical", "room": "hospital:h", key: missing}
        got = rooms_for(make_event(name, data, T0))
        for room in got:
            parse_room(room)
            assert "None" not in room and not room.endswith(":"), (key, got)
        with_all = rooms_for(make_event(name, {**VITALS, "kind": "technical", "room": "hospital:h"}, T0))
        assert set(got) <= set(with_all), (key, got)


def test_rooms_for_an_event_with_no_ids_is_empty() -> None:
    assert rooms_for(make_event("patient.news2.update", {"total": 7}, T0)) == []
    assert rooms_for(make_event("hospital.alert", {}, T0)) == []
    assert rooms_for(make_event("device.status.change", {"device_type": "monitor"}, T0)) == []


def test_presence_is_ephemeral_and_never_an_alert() -> None:
    from firstcare.events import EPHEMERAL_EVENTS, encode_ephemeral

    assert set(PRESENCE_NAMES) == EPHEMERAL_EVENTS
    event = make_event("presence.join", {"room": "system", "user": "u"}, T0)
    assert not event.is_alert
    body = json.loads(encode_ephemeral(event, "system"))
    assert (body["type"], body["event"], body["room"], body["id"]) == ("presence_join", "presence.join", "system", None)
