"""The forwarder's bookkeeping against a real spool, with the MQTT client replaced by a recorder:
the refusals no test broker can be made to send (MQTT 5 quota exceeded), the attribution of
connection drops, and the window of one while suspects are re-sent."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge.forwarder import KEEPALIVE_TIMEOUT, Forwarder
from edge.spool import Spool
from edge.stamp import PRIORITY_VITALS, Outbound
from firstcare.mqtt import MqttTarget

NOW = 1_790_000_000_000


@dataclass
class Sent:
    rc: int
    mid: int


@dataclass
class RecordingClient:
    protocol: int = mqtt.MQTTv5
    published: list[tuple[int, str, bytes]] = field(default_factory=list)
    _mids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Sent:
        mid = next(self._mids)
        self.published.append((mid, topic, payload))
        return Sent(mqtt.MQTT_ERR_SUCCESS, mid)


def paho(client: RecordingClient) -> mqtt.Client:
    """The recording client where the forwarder expects paho's (it calls only ``publish``)."""
    return cast(mqtt.Client, client)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(str(tmp_path / "s.db"), 0, 0)
    spool.append([Outbound(f"fc/v1/h1/oximeter/ox-{n}/vitals", b'{"seq":%d}' % n, PRIORITY_VITALS, f"oximeter/ox-{n}",
                           NOW) for n in range(1, 6)], [], NOW)
    yield spool
    spool.close()


def forwarder(spool: Spool) -> Forwarder:
    fw = Forwarder(spool, MqttTarget("127.0.0.1", 1), "edge-test", "fc/edge/h1/gw/status", rate=1000, inflight=10)
    return fw


def puback(name: str) -> ReasonCode:
    return ReasonCode(PacketTypes.PUBACK, name)


def test_quota_exceeded_is_tried_again_then_quarantined_while_the_rest_goes_on(spool: Spool) -> None:
    fw, client = forwarder(spool), RecordingClient()
    fw._send(paho(client))
    assert len(client.published) == 5
    first = client.published[0][0]
    for mid, _, _ in client.published[1:]:
        fw._on_publish(paho(client), None, mid, puback("Success"), None)
    fw._on_publish(paho(client), None, first, puback("Quota exceeded"), None)
    fw._flush()
    assert spool.depth == 1 and fw.counters["acked"] == 4, "the queue behind it moved on"
    (entry,) = spool.next(5, set())
    for _attempt in (2, 3):
        fw._deferred = {entry.id: 0.0}  # its backoff is over
        client.published.clear()
        fw._send(paho(client))
        ((mid, _, _),) = client.published
        fw._on_publish(paho(client), None, mid, puback("Quota exceeded"), None)
        fw._flush()
    assert spool.depth == 0
    assert [(q.reason, q.detail) for q in spool.quarantined()] == [
        ("quota_exceeded", "upstream PUBACK 0x97 Quota exceeded")]
    assert fw.counters["refusals"] == 3 and fw.counters["quarantined"] == 1


def test_not_authorised_is_quarantined_at_once_and_mqtt_3_1_1_sees_no_refusal(spool: Spool) -> None:
    fw, client = forwarder(spool), RecordingClient()
    fw._send(paho(client))
    fw._on_publish(paho(client), None, 1, puback("Not authorized"), None)
    fw._flush()
    assert [q.reason for q in spool.quarantined()] == ["not_authorized"]
    old = RecordingClient(protocol=mqtt.MQTTv311)
    fw2 = forwarder(spool)
    fw2._send(paho(old))
    for mid, _, _ in old.published:
        fw2._on_publish(paho(old), None, mid, puback("Success"), None)
    fw2._flush()
    assert spool.depth == 0 and len(spool.quarantined()) == 1


def test_a_drop_with_several_in_flight_makes_suspects_sent_one_at_a_time(spool: Spool) -> None:
    fw, client = forwarder(spool), RecordingClient()
    fw._send(paho(client))
    in_flight = {spool_id for spool_id in fw._flights.values()}
    fw._disconnect = (0x80, False)
    fw._attribute_drop()
    assert fw._suspects == in_flight and fw.counters["drops"] == 0, "no single message to blame yet"
    fw._flights.clear()
    fw._parts_left.clear()
    client.published.clear()
    fw._send(paho(client))
    assert len(client.published) == 1, "one suspect at a time"
    fw._attribute_drop()  # dropped again while it was alone in flight: it counts
    assert fw.counters["drops"] == 1


def test_a_keepalive_timeout_is_the_network_not_the_message(spool: Spool) -> None:
    fw, client = forwarder(spool), RecordingClient()
    fw._suspects = {spool.next(1, set())[0].id}
    fw._send(paho(client))
    fw._disconnect = (KEEPALIVE_TIMEOUT, False)
    fw._attribute_drop()
    assert fw.counters["drops"] == 0


def test_three_drops_alone_in_flight_quarantine_it(spool: Spool) -> None:
    fw, client = forwarder(spool), RecordingClient()
    entry = spool.next(1, set())[0]
    for _ in range(3):
        fw._suspects = {entry.id}
        fw._flights.clear()
        fw._parts_left.clear()
        fw._send(paho(client))
        fw._disconnect = (0x80, False)
        fw._attribute_drop()
    assert [q.reason for q in spool.quarantined()] == ["connection_dropped"]
    assert spool.depth == 4


def test_a_broker_that_says_packet_too_large_quarantines_the_one_in_flight(spool: Spool) -> None:
    fw, client = forwarder(spool), RecordingClient()
    fw._suspects = {spool.next(1, set())[0].id}
    fw._send(paho(client))
    fw._disconnect = (0x95, True)
    fw._attribute_drop()
    assert [q.reason for q in spool.quarantined()] == ["packet_too_large"]
