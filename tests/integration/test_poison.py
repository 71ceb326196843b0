"""No message can stall the stream: a poison message between valid ones is dead-lettered and
acknowledged while everything around it is stored, on the embedded broker and on Mosquitto,
whether it breaks the decoder, an alarm rule or the store; an unavailable store is retried."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.alerts import AlertBook
from tests.support.bridge import SECRET, BridgeProcess, BridgeThread, bridge_settings, token, wait_until
from tests.support.brokers import MosquittoInstance, free_port
from tests.support.devices import Device

NESTED = b'{"a":' * 1000 + b"1" + b"}" * 1000


def reading(seq: int, **metrics: float) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), "patient_id": "p-001",
                       "metrics": metrics or {"spo2": 97}}).encode()


def publish_burst(device: Device, payloads: list[bytes]) -> None:
    """Publish without waiting for each PUBACK (the bridge acks only after commit), so the
    messages arrive together and share a batch."""
    infos = [device.client.publish(device.vitals_topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published()


def seqs(db_path: str | Path, device_id: str) -> list[int]:
    with sqlite3.connect(db_path) as db:
        return [r[0] for r in db.execute("SELECT seq FROM readings WHERE device_id=? ORDER BY seq", (device_id,))]


def letters(db_path: str | Path) -> list[tuple[str, str, bytes]]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT reason, detail, payload FROM dead_letters ORDER BY id")
        return [(r[0], r[1], bytes(r[2])) for r in rows]


# ------------------------------------------------------------------ the nested-object message

def test_nested_message_on_the_embedded_broker_is_dead_lettered_and_acknowledged(tmp_path: Path) -> None:
    with BridgeThread(bridge_settings(tmp_path, batch_linger_ms=200)) as bridge:
        device = Device(bridge.mqtt_port, "ox-nest")
        try:
            publish_burst(device, [reading(1), reading(2), reading(3), NESTED, reading(4), reading(5), reading(6)])
            wait_until(lambda: seqs(bridge.settings.sqlite_path, "ox-nest") == [1, 2, 3, 4, 5, 6],
                       what="every valid reading stored")
            assert [(r, d) for r, d, _ in letters(bridge.settings.sqlite_path)] == [
                ("payload_too_deep", "JSON nested deeper than 16 levels")]
            ingest = bridge.runtime.ingest
            wait_until(lambda: ingest.counters["acked"] == ingest.counters["received"] == 7,
                       what="all seven acknowledged, the poison too")
            device.vitals({"spo2": 96}, seq=7)  # and the stream goes on
            wait_until(lambda: seqs(bridge.settings.sqlite_path, "ox-nest")[-1:] == [7], what="later reading")
            assert bridge.runtime.readiness()["ready"]
        finally:
            device.close()


def bridge_env(tmp_path: Path, mqtt_url: str, **extra: str) -> dict[str, str]:
    return {"FC_MQTT_URL": mqtt_url, "FC_HTTP_PORT": str(free_port()), "FC_JWT_SECRET": SECRET,
            "FC_STORE_URL": f"sqlite:///{tmp_path}/bridge.db", "FC_MQTT_CLIENT_ID": f"bridge-{tmp_path.name}",
            "FC_LOG_LEVEL": "WARNING", **extra}


def test_nested_message_on_mosquitto_never_comes_back_after_a_restart(mosquitto: MosquittoInstance,
                                                                       tmp_path: Path) -> None:
    """`firstcare bridge` as a user runs it: after a restart the broker redelivers only what
    was not acknowledged, and the poison was acknowledged (it would be dead-lettered twice)."""
    env = bridge_env(tmp_path, mosquitto.url("bridge"), FC_BATCH_LINGER_MS="200")
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    db = tmp_path / "bridge.db"
    device = Device(mosquitto.port, "ox-nest-mq")
    try:
        publish_burst(device, [reading(1), NESTED, reading(2), NESTED.replace(b"1", b"[]"), reading(3)])
        wait_until(lambda: seqs(db, "ox-nest-mq") == [1, 2, 3], what="valid readings around the poison")
        wait_until(lambda: [r for r, _, _ in letters(db)] == ["payload_too_deep"] * 2, what="both dead-lettered")
        bridge.stop()
        bridge.start()
        device.vitals({"spo2": 95}, seq=4)
        wait_until(lambda: seqs(db, "ox-nest-mq") == [1, 2, 3, 4], what="the stream goes on after the restart")
        stats = httpx.get(bridge.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"}).json()
        assert stats["ingest"]["dead_letters"] == 0, "nothing redelivered: the poison was acknowledged"
        assert [r for r, _, _ in letters(db)] == ["payload_too_deep"] * 2
    finally:
        device.close()
        bridge.stop()


# ------------------------------------------------------------------ a bug in our own code

@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path, batch_linger_ms=300)) as b:
        yield b


def test_an_alarm_rule_that_raises_for_one_message_is_isolated_and_the_batch_stored(
        bridge: BridgeThread, monkeypatch: pytest.MonkeyPatch) -> None:
    original = AlertBook.evaluate

    def evaluate(self: AlertBook, r: Any) -> Any:
        if r.metrics.get("heart_rate") == 123:
            raise RuntimeError("rule exploded")
        return original(self, r)

    monkeypatch.setattr(AlertBook, "evaluate", evaluate)
    device = Device(bridge.mqtt_port, "mon-bug", device_type="monitor")
    try:
        publish_burst(device, [reading(1, heart_rate=70), reading(2, heart_rate=71), reading(3, heart_rate=123),
                               reading(4, heart_rate=72), reading(5, heart_rate=73)])
        wait_until(lambda: seqs(bridge.settings.sqlite_path, "mon-bug") == [1, 2, 4, 5], what="the rest stored")
        ((reason, detail, payload),) = letters(bridge.settings.sqlite_path)
        assert (reason, detail) == ("internal_error", "RuntimeError: rule exploded")
        assert json.loads(payload)["seq"] == 3, "the whole message is kept for replay"
        core, ingest = bridge.runtime.core, bridge.runtime.ingest
        wait_until(lambda: ingest.counters["acked"] == 5, what="all five acknowledged")
        assert ingest.counters["poison_isolated"] == 1 and ingest.counters["store_retries"] == 0
        assert (core.counters["quarantined"], core.counters["internal_errors"]) == (1, 1)
        assert core.dead_letter_reasons["internal_error"] == 1
        # the rolled-back attempts left no trace in memory: counted once, state as in the database
        assert (core.counters["readings_stored"], core.counters["duplicates"]) == (4, 0)
        for store in (core.store, bridge.runtime.store):
            record = store.device("monitor", "mon-bug")
            assert record is not None and record.last_seq == 5
        with bridge.http() as client:
            (letter,) = client.get("/api/dead-letters", params={"reason": "internal_error"}).json()["items"]
            assert letter["topic"] == device.vitals_topic and not letter["truncated"]
        stats = bridge.stats()["ingest"]
        assert (stats["quarantined"], stats["poison_isolated"]) == (1, 1)
        metrics = httpx.get(bridge.url + "/metrics").text
        for line in ("firstcare_ingest_internal_errors_total 1.0", "firstcare_ingest_quarantined_total 1.0",
                     'firstcare_dead_letters_total{reason="internal_error"} 1.0'):
            assert line in metrics.splitlines(), line
    finally:
        device.close()


def test_a_store_failure_for_one_message_is_isolated_by_splitting_the_batch(bridge: BridgeThread) -> None:
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        db.execute("CREATE TRIGGER poison BEFORE INSERT ON readings WHEN NEW.seq = 666"
                   " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
    device = Device(bridge.mqtt_port, "ox-trigger")
    try:
        publish_burst(device, [reading(seq) for seq in (664, 665, 666, 667, 668)])
        wait_until(lambda: seqs(bridge.settings.sqlite_path, "ox-trigger") == [664, 665, 667, 668],
                   what="all but the poisoned row stored")
        ((reason, detail, payload),) = letters(bridge.settings.sqlite_path)
        assert reason == "internal_error" and detail.startswith("StoreError: ") and "poisoned row" in detail
        assert json.loads(payload)["seq"] == 666
        wait_until(lambda: bridge.runtime.ingest.counters["acked"] == 5, what="all five acknowledged")
    finally:
        device.close()


def test_a_database_held_by_another_writer_is_retried_whole_and_not_acknowledged(bridge: BridgeThread) -> None:
    device = Device(bridge.mqtt_port, "ox-locked")
    ingest = bridge.runtime.ingest
    try:
        device.vitals({"spo2": 97}, seq=1)
        wait_until(lambda: ingest.counters["acked"] == 1, what="first reading acknowledged")
        blocker = sqlite3.connect(bridge.settings.sqlite_path, timeout=1)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            for seq in (2, 3, 4):
                device.client.publish(device.vitals_topic, reading(seq), qos=1)
            wait_until(lambda: ingest.counters["store_retries"] >= 1, timeout=90, what="a retry of the batch")
            assert ingest.counters["acked"] == 1, "nothing acknowledged while the store refuses writes"
            assert ingest.counters["poison_isolated"] == ingest.counters["batch_splits"] == 0, \
                "never blamed on a message"
            assert not bridge.runtime.readiness()["ready"]
        finally:
            blocker.rollback()
            blocker.close()
        wait_until(lambda: seqs(bridge.settings.sqlite_path, "ox-locked") == [1, 2, 3, 4], timeout=90,
                   what="stored once the database is back")
        wait_until(lambda: ingest.counters["acked"] == 4, what="then acknowledged")
        assert letters(bridge.settings.sqlite_path) == []
    finally:
        device.close()
