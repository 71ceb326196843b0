"""What the bridge refuses at start, as a user runs it (``firstcare bridge`` processes against
real brokers and real SQLite): a session that could not be persistent, a second bridge on one
database, a second bridge with one client id. Each refusal says what to change."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.bridge import SECRET, BridgeProcess, token, wait_until
from tests.support.brokers import MosquittoInstance, free_port
from tests.support.devices import Device
from tests.support.process import REPO_ROOT


def env_for(tmp_path: Path, mqtt_url: str, db: str = "bridge.db", client_id: str | None = None,
            **extra: str) -> dict[str, str]:
    return {
        "FC_MQTT_URL": mqtt_url, "FC_HTTP_PORT": str(free_port()), "FC_JWT_SECRET": SECRET,
        "FC_STORE_URL": f"sqlite:///{tmp_path}/{db}", "FC_MQTT_CLIENT_ID": client_id or f"bridge-{tmp_path.name}",
        "FC_LOG_LEVEL": "WARNING", **extra,
    }


def refused(env: dict[str, str]) -> str:
    """Run ``firstcare bridge``; it must exit with status 2. Returns what it printed."""
    proc = subprocess.run([sys.executable, "-m", "firstcare.cli", "bridge"], env={**os.environ, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, f"expected a refusal, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stderr


def stored(tmp_path: Path, db: str = "bridge.db") -> int:
    with sqlite3.connect(tmp_path / db) as conn:
        return conn.execute("SELECT count(*) FROM readings").fetchone()[0]


def stats(bridge: BridgeProcess) -> dict:
    return httpx.get(bridge.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"}, timeout=10).json()


@pytest.fixture
def amqtt_broker() -> Iterator[int]:
    """The embedded broker as its own process (`firstcare broker`)."""
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


# --- a session that could not be persistent ---------------------------------------------------


def test_an_anonymous_session_on_the_embedded_broker_is_refused(amqtt_broker: int, tmp_path: Path) -> None:
    message = refused(env_for(tmp_path, f"mqtt://127.0.0.1:{amqtt_broker}"))
    assert "FC_MQTT_URL" in message and "anonymous" in message
    assert "mqtt://bridge:password@host:port" in message and "FC_MQTT_ALLOW_ANONYMOUS=true" in message
    assert not (tmp_path / "bridge.db").exists(), "refused before touching the database"


def test_mqtt5_without_a_session_expiry_is_refused(mosquitto: MosquittoInstance, tmp_path: Path) -> None:
    message = refused(env_for(tmp_path, mosquitto.url("bridge"), FC_MQTT_PROTOCOL="5",
                              FC_MQTT_SESSION_EXPIRY_SECONDS="0"))
    assert "FC_MQTT_SESSION_EXPIRY_SECONDS" in message and "1209600" in message


def test_an_mqtt5_session_with_an_expiry_keeps_what_the_broker_queued(mosquitto: MosquittoInstance,
                                                                      tmp_path: Path) -> None:
    """The setting the refusal asks for works: readings published while the bridge is away
    arrive when it is back."""
    bridge = BridgeProcess(env_for(tmp_path, mosquitto.url("bridge"), FC_MQTT_PROTOCOL="5"),
                           tmp_path / "bridge.log").start()
    device = Device(mosquitto.port, "ox-v5")
    device.vitals({"spo2": 97}, seq=1)
    wait_until(lambda: stored(tmp_path) == 1, what="first reading stored")
    bridge.stop()
    for seq in range(2, 52):
        device.vitals({"spo2": 96}, seq=seq)
    bridge.start()
    wait_until(lambda: stored(tmp_path) == 51, timeout=60, what="the queued readings stored")
    device.close()
    bridge.stop()


# --- two bridges, one database -----------------------------------------------------------------


def test_a_second_bridge_on_one_database_is_refused(mosquitto: MosquittoInstance, tmp_path: Path) -> None:
    first = BridgeProcess(env_for(tmp_path, mosquitto.url("bridge"), client_id="bridge-db-a"),
                          tmp_path / "first.log").start()
    message = refused(env_for(tmp_path, mosquitto.url("bridge"), client_id="bridge-db-b"))
    assert first.process is not None
    assert "in use" in message and "bridge.db" in message and f"pid {first.process.pid}" in message
    assert "FC_STORE_URL" in message
    device = Device(mosquitto.port, "ox-db")
    device.vitals({"spo2": 97}, seq=1)
    wait_until(lambda: stored(tmp_path) == 1, what="the first bridge still stores")
    assert first.ready()
    first.kill()  # the kernel drops the lock with the process: a restart is not refused
    second = BridgeProcess(env_for(tmp_path, mosquitto.url("bridge"), client_id="bridge-db-b"),
                           tmp_path / "second.log").start()
    assert second.ready()
    device.close()
    second.stop()


# --- two bridges, one client id ------------------------------------------------------------------


def test_a_second_bridge_with_the_same_client_id_is_refused_and_the_first_keeps_its_session(
        mosquitto: MosquittoInstance, tmp_path: Path) -> None:
    client_id = f"bridge-shared-{tmp_path.name}"
    first = BridgeProcess(env_for(tmp_path, mosquitto.url("bridge"), db="a.db", client_id=client_id),
                          tmp_path / "first.log").start()
    message = refused(env_for(tmp_path, mosquitto.url("bridge"), db="b.db", client_id=client_id))
    assert client_id in message and "in use" in message and "FC_MQTT_CLIENT_ID" in message
    assert first.process is not None and f"process {first.process.pid}" in message
    device = Device(mosquitto.port, "ox-id")
    device.vitals({"spo2": 97}, seq=1)
    wait_until(lambda: stored(tmp_path, "a.db") == 1, what="the first bridge stores")
    ingest = stats(first)["ingest"]
    assert (ingest["connects"], ingest["disconnects"]) == (1, 0), "the first bridge's session was never taken"
    assert first.ready()

    # A bridge killed without releasing its claim does not block a restart: the newcomer
    # watches the claim, sees no heartbeat, and takes over.
    first.kill()
    again = BridgeProcess(env_for(tmp_path, mosquitto.url("bridge"), db="a.db", client_id=client_id),
                          tmp_path / "again.log").start()
    device.vitals({"spo2": 96}, seq=2)
    wait_until(lambda: stored(tmp_path, "a.db") == 2, what="the restarted bridge stores")
    device.close()
    again.stop()


def test_the_same_client_id_is_refused_on_the_embedded_broker_too(tmp_path: Path) -> None:
    """`firstcare up`'s own broker: a bridge pointed at it with the same client id."""
    mqtt_port = free_port()
    owner = BridgeProcess({**env_for(tmp_path, "embedded", db="a.db", client_id="bridge-embedded"),
                           "FC_MQTT_PORT": str(mqtt_port)}, tmp_path / "owner.log").start()
    message = refused(env_for(tmp_path, f"mqtt://bridge@127.0.0.1:{mqtt_port}", db="b.db",
                              client_id="bridge-embedded"))
    assert "bridge-embedded" in message and "in use" in message
    assert owner.ready()
    owner.stop()
