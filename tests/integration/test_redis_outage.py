"""Lost Redis: the bridge keeps ingesting and storing, reports itself degraded, counts what it
could not fan out, catches up when Redis is back, and tells replaying clients to resync."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.brokers import free_port
from tests.support.devices import Device


class PrivateRedis:
    """A redis-server of our own, so the test may kill it without touching anyone else's."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "PrivateRedis":
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.tmp_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_until(lambda: _pings(redis.Redis(port=self.port, socket_connect_timeout=1)), what="redis up")
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path, redis_url: str) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path).start()
    yield server
    server.kill()


def test_bridge_survives_a_redis_outage_and_clients_resync(private_redis: PrivateRedis, tmp_path: Path) -> None:
    settings = bridge_settings(tmp_path, hub_url=f"redis://127.0.0.1:{private_redis.port}/0")
    with BridgeThread(settings) as bridge:
        device = Device(bridge.mqtt_port, "ox-r")
        room = "patient:p-001:vitals"
        url = bridge.url.replace("http", "ws") + f"/realtime/ws?token={token()}"

        async def last_id_before_outage() -> str:
            async with websockets.connect(url) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "subscribe", "room": room}))
                await ws.recv()
                await asyncio.to_thread(device.vitals, {"spo2": 97}, 1)
                return json.loads(await asyncio.wait_for(ws.recv(), 15))["id"]

        last_id = asyncio.run(last_id_before_outage())
        private_redis.kill()
        for seq in range(2, 12):
            device.vitals({"spo2": 96}, seq=seq)
        wait_until(lambda: bridge.runtime.core.counters["readings_stored"] == 11, what="stored while Redis is down")
        ready = wait_until(lambda: (r := httpx.get(bridge.url + "/readyz")).status_code == 503 and r, what="degraded")
        assert ready.json()["checks"]["hub"] == "degraded"
        wait_until(lambda: bridge.stats()["hub"]["publish_failures"] >= 10, what="failures counted")

        private_redis.start()
        wait_until(lambda: httpx.get(bridge.url + "/readyz").status_code == 200, timeout=30, what="recovered")

        async def after() -> tuple[dict, dict]:
            async with websockets.connect(url) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "subscribe", "room": room, "since": last_id}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), 15))
                await ws.send(json.dumps({"type": "subscribe", "room": room}))
                await asyncio.wait_for(ws.recv(), 15)
                await asyncio.to_thread(device.vitals, {"spo2": 95}, 12)
                while True:
                    live = json.loads(await asyncio.wait_for(ws.recv(), 15))
                    if live["type"] == "vitals_update":
                        return answer, live

        answer, live = asyncio.run(after())
        assert answer == {"type": "resync", "room": room,
                          "message": "history does not reach back that far; reload from the REST API"}
        assert live["data"]["seq"] == 12
        with bridge.http() as client:
            seqs = [r["seq"] for r in client.get("/api/patients/p-001/readings").json()["items"]]
        assert seqs == list(range(1, 13)), "the REST API has everything the live stream missed"
        device.close()
