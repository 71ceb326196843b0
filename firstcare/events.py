"""The event envelope, built here and nowhere else.

Every event a browser sees has one shape::

    {"type": "vitals_update", "event": "patient.vitals.update", "room": "patient:p-001:vitals",
     "id": "<epoch>:<offset>", "ts": "2026-11-26T10:15:30.120Z", "data": {...}}

An :class:`Event` is what producers hand to the router (no room, no id); the hub gives it a
room and a per-room id when it is published, and :func:`envelope` makes the wire form.
Ephemeral events (``presence.*``) are never part of a room's history: their ``id`` is ``null``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from firstcare.payloads import format_ts, now_ms

EVENT_TYPES: dict[str, str] = {
    "patient.vitals.update": "vitals_update",
    "patient.alert.raised": "alert_raised",
    "patient.alert.acknowledged": "alert_acknowledged",
    "patient.alert.resolved": "alert_resolved",
    "patient.alert.escalated": "alert_escalated",
    "patient.status.change": "patient_status",
    "patient.news2.update": "news2_update",
    "device.data.update": "device_data",
    "device.status.change": "device_status",
    "hospital.alert": "hospital_alert",
    "hospital.capacity.update": "capacity_update",
    "hospital.emergency": "emergency",
    "system.maintenance": "maintenance",
    "system.alert": "system_alert",
    "presence.join": "presence_join",
    "presence.leave": "presence_leave",
}
EPHEMERAL_EVENTS = frozenset({"presence.join", "presence.leave"})

ALERT_EVENTS = frozenset(name for name in EVENT_TYPES if ".alert" in name)


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    data: dict[str, Any]
    ts_ms: int
    # Not on the wire: the device's own time of the reading behind the event, for latency metrics.
    device_ms: int | None = None

    @property
    def type(self) -> str:
        return EVENT_TYPES[self.name]

    @property
    def is_alert(self) -> bool:
        """Alert events are never dropped or coalesced on the way to a client."""
        return self.name in ALERT_EVENTS


def transition_key(event: Event) -> tuple[str, str, int] | None:
    """(alert id, action, time) of an alarm event: how its stored transition is found, and
    what makes it one publication however many bridges try to publish it (bridge/hub_redis.py).

    >>> transition_key(Event("patient.alert.raised", {"id": "a1"}, 5))
    ('a1', 'raised', 5)
    >>> transition_key(Event("patient.vitals.update", {}, 5)) is None
    True
    """
    if not event.name.startswith("patient.alert.") or not isinstance(event.data.get("id"), str):
        return None
    return event.data["id"], event.name.rsplit(".", 1)[1], event.ts_ms


def make_event(name: str, data: dict[str, Any], ts_ms: int | None = None, device_ms: int | None = None) -> Event:
    if name not in EVENT_TYPES:
        raise ValueError(f"unknown event {name!r} (one of {', '.join(EVENT_TYPES)})")
    return Event(name, data, now_ms() if ts_ms is None else ts_ms, device_ms)


def event_id(epoch: str, offset: int) -> str:
    return f"{epoch}:{offset}"


def parse_event_id(value: str) -> tuple[str, int]:
    """``"<epoch>:<offset>"`` to its parts; ValueError when malformed."""
    epoch, sep, offset = value.rpartition(":")
    if not sep or not epoch or not (offset.isascii() and offset.isdigit()):
        raise ValueError(f"malformed event id {value!r} (expected '<epoch>:<offset>')")
    return epoch, int(offset)


def envelope(event: Event, room: str, id: str | None) -> dict[str, Any]:
    return {
        "type": event.type,
        "event": event.name,
        "room": room,
        "id": id,
        "ts": format_ts(event.ts_ms),
        "data": event.data,
    }


_encoder = msgspec.json.Encoder()


def envelope_parts(event: Event) -> tuple[bytes, bytes, bytes]:
    """The envelope's bytes around its room and id: ``head + room + mid + id + tail``.

    A hub that assigns ids where the history lives (inside Redis, atomically) splices the room
    and id in there; room names and ids are plain ASCII that needs no JSON escaping.
    """
    head = _HEADS[event.name]
    tail = b'","ts":"' + format_ts(event.ts_ms).encode() + b'","data":' + _encoder.encode(event.data) + b"}"
    return head, b'","id":"', tail


_HEADS = {name: b'{"type":' + _encoder.encode(type) + b',"event":' + _encoder.encode(name) + b',"room":"'
          for name, type in EVENT_TYPES.items()}


def splice(parts: tuple[bytes, bytes, bytes], room: str, id: str) -> bytes:
    """One room's envelope from :func:`envelope_parts`: an event reaching several rooms is
    encoded once and spliced per room; every client in a room gets the same bytes."""
    head, mid, tail = parts
    return head + room.encode() + mid + id.encode() + tail


def encode_envelope(event: Event, room: str, id: str) -> bytes:
    return splice(envelope_parts(event), room, id)


def encode_ephemeral(event: Event, room: str) -> bytes:
    """An event outside the room's history (presence): the same envelope with ``"id": null``.

    >>> encode_ephemeral(Event("presence.join", {"user": "u"}, 0), "system")[:60]
    b'{"type":"presence_join","event":"presence.join","room":"syst'
    """
    return _encoder.encode(envelope(event, room, None))
