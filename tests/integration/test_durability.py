"""No silent loss: QoS 1 readings the broker held survive a stopped or SIGKILLed bridge,
because the bridge acknowledges a message only after its batch has committed."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge import SECRET, BridgeProcess, wait_until
from tests.support.brokers import MosquittoInstance, free_port
from tests.support.devices import Device

TOTAL = 600


def bridge_env(tmp_path: Path, mqtt_url: str) -> dict[str, str]:
    return {
        "FC_MQTT_URL": mqtt_url, "FC_HTTP_PORT": str(free_port()), "FC_JWT_SECRET": SECRET,
        "FC_STORE_URL": f"sqlite:///{tmp_path}/bridge.db", "FC_MQTT_CLIENT_ID": f"bridge-{tmp_path.name}",
        "FC_LOG_LEVEL": "WARNING",
    }


def stored_seqs(tmp_path: Path, device_id: str) -> list[int]:
    with sqlite3.connect(tmp_path / "bridge.db") as db:
        return [row[0] for row in db.execute("SELECT seq FROM readings WHERE device_id=? ORDER BY seq", (device_id,))]


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[int]:
    """The embedded broker as its own process (`firstcare broker`), so the bridge can stop."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "firstcare.cli", "broker", "--mqtt-port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def accepting() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(accepting, what="embedded broker")
    yield port
    proc.terminate()
    proc.wait(10)


def publish_in_background(device: Device, first: int, last: int) -> threading.Thread:
    def run() -> None:
        for seq in range(first, last + 1):
            device.vitals({"heart_rate": 60 + seq % 40, "spo2": 97}, seq=seq)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_stopped_bridge_loses_nothing_the_broker_held(broker: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    if broker == "mosquitto":
        port = request.getfixturevalue("mosquitto").port
    else:
        port = request.getfixturevalue("amqtt_broker")
    bridge = BridgeProcess(bridge_env(tmp_path, f"mqtt://bridge@127.0.0.1:{port}"), tmp_path / "bridge.log").start()
    device = Device(port, f"ox-stop-{broker}")
    for seq in range(1, 101):
        device.vitals({"spo2": 97}, seq=seq)
    wait_until(lambda: len(stored_seqs(tmp_path, device.device_id)) == 100, what="first 100 stored")
    bridge.stop()
    for seq in range(101, 301):  # published while no bridge runs: the broker queues them
        device.vitals({"spo2": 96}, seq=seq)
    bridge.start()
    wait_until(lambda: len(stored_seqs(tmp_path, device.device_id)) == 300, timeout=60, what="all 300 stored")
    assert stored_seqs(tmp_path, device.device_id) == list(range(1, 301))
    device.close()
    bridge.stop()


def test_sigkilled_bridge_on_mosquitto_loses_nothing_and_stores_nothing_twice(
        mosquitto: MosquittoInstance, tmp_path: Path) -> None:
    bridge = BridgeProcess(bridge_env(tmp_path, mosquitto.url("bridge")), tmp_path / "bridge.log").start()
    device = Device(mosquitto.port, "ox-kill")
    publisher = publish_in_background(device, 1, TOTAL)
    wait_until(lambda: len(stored_seqs(tmp_path, "ox-kill")) >= TOTAL // 4, timeout=60, what="a quarter stored")
    bridge.kill()
    killed_at = len(stored_seqs(tmp_path, "ox-kill"))
    time.sleep(0.2)
    bridge.start()
    publisher.join(120)
    wait_until(lambda: len(stored_seqs(tmp_path, "ox-kill")) == TOTAL, timeout=90, what="every reading stored")
    seqs = stored_seqs(tmp_path, "ox-kill")
    assert seqs == list(range(1, TOTAL + 1)), "a reading was lost or stored twice"
    assert killed_at < TOTAL, "the kill must land mid-stream for this test to mean anything"
    device.close()
    bridge.stop()
