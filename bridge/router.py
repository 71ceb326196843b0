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

from firstcare import rooms
from firstcare.events import Event


def rooms_for(event: Event) -> list[str]:
    d = event.data
    name = event.name
    pid, hid = d.get("patient_id"), d.get("hospital_id")
    device = (d.get("device_type"), d.get("device_id"))
    out: list[str] = []
    if name == "patient.vitals.update":
        out += [rooms.patient_vitals_room(pid), rooms.patient_room(pid), rooms.hospital_room(hid)]
        if device[0] and device[1]:
            out.append(rooms.device_room(*device))
    elif name == "device.data.update":
        out.append(rooms.device_room(*device))
    elif name.startswith("patient.alert."):
        if pid:
            out += [rooms.patient_alerts_room(pid), rooms.patient_room(pid)]
        if hid:
            out.append(rooms.hospital_alerts_room(hid))
            if name == "patient.alert.escalated":
                out.append(rooms.hospital_room(hid))
        if d.get("kind") == "technical" and device[0] and device[1]:
            out.append(rooms.device_room(*device))
    elif name == "device.status.change":
        out.append(rooms.device_room(*device))
        if hid:
            out.append(rooms.hospital_room(hid))
        if pid:
            out.append(rooms.patient_room(pid))
    elif name == "patient.news2.update" or name == "patient.status.change":
        out.append(rooms.patient_room(pid))
        if hid:
            out.append(rooms.hospital_room(hid))
    elif name.startswith("hospital."):
        out.append(rooms.hospital_room(hid))
    elif name.startswith("system."):
        out.append(rooms.SYSTEM)
    elif name.startswith("presence.") and d.get("room"):
        out.append(d["room"])
    return out
