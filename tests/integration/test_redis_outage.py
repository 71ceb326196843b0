"""Lost Redis: the bridge keeps ingesting and storing, reports itself degraded, counts what it
could not fan out, catches up when Redis is back, and tells replaying clients to resync.

Each test runs its own redis-server on a free port (the machine's Redis is never stopped)."""

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

    def __init__(self, tmp_path: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         *persistence, "--dir", str(self.tmp_path)],
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


@pytest.fixture
def persistent_redis(tmp_path: Path, redis_url: str) -> Iterator[PrivateRedis]:
    """Keeps its keys across a restart (append-only file), so an old epoch would live on."""
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis", persistent=True).start()
    yield server
    server.kill()


async def _dashboard(url: str, rooms: list[str]) -> websockets.ClientConnection:
    ws = await websockets.connect(url, open_timeout=10)
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
    for room in rooms:
        await ws.send(json.dumps({"type": "subscribe", "room": room}))
        while (answer := json.loads(await asyncio.wait_for(ws.recv(), 15)))["type"] in ("ping", "presence_join"):
            pass
        assert answer["type"] == "subscribed", answer
    return ws


async def _read_until(ws: websockets.ClientConnection, done: object, timeout: float = 60) -> list[dict]:
    """Messages (keepalives and presence skipped) until ``done(messages)`` holds."""
    messages: list[dict] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not done(messages):  # type: ignore[operator]
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"timed out; got {messages}")
        message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        if message["type"] not in ("ping", "presence_join", "presence_leave"):
            messages.append(message)
    return messages


def test_an_outage_is_never_invisible_and_the_alarm_stored_meanwhile_reaches_the_dashboards(
        persistent_redis: PrivateRedis, tmp_path: Path) -> None:
    """Two bridge processes share a persistent Redis; A ingests. Redis stops; A stores three
    readings, the last two a severe desaturation (a high-priority alarm); Redis comes back with
    its old keys; A stores one more. The dashboards connected throughout (one on each process,
    real WebSocket clients over TCP) are told to resync and receive the alarm; a client
    replaying from before the outage is told to resync; the new events are in a new epoch."""
    hub_url = f"redis://127.0.0.1:{persistent_redis.port}/0"
    with BridgeThread(bridge_settings(tmp_path / "a", hub_url=hub_url)) as a, \
            BridgeThread(bridge_settings(tmp_path / "b", hub_url=hub_url)) as b:
        device = Device(a.mqtt_port, "ox-out")
        vitals_room, alerts_room = "patient:p-out:vitals", "hospital:h1:alerts"
        url_a = a.url.replace("http", "ws") + f"/realtime/ws?token={token()}"
        url_b = b.url.replace("http", "ws") + f"/realtime/ws?token={token()}"

        async def main() -> None:
            dash_a = await _dashboard(url_a, [vitals_room, alerts_room])
            dash_b = await _dashboard(url_b, [alerts_room])
            await asyncio.to_thread(device.vitals, {"spo2": 97}, 1, "p-out")
            before = (await _read_until(dash_a, lambda m: any(x.get("room") == vitals_room for x in m)))[-1]
            last_id = before["id"]

            await asyncio.to_thread(persistent_redis.kill)
            for seq, spo2 in ((2, 97), (3, 80), (4, 80)):
                await asyncio.to_thread(device.vitals, {"spo2": spo2}, seq, "p-out")
            await asyncio.to_thread(wait_until, lambda: a.runtime.core.counters["readings_stored"] == 4,
                                    what="stored while Redis is down")
            with a.http() as api:
                alarms = api.get("/api/alerts", params={"patient_id": "p-out", "state": "active"}).json()["items"]
            assert [(x["rule_id"], x["priority"]) for x in alarms] == [("spo2.low.critical", "high")]
            await asyncio.to_thread(wait_until, lambda: a.stats()["hub"]["alerts_catch_up_pending"],
                                    what="the alarm's publish failed")

            await asyncio.to_thread(persistent_redis.start)
            await asyncio.to_thread(device.vitals, {"spo2": 81}, 5, "p-out")

            def got_alarm_and_resync(messages: list[dict]) -> bool:
                return (any(m["type"] == "resync" and m["room"] == alerts_room for m in messages)
                        and any(m["type"] == "alert_raised" and m["room"] == alerts_room for m in messages))

            def all_three(m: list[dict]) -> bool:
                return (got_alarm_and_resync(m)
                        and any(x["type"] == "resync" and x["room"] == vitals_room for x in m)
                        and any(x.get("room") == vitals_room and x["type"] == "vitals_update" for x in m))

            seen_a = await _read_until(dash_a, all_three)
            seen_b = await _read_until(dash_b, got_alarm_and_resync)
            for seen in (seen_a, seen_b):
                alarm = next(m for m in seen if m["type"] == "alert_raised")
                assert (alarm["data"]["patient_id"], alarm["data"]["rule_id"], alarm["data"]["priority"]) == (
                    "p-out", "spo2.low.critical", "high")
                resync_at = next(i for i, m in enumerate(seen) if m["type"] == "resync" and m["room"] == alerts_room)
                assert resync_at < seen.index(alarm), "the resync comes before the room's new epoch"
            new_vitals = [m for m in seen_a if m["type"] == "vitals_update" and m["room"] == vitals_room]
            assert [m["data"]["seq"] for m in new_vitals] == [5]
            assert new_vitals[0]["id"].split(":")[0] != last_id.split(":")[0], "the epoch must change"

            late = await _dashboard(url_a, [])
            await late.send(json.dumps({"type": "subscribe", "room": vitals_room, "since": last_id}))
            answer = (await _read_until(late, lambda m: bool(m)))[0]
            assert (answer["type"], answer["room"]) == ("resync", vitals_room)
            for ws in (dash_a, dash_b, late):
                await ws.close()

        asyncio.run(main())
        with a.http() as api:
            seqs = [r["seq"] for r in api.get("/api/patients/p-out/readings").json()["items"]]
        assert seqs == [1, 2, 3, 4, 5], "the REST API has everything the resync points to"
        hub = a.stats()["hub"]
        assert hub["alerts_caught_up"] >= 1 and hub["backend_epochs_reset"] >= 1
        device.close()
