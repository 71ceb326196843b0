"""The identity rule (firstcare/identity.py): one table for the Mosquitto ACL and the embedded broker."""

from __future__ import annotations

import pytest

from firstcare.errors import ConfigError
from firstcare.identity import (
    Identity,
    device_identity,
    file_stem,
    gateway_identity,
    may_publish,
    may_read,
    parse_identity,
)

M7 = parse_identity("h1/monitor/monitor-7")
GW = parse_identity("gateway/h1/ward-3")
BRIDGE = parse_identity("bridge")


@pytest.mark.parametrize(("name", "expected"), [
    ("h1/monitor/monitor-7", Identity("device", "h1/monitor/monitor-7", "h1", "monitor", "monitor-7")),
    ("gateway/h1/ward-3", Identity("gateway", "gateway/h1/ward-3", "h1", gateway_id="ward-3")),
    ("bridge", Identity("bridge", "bridge")),
    ("bridge-2", Identity("bridge", "bridge-2")),
])
def test_identities_follow_the_naming_rule(name: str, expected: Identity) -> None:
    assert parse_identity(name) == expected


@pytest.mark.parametrize("name", [
    "monitor-7",                    # no hospital, no type: would need an ACL line per device
    "h1/toaster/t-1",               # unknown device type
    "h1/monitor/monitor-7/extra",
    "h1/monitor/+",                 # wildcards are never ids
    "h#/monitor/m-1",
    "gateway/h1",
    "gateway/h1/ward 3",
    "bridge/",
    "",
    "h1.monitor.monitor-7",
])
def test_names_outside_the_rule_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="follows no rule"):
        parse_identity(name)


def test_builders_and_file_names() -> None:
    assert device_identity("h1", "bp", "bp-1") == "h1/bp/bp-1"
    assert gateway_identity("h2", "g") == "gateway/h2/g"
    assert file_stem("h1/bp/bp-1") == "h1.bp.bp-1"
    with pytest.raises(ConfigError):
        device_identity("h1", "toaster", "t")
    with pytest.raises(ConfigError, match="reserved"):
        device_identity("gateway", "monitor", "m-1")
    assert parse_identity("gateway/monitor/m-1").kind == "gateway"  # never a device of hospital "gateway"


@pytest.mark.parametrize(("identity", "topic", "allowed"), [
    (M7, "fc/v1/h1/monitor/monitor-7/vitals", True),
    (M7, "fc/v1/h1/monitor/monitor-7/status", True),
    (M7, "fc/v1/h1/monitor/monitor-8/vitals", False),    # another device
    (M7, "fc/v1/h2/monitor/monitor-7/vitals", False),    # another hospital
    (M7, "fc/v1/h1/oximeter/monitor-7/vitals", False),   # another type
    (M7, "fc/v1/h1/monitor/monitor-7/other", False),
    (M7, "fc/v1/h1/monitor/monitor-7/vitals/x", False),
    (M7, "fc/edge/h1/ward-3/status", False),
    (GW, "fc/v1/h1/monitor/m-1/vitals", True),
    (GW, "fc/v1/h1/oximeter/o-9/status", True),
    (GW, "fc/v1/h2/monitor/m-1/vitals", False),           # not its hospital
    (GW, "fc/v1/h1/monitor/m-1/other", False),
    (GW, "fc/v1/h1/monitor/vitals", False),
    (GW, "fc/edge/h1/ward-3/status", True),
    (GW, "fc/edge/h1/ward-4/status", False),
    (GW, "fc/edge/h2/ward-3/status", False),
    (BRIDGE, "fc/v1/h1/monitor/m-1/vitals", False),       # the bridge only reads readings
    (BRIDGE, "firstcare/lease/firstcare-bridge", True),   # ... and holds its client-id lease
    (M7, "firstcare/lease/firstcare-bridge", False),
    (GW, "firstcare/lease/x", False),
])
def test_who_may_publish(identity: Identity, topic: str, allowed: bool) -> None:
    assert may_publish(identity, topic) is allowed


def test_the_lease_prefix_is_the_leases() -> None:
    from firstcare.identity import LEASE_PREFIX
    from firstcare.lease import TOPIC_PREFIX

    assert LEASE_PREFIX == TOPIC_PREFIX


def test_the_root_is_respected() -> None:
    assert may_publish(M7, "site/a/v1/h1/monitor/monitor-7/vitals", "site/a")
    assert not may_publish(M7, "fc/v1/h1/monitor/monitor-7/vitals", "site/a")


@pytest.mark.parametrize(("identity", "topic", "readers", "allowed"), [
    (BRIDGE, "fc/v1/#", (), True),
    (BRIDGE, "fc/v1/h1/monitor/m-1/vitals", (), True),
    (parse_identity("bridge-2"), "fc/#", (), True),
    (BRIDGE, "#", (), False),                            # not beyond the root
    (BRIDGE, "+/v1/#", (), False),
    (BRIDGE, "firstcare/lease/#", (), True),
    (M7, "firstcare/lease/#", (), False),
    (M7, "fc/v1/h1/monitor/monitor-7/vitals", (), False),  # devices read nothing, not even their own
    (M7, "fc/#", (), False),
    (GW, "fc/v1/#", (), False),
    (GW, "fc/v1/#", ("gateway/h1/ward-3",), True),       # the gateway reading its own ward broker
    (GW, "fc/edge/h1/ward-3/status", (), True),
    (GW, "fc/edge/h1/#", (), False),
])
def test_who_may_read(identity: Identity, topic: str, readers: tuple[str, ...], allowed: bool) -> None:
    assert may_read(identity, topic, readers=frozenset(readers)) is allowed
