"""Room names, the only place that knows them.

    patient:{pid}            patient:{pid}:vitals     patient:{pid}:alerts
    hospital:{hid}           hospital:{hid}:alerts
    device:{type}:{id}       system

>>> parse_room("patient:p-001:vitals")
Room(kind='patient_vitals', key=('p-001',))
"""

from __future__ import annotations

from dataclasses import dataclass

from firstcare.errors import RoomError
from firstcare.topics import DEVICE_TYPES, is_valid_id

SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Room:
    kind: str  # patient | patient_vitals | patient_alerts | hospital | hospital_alerts | device | system
    key: tuple[str, ...]

    @property
    def name(self) -> str:
        return _FORMATS[self.kind].format(*self.key)

    @property
    def patient_id(self) -> str | None:
        return self.key[0] if self.kind.startswith("patient") else None

    @property
    def hospital_id(self) -> str | None:
        return self.key[0] if self.kind.startswith("hospital") else None

    @property
    def device(self) -> tuple[str, str] | None:
        return (self.key[0], self.key[1]) if self.kind == "device" else None

    def __str__(self) -> str:
        return self.name


_FORMATS = {
    "patient": "patient:{}",
    "patient_vitals": "patient:{}:vitals",
    "patient_alerts": "patient:{}:alerts",
    "hospital": "hospital:{}",
    "hospital_alerts": "hospital:{}:alerts",
    "device": "device:{}:{}",
    "system": "system",
}


def parse_room(name: str) -> Room:
    """Parse and validate a room name; raise :class:`RoomError` (reason ``room_invalid``)."""
    if not isinstance(name, str):
        raise RoomError("room must be a string")
    if name == SYSTEM:
        return Room("system", ())
    parts = name.split(":")
    head, rest = parts[0], parts[1:]
    if head in ("patient", "hospital") and len(rest) in (1, 2) and is_valid_id(rest[0]):
        suffix = rest[1] if len(rest) == 2 else None
        if suffix is None:
            return Room(head, (rest[0],))
        if suffix == "alerts" or (head == "patient" and suffix == "vitals"):
            return Room(f"{head}_{suffix}", (rest[0],))
    if head == "device" and len(rest) == 2 and rest[0] in DEVICE_TYPES and is_valid_id(rest[1]):
        return Room("device", (rest[0], rest[1]))
    raise RoomError(f"unknown room {name!r}")


def patient_room(pid: str) -> str:
    return f"patient:{pid}"


def patient_vitals_room(pid: str) -> str:
    return f"patient:{pid}:vitals"


def patient_alerts_room(pid: str) -> str:
    return f"patient:{pid}:alerts"


def hospital_room(hid: str) -> str:
    return f"hospital:{hid}"


def hospital_alerts_room(hid: str) -> str:
    return f"hospital:{hid}:alerts"


def device_room(device_type: str, device_id: str) -> str:
    return f"device:{device_type}:{device_id}"
