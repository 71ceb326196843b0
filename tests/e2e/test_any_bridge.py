"""Two `firstcare bridge` processes on one fresh PostgreSQL database and one Redis hub: readings
reach bridge A only (its own broker), and a clinician asking bridge B gets the patient's and the
device's data and rooms as if B had ingested them: REST 200 with the readings, WebSocket
subscriptions accepted with each live event once, SSE 200, a ticket made on A used on B. A token
refreshed on A narrows the subject's streams on B."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.bridge import SECRET, BridgeProcess, token, wait_until
from tests.support.brokers import free_port
from tests.support.devices import Device

PATIENT, DEVICE = "p-any", ("monitor", "mon-any")
ROOMS = (f"patient:{PATIENT}:vitals", f"patient:{PATIENT}", f"device:{DEVICE[0]}:{DEVICE[1]}")


def start(tmp_path: Path, name: str, store_url: str, hub_url: str) -> tuple[BridgeProcess, int]:
    mqtt_port = free_port()
    env = {"FC_MQTT_URL": "embedded", "FC_MQTT_PORT": str(mqtt_port), "FC_HTTP_PORT": str(free_port()),
           "FC_JWT_SECRET": SECRET, "FC_STORE_URL": store_url, "FC_HUB_URL": hub_url,
           "FC_MQTT_CLIENT_ID": f"bridge-{name}", "FC_DEVICE_SILENT_SECONDS": "600",
           "FC_DEVICE_OFFLINE_SECONDS": "900", "FC_AUDIT_URL": f"sqlite:///{tmp_path}/{name}-audit.db",
           "FC_LOG_LEVEL": "WARNING"}
    return BridgeProcess(env, tmp_path / f"{name}.log").start(), mqtt_port


async def frames(ws: websockets.ClientConnection, until: float = 20) -> dict:
    """The next frame that is neither a keepalive nor presence."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), until))
        if message["type"] not in ("ping", "presence_join", "presence_leave"):
            return message


@pytest.fixture
def pair(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[tuple[BridgeProcess, BridgeProcess, Device]]:
    hub_url = f"{redis_url}?prefix=any-{secrets.token_hex(4)}:"
    a, a_mqtt = start(tmp_path, "a", pg_url, hub_url)
    b, _ = start(tmp_path, "b", pg_url, hub_url)
    device = Device(a_mqtt, DEVICE[1], device_type=DEVICE[0], will=False)
    try:
        yield a, b, device
    finally:
        device.close()
        a.stop()
        b.stop()


def test_a_bridge_that_ingested_nothing_serves_the_patient_and_device(
        pair: tuple[BridgeProcess, BridgeProcess, Device]) -> None:
    a, b, device = pair
    clinician = token("clinician", sub="dr-b", hospitals=("h1",))
    stranger = token("clinician", sub="dr-h2", hospitals=("h2",))
    auth = {"Authorization": f"Bearer {clinician}"}
    first = device.vitals({"heart_rate": 72, "spo2": 98}, patient_id=PATIENT)
    with httpx.Client(base_url=b.url, headers=auth, timeout=15) as on_b:
        wait_until(lambda: on_b.get(f"/api/patients/{PATIENT}/readings").status_code == 200
                   and on_b.get(f"/api/patients/{PATIENT}/readings").json()["items"], what="reading seen on B")
        readings = on_b.get(f"/api/patients/{PATIENT}/readings").json()["items"]
        assert [r["seq"] for r in readings] == [first]
        assert on_b.get(f"/api/patients/{PATIENT}/vitals/latest").status_code == 200
        assert on_b.get(f"/api/devices/{DEVICE[0]}/{DEVICE[1]}").json()["hospital_id"] == "h1"
        assert on_b.get("/api/patients").json()["items"][0]["patient_id"] == PATIENT
        # another hospital's clinician is refused on B as on A: owners come from the shared store
        denied = httpx.get(f"{b.url}/api/patients/{PATIENT}/readings",
                           headers={"Authorization": f"Bearer {stranger}"}, timeout=15)
        assert denied.status_code in (403, 404)
        presence = on_b.get("/realtime/presence", params={"room": ROOMS[2]})
        assert presence.status_code == 200

    async def main() -> None:
        url_b = b.url.replace("http", "ws") + f"/realtime/ws?token={clinician}"
        async with websockets.connect(url_b) as ws:
            assert (await frames(ws))["type"] == "welcome"
            for room in ROOMS:
                await ws.send(json.dumps({"type": "subscribe", "room": room}))
                answer = await frames(ws)
                assert (answer["type"], answer["room"]) == ("subscribed", room), answer
            sent = [await asyncio.to_thread(device.vitals, {"heart_rate": 70 + i, "spo2": 97},
                                            patient_id=PATIENT) for i in range(5)]
            # a connection in several of an event's rooms gets it once (the most specific room)
            got: Counter[int] = Counter()
            while sum(got.values()) < len(sent):
                event = await frames(ws)
                assert (event["type"], event["room"]) == ("vitals_update", ROOMS[0]), event
                got[event["data"]["seq"]] += 1
            assert got == Counter(sent)
            # nothing else arrives: no second copy of any of them
            with_more = []
            try:
                while True:
                    extra = await frames(ws, until=2)
                    if extra["type"] == "vitals_update":
                        with_more.append(extra)
            except TimeoutError:
                pass
            assert with_more == []
        async with websockets.connect(url_b) as ws:  # the device's room alone
            await frames(ws)
            await ws.send(json.dumps({"type": "subscribe", "room": ROOMS[2]}))
            assert (await frames(ws))["type"] == "subscribed"
            seq = await asyncio.to_thread(device.vitals, {"heart_rate": 80, "spo2": 97}, patient_id=PATIENT)
            event = await frames(ws)
            assert (event["room"], event["data"]["seq"]) == (ROOMS[2], seq)
        # another hospital's clinician: the room is refused on B
        async with websockets.connect(b.url.replace("http", "ws") + f"/realtime/ws?token={stranger}") as ws:
            await frames(ws)
            await ws.send(json.dumps({"type": "subscribe", "room": ROOMS[0]}))
            refused = await frames(ws)
            assert (refused["type"], refused["code"]) == ("error", "forbidden")

    asyncio.run(main())

    with httpx.Client(timeout=15) as client:
        # SSE on B for the patient and the device, one with a ticket made on A
        ticket = client.post(f"{a.url}/realtime/ticket", headers=auth).json()["ticket"]
        for path, params, headers in (
                (f"/realtime/events/patient/{PATIENT}", {"room": "vitals"}, auth),
                (f"/realtime/events/device/{DEVICE[0]}/{DEVICE[1]}", {"ticket": ticket}, {})):
            with client.stream("GET", b.url + path, params=params, headers=headers) as stream:
                assert stream.status_code == 200, path
                seq = device.vitals({"heart_rate": 75, "spo2": 97}, patient_id=PATIENT)
                for line in stream.iter_lines():
                    if line.startswith("data:") and json.loads(line[5:]).get("seq") == seq:
                        break
        refused = client.get(f"{b.url}/realtime/events/patient/{PATIENT}",
                             headers={"Authorization": f"Bearer {stranger}"})
        assert refused.status_code == 403


def test_a_token_refreshed_on_one_bridge_narrows_the_subjects_streams_on_the_other(
        pair: tuple[BridgeProcess, BridgeProcess, Device]) -> None:
    a, b, device = pair
    both = token("clinician", sub="dr-moves", hospitals=("h1", "h2"))
    narrower = token("clinician", sub="dr-moves", hospitals=("h1",))

    async def main() -> None:
        async with websockets.connect(b.url.replace("http", "ws") + f"/realtime/ws?token={both}") as on_b, \
                websockets.connect(a.url.replace("http", "ws") + f"/realtime/ws?token={both}") as on_a:
            for ws in (on_b, on_a):
                assert (await frames(ws))["type"] == "welcome"
            for room in ("hospital:h1", "hospital:h2"):
                await on_b.send(json.dumps({"type": "subscribe", "room": room}))
                assert (await frames(on_b))["type"] == "subscribed"
            await on_a.send(json.dumps({"type": "auth", "token": narrower}))
            assert (await frames(on_a))["type"] == "authenticated"
            told = await frames(on_b)
            assert told == {"type": "unsubscribed", "room": "hospital:h2", "reason": "forbidden"}, told
            await on_b.send(json.dumps({"type": "subscribe", "room": "hospital:h2"}))
            again = await frames(on_b)
            assert (again["type"], again["code"]) == ("error", "forbidden"), "a refresh never widens; it narrows"
            seq = await asyncio.to_thread(device.vitals, {"heart_rate": 74, "spo2": 97}, seq=1000, patient_id=PATIENT)
            event = await frames(on_b)
            assert (event["room"], event["data"]["seq"]) == ("hospital:h1", seq), "the rooms still allowed stay"

    asyncio.run(main())
