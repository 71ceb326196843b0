"""An edge gateway's status as technical alarms (bridge/alerts.py), pure: the conditions its
status states, and their lifecycle in the alert book."""

from __future__ import annotations

import itertools

import pytest

from bridge.alerts import (
    GATEWAY_QUARANTINE,
    GATEWAY_SPOOL_EVICTING,
    GATEWAY_SPOOL_NEAR_FULL,
    AlertBook,
    Rule,
    gateway_conditions,
    validate_rule,
)
from firstcare.payloads import GatewayQuarantine, GatewaySpool, GatewayStatus, decode_gateway_status

T0 = 1_800_000_000_000


def book() -> AlertBook:
    ids = itertools.count(1)
    return AlertBook([], new_id=lambda: f"a{next(ids)}")


def status(evicting: bool = False, near_full: bool = False, quarantined: int = 0, discarded: int = 0,
           used: int = 100) -> GatewayStatus:
    return GatewayStatus("online", spool=GatewaySpool(depth=5, bytes=used, max_bytes=1000, discarded_full=discarded,
                                                      evicting=evicting, near_full=near_full),
                         quarantine=GatewayQuarantine(depth=quarantined, total=quarantined))


@pytest.mark.parametrize("report, active", [
    (status(), set()),
    (status(evicting=True, discarded=7), {GATEWAY_SPOOL_EVICTING}),
    (status(near_full=True, used=900), {GATEWAY_SPOOL_NEAR_FULL}),
    (status(quarantined=2), {GATEWAY_QUARANTINE}),
    (status(evicting=True, near_full=True, quarantined=1), {GATEWAY_SPOOL_EVICTING, GATEWAY_SPOOL_NEAR_FULL,
                                                            GATEWAY_QUARANTINE}),
])
def test_conditions_follow_the_status(report: GatewayStatus, active: set[str]) -> None:
    conditions = gateway_conditions("ward-3", report)
    assert {c.rule_id for c in conditions} == {GATEWAY_SPOOL_EVICTING, GATEWAY_SPOOL_NEAR_FULL, GATEWAY_QUARANTINE}
    assert {c.rule_id for c in conditions if c.active} == active


def test_a_will_or_an_older_gateway_says_nothing_so_nothing_changes() -> None:
    for payload in (b'{"state": "offline"}', b'{"state": "online", "spool_depth": 3, "forwarded_per_s": 1}'):
        decoded = decode_gateway_status(payload)
        assert isinstance(decoded, GatewayStatus)
        assert gateway_conditions("ward-3", decoded) == []


def test_raised_while_it_holds_updated_when_it_changes_resolved_when_it_stops() -> None:
    b = book()
    raised = b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status(evicting=True, discarded=5)), T0)
    assert [(t.action, t.alert.rule_id) for t in raised] == [("raised", GATEWAY_SPOOL_EVICTING)]
    alert = raised[0].alert
    assert (alert.kind, alert.hospital_id, alert.subject, alert.priority, alert.value) == (
        "technical", "h1", "gateway:h1:ward-3", "medium", 5.0)
    assert "ward-3" in alert.message and "5 readings discarded" in alert.message
    same = b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status(evicting=True, discarded=5)), T0 + 1)
    assert same == [], "a repeated status changes nothing"
    more = b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status(evicting=True, discarded=9)), T0 + 2)
    assert [(t.action, t.alert.value) for t in more] == [("updated", 9.0)]
    gone = b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status(discarded=9)), T0 + 3)
    assert [(t.action, t.alert.id) for t in gone] == [("resolved", alert.id)]
    assert b.active() == []


def test_each_gateway_has_its_own_alarm() -> None:
    b = book()
    b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status(quarantined=1)), T0)
    b.gateway_status("h1", "ward-4", gateway_conditions("ward-4", status(quarantined=2)), T0)
    assert sorted((a.subject, a.value) for a in b.active()) == [("gateway:h1:ward-3", 1.0), ("gateway:h1:ward-4", 2.0)]
    b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status()), T0 + 1)
    assert [a.subject for a in b.active()] == ["gateway:h1:ward-4"]


def test_an_acknowledged_gateway_alarm_still_resolves_when_the_condition_stops() -> None:
    b = book()
    (t,) = b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status(quarantined=1)), T0)
    b.acknowledge(t.alert.id, "it", T0 + 1)
    (gone,) = b.gateway_status("h1", "ward-3", gateway_conditions("ward-3", status()), T0 + 2)
    assert gone.action == "resolved"


def test_gateway_rule_ids_are_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        validate_rule(Rule("gateway.mine", "spo2", "below", 90, 92, "low"))
