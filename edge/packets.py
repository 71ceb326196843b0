"""What the upstream broker can take, pure: MQTT packet sizes, splitting a batch that is too big,
and what an MQTT 5 refusal means for the message.

An MQTT 5 broker advertises the largest packet it accepts (CONNACK ``Maximum Packet Size``); a
bigger one gets the client disconnected, and a client that re-sends it on every reconnect never
gets past it. So each spool entry is measured before it is published:

>>> publish_packet_size("fc/v1/h1/monitor/m-1/vitals", 100, mqtt5=True)
135
>>> fit("fc/v1/h1/monitor/m-1/vitals", b'{"seq":1}', 0, mqtt5=True)
[b'{"seq":1}']

A vitals batch that does not fit is split into batches that do (``encode_readings``); the bridge
sees the same readings. A signed message cannot be split (the signature covers its exact bytes),
nor a status message: those are refused, to be quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from firstcare.payloads import encode_readings
from firstcare.signing import is_signed


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the upstream will not take a message. ``permanent``: quarantine at once; else after
    the gateway's limit of tries (``FC_EDGE_QUARANTINE_AFTER``)."""

    reason: str  # one of edge.spool.QUARANTINE_REASONS
    detail: str
    permanent: bool = True


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, mqtt5: bool) -> int:
    """Bytes of a QoS 1 PUBLISH: fixed header, topic, packet id, (MQTT 5: an empty property
    list), payload."""
    remaining = 2 + len(topic.encode()) + 2 + (1 if mqtt5 else 0) + payload_len
    return 1 + _varint_len(remaining) + remaining


def fit(topic: str, payload: bytes, max_packet: int, mqtt5: bool) -> list[bytes] | Refusal:
    """The payloads to publish for one spool entry: itself when it fits ``max_packet`` (0: no
    limit known), else its readings re-split into batches that each fit, else a refusal."""
    if max_packet <= 0 or publish_packet_size(topic, len(payload), mqtt5) <= max_packet:
        return [payload]
    size = publish_packet_size(topic, len(payload), mqtt5)
    too_big = f"{size} bytes > the upstream's maximum packet size {max_packet}"
    if is_signed(payload):
        return Refusal("packet_too_large",
                       f"{too_big}; a signed message cannot be split without breaking its signature")
    room = max_packet - publish_packet_size(topic, 0, mqtt5)
    bodies = _readings(payload)
    if bodies is None:
        return Refusal("packet_too_large", f"{too_big}; only a vitals batch can be split")
    parts = encode_readings(bodies, room) if room > 0 else []
    if not parts or any(len(p) > room for p in parts):
        return Refusal("packet_too_large", f"{too_big}; a single reading does not fit")
    return parts


def _readings(payload: bytes) -> list[dict] | None:
    """The readings of a stamped vitals payload (one reading, or ``{"readings": [...]}``)."""
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("readings"), list):
        items = body["readings"]
        return items if items and all(isinstance(i, dict) and "seq" in i for i in items) else None
    return [body] if "seq" in body and "metrics" in body else None


# MQTT 5 PUBACK reason codes of 0x80 and above refuse the message (below: accepted, e.g. 0x10
# "no matching subscribers"). Transient ones are tried again, a few times, before quarantine.
PUBACK_REFUSALS: dict[int, tuple[str, bool]] = {
    0x80: ("refused", False),  # unspecified error
    0x83: ("refused", False),  # implementation specific error
    0x87: ("not_authorized", True),
    0x90: ("topic_name_invalid", True),
    0x91: ("refused", False),  # packet identifier in use: a glitch, not the message
    0x95: ("packet_too_large", True),
    0x97: ("quota_exceeded", False),
    0x99: ("payload_format_invalid", True),
}


def puback_refusal(code: int, name: str = "") -> Refusal | None:
    """What a PUBACK reason code means for the message; None when it was accepted.

    >>> puback_refusal(0x10) is None
    True
    >>> puback_refusal(0x87, "Not authorized")
    Refusal(reason='not_authorized', detail='upstream PUBACK 0x87 Not authorized', permanent=True)
    """
    if code < 0x80:
        return None
    reason, permanent = PUBACK_REFUSALS.get(code, ("refused", True))
    return Refusal(reason, f"upstream PUBACK 0x{code:02x} {name}".rstrip(), permanent)


DISCONNECT_PACKET_TOO_LARGE = 0x95
