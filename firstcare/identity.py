"""Who a broker client is, and what it may do: the one rule behind the Mosquitto ACL and the
embedded broker's topic check.

A client's identity is the common name (CN) of its TLS client certificate; Mosquitto uses it as
the username (``use_identity_as_username``) and, on the devices' listener, as the client id
(``use_username_as_clientid``).
The naming rule binds hospital and device type into the certificate itself::

    h1/monitor/monitor-7     a device: {hospital_id}/{device_type}/{device_id}
    gateway/h1/ward-3        an edge gateway of hospital h1: gateway/{hospital_id}/{gateway_id}
    bridge                   the ingest bridge (``bridge`` or ``bridge-2`` ...: ``bridge[-name]``)

A device identity is exactly the middle of its topics, so one ACL line covers every device
(``pattern write fc/v1/%u/vitals``) and a device can write only
``fc/v1/h1/monitor/monitor-7/{vitals,status}``: not another device, not another hospital, and
it can read nothing. Moving a device to another hospital means a new certificate.

>>> parse_identity("h1/monitor/monitor-7")  # doctest: +NORMALIZE_WHITESPACE
Identity(kind='device', name='h1/monitor/monitor-7', hospital_id='h1', device_type='monitor',
         device_id='monitor-7', gateway_id=None)
>>> may_publish(parse_identity("h1/monitor/monitor-7"), "fc/v1/h1/monitor/monitor-8/vitals")
False
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from firstcare.errors import ConfigError
from firstcare.topics import DEFAULT_ROOT, DEVICE_TYPES, VERSION, is_valid_id

Kind = Literal["device", "gateway", "bridge"]
LEASE_PREFIX = "firstcare/lease/"
"""Where a bridge holds the lease on its MQTT client id (firstcare.lease): bridges only."""
_BRIDGE = re.compile(r"bridge(-[A-Za-z0-9_-]{1,57})?")


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Kind
    name: str
    hospital_id: str | None = None
    device_type: str | None = None
    device_id: str | None = None
    gateway_id: str | None = None


def parse_identity(name: str) -> Identity:
    """The identity a certificate CN names; :class:`ConfigError` when it follows no rule."""
    if _BRIDGE.fullmatch(name):
        return Identity("bridge", name)
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "gateway" and is_valid_id(parts[1]) and is_valid_id(parts[2]):
        return Identity("gateway", name, hospital_id=parts[1], gateway_id=parts[2])
    if len(parts) == 3 and is_valid_id(parts[0]) and parts[1] in DEVICE_TYPES and is_valid_id(parts[2]):
        return Identity("device", name, hospital_id=parts[0], device_type=parts[1], device_id=parts[2])
    raise ConfigError(
        f"identity {name!r} follows no rule: expected {{hospital}}/{{device_type}}/{{device_id}}, "
        "gateway/{hospital}/{gateway_id} or bridge[-name]", "identity_invalid")


RESERVED_HOSPITALS = frozenset({"gateway"})
"""``gateway/...`` names a gateway, so no device can belong to a hospital called ``gateway``."""


def device_identity(hospital_id: str, device_type: str, device_id: str) -> str:
    identity = parse_identity(f"{hospital_id}/{device_type}/{device_id}")
    if hospital_id in RESERVED_HOSPITALS or identity.kind != "device":
        raise ConfigError(f"hospital id {hospital_id!r} is reserved for gateway identities", "identity_invalid")
    return identity.name


def gateway_identity(hospital_id: str, gateway_id: str) -> str:
    return parse_identity(f"gateway/{hospital_id}/{gateway_id}").name


def file_stem(identity: str) -> str:
    """A file name for an identity (ids never contain dots): ``h1.monitor.monitor-7``."""
    return identity.replace("/", ".")


def _levels(topic: str, root: str) -> list[str] | None:
    """The levels of ``topic`` after ``{root}/v1/``, or None when it is not under them."""
    prefix = f"{root}/{VERSION}/"
    return topic[len(prefix):].split("/") if topic.startswith(prefix) else None


def may_publish(identity: Identity, topic: str, root: str = DEFAULT_ROOT) -> bool:
    """A device writes its own vitals and status; a gateway writes any device topic of its
    hospital and its own status under ``{root}/edge/{hospital}/{gateway}/``; a bridge writes
    nothing there (only its client-id lease under ``firstcare/lease/``). Wills are publishes too."""
    if identity.kind == "device":
        own = f"{root}/{VERSION}/{identity.name}/"
        return topic in (own + "vitals", own + "status")
    if identity.kind == "bridge":
        return topic.startswith(LEASE_PREFIX)
    if identity.kind == "gateway":
        levels = _levels(topic, root)
        if levels is not None:
            return len(levels) == 4 and levels[0] == identity.hospital_id and levels[3] in ("vitals", "status")
        return topic == f"{root}/edge/{identity.hospital_id}/{identity.gateway_id}/status"
    return False


def may_read(identity: Identity, topic_or_filter: str, root: str = DEFAULT_ROOT, readers: frozenset[str] = frozenset()
             ) -> bool:
    """Readings are patient data: only the bridge (or an identity the broker names in
    ``readers``, such as an edge gateway reading its own ward broker) reads under the root. A
    gateway also reads its own edge status. Devices read nothing."""
    if identity.kind == "bridge" and topic_or_filter.startswith(LEASE_PREFIX):
        return True
    if identity.kind == "bridge" or identity.name in readers:
        return topic_or_filter.startswith(root + "/")
    if identity.kind == "gateway":
        return topic_or_filter == f"{root}/edge/{identity.hospital_id}/{identity.gateway_id}/status"
    return False
