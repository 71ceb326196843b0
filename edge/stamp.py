"""What the gateway does to each device message, pure: validate with the shared wire contract,
enforce the gateway's hospital, fill ``patient_id`` from the bed map, and re-encode.

Only validated content is forwarded: bad readings of a batch are dead-lettered here, at the
edge, and the good ones travel on. Status messages (and wills) get priority over vitals. A
device's ``boot`` travels untouched, so the bridge sees the same reading identity.

Signed readings (firstcare.signing) travel **untouched**: re-encoding or stamping would break
the device's signature, so the gateway checks the content against the contract and forwards the
exact bytes (a message with no valid reading is dead-lettered here; the bridge dead-letters the
bad readings of a mixed one). The gateway cannot verify them (the public keys live at the
bridge) and cannot alter them; the bed map does not apply (bind such devices with the bridge's
binding API, or have them send ``patient_id``). A gateway with its own key (``signer``) signs
the unsigned readings it stamps, on behalf of devices that cannot sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from firstcare.errors import TopicError
from firstcare.payloads import (
    MAX_PAYLOAD_BYTES,
    Inbound,
    Rejection,
    decode_status,
    decode_vitals,
    encode_readings,
    encode_status,
    vitals_body,
)
from firstcare.signing import is_signed, unwrap
from firstcare.topics import Topic, make_topic, parse_topic

Signer = Callable[[str, bytes], bytes]
"""(topic, payload) -> the signed wrapper for that topic."""

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


def sign_within(bodies: list[dict], topic: str, signer: Signer, limit: int = MAX_PAYLOAD_BYTES) -> list[bytes]:
    """Readings as signed messages of at most ``limit`` bytes each: the wrapper escapes the
    inner JSON, so a chunk that outgrows the limit is split again, smaller."""
    out: list[bytes] = []
    for chunk_limit in (limit, limit * 3 // 4, limit // 2, limit // 4):
        out = [signer(topic, p) for p in encode_readings(bodies, chunk_limit)]
        if all(len(p) <= limit for p in out):
            return out
    return [p for p in out if len(p) <= limit]


def stamp(message: Inbound, hospital_id: str, patient_for: Callable[[str, str], str | None],
          root: str = "fc", signer: Signer | None = None) -> tuple[list[Outbound], list[Refused]]:
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
    if is_signed(message.payload):
        return _signed(message, topic, hospital_id, device)
    decoded = decode_vitals(topic, message.payload, message.received_ms)
    refused = [Refused(message.topic, message.payload, message.received_ms, r) for r in decoded.rejections]
    if not decoded.readings:
        return [], refused
    bound = patient_for(topic.device_type, topic.device_id)
    bodies = [vitals_body(r.seq, r.ts_ms, r.metrics, r.patient_id or bound, r.boot) for r in decoded.readings]
    payloads = sign_within(bodies, out_topic, signer) if signer is not None else encode_readings(bodies)
    return [Outbound(out_topic, payload, PRIORITY_VITALS, device, message.received_ms)
            for payload in payloads], refused


def _signed(message: Inbound, topic: Topic, hospital_id: str, device: str) -> tuple[list[Outbound], list[Refused]]:
    def refuse(rejection: Rejection) -> tuple[list[Outbound], list[Refused]]:
        return [], [Refused(message.topic, message.payload, message.received_ms, rejection)]

    if len(message.payload) > MAX_PAYLOAD_BYTES:
        return refuse(Rejection("payload_too_large", f"{len(message.payload)} bytes > {MAX_PAYLOAD_BYTES}"))
    wrapper = unwrap(message.payload)
    if isinstance(wrapper, Rejection):
        return refuse(wrapper)
    if topic.hospital_id != hospital_id:
        return refuse(Rejection("hospital_mismatch", f"signed for hospital {topic.hospital_id!r}; this gateway "
                                f"forwards for {hospital_id!r} and cannot re-address a signed reading"))
    decoded = decode_vitals(topic, wrapper[0], message.received_ms)
    if not decoded.readings:
        return [], [Refused(message.topic, message.payload, message.received_ms, r) for r in decoded.rejections]
    return [Outbound(message.topic, message.payload, PRIORITY_VITALS, device, message.received_ms)], []
