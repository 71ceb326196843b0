"""Which rooms an event belongs to, pure.

    patient.vitals.update   -> patient:{pid}:vitals, patient:{pid}, hospital:{hid}, device:{type}:{id}
    device.data.update      -> device:{type}:{id}                (a reading with no patient)
    patient.news2.update    -> patient:{pid}, hospital:{hid}
    patient.alert.*         -> patient:{pid}:alerts, patient:{pid}, hospital:{hid}:alerts
                               (+ hospital:{hid} when escalated; + device room for technical alarms)
    device.status.change    -> device:{type}:{id}, hospital:{hid}, patient:{pid} when bound
    hospital.*              -> hospital:{hid}
    system.*                -> system
    presence.join|leave     -> the room named in the event (ephemeral: never in a room's history)

The most specific room comes first: a connection in several of an event's rooms receives it
once, under the first of them it has joined.
"""

from __future__ import annotations

from typing import Any

from firstcare import rooms
from firstcare.events import Event


def _id(value: Any) -> str | None:
    """An id the event carries, or None when it is absent or empty: a room is never built
    from a missing id (no ``patient:None``)."""
    return value if isinstance(value, str) and value else None


def rooms_for(event: Event) -> list[str]:
    d = event.data
    name = event.name
    pid, hid = _id(d.get("patient_id")), _id(d.get("hospital_id"))
    device_type, device_id = _id(d.get("device_type")), _id(d.get("device_id"))
    device = rooms.device_room(device_type, device_id) if device_type and device_id else None
    out: list[str] = []
    if name == "patient.vitals.update":
        if pid:
            out += [rooms.patient_vitals_room(pid), rooms.patient_room(pid)]
        if hid:
            out.append(rooms.hospital_room(hid))
        if device:
            out.append(device)
    elif name == "device.data.update":
        if device:
            out.append(device)
    elif name.startswith("patient.alert."):
        if pid:
            out += [rooms.patient_alerts_room(pid), rooms.patient_room(pid)]
        if hid:
            out.append(rooms.hospital_alerts_room(hid))
            if name == "patient.alert.escalated":
                out.append(rooms.hospital_room(hid))
        if d.get("kind") == "technical" and device:
            out.append(device)
    elif name == "device.status.change":
        if device:
            out.append(device)
        if hid:
            out.append(rooms.hospital_room(hid))
        if pid:
            out.append(rooms.patient_room(pid))
    elif name == "patient.news2.update" or name == "patient.status.change":
        if pid:
            out.append(rooms.patient_room(pid))
        if hid:
            out.append(rooms.hospital_room(hid))
    elif name.startswith("hospital."):
        if hid:
            out.append(rooms.hospital_room(hid))
    elif name.startswith("system."):
        out.append(rooms.SYSTEM)
    elif name.startswith("presence.") and (room := _id(d.get("room"))):
        out.append(room)
    return out
