"""Room grammar (firstcare/rooms.py) and the one permission rule (firstcare/permissions.py)."""

from __future__ import annotations

from typing import Any

import pytest

from firstcare import rooms
from firstcare.errors import RoomError
from firstcare.permissions import Claims, can_subscribe, can_view_hospital, can_view_patient, visible_hospitals
from firstcare.rooms import Room, parse_room

EXP = 1_900_000_000
ADMIN = Claims("ops", "admin", EXP)
SERVICE = Claims("svc", "service", EXP)
CLINICIAN = Claims("dr", "clinician", EXP, hospitals=frozenset({"h1"}))
PATIENT = Claims("pat", "patient", EXP, patients=frozenset({"p1"}))
NOBODY = Claims("new-dr", "clinician", EXP)  # clinician with no hospitals


# ------------------------------------------------------------------------------- rooms


@pytest.mark.parametrize(
    ("name", "kind", "key", "patient_id", "hospital_id", "device"),
    [
        ("patient:p-001", "patient", ("p-001",), "p-001", None, None),
        ("patient:p-001:vitals", "patient_vitals", ("p-001",), "p-001", None, None),
        ("patient:p_1:alerts", "patient_alerts", ("p_1",), "p_1", None, None),
        ("hospital:h1", "hospital", ("h1",), None, "h1", None),
        ("hospital:h1:alerts", "hospital_alerts", ("h1",), None, "h1", None),
        ("device:oximeter:ox-7", "device", ("oximeter", "ox-7"), None, None, ("oximeter", "ox-7")),
        ("system", "system", (), None, None, None),
    ],
)
def test_parse_room_all_kinds(name, kind, key, patient_id, hospital_id, device) -> None:
    room = parse_room(name)
    assert room == Room(kind, key)
    assert (room.patient_id, room.hospital_id, room.device) == (patient_id, hospital_id, device)
    assert room.name == name == str(room)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "patients:p1",
        "Patient:p1",
        "ward:w1",
        "system:x",
        "System",
        "patient",
        "patient:",
        "patient:p 1",
        "patient:p.1",
        "patient:" + "p" * 65,
        "patient:x:foo",
        "patient:x:vitals:extra",
        "patient:x:",
        "hospital:x:vitals",
        "hospital:",
        "hospital:h 1:alerts",
        "hospital:h1:alerts:x",
        "device:toaster:1",
        "device:monitor",
        "device:monitor:",
        "device:monitor:m 1",
        "device:monitor:m1:vitals",
        "device::m1",
        ":p1",
        "patient:*",
        "hospital:*",
    ],
)
def test_parse_room_rejects(name: str) -> None:
    with pytest.raises(RoomError) as info:
        parse_room(name)
    assert info.value.reason == "room_invalid"


@pytest.mark.parametrize("value", [None, 42, b"system", ["system"]])
def test_parse_room_rejects_non_strings(value: Any) -> None:
    with pytest.raises(RoomError):
        parse_room(value)


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (rooms.patient_room("p1"), "patient:p1"),
        (rooms.patient_vitals_room("p1"), "patient:p1:vitals"),
        (rooms.patient_alerts_room("p1"), "patient:p1:alerts"),
        (rooms.hospital_room("h1"), "hospital:h1"),
        (rooms.hospital_alerts_room("h1"), "hospital:h1:alerts"),
        (rooms.device_room("bp", "cuff-2"), "device:bp:cuff-2"),
        (rooms.SYSTEM, "system"),
    ],
)
def test_room_builders_parse_back(built: str, expected: str) -> None:
    assert built == expected
    assert parse_room(built).name == built


# ------------------------------------------------------------------------------- can_subscribe

ALL_ROOMS = [
    ("patient:p1", "h1"), ("patient:p1:vitals", "h1"), ("patient:p1:alerts", "h1"),
    ("patient:p9", None), ("hospital:h1", None), ("hospital:h2:alerts", None),
    ("device:monitor:m1", "h2"), ("device:scale:s1", None), ("system", None),
]


@pytest.mark.parametrize("claims", [ADMIN, SERVICE], ids=["admin", "service"])
@pytest.mark.parametrize(("room", "owner"), ALL_ROOMS)
def test_admin_and_service_see_everything(claims: Claims, room: str, owner: str | None) -> None:
    assert can_subscribe(claims, parse_room(room), owner) is True


@pytest.mark.parametrize(
    ("claims", "room", "owner", "allowed"),
    [
        # clinician of h1
        (CLINICIAN, "hospital:h1", None, True),
        (CLINICIAN, "hospital:h2", None, False),
        (CLINICIAN, "hospital:h1:alerts", None, True),
        (CLINICIAN, "hospital:h2:alerts", None, False),
        (CLINICIAN, "hospital:h1", "h2", True),  # owner ignored for hospital rooms
        (CLINICIAN, "hospital:h2", "h1", False),
        (CLINICIAN, "patient:p1", "h1", True),
        (CLINICIAN, "patient:p1", "h2", False),
        (CLINICIAN, "patient:p1", None, False),
        (CLINICIAN, "patient:p1:vitals", "h1", True),
        (CLINICIAN, "patient:p1:vitals", "h2", False),
        (CLINICIAN, "patient:p1:vitals", None, False),
        (CLINICIAN, "patient:p1:alerts", "h1", True),
        (CLINICIAN, "patient:p1:alerts", "h2", False),
        (CLINICIAN, "patient:p1:alerts", None, False),
        (CLINICIAN, "device:monitor:m1", "h1", True),
        (CLINICIAN, "device:monitor:m1", "h2", False),
        (CLINICIAN, "device:monitor:m1", None, False),
        (CLINICIAN, "system", None, True),
        # clinician without hospitals sees only the system room
        (NOBODY, "hospital:h1", None, False),
        (NOBODY, "patient:p1", "h1", False),
        (NOBODY, "device:monitor:m1", "h1", False),
        (NOBODY, "system", None, True),
        # patient p1
        (PATIENT, "patient:p1", None, True),
        (PATIENT, "patient:p1", "h1", True),
        (PATIENT, "patient:p1:vitals", "h1", True),
        (PATIENT, "patient:p1:alerts", "h1", True),
        (PATIENT, "patient:p2", "h1", False),
        (PATIENT, "patient:p2:vitals", "h1", False),
        (PATIENT, "patient:p2:alerts", None, False),
        (PATIENT, "hospital:h1", None, False),
        (PATIENT, "hospital:h1:alerts", None, False),
        (PATIENT, "hospital:h2", None, False),
        (PATIENT, "device:monitor:m1", "h1", False),
        (PATIENT, "device:monitor:m1", None, False),
        (PATIENT, "system", None, True),
    ],
)
def test_can_subscribe_table(claims: Claims, room: str, owner: str | None, allowed: bool) -> None:
    assert can_subscribe(claims, parse_room(room), owner) is allowed


def test_patient_role_hospitals_claim_grants_nothing() -> None:
    # a "patient" token that also lists hospitals must not see those hospitals
    claims = Claims("pat", "patient", EXP, hospitals=frozenset({"h1"}), patients=frozenset({"p1"}))
    assert can_subscribe(claims, parse_room("hospital:h1"), None) is False
    assert can_subscribe(claims, parse_room("patient:p2"), "h1") is False
    assert can_subscribe(claims, parse_room("device:monitor:m1"), "h1") is False


def test_unknown_role_gets_nothing() -> None:
    claims = Claims("x", "visitor", EXP, hospitals=frozenset({"h1"}), patients=frozenset({"p1"}))
    for room, owner in ALL_ROOMS:
        assert can_subscribe(claims, parse_room(room), owner) is False, room


# ------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("claims", "patient_id", "hospital", "allowed"),
    [
        (ADMIN, "p1", None, True),
        (SERVICE, "p9", "h9", True),
        (CLINICIAN, "p1", "h1", True),
        (CLINICIAN, "p1", "h2", False),
        (CLINICIAN, "p1", None, False),
        (PATIENT, "p1", None, True),
        (PATIENT, "p1", "h2", True),
        (PATIENT, "p2", "h1", False),
        (NOBODY, "p1", "h1", False),
    ],
)
def test_can_view_patient(claims: Claims, patient_id: str, hospital: str | None, allowed: bool) -> None:
    assert can_view_patient(claims, patient_id, hospital) is allowed


@pytest.mark.parametrize(
    ("claims", "hospital", "allowed"),
    [(ADMIN, "h2", True), (CLINICIAN, "h1", True), (CLINICIAN, "h2", False), (CLINICIAN, None, False),
     (PATIENT, "h1", False)],
)
def test_can_view_hospital(claims: Claims, hospital: str | None, allowed: bool) -> None:
    assert can_view_hospital(claims, hospital) is allowed


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        (ADMIN, None),
        (SERVICE, None),
        (CLINICIAN, frozenset({"h1"})),
        (Claims("dr2", "clinician", EXP, hospitals=frozenset({"h1", "h2"})), frozenset({"h1", "h2"})),
        (NOBODY, frozenset()),
        (PATIENT, frozenset()),
        (Claims("pat", "patient", EXP, hospitals=frozenset({"h1"})), frozenset()),
    ],
)
def test_visible_hospitals(claims: Claims, expected: frozenset[str] | None) -> None:
    assert visible_hospitals(claims) == expected


@pytest.mark.parametrize(
    ("claims", "is_admin", "sees_everything"),
    [(ADMIN, True, True), (SERVICE, False, True), (CLINICIAN, False, False), (PATIENT, False, False)],
)
def test_role_properties(claims: Claims, is_admin: bool, sees_everything: bool) -> None:
    assert (claims.is_admin, claims.sees_everything) == (is_admin, sees_everything)
