"""What the gateway does to each device message, pure: validate with the shared wire contract,
enforce the gateway's hospital, fill ``patient_id`` from the bed map, and re-encode.

Only validated content is forwarded: bad readings of a batch are dead-lettered here, at the
edge, and the good ones travel on. Status messages (and wills) get priority over vitals. A
device's ``boot`` travels untouched, so the bridge sees the same reading identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from firstcare.errors import TopicError
from firstcare.payloads import (
    Rejection,
    decode_status,
    decode_vitals,
    encode_readings,
    encode_status,
    vitals_body,
)
from firstcare.mqtt import Inbound
from firstcare.topics import make_topic, parse_topic

PRIORITY_STATUS = 0
PRIORITY_VITALS = 1


@dataclass(frozen=True, slots=True)
class Outbound:
    topic: str
    payload: bytes
    priority: int
    device: str
    received_ms: int


@dataclass(frozen=True, slots=True)
class Refused:
    topic: str
    payload: bytes
    received_ms: int
    rejection: Rejection


def stamp(message: Inbound, hospital_id: str, patient_for: Callable[[str, str], str | None],
          root: str = "fc") -> tuple[list[Outbound], list[Refused]]:
    try:
        topic = parse_topic(message.topic, root)
    except TopicError as exc:
        return [], [Refused(message.topic, message.payload, message.received_ms, Rejection(exc.reason, str(exc)))]
    out_topic = make_topic(hospital_id, topic.device_type, topic.device_id, topic.kind, root)
    device = f"{topic.device_type}/{topic.device_id}"
    if topic.kind == "status":
        status = decode_status(topic, message.payload, message.received_ms)
        if isinstance(status, Rejection):
            return [], [Refused(message.topic, message.payload, message.received_ms, status)]
        payload = encode_status(status.state, status.battery, status.firmware, status.ts_ms, status.boot)
        return [Outbound(out_topic, payload, PRIORITY_STATUS, device, message.received_ms)], []
    decoded = decode_vitals(topic, message.payload, message.received_ms)
    refused = [Refused(message.topic, message.payload, message.received_ms, r) for r in decoded.rejections]
    if not decoded.readings:
        return [], refused
    bound = patient_for(topic.device_type, topic.device_id)
    bodies = [vitals_body(r.seq, r.ts_ms, r.metrics, r.patient_id or bound, r.boot) for r in decoded.readings]
    return [Outbound(out_topic, payload, PRIORITY_VITALS, device, message.received_ms)
            for payload in encode_readings(bodies)], refused
