"""The MQTT topic grammar (contract v1), the only place that knows it.

    fc/v1/{hospital_id}/{device_type}/{device_id}/vitals   QoS 1, readings
    fc/v1/{hospital_id}/{device_type}/{device_id}/status   QoS 1, retained, online/offline (+ will)
    fc/edge/{hospital_id}/{gateway_id}/status              QoS 1, retained, an edge gateway's own status

A gateway's status sits outside the device tree on purpose: no device identity can name it, and
the broker's ACL gives each gateway exactly its own (``topic readwrite fc/edge/h1/ward-1/status``).
The bridge subscribes to both (:func:`subscription_filters`).

>>> parse_topic("fc/v1/h1/oximeter/ox-7/vitals")
Topic(root='fc', hospital_id='h1', device_type='oximeter', device_id='ox-7', kind='vitals')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from firstcare.errors import TopicError

VERSION = "v1"
DEFAULT_ROOT = "fc"
DEVICE_TYPES: frozenset[str] = frozenset(
    {"monitor", "oximeter", "bp", "thermometer", "glucometer", "scale"}
)
KINDS: frozenset[str] = frozenset({"vitals", "status"})
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_valid_id(value: object) -> bool:
    """IDs (hospital, device, patient) are ``[A-Za-z0-9_-]{1,64}``."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


ROOT_FORBIDDEN = "+#$/"


def check_root(root: str) -> str:
    """The root is one topic level: no wildcard (``+``, ``#``) that would make the bridge
    subscribe to more than it parses, no ``$`` (broker-reserved topics), no ``/``."""
    if not root or any(c in root for c in ROOT_FORBIDDEN) or root != root.strip() or "\0" in root:
        raise TopicError(f"invalid topic root {root!r}: one topic level, without '+', '#', '$', '/' or spaces"
                         " around it", "topic_root_invalid")
    return root


@dataclass(frozen=True, slots=True)
class Topic:
    root: str
    hospital_id: str
    device_type: str
    device_id: str
    kind: str

    def __str__(self) -> str:
        return "/".join(
            (self.root, VERSION, self.hospital_id, self.device_type, self.device_id, self.kind)
        )

    @property
    def device_key(self) -> tuple[str, str]:
        return (self.device_type, self.device_id)


def parse_topic(topic: str, root: str = DEFAULT_ROOT) -> Topic:
    """Split and validate a topic; raise :class:`TopicError` with a precise reason."""
    root_parts = root.split("/")
    parts = topic.split("/")
    n = len(root_parts)
    if parts[:n] != root_parts:
        raise TopicError(f"topic {topic!r} is not under root {root!r}", "topic_unknown")
    rest = parts[n:]
    if len(rest) != 5 or rest[0] != VERSION:
        raise TopicError(
            f"topic {topic!r} does not match {root}/{VERSION}/{{hospital_id}}/{{device_type}}"
            "/{device_id}/{vitals|status}",
            "topic_unknown",
        )
    _, hospital_id, device_type, device_id, kind = rest
    if kind not in KINDS:
        raise TopicError(f"unknown message kind {kind!r} (expected vitals or status)", "topic_unknown")
    if not is_valid_id(hospital_id):
        raise TopicError(f"invalid hospital_id {hospital_id!r}", "hospital_id_invalid")
    if device_type not in DEVICE_TYPES:
        raise TopicError(
            f"unknown device_type {device_type!r} (one of {', '.join(sorted(DEVICE_TYPES))})",
            "device_type_unknown",
        )
    if not is_valid_id(device_id):
        raise TopicError(f"invalid device_id {device_id!r}", "device_id_invalid")
    return Topic(root, hospital_id, device_type, device_id, kind)


def make_topic(hospital_id: str, device_type: str, device_id: str, kind: str, root: str = DEFAULT_ROOT) -> str:
    """Build a topic, validating every part the way :func:`parse_topic` does."""
    return str(parse_topic("/".join((root, VERSION, hospital_id, device_type, device_id, kind)), root))


def vitals_topic(hospital_id: str, device_type: str, device_id: str, root: str = DEFAULT_ROOT) -> str:
    return make_topic(hospital_id, device_type, device_id, "vitals", root)


def status_topic(hospital_id: str, device_type: str, device_id: str, root: str = DEFAULT_ROOT) -> str:
    return make_topic(hospital_id, device_type, device_id, "status", root)


def subscription_filter(root: str = DEFAULT_ROOT) -> str:
    """The filter the bridge subscribes to. It is wider than the grammar on purpose: topics
    that are close but wrong (a bad id, an unknown device type or kind) arrive too and are
    dead-lettered with a reason instead of vanishing unseen."""
    return f"{check_root(root)}/{VERSION}/#"


EDGE = "edge"


@dataclass(frozen=True, slots=True)
class GatewayTopic:
    root: str
    hospital_id: str
    gateway_id: str

    def __str__(self) -> str:
        return "/".join((self.root, EDGE, self.hospital_id, self.gateway_id, "status"))


def is_gateway_topic(topic: str, root: str = DEFAULT_ROOT) -> bool:
    """Under ``{root}/edge/``: a gateway's status, not a device's (may still be malformed)."""
    return topic.startswith(f"{root}/{EDGE}/")


def parse_gateway_topic(topic: str, root: str = DEFAULT_ROOT) -> GatewayTopic:
    """``{root}/edge/{hospital_id}/{gateway_id}/status``; :class:`TopicError` otherwise.

    >>> parse_gateway_topic("fc/edge/h1/ward-3/status")
    GatewayTopic(root='fc', hospital_id='h1', gateway_id='ward-3')
    """
    prefix = f"{root}/{EDGE}/"
    rest = topic[len(prefix):].split("/") if topic.startswith(prefix) else []
    if len(rest) != 3 or rest[2] != "status":
        raise TopicError(f"topic {topic!r} does not match {root}/{EDGE}/{{hospital_id}}/{{gateway_id}}/status",
                         "topic_unknown")
    hospital_id, gateway_id, _ = rest
    if not is_valid_id(hospital_id):
        raise TopicError(f"invalid hospital_id {hospital_id!r}", "hospital_id_invalid")
    if not is_valid_id(gateway_id):
        raise TopicError(f"invalid gateway_id {gateway_id!r}", "gateway_id_invalid")
    return GatewayTopic(root, hospital_id, gateway_id)


def gateway_status_topic(hospital_id: str, gateway_id: str, root: str = DEFAULT_ROOT) -> str:
    """Build a gateway's status topic, validating every part the way :func:`parse_gateway_topic` does."""
    return str(parse_gateway_topic(f"{check_root(root)}/{EDGE}/{hospital_id}/{gateway_id}/status", root))


def gateway_status_filter(root: str = DEFAULT_ROOT) -> str:
    return f"{check_root(root)}/{EDGE}/+/+/status"


def subscription_filters(root: str = DEFAULT_ROOT) -> tuple[str, str]:
    """Everything the bridge reads: the device tree (:func:`subscription_filter`) and every
    gateway's status."""
    return (subscription_filter(root), gateway_status_filter(root))
