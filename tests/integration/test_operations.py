"""Operators' truth: readiness under a locked database, stats and metrics that never crash,
Prometheus text that parses, latency histograms, and the session-lost alarm after a broker
that forgot the bridge's session. Real brokers, real SQLite, real HTTP."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from firstcare.payloads import encode_status
from firstcare.topics import status_topic
from tests.integration.test_refusals import env_for
from tests.support.bridge import BridgeProcess, BridgeThread, bridge_settings, token, wait_until
from tests.support.brokers import MosquittoInstance, require_mosquitto, start_mosquitto
from tests.support.devices import Device


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels}")


# --- readiness under a held write lock --------------------------------------------------------------


def test_readyz_turns_503_while_the_database_refuses_writes_and_recovers(tmp_path: Path) -> None:
    with BridgeThread(bridge_settings(tmp_path)) as bridge:
        device = Device(bridge.mqtt_port, "ox-lock")
        wait_until(lambda: httpx.get(bridge.url + "/readyz").status_code == 200, what="ready")
        holder = sqlite3.connect(bridge.settings.sqlite_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
        try:
            # idle bridge: the timer's write finds the lock within FC_STORE_BUSY_TIMEOUT_SECONDS
            body = wait_until(lambda: (r := httpx.get(bridge.url + "/readyz")).status_code == 503 and r.json(),
                              timeout=30, what="/readyz 503 under the held lock")
            assert body["checks"]["store"].startswith("error")
            device.vitals({"spo2": 97}, seq=1)  # a batch that cannot commit is retried, not acked
            wait_until(lambda: bridge.runtime.ingest.counters["store_retries"] >= 2, timeout=60,
                       what="the batch retried")
            assert httpx.get(bridge.url + "/readyz").status_code == 503, "503 while a batch is retrying"
            assert bridge.runtime.store.counts()["readings"] == 0
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wait_until(lambda: bridge.runtime.store.counts()["readings"] == 1, timeout=60, what="stored after release")
        wait_until(lambda: httpx.get(bridge.url + "/readyz").status_code == 200, timeout=30, what="ready again")
        device.close()


# --- stats and metrics never crash while devices appear -----------------------------------------------


def test_metrics_and_stats_hammered_while_500_new_devices_appear(tmp_path: Path) -> None:
    with BridgeThread(bridge_settings(tmp_path)) as bridge:
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet", protocol=mqtt.MQTTv311)
        publisher.max_inflight_messages_set(200)
        publisher.connect("127.0.0.1", bridge.mqtt_port)
        publisher.loop_start()
        stop = threading.Event()
        failures: list[str] = []
        scrapes = [0]

        def hammer(path: str, auth: bool) -> None:
            headers = {"Authorization": f"Bearer {token()}"} if auth else {}
            with httpx.Client(base_url=bridge.url, headers=headers, timeout=30) as client:
                while not stop.is_set():
                    response = client.get(path)
                    if response.status_code != 200:
                        failures.append(f"{path}: {response.status_code} {response.text[:300]}")
                        continue
                    if path == "/metrics":
                        families(response.text)  # parses, or raises
                    scrapes[0] += 1

        threads = [threading.Thread(target=hammer, args=(path, path != "/metrics"), daemon=True)
                   for path in ("/metrics", "/realtime/stats") * 2]
        for t in threads:
            t.start()
        sent = []
        for i in range(500):  # in order, batch after batch, so the registry grows while the readers run
            topic = status_topic("h1", "monitor", f"mon-{i:03d}")
            sent.append(publisher.publish(topic, encode_status("online", battery=80), qos=1, retain=True))
            sent.append(publisher.publish(topic.replace("/status", "/vitals"), json.dumps(
                {"seq": 1, "ts": 1790000000000 + i, "patient_id": f"p-{i:03d}", "metrics": {"heart_rate": 70}}),
                qos=1))
        for info in sent:
            info.wait_for_publish(60)
        wait_until(lambda: bridge.runtime.store.counts()["devices"] == 500, timeout=90, what="500 devices registered")
        stop.set()
        for t in threads:
            t.join(30)
        publisher.loop_stop()
        publisher.disconnect()
        assert failures == []
        assert scrapes[0] > 4
        def metrics_with_every_device() -> str | None:  # the gauges follow the store at the next timer tick
            text = httpx.get(bridge.url + "/metrics").text
            return text if sample(text, "firstcare_devices") == 500 else None

        text = wait_until(metrics_with_every_device, what="500 devices in /metrics")
        assert sample(text, "firstcare_devices_online") == 500
        assert "mon-0" not in text and "p-0" not in text, "no device or patient id in /metrics"


# --- the Prometheus text ---------------------------------------------------------------------------------


def test_metrics_parse_with_help_and_type_and_measure_the_alarm_path(tmp_path: Path) -> None:
    with BridgeThread(bridge_settings(tmp_path)) as bridge:
        sub = bridge.subscribe("hospital:h1:alerts", "patient:p-001:vitals")
        device = Device(bridge.mqtt_port, "ox-lat")
        for _ in range(3):
            device.vitals({"spo2": 80})  # the critical desaturation rule raises after its delay
        bridge.receive_until(sub, lambda e: e["event"] == "patient.alert.raised")
        device.vitals({"spo2": 97}, ts_ms=int(time.time() * 1000) + 3_600_000)  # a device clock an hour ahead
        bridge.receive_until(sub, lambda e: e["event"] == "patient.vitals.update"
                             and e["data"]["metrics"]["spo2"] == 97)
        device.publish(device.vitals_topic, b"not json")
        wait_until(lambda: bridge.runtime.core.snapshot.counters.get("dead_letters") == 1, what="dead letter")
        text = httpx.get(bridge.url + "/metrics").text
        device.close()

    assert "# HELP firstcare_alarm_latency_seconds " in text
    assert "# TYPE firstcare_alarm_latency_seconds histogram" in text
    found = families(text)
    for name, kind in [("firstcare_alarm_latency_seconds", "histogram"),
                       ("firstcare_vitals_latency_seconds", "histogram"), ("firstcare_readings_stored", "counter"),
                       ("firstcare_dead_letters", "counter"),
                       ("firstcare_alert_transitions", "counter"), ("firstcare_devices_online", "gauge"),
                       ("firstcare_mqtt_sessions_lost", "counter"), ("firstcare_ready", "gauge"),
                       ("firstcare_hub_delivered", "counter"), ("firstcare_realtime_connections", "gauge"),
                       ("firstcare_device_clock_ahead", "counter")]:
        assert found[name].type == kind, name
        assert found[name].documentation, f"{name} has no HELP"
    assert sample(text, "firstcare_dead_letters_total", reason="payload_not_json") == 1
    assert sample(text, "firstcare_alert_transitions_total", action="raised") >= 1
    for stage in ("device_to_commit", "receipt_to_commit", "commit_to_delivery", "device_to_delivery"):
        assert sample(text, "firstcare_alarm_latency_seconds_count", stage=stage) >= 1, stage
        assert sample(text, "firstcare_vitals_latency_seconds_count", stage=stage) >= 4, stage
    assert sample(text, "firstcare_device_clock_ahead_total", kind="vitals") == 1
    assert sample(text, "firstcare_mqtt_state", state="connected") == 1
    assert sample(text, "firstcare_ready") == 1
    assert "p-001" not in text and "ox-lat" not in text


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    """Two bridges in one process: no 'Duplicated timeseries' error, separate figures."""
    with BridgeThread(bridge_settings(tmp_path / "a")) as a, BridgeThread(bridge_settings(tmp_path / "b")) as b:
        device = Device(a.mqtt_port, "ox-a")
        device.vitals({"spo2": 97})
        wait_until(lambda: a.runtime.core.snapshot.counters.get("readings_stored") == 1, what="stored on a")
        assert sample(httpx.get(a.url + "/metrics").text, "firstcare_readings_stored_total") == 1
        assert sample(httpx.get(b.url + "/metrics").text, "firstcare_readings_stored_total") == 0
        device.close()


# --- a broker that lost the session ---------------------------------------------------------------------


@pytest.fixture
def forgetful_broker(tmp_path: Path) -> Iterator[MosquittoInstance]:
    """The dev config WITHOUT persistence: a restart forgets every session and queue."""
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "broker", dev=True, overrides={"persistence": "false"})
    yield broker
    broker.stop()


def session_lost_alerts(bridge: BridgeThread) -> list[dict]:
    with bridge.http() as client:
        items = client.get("/api/alerts", params={"limit": 100}).json()["items"]
    return [a for a in items if a["rule_id"] == "ingest.session_lost"]


def test_a_broker_restart_without_persistence_raises_session_lost(
        forgetful_broker: MosquittoInstance, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with BridgeThread(bridge_settings(tmp_path, mqtt_url=forgetful_broker.url("bridge"))) as bridge:
        for hospital in ("h1", "h2"):
            device = Device(forgetful_broker.port, f"ox-{hospital}", hospital_id=hospital)
            device.status("online")
            device.close()
        wait_until(lambda: bridge.runtime.core.snapshot.devices == 2, what="two hospitals known")
        assert session_lost_alerts(bridge) == [], "the first session of a fresh client id is no loss"
        sub = bridge.subscribe("system", "hospital:h1:alerts", "hospital:h2:alerts")
        seen: list[dict[str, Any]] = []

        def system_event(event: dict[str, Any]) -> bool:
            seen.append(event)
            return bool(event["room"] == "system")

        with caplog.at_level(logging.WARNING, logger="firstcare.mqtt"):
            forgetful_broker.restart()
            system = bridge.receive_until(sub, system_event, timeout=60)
        raised = [e for e in seen if e["event"] == "patient.alert.raised"]
        assert sorted(e["room"] for e in raised) == ["hospital:h1:alerts", "hospital:h2:alerts"]
        assert {e["data"]["rule_id"] for e in raised} == {"ingest.session_lost"}
        assert system["event"] == "system.alert" and system["data"]["rule_id"] == "ingest.session_lost"
        assert sorted(system["data"]["hospitals"]) == ["h1", "h2"]
        alerts = wait_until(lambda: len(session_lost_alerts(bridge)) == 2 and session_lost_alerts(bridge),
                            what="one stored alarm per hospital")
        assert sorted(a["hospital_id"] for a in alerts) == ["h1", "h2"]
        assert all(a["state"] == "raised" and a["kind"] == "technical" for a in alerts)
        assert any("session" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        stats = bridge.stats()["ingest"]
        assert stats["sessions_lost"] == 1
        text = httpx.get(bridge.url + "/metrics").text
        assert sample(text, "firstcare_mqtt_sessions_lost_total") == 1
        wait_until(lambda: bridge.runtime.ingest.connected, what="reconnected")


def test_a_persistent_broker_restart_raises_nothing(tmp_path: Path) -> None:
    require_mosquitto()
    with (
        start_mosquitto(tmp_path / "broker", dev=True) as broker,
        BridgeThread(bridge_settings(tmp_path, mqtt_url=broker.url("bridge"))) as bridge,
    ):
        device = Device(broker.port, "ox-keep")
        device.status("online")
        device.close()
        wait_until(lambda: bridge.runtime.core.snapshot.devices == 1, what="device known")
        connects = bridge.runtime.ingest.counters["connects"]
        broker.restart()
        wait_until(lambda: bridge.runtime.ingest.counters["connects"] > connects and bridge.runtime.ingest.connected,
                   timeout=60, what="reconnected")
        assert bridge.runtime.ingest.counters["sessions_lost"] == 0
        assert session_lost_alerts(bridge) == []


def test_session_lost_is_noticed_across_a_bridge_restart(forgetful_broker: MosquittoInstance, tmp_path: Path) -> None:
    """The bridge remembers in its database that it had a session: a broker that forgot it
    while the bridge was down is a loss too."""
    env = env_for(tmp_path, forgetful_broker.url("bridge"))
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    device = Device(forgetful_broker.port, "ox-away")
    device.vitals({"spo2": 97}, seq=1)
    db = tmp_path / "bridge.db"

    def rules() -> list[str]:
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute("SELECT rule_id FROM alerts")]

    wait_until(lambda: _count(db) == 1, what="stored")
    bridge.stop()
    device.vitals({"spo2": 96}, seq=2)  # queued for the bridge... and forgotten by the restart
    device.close()
    forgetful_broker.restart()
    bridge.start()
    wait_until(lambda: "ingest.session_lost" in rules(), timeout=60, what="session_lost stored after the restart")
    assert rules().count("ingest.session_lost") == 1
    bridge.stop()


def _count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM readings").fetchone()[0]
