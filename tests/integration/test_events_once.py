"""A message that reaches two bridges sharing one PostgreSQL database gives its events once.

Shared subscriptions deal each message to one bridge, but some reach more than one: a retained
status (a device's last status, a gateway's) is sent again to every new subscription, a broker
redelivers what a dead bridge's slot had not acknowledged to the bridge that takes the slot over,
and a message may be redelivered after a bridge stored it but before its acknowledgement reached
the broker. Each bridge evaluates under the device's lock against the state the other wrote, so
the second delivery changes nothing and publishes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bridge.core import BridgeCore
from bridge.store_postgres import PostgresStore
from firstcare.events import Event
from firstcare.payloads import GatewayQuarantine, GatewayStatus, Inbound, encode_gateway_status
from tests.integration.test_cluster_state import T0, Clock, S, cores, pg_stores, status, vitals  # noqa: F401


def names(events: list[Event]) -> list[str]:
    return sorted(e.name for e in events)


def both(nodes: list[BridgeCore], batch: list[Inbound], how: Callable[[BridgeCore], Any] | None = None
         ) -> tuple[list[Event], list[Event]]:
    first, second = nodes
    run = how or (lambda node: node.process(batch))
    return run(first), run(second)


def test_a_status_delivered_to_both_bridges_changes_the_device_once(pg_stores: Callable[[], PostgresStore]) -> None:  # noqa: F811 - the fixture imported above
    clock = Clock(T0)
    nodes = cores(pg_stores, 2, clock)
    online = [status("online", T0)]
    first, second = both(nodes, online)
    assert names(first) == ["device.status.change"] and second == []
    # the retained copy a new subscription gets later: the same message again, nothing new
    clock.now = T0 + 30 * S
    assert both(nodes, online) == ([], [])
    offline = [status("offline", T0 + 40 * S)]  # its technical alarm too, once
    first, second = both(nodes, offline)
    assert names(first) == ["device.status.change", "patient.alert.raised"] and second == []


def test_a_reading_delivered_to_both_bridges_is_one_event(pg_stores: Callable[[], PostgresStore]) -> None:  # noqa: F811 - the fixture imported above
    clock = Clock(T0 + S)
    nodes = cores(pg_stores, 2, clock)
    nodes[0].process([status("online", T0)])
    batch = [vitals(1, T0 + S)]
    first, second = both(nodes, batch)
    assert "patient.vitals.update" in names(first)
    assert "patient.vitals.update" not in names(second) and second == [], second
    assert sum(n.stats().get("duplicates", 0) for n in nodes) == 1, [n.stats() for n in nodes]


def test_a_gateway_status_delivered_to_both_bridges_raises_its_alarm_once(
        pg_stores: Callable[[], PostgresStore]) -> None:  # noqa: F811 - the fixture imported above
    clock = Clock(T0)
    nodes = cores(pg_stores, 2, clock)
    body = encode_gateway_status(GatewayStatus("online", quarantine=GatewayQuarantine(2, 2)))
    message = [Inbound("fc/edge/h1/ward-1/status", body, T0)]
    first, second = both(nodes, message, lambda node: node.gateway_status(message))
    assert names(first) == ["patient.alert.raised"] and second == []
    clock.now = T0 + 60 * S
    assert both(nodes, message, lambda node: node.gateway_status(message)) == ([], [])
