"""Two `firstcare bridge` processes on one Redis: rooms, replay and presence span both."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import websockets

from tests.support.bridge import SECRET, BridgeProcess, token, wait_until
from tests.support.brokers import free_port
from tests.support.devices import Device


def start(tmp_path: Path, name: str, hub_url: str) -> tuple[BridgeProcess, int]:
    mqtt_port = free_port()
    env = {"FC_MQTT_URL": "embedded", "FC_MQTT_PORT": str(mqtt_port), "FC_HTTP_PORT": str(free_port()),
           "FC_HUB_URL": hub_url, "FC_JWT_SECRET": SECRET, "FC_STORE_URL": f"sqlite:///{tmp_path}/{name}.db",
           "FC_LOG_LEVEL": "WARNING"}
    return BridgeProcess(env, tmp_path / f"{name}.log").start(), mqtt_port


SKIPPED = ("ping", "welcome", "subscribed", "presence_join", "presence_leave")


async def next_event(ws: websockets.ClientConnection, skip: tuple[str, ...] = SKIPPED) -> dict:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if message["type"] not in skip:
            return message


def test_a_client_on_one_process_gets_events_ingested_by_the_other(tmp_path: Path, redis_url: str) -> None:
    hub_url = f"{redis_url}?prefix=mp-{secrets.token_hex(4)}:"
    a, a_mqtt = start(tmp_path, "a", hub_url)
    b, _ = start(tmp_path, "b", hub_url)
    device = Device(a_mqtt, "ox-mp")
    auth = {"Authorization": f"Bearer {token()}"}
    try:
        async def main() -> None:
            room = "patient:p-001:vitals"
            url_a = a.url.replace("http", "ws") + f"/realtime/ws?token={token(sub='on-a')}"
            url_b = b.url.replace("http", "ws") + f"/realtime/ws?token={token(sub='on-b')}"
            async with websockets.connect(url_a) as on_a, websockets.connect(url_b) as on_b:
                for ws in (on_a, on_b):
                    await ws.send(json.dumps({"type": "subscribe", "room": room}))
                presence = await asyncio.to_thread(
                    lambda: wait_until(lambda: len(httpx.get(f"{b.url}/realtime/presence", params={"room": room},
                                                             headers=auth).json()["members"]) == 2,
                                       what="presence of both"))
                assert presence
                members = httpx.get(f"{a.url}/realtime/presence", params={"room": room}, headers=auth).json()
                assert {m["user"] for m in members["members"]} == {"on-a", "on-b"}
                assert len({m["node"] for m in members["members"]}) == 2
                seq = await asyncio.to_thread(device.vitals, {"spo2": 95}, patient_id="p-001")
                event = await next_event(on_b)
                assert (event["room"], event["data"]["seq"]) == (room, seq)
                last_id = event["id"]
                while (told := await next_event(on_a, ("ping", "welcome", "subscribed", "vitals_update")))[
                        "type"] != "presence_join":
                    pass
                assert (told["room"], told["data"]["user"]) == (room, "on-b"), "presence across processes"
            missed = [await asyncio.to_thread(device.vitals, {"spo2": 94}, patient_id="p-001") for _ in range(3)]
            await asyncio.to_thread(wait_until, lambda: httpx.get(
                f"{a.url}/api/patients/p-001/readings", headers=auth).json()["items"][-1]["seq"] == missed[-1])
            async with websockets.connect(url_b) as again:  # replay from the process that did not ingest
                await again.send(json.dumps({"type": "subscribe", "room": room, "since": last_id}))
                got = [await next_event(again) for _ in missed]
            assert [e["data"]["seq"] for e in got] == missed

        asyncio.run(main())
    finally:
        device.close()
        a.stop()
        b.stop()
