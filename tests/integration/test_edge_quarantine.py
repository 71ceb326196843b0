"""Messages the upstream will never take are quarantined with their reason, the readings behind
them are delivered, and the hospital hears about it: real Mosquitto upstream (with an ACL and a
small max_packet_size), a real bridge, `firstcare edge` as a child process."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from firstcare.payloads import format_ts
from firstcare.signing import new_signing_key, sign
from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import REPO_ROOT, MosquittoInstance, require_mosquitto, start_mosquitto
from tests.support.devices import Device
from tests.support.edge import EdgeProcess

MAX_PACKET = 4096
ACL_DENYING_MONITORS = """
user gateway
topic write fc/v1/h1/oximeter/+/vitals
topic write fc/v1/h1/+/+/status
topic readwrite fc/edge/h1/#
user bridge
topic read fc/#
topic readwrite firstcare/lease/#
"""


def upstream_broker(tmp_path: Path, acl: str | None = None) -> MosquittoInstance:
    require_mosquitto()
    extra = []
    if acl is not None:
        (tmp_path / "upstream-acl").write_text(acl)
        extra.append(f"acl_file {tmp_path / 'upstream-acl'}")
    return start_mosquitto(tmp_path / "upstream", dev=True, overrides={"max_packet_size": str(MAX_PACKET)},
                           extra_lines=extra)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MosquittoInstance]:
    broker = upstream_broker(tmp_path, ACL_DENYING_MONITORS)
    yield broker
    broker.stop()


@pytest.fixture
def bridge(upstream: MosquittoInstance, tmp_path: Path) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path, mqtt_url=upstream.url("bridge"))) as b:
        yield b


def seqs(bridge: BridgeThread, device_id: str) -> list[int]:
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        return [r[0] for r in db.execute("SELECT seq FROM readings WHERE device_id=? ORDER BY seq", (device_id,))]


def body(seq: int) -> dict[str, Any]:
    return {"seq": seq, "ts": format_ts(int(time.time() * 1000)), "patient_id": "p-q", "metrics": {"spo2": 97}}


def batch(first: int, n: int) -> bytes:
    return json.dumps({"readings": [body(seq) for seq in range(first, first + n)]}).encode()


def quarantine_cli(edge: EdgeProcess, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "firstcare.cli", "edge", "quarantine", *args, "--spool",
                             str(edge.spool_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def alert_events(bridge: BridgeThread, subscriber: Any, rule_id: str, action: str) -> dict[str, Any]:
    return bridge.receive_until(subscriber, lambda e: e["event"] == f"patient.alert.{action}"
                                and e["data"]["rule_id"] == rule_id, timeout=60)


def test_refused_and_oversize_messages_are_quarantined_and_the_readings_behind_them_arrive(
        upstream: MosquittoInstance, bridge: BridgeThread, tmp_path: Path) -> None:
    alerts = bridge.subscribe("hospital:h1:alerts")
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), status_seconds=1).start()
    ox = Device(edge.local_port, "ox-q")
    monitor = Device(edge.local_port, "mon-q", device_type="monitor")
    key = new_signing_key()
    try:
        wait_until(lambda: edge.stats()["upstream"]["protocol"] == "5", what="MQTT 5 upstream")
        assert edge.stats()["upstream"]["max_packet"] == MAX_PACKET
        for seq in (1, 2, 3):
            ox.publish(ox.vitals_topic, json.dumps(body(seq)))
        monitor.publish(monitor.vitals_topic, json.dumps(body(1)))  # the upstream's ACL denies monitors
        big = batch(10, 60)
        assert len(big) > MAX_PACKET
        ox.publish(ox.vitals_topic, big)  # valid, too big for one packet: split
        ox.publish(ox.vitals_topic, sign(key, "h1/oximeter/ox-q", ox.vitals_topic, batch(100, 60)))  # cannot split
        for seq in (4, 5, 6):
            ox.publish(ox.vitals_topic, json.dumps(body(seq)))

        expected = [1, 2, 3, 4, 5, 6, *range(10, 70)]
        wait_until(lambda: seqs(bridge, "ox-q") == expected, timeout=60, what="every valid reading behind them")
        stats = wait_until(lambda: (s := edge.stats())["quarantine"]["depth"] == 2 and s, what="two quarantined")
        assert stats["quarantine"]["reasons"] == {"not_authorized": 1, "packet_too_large": 1}
        assert stats["upstream"]["split"] == 1 and stats["spool"]["depth"] == 0
        assert seqs(bridge, "mon-q") == []
        metrics = httpx.get(edge.url + "/metrics").text
        assert 'firstcare_edge_quarantined_total{reason="not_authorized"} 1.0' in metrics
        assert "firstcare_edge_quarantine_depth 2.0" in metrics

        raised = alert_events(bridge, alerts, "gateway.quarantine", "raised")
        assert raised["data"]["hospital_id"] == "h1" and raised["data"]["kind"] == "technical"
        with bridge.http() as client:  # staff acknowledge it; it stays until the quarantine is empty
            acked = client.post(f"/api/alerts/{raised['data']['id']}/ack")
        assert acked.status_code == 200 and acked.json()["state"] == "acknowledged", acked.text

        listed = quarantine_cli(edge, "list")
        lines = [line.split("\t") for line in listed.splitlines() if "\t" in line]
        by_reason = {fields[2]: int(fields[0]) for fields in lines}
        assert set(by_reason) == {"not_authorized", "packet_too_large"}
        assert "2 quarantined" in listed
        items = httpx.get(edge.url + "/quarantine").json()["items"]
        assert {i["reason"] for i in items} == {"not_authorized", "packet_too_large"}
        assert all("payload" not in i for i in items)

        # the hospital fixes the ACL; the refused reading is sent again and arrives
        (tmp_path / "upstream-acl").write_text(ACL_DENYING_MONITORS.replace("oximeter/+/vitals", "+/+/vitals"))
        assert upstream.process is not None
        upstream.process.send_signal(signal.SIGHUP)
        time.sleep(1)  # mosquitto reloads its ACL on SIGHUP; nothing to poll for
        assert "1 moved back" in quarantine_cli(edge, "retry", "--id", str(by_reason["not_authorized"]))
        wait_until(lambda: seqs(bridge, "mon-q") == [1], timeout=60, what="the retried reading")
        # the oversize signed batch cannot ever go: dropped, and the alarm clears
        assert "1 dropped" in quarantine_cli(edge, "drop", "--id", str(by_reason["packet_too_large"]))
        resolved = alert_events(bridge, alerts, "gateway.quarantine", "resolved")
        assert resolved["data"]["id"] == raised["data"]["id"]
        counters = edge.stats()["spool"]
        assert counters["quarantine_retried"] == 1 and counters["quarantine_dropped"] == 1
    finally:
        ox.close()
        monitor.close()
        edge.stop()


def test_with_mqtt_3_1_1_a_message_that_keeps_getting_the_connection_dropped_is_quarantined(
        tmp_path: Path) -> None:
    """MQTT 3.1.1 says nothing: Mosquitto just closes the connection on an oversize packet."""
    upstream = upstream_broker(tmp_path)
    try:
        with BridgeThread(bridge_settings(tmp_path, mqtt_url=upstream.url("bridge"))) as bridge:
            edge = EdgeProcess(tmp_path, upstream.url("gateway"), upstream_protocol="3.1.1").start()
            ox = Device(edge.local_port, "ox-drop")
            try:
                for seq in (1, 2, 3):
                    ox.publish(ox.vitals_topic, json.dumps(body(seq)))
                ox.publish(ox.vitals_topic, sign(new_signing_key(), "h1/oximeter/ox-drop", ox.vitals_topic,
                                                 batch(100, 60)))
                for seq in (4, 5, 6):
                    ox.publish(ox.vitals_topic, json.dumps(body(seq)))
                wait_until(lambda: seqs(bridge, "ox-drop") == [1, 2, 3, 4, 5, 6], timeout=90,
                           what="the readings behind the poison")
                stats = wait_until(lambda: (s := edge.stats())["quarantine"]["depth"] == 1 and s, what="quarantined")
                assert stats["quarantine"]["reasons"] == {"connection_dropped": 1}
                assert stats["upstream"]["protocol"] == "3.1.1" and stats["upstream"]["drops"] == 3
            finally:
                ox.close()
                edge.stop()
    finally:
        upstream.stop()


def test_a_full_spool_raises_the_technical_alarm_in_the_hospital_alerts_room_and_it_clears(
        tmp_path: Path) -> None:
    """A slow uplink (drain rate) and a small spool: the gateway discards the oldest vitals, says
    so in its status, the bridge raises gateway.spool_evicting in hospital:h1:alerts; once the
    devices calm down the discards stop and the alarm is resolved."""
    upstream = upstream_broker(tmp_path)
    try:
        with BridgeThread(bridge_settings(tmp_path, mqtt_url=upstream.url("bridge"))) as bridge:
            alerts = bridge.subscribe("hospital:h1:alerts")
            edge = EdgeProcess(tmp_path, upstream.url("gateway"), spool_max_mb=0.01, drain_rate=20,
                               status_seconds=1).start()
            ox = Device(edge.local_port, "ox-full")
            try:
                for seq in range(1, 301):
                    ox.client.publish(ox.vitals_topic, json.dumps(body(seq)), qos=1)
                raised = alert_events(bridge, alerts, "gateway.spool_evicting", "raised")
                assert raised["data"]["value"] > 0 and "discarded" in raised["data"]["message"]
                resolved = alert_events(bridge, alerts, "gateway.spool_evicting", "resolved")
                assert resolved["data"]["id"] == raised["data"]["id"]
                stats = edge.stats()["spool"]
                assert stats["discarded_full"] > 0 and not stats["evicting"]
                with bridge.http() as client:
                    listed = client.get("/api/alerts", params={"hospital_id": "h1"}).json()
                rows = listed["items"] if isinstance(listed, dict) else listed
                assert any(a["rule_id"] == "gateway.spool_evicting" and a["state"] == "resolved" for a in rows)
            finally:
                ox.close()
                edge.stop()
    finally:
        upstream.stop()


def test_an_upstream_without_mqtt_5_gets_3_1_1_and_the_alarm_path_works_there_too(tmp_path: Path) -> None:
    """The bridge's embedded amqtt broker speaks MQTT 3.1.1 only: the gateway falls back."""
    with BridgeThread(bridge_settings(tmp_path)) as bridge:
        edge = EdgeProcess(tmp_path, f"mqtt://gateway@127.0.0.1:{bridge.mqtt_port}").start()
        ox = Device(edge.local_port, "ox-amqtt")
        try:
            ox.vitals({"spo2": 96}, seq=1)
            wait_until(lambda: seqs(bridge, "ox-amqtt") == [1], timeout=60, what="the reading over 3.1.1")
            assert edge.stats()["upstream"]["protocol"] == "3.1.1"
        finally:
            ox.close()
            edge.stop()
