"""The edge gateway with real brokers and processes: outages, SIGKILL, a full spool, bad input,
the drain rate, the bed map and the hospital stamp."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import MosquittoInstance, require_mosquitto, start_mosquitto
from tests.support.devices import Device
from tests.support.edge import EdgeProcess


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MosquittoInstance]:
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "upstream", dev=True)
    yield broker
    broker.stop()


@pytest.fixture
def bridge(upstream: MosquittoInstance, tmp_path: Path) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path, mqtt_url=upstream.url("bridge"))) as b:
        yield b


def rows(bridge: BridgeThread, device_id: str) -> list[tuple[int, str | None, str]]:
    """(seq, patient, hospital) in the order the bridge stored them."""
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        return db.execute("SELECT seq, patient_id, hospital_id FROM readings WHERE device_id=? ORDER BY id",
                          (device_id,)).fetchall()


def publish(device: Device, first: int, last: int) -> list[int]:
    return [device.vitals({"spo2": 90 + seq % 10}, seq=seq) for seq in range(first, last + 1)]


def test_readings_during_an_upstream_outage_all_arrive_in_order_stored_once(
        upstream: MosquittoInstance, bridge: BridgeThread, tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), drain_rate=500).start()
    device = Device(edge.local_port, "ox-out")
    try:
        publish(device, 1, 20)
        wait_until(lambda: len(rows(bridge, "ox-out")) == 20, what="live readings")
        upstream.stop()
        wait_until(lambda: edge.stats()["upstream"]["state"] != "connected", what="edge sees the outage")
        publish(device, 21, 120)
        stats = wait_until(lambda: (s := edge.stats())["spool"]["depth"] >= 100 and s, what="spooled")
        assert stats["spool"]["oldest_age_s"] >= 0 and stats["upstream"]["state"] != "connected"
        upstream.start()
        wait_until(lambda: len(rows(bridge, "ox-out")) == 120, timeout=60, what="backlog delivered")
        assert [r[0] for r in rows(bridge, "ox-out")] == list(range(1, 121)), "out of order, lost or twice"
        wait_until(lambda: edge.stats()["spool"]["depth"] == 0, what="spool drained")
    finally:
        device.close()
        edge.stop()


def test_gateway_killed_mid_drain_loses_nothing(upstream: MosquittoInstance, bridge: BridgeThread,
                                                tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), drain_rate=40, inflight=20).start()
    device = Device(edge.local_port, "ox-kill")
    upstream.stop()
    publish(device, 1, 200)
    wait_until(lambda: edge.stats()["spool"]["depth"] == 200, what="all spooled")
    device.close()
    upstream.start()
    wait_until(lambda: len(rows(bridge, "ox-kill")) >= 40, timeout=60, what="drain under way")
    edge.kill()
    assert len(rows(bridge, "ox-kill")) < 200, "the kill must land mid-drain"
    edge.start()
    wait_until(lambda: len(rows(bridge, "ox-kill")) == 200, timeout=90, what="everything after the restart")
    assert sorted(r[0] for r in rows(bridge, "ox-kill")) == list(range(1, 201))
    edge.stop()


def test_a_full_spool_discards_the_oldest_vitals_keeps_status_and_counts(
        upstream: MosquittoInstance, bridge: BridgeThread, tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), spool_max_mb=0.01).start()
    device = Device(edge.local_port, "mon-full", device_type="monitor", will=False)
    upstream.stop()
    for seq in range(1, 301):
        device.vitals({"heart_rate": 70}, seq=seq)
        if seq % 60 == 0:
            device.status("online", battery=100 - seq // 60)
    stats = wait_until(lambda: (s := edge.stats())["messages"] >= 305 and s, what="all accepted")
    discarded = stats["spool"]["discarded_full"]
    assert discarded > 0 and stats["discarded"] == discarded
    assert stats["spool"]["bytes"] <= 0.01 * 1024 * 1024 + 200
    upstream.start()
    wait_until(lambda: len(rows(bridge, "mon-full")) == 300 - discarded, timeout=60, what="what was kept")
    seqs = [r[0] for r in rows(bridge, "mon-full")]
    assert seqs == list(range(discarded + 1, 301)), "only the oldest vitals may be discarded"
    wait_until(lambda: bridge.runtime.core.counters["status_messages"] == 5, what="every status kept")
    device.close()
    edge.stop()


def test_malformed_device_messages_never_reach_upstream(upstream: MosquittoInstance, tmp_path: Path) -> None:
    seen: list[str] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy")
    spy.on_message = lambda c, u, m: seen.append(m.payload.decode())
    spy.connect(upstream.host, upstream.port)
    spy.subscribe("fc/v1/#", qos=1)
    spy.loop_start()
    edge = EdgeProcess(tmp_path, upstream.url("gateway")).start()
    device = Device(edge.local_port, "ox-bad")
    try:
        bad = [b"not json", b'{"seq": 1}', b'{"seq": 2, "ts": 1790000000000, "metrics": {"spo2": 150}}',
               b'{"seq": 3, "ts": 1790000000000, "metrics": {"mood": 1}}']
        for payload in bad:
            device.publish(device.vitals_topic, payload)
        device.publish("fc/v1/h1/toaster/ox-bad/vitals", b"{}")
        device.vitals({"spo2": 97}, seq=10)
        wait_until(lambda: any('"seq":10' in p for p in seen), what="the valid reading upstream")
        assert all('"seq":10' in p for p in seen), seen
        stats = edge.stats()
        assert stats["dead_letters"] == 5
        reasons = {d["reason"] for d in edge_dead_letters(edge)}
        assert reasons == {"payload_not_json", "schema_invalid", "value_out_of_range", "metric_unknown",
                           "device_type_unknown"}
    finally:
        device.close()
        edge.stop()
        spy.loop_stop()
        spy.disconnect()


def edge_dead_letters(edge: EdgeProcess) -> list[dict]:
    import httpx

    return httpx.get(edge.url + "/dead-letters").json()["items"]


def test_the_replay_burst_respects_the_drain_rate(upstream: MosquittoInstance, bridge: BridgeThread,
                                                   tmp_path: Path) -> None:
    """Timed at a live subscriber on the upstream broker: the bridge's receive times would be
    squeezed by its own reconnect, which may come after part of the drain has been queued."""
    import time

    rate = 25
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), drain_rate=rate).start()
    device = Device(edge.local_port, "ox-rate")
    upstream.stop()
    publish(device, 1, 100)
    wait_until(lambda: edge.stats()["spool"]["depth"] == 100, what="spooled")
    upstream.start()
    arrivals: list[float] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rate-spy", clean_session=True)
    spy.on_message = lambda c, u, m: arrivals.append(time.monotonic())
    spy.connect(upstream.host, upstream.port)
    spy.subscribe("fc/v1/h1/oximeter/ox-rate/vitals", qos=1)
    spy.loop_start()
    wait_until(lambda: len(rows(bridge, "ox-rate")) == 100, timeout=60, what="drained")
    time.sleep(0.5)
    spy.loop_stop()
    spy.disconnect()
    seen = len(arrivals)
    assert seen > 50, "the spy must see most of the drain for the timing to mean anything"
    burst = rate  # the bucket starts full
    assert arrivals[-1] - arrivals[0] >= (seen - 1 - burst) / rate * 0.9, "the drain ran faster than FC_EDGE_DRAIN_RATE"
    device.close()
    edge.stop()


def test_hospital_is_enforced_and_patient_filled_from_a_reloadable_bed_map(
        upstream: MosquittoInstance, bridge: BridgeThread, tmp_path: Path) -> None:
    beds = tmp_path / "beds.yaml"
    beds.write_text("monitor/mon-bed: p-bed-1\n")
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), bed_map=beds).start()
    device = Device(edge.local_port, "mon-bed", device_type="monitor", hospital_id="wrong-hospital")
    try:
        device.vitals({"heart_rate": 80}, seq=1, patient_id=None)
        device.vitals({"heart_rate": 81}, seq=2, patient_id="p-explicit")
        wait_until(lambda: len(rows(bridge, "mon-bed")) == 2, what="stamped readings")
        assert rows(bridge, "mon-bed") == [(1, "p-bed-1", "h1"), (2, "p-explicit", "h1")]
        beds.write_text("monitor/mon-bed: p-bed-2\n")
        import os
        import time

        os.utime(beds, (time.time() + 5, time.time() + 5))
        device.vitals({"heart_rate": 82}, seq=3, patient_id=None)
        wait_until(lambda: len(rows(bridge, "mon-bed")) == 3, what="after reload")
        assert rows(bridge, "mon-bed")[-1] == (3, "p-bed-2", "h1")
        beds.write_text("this: is: not: yaml: [")
        os.utime(beds, (time.time() + 10, time.time() + 10))
        device.vitals({"heart_rate": 83}, seq=4, patient_id=None)
        wait_until(lambda: len(rows(bridge, "mon-bed")) == 4, what="bad map keeps the old one")
        assert rows(bridge, "mon-bed")[-1] == (4, "p-bed-2", "h1")
        assert edge.stats()["bed_map"]["errors"] >= 1
    finally:
        device.close()
        edge.stop()


def test_edge_status_is_published_upstream_with_a_will(upstream: MosquittoInstance, tmp_path: Path) -> None:
    states: list[str] = []
    got = threading.Event()
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="status-spy")

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        import json

        states.append(json.loads(m.payload)["state"])
        got.set()

    spy.on_message = on_message
    spy.connect(upstream.host, upstream.port)
    spy.subscribe("fc/edge/#", qos=1)
    spy.loop_start()
    edge = EdgeProcess(tmp_path, upstream.url("gateway")).start()
    wait_until(lambda: "online" in states, what="online status")
    edge.kill()
    wait_until(lambda: states[-1] == "offline", timeout=40, what="the will after a crash")
    edge.start()
    wait_until(lambda: states[-1] == "online", what="online again")
    edge.stop()
    wait_until(lambda: states[-1] == "offline", what="offline after a clean stop")
    spy.loop_stop()
    spy.disconnect()


def test_a_clean_stop_logs_no_warning(upstream: MosquittoInstance, tmp_path: Path) -> None:
    """Its own disconnects at SIGTERM (upstream and ward) are no news to an operator."""
    import httpx

    edge = EdgeProcess(tmp_path, upstream.url("gateway")).start()  # logs at WARNING and above
    wait_until(lambda: httpx.get(edge.url + "/readyz", timeout=5).status_code == 200, what="both brokers connected")
    edge.stop()
    log = edge.log_path.read_text()
    complaints = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert "edge gateway" in log and not complaints, log


# ------------------------------------------------------------------ no message stalls the ward

NESTED = b'{"a":' * 1000 + b"1" + b"}" * 1000


def test_a_nested_message_is_dead_lettered_at_the_edge_and_the_rest_reaches_the_bridge(
        upstream: MosquittoInstance, bridge: BridgeThread, tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path, upstream.url("gateway")).start()
    device = Device(edge.local_port, "ox-nest-edge")
    try:
        publish(device, 1, 3)
        device.publish(device.vitals_topic, NESTED)
        publish(device, 4, 6)
        wait_until(lambda: [r[0] for r in rows(bridge, "ox-nest-edge")] == [1, 2, 3, 4, 5, 6], what="valid readings")
        assert [d["reason"] for d in edge_dead_letters(edge)] == ["payload_too_deep"]
        ward = edge.stats()["ward"]
        assert ward["acked"] == ward["received"] == 7, "the poison was acknowledged to the ward broker"
    finally:
        device.close()
        edge.stop()


def test_edge_readyz_turns_503_while_the_spool_refuses_writes(upstream: MosquittoInstance, bridge: BridgeThread,
                                                               tmp_path: Path) -> None:
    import httpx

    edge = EdgeProcess(tmp_path, upstream.url("gateway")).start()
    device = Device(edge.local_port, "ox-stuck")
    try:
        publish(device, 1, 2)
        wait_until(lambda: httpx.get(edge.url + "/readyz").status_code == 200, what="ready")
        blocker = sqlite3.connect(tmp_path / "spool.db", timeout=1)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the spool: the ward stream stops
        try:
            info = device.client.publish(device.vitals_topic, b'{"seq": 3, "ts": %d, "metrics": {"spo2": 97}}'
                                         % int(__import__("time").time() * 1000), qos=1)
            stuck = wait_until(lambda: (r := httpx.get(edge.url + "/readyz", timeout=5)).status_code == 503 and r,
                               timeout=60, what="edge not ready while its ward consumer is stuck")
            assert stuck.json()["checks"]["spool"] != "ok"
        finally:
            blocker.rollback()
            blocker.close()
        info.wait_for_publish(60)
        wait_until(lambda: [r[0] for r in rows(bridge, "ox-stuck")] == [1, 2, 3], timeout=60, what="then forwarded")
        ward = edge.stats()["ward"]
        assert ward["acked"] == ward["received"] == 3 and ward["poison_isolated"] == 0
        wait_until(lambda: httpx.get(edge.url + "/readyz").status_code == 200, timeout=60, what="ready again")
    finally:
        device.close()
        edge.stop()


def test_stats_answer_at_once_while_another_process_holds_the_spool_write_lock(
        upstream: MosquittoInstance, tmp_path: Path) -> None:
    """A backup (or the quarantine command) holding the spool's write lock delays the ward's
    writes, never /stats: reads use their own connection and never wait for the writer."""
    import httpx

    edge = EdgeProcess(tmp_path, upstream.url("gateway"), spool_busy_timeout_seconds=30).start()
    device = Device(edge.local_port, "ox-lock")
    blocker = sqlite3.connect(tmp_path / "spool.db", timeout=1)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        info = device.client.publish(device.vitals_topic, device.reading({"spo2": 97}, seq=1), qos=1)
        wait_until(lambda: edge.stats()["ward"]["received"] == 1, what="a write waiting for the lock")
        for _ in range(3):
            response = httpx.get(edge.url + "/stats", timeout=3)  # would wait up to 30 s behind the writer
            assert response.status_code == 200 and response.json()["spool"]["depth"] == 0
        assert not info.is_published(), "not acknowledged before it is on disk"
        blocker.rollback()
        info.wait_for_publish(60)
        wait_until(lambda: edge.stats()["spool"]["forwarded"] == 1, what="then spooled and forwarded")
    finally:
        blocker.close()
        device.close()
        edge.stop()


def test_the_http_token_guards_stats_dead_letters_and_quarantine_and_no_payload_is_served(
        upstream: MosquittoInstance, tmp_path: Path) -> None:
    import httpx

    token = "a-token-of-at-least-16-chars"
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), http_token=token).start()
    device = Device(edge.local_port, "ox-token")
    try:
        device.publish(device.vitals_topic, b'{"seq": 1, "patient_id": "p-secret", "metrics": {"spo2": 150}}')
        for path in ("/stats", "/dead-letters", "/quarantine"):
            assert httpx.get(edge.url + path).status_code == 401
            assert httpx.get(edge.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(edge.url + path).status_code in (200, 503)
        letters = wait_until(lambda: httpx.get(edge.url + "/dead-letters", headers=edge.headers).json()["items"],
                             what="the dead letter")
        assert letters[0]["reason"] == "schema_invalid"
        assert all("payload" not in letter for letter in letters)
        assert "p-secret" not in httpx.get(edge.url + "/dead-letters", headers=edge.headers).text
    finally:
        device.close()
        edge.stop()
