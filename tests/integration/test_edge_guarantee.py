"""What a device was told is safe reaches the bridge: in each supported ward-broker mode, the
gateway is killed (SIGKILL) or stopped (SIGTERM) and restarted while devices publish, and every
reading a device got a PUBACK for (counted with paho's ``on_publish``) is stored by a real
``firstcare bridge`` exactly once.

    devices --QoS 1--> ward broker (embedded amqtt in `firstcare edge` | Mosquitto)
            --> `firstcare edge` (spool) --> upstream Mosquitto --> `firstcare bridge` (SQLite)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge import SECRET, BridgeProcess, wait_until
from tests.support.brokers import MosquittoInstance, free_port, require_mosquitto, start_mosquitto
from tests.support.devices import CountingDevice
from tests.support.edge import EdgeProcess

DEVICES = 4
READINGS = 750  # per device
RATE = 75.0  # readings/s per device: 300/s for the ward


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MosquittoInstance]:
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "upstream", dev=True)
    yield broker
    broker.stop()


@pytest.fixture
def bridge(upstream: MosquittoInstance, tmp_path: Path) -> Iterator[Path]:
    env = {"FC_MQTT_URL": upstream.url("bridge"), "FC_HTTP_PORT": str(free_port()), "FC_JWT_SECRET": SECRET,
           "FC_STORE_URL": f"sqlite:///{tmp_path}/bridge.db", "FC_MQTT_CLIENT_ID": f"bridge-{tmp_path.name}",
           "FC_LOG_LEVEL": "WARNING"}
    process = BridgeProcess(env, tmp_path / "bridge.log").start()
    yield tmp_path / "bridge.db"
    process.stop()


def stored(db: Path) -> dict[str, list[int]]:
    """device id -> the seqs the bridge stored, one entry per stored row."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT device_id, seq FROM readings ORDER BY device_id, seq").fetchall()
    out: dict[str, list[int]] = {}
    for device_id, seq in rows:
        out.setdefault(device_id, []).append(seq)
    return out


@pytest.mark.parametrize("fault", ["sigkill", "sigterm"])
@pytest.mark.parametrize("ward", ["embedded", "mosquitto"])
def test_every_reading_a_device_was_acknowledged_for_reaches_the_bridge_once(
        ward: str, fault: str, upstream: MosquittoInstance, bridge: Path, tmp_path: Path) -> None:
    settings: dict[str, object] = {}
    ward_broker = None
    if ward == "mosquitto":
        ward_broker = start_mosquitto(tmp_path / "ward", dev=True)
        settings["local_url"] = ward_broker.url()
    edge = EdgeProcess(tmp_path, upstream.url("gateway"), **settings).start()
    port = ward_broker.port if ward_broker is not None else edge.local_port
    devices = [CountingDevice(port, f"ox-{ward[:3]}-{fault[3:]}-{n}", READINGS, RATE) for n in range(DEVICES)]
    try:
        for device in devices:
            device.start()
        wait_until(lambda: sum(map(len, stored(bridge).values())) >= 300, timeout=60, what="the stream under way")
        acked_before = sum(len(d.acked) for d in devices)
        if fault == "sigkill":
            edge.kill()
        else:
            edge.stop()
        edge.start()
        wait_until(lambda: all(d.finished() for d in devices), timeout=180,
                   what="every reading published and acknowledged")
        acked = {d.device_id: sorted(d.acked) for d in devices}
        total = sum(map(len, acked.values()))
        assert acked_before < total, "the fault must land mid-stream"
        wait_until(lambda: sum(map(len, stored(bridge).values())) >= total, timeout=120,
                   what="every acknowledged reading at the bridge")
        at_bridge = stored(bridge)
        for device_id, seqs in acked.items():
            got = at_bridge.get(device_id, [])
            missing = sorted(set(seqs) - set(got))
            assert missing == [], f"{device_id}: {len(missing)} acknowledged readings lost: {missing[:20]}"
            assert len(got) == len(set(got)), f"{device_id}: stored more than once"
        print(f"\n[{ward} ward, {fault}] acknowledged {total} (before the fault: {acked_before}), "
              f"arrived {sum(len(set(v)) for v in at_bridge.values())}, lost 0, stored twice 0")
    finally:
        for device in devices:
            device.close()
        edge.stop()
        if ward_broker is not None:
            ward_broker.stop()
