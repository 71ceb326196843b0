"""WebSocket and SSE against a real uvicorn server, with clients over TCP as a browser would
use them, on both hub backends (memory:// and a real Redis)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from bridge.realtime import CLOSE_CODES
from firstcare.auth import LEEWAY_SECONDS
from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.devices import Device

CLINICIAN_H1: dict[str, Any] = {"role": "clinician", "sub": "dr-h1", "hospitals": ("h1",)}


@pytest.fixture(scope="module", params=["memory", "redis"])
def bridge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    hub_url = "memory://"
    if request.param == "redis":
        hub_url = f"{request.getfixturevalue('redis_url')}?prefix=rt-{secrets.token_hex(4)}:"
    settings = bridge_settings(tmp_path_factory.mktemp(f"rt-{request.param}"), hub_url=hub_url, ws_queue_size=20,
                               ws_send_timeout_seconds=3, history_size=200, max_connections_per_user=5,
                               ws_rate_per_second=5, allowed_origins=("http://dashboard.example",))
    with BridgeThread(settings) as b:
        b.device = Device(b.mqtt_port, "ox-1")  # type: ignore[attr-defined]
        b.other = Device(b.mqtt_port, "ox-9", hospital_id="h2")  # type: ignore[attr-defined]
        b.device.vitals({"spo2": 97}, patient_id="p-001")  # type: ignore[attr-defined]
        b.other.vitals({"spo2": 97}, patient_id="p-h2")  # type: ignore[attr-defined]
        wait_until(lambda: b.runtime.store.patient_hospital("p-h2") == "h2", what="seed patients")
        yield b
        b.device.close()  # type: ignore[attr-defined]
        b.other.close()  # type: ignore[attr-defined]


def ws_url(bridge: BridgeThread, path: str = "/realtime/ws", **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return bridge.url.replace("http://", "ws://") + path + (f"?{q}" if q else "")


@asynccontextmanager
async def ws_client(url: str, **kw: Any) -> AsyncIterator[ClientConnection]:
    async with websockets.connect(url, open_timeout=10, **kw) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
        yield ws


PASSING = ("ping", "presence_join", "presence_leave")  # keepalives and other users coming and going


async def recv(ws: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message["type"] not in PASSING:
            return message


async def closed_with(url: str, **kw: Any) -> tuple[int, str]:
    """Connect and read until the server closes; the close code and reason."""
    async with websockets.connect(url, open_timeout=10, **kw) as ws:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 15)
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("not closed")


async def subscribe(ws: ClientConnection, room: str, since: str | None = None) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "room": room, **({"since": since} if since else {})}))
    return await recv(ws)


def publish_readings(bridge: BridgeThread, n: int, spo2: int = 96) -> list[int]:
    stored = bridge.runtime.core.counters["readings_stored"]
    seqs = [bridge.device.vitals({"spo2": spo2}, patient_id="p-001") for _ in range(n)]  # type: ignore[attr-defined]
    wait_until(lambda: bridge.runtime.core.counters["readings_stored"] >= stored + n, what=f"{n} readings stored")
    return seqs


# --- streams get the right events, and only them -----------------------------------------

def test_patient_websocket_auto_subscribes_and_gets_the_patients_events_only(bridge: BridgeThread) -> None:
    async def main() -> None:
        async with ws_client(ws_url(bridge, "/realtime/ws/patient/p-001", token=token(**CLINICIAN_H1))) as ws:
            answer = await recv(ws)
            assert (answer["type"], answer["room"], answer["replayed"]) == ("subscribed", "patient:p-001", 0)
            assert answer["last_id"] is None or ":" in answer["last_id"]
            await asyncio.to_thread(bridge.other.vitals, {"spo2": 90}, patient_id="p-h2")  # type: ignore[attr-defined]
            seq = await asyncio.to_thread(bridge.device.vitals, {"spo2": 95}, patient_id="p-001")  # type: ignore[attr-defined]
            event = await recv(ws)
            assert (event["type"], event["event"], event["room"]) == ("vitals_update", "patient.vitals.update",
                                                                      "patient:p-001")
            assert (event["data"]["patient_id"], event["data"]["seq"]) == ("p-001", seq)

    asyncio.run(main())


def test_hospital_websocket_sees_its_hospital_not_the_other(bridge: BridgeThread) -> None:
    async def main() -> None:
        h2 = token("clinician", hospitals=("h2",))
        async with ws_client(ws_url(bridge, "/realtime/ws/hospital/h2", token=h2)) as ws:
            await recv(ws)
            await asyncio.to_thread(bridge.device.vitals, {"spo2": 95}, patient_id="p-001")  # type: ignore[attr-defined]
            await asyncio.to_thread(bridge.other.vitals, {"spo2": 91}, patient_id="p-h2")  # type: ignore[attr-defined]
            event = await recv(ws)
            assert (event["room"], event["data"]["hospital_id"]) == ("hospital:h2", "h2")

    asyncio.run(main())


def test_sse_patient_stream_carries_id_event_and_data(bridge: BridgeThread) -> None:
    with httpx.stream("GET", f"{bridge.url}/realtime/events/patient/p-001",
                      params={"token": token(**CLINICIAN_H1), "room": "vitals"}, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        seq = bridge.device.vitals({"spo2": 94}, patient_id="p-001")  # type: ignore[attr-defined]
        event = read_sse(response, 1)[0]
    assert event["event"] == "patient.vitals.update"
    assert json.loads(event["data"])["seq"] == seq
    assert event["id"].endswith(f":{event['id'].split(':')[1]}") and ":" in event["id"]


def read_sse(response: httpx.Response, n: int) -> list[dict[str, str]]:
    """Parse the raw stream as EventSource does; comments (pings) and other users' presence
    announcements are skipped."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if current and not current.get("event", "").startswith("presence."):
                events.append(current)
                if len(events) == n:
                    return events
            current = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        current[field] = value[1:] if value.startswith(" ") else value
    raise AssertionError(f"stream ended after {len(events)} events")


# --- authentication and permissions ------------------------------------------------------

@pytest.mark.parametrize(("query", "code"), [
    ({}, "token_invalid"),
    ({"token": "garbage"}, "token_invalid"),
    ({"token": "EXPIRED"}, "token_expired"),
    ({"ticket": "never-issued"}, "token_invalid"),
])
def test_bad_tokens_never_get_a_websocket_stream(bridge: BridgeThread, query: dict[str, str], code: str) -> None:
    if query.get("token") == "EXPIRED":
        query = {"token": token(ttl=-60)}
    close_code, _ = asyncio.run(closed_with(ws_url(bridge, "/realtime/ws/patient/p-001", **query)))
    assert close_code == CLOSE_CODES[code]


@pytest.mark.parametrize("query", [{}, {"token": "garbage"}, {"token": "EXPIRED"}])
def test_bad_tokens_never_get_an_sse_stream(bridge: BridgeThread, query: dict[str, str]) -> None:
    if query.get("token") == "EXPIRED":
        query = {"token": token(ttl=-60)}
    response = httpx.get(f"{bridge.url}/realtime/events/patient/p-001", params=query, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"] in ("token_invalid", "token_expired")


@pytest.mark.parametrize("room", ["patient:p-h2", "patient:p-h2:vitals", "hospital:h2", "hospital:h2:alerts",
                                  "device:oximeter:ox-9", "patient:p-nobody", "nonsense", "hospital:h1:vitals"])
def test_rooms_of_other_hospitals_and_unknown_rooms_answer_alike(bridge: BridgeThread, room: str) -> None:
    async def main() -> dict[str, Any]:
        async with ws_client(ws_url(bridge, token=token(**CLINICIAN_H1))) as ws:
            return await subscribe(ws, room)

    answer = asyncio.run(main())
    assert answer == {"type": "error", "code": "forbidden", "room": room, "message": "unknown room or not allowed"}


def test_a_patient_token_sees_its_own_record_only(bridge: BridgeThread) -> None:
    mine = token("patient", sub="pat-1", patients=("p-001",))
    for path in ("/realtime/ws/patient/p-h2", "/realtime/ws/hospital/h1"):
        assert asyncio.run(closed_with(ws_url(bridge, path, token=mine)))[0] == CLOSE_CODES["forbidden"], path
    response = httpx.get(f"{bridge.url}/realtime/events/patient/p-h2", params={"token": mine}, timeout=10)
    assert (response.status_code, response.json()["error"]) == (403, "forbidden")

    async def own() -> dict[str, Any]:
        async with ws_client(ws_url(bridge, "/realtime/ws/patient/p-001", token=mine)) as ws:
            return await recv(ws)

    assert asyncio.run(own())["type"] == "subscribed"


def test_token_in_subprotocol_and_single_use_ticket(bridge: BridgeThread) -> None:
    async def via_subprotocol() -> str | None:
        async with ws_client(ws_url(bridge), subprotocols=["firstcare.v1", f"bearer.{token()}"]) as ws:
            return ws.subprotocol

    assert asyncio.run(via_subprotocol()) == "firstcare.v1"
    ticket = httpx.post(f"{bridge.url}/realtime/ticket", headers={"Authorization": f"Bearer {token(**CLINICIAN_H1)}"}
                        ).json()["ticket"]

    async def via_ticket() -> dict[str, Any]:
        async with ws_client(ws_url(bridge, "/realtime/ws/patient/p-001", ticket=ticket)) as ws:
            return await recv(ws)

    assert asyncio.run(via_ticket())["type"] == "subscribed"
    assert asyncio.run(closed_with(ws_url(bridge, "/realtime/ws/patient/p-001", ticket=ticket)))[0] == \
        CLOSE_CODES["token_invalid"]


def nearly_expired() -> str:
    """A token past its ``exp`` by all but 3 s of the leeway: accepted, and its stream ends
    3 s later, as any token's does at ``exp`` plus the leeway."""
    return token(ttl=-(LEEWAY_SECONDS - 3))


def test_stream_closes_when_the_token_expires(bridge: BridgeThread) -> None:
    async def main() -> tuple[int, str]:
        async with ws_client(ws_url(bridge, token=nearly_expired())) as ws:  # accepted: a welcome first
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason
        raise AssertionError("not closed")

    code, reason = asyncio.run(main())
    assert (code, "expired" in reason) == (CLOSE_CODES["token_expired"], True)
    with httpx.stream("GET", f"{bridge.url}/realtime/events", params={"token": nearly_expired()},
                      timeout=30) as response:
        assert response.status_code == 200
        assert read_sse(response, 1)[0]["event"] == "reauth"


def test_origins_outside_the_allow_list_are_refused(bridge: BridgeThread) -> None:
    url = ws_url(bridge, token=token())
    assert asyncio.run(closed_with(url, origin="http://evil.example"))[0] == CLOSE_CODES["origin_forbidden"]

    async def allowed() -> str:
        async with ws_client(url, origin="http://dashboard.example") as ws:
            await ws.send(json.dumps({"type": "ping"}))
            return (await recv(ws))["type"]

    assert asyncio.run(allowed()) == "pong"
    response = httpx.get(f"{bridge.url}/realtime/events", params={"token": token()},
                         headers={"Origin": "http://evil.example"}, timeout=10)
    assert (response.status_code, response.json()["error"]) == (403, "origin_forbidden")


# --- replay --------------------------------------------------------------------------------

def test_websocket_reconnect_with_last_id_gets_exactly_what_it_missed(bridge: BridgeThread) -> None:
    async def main() -> None:
        url = ws_url(bridge, token=token(**CLINICIAN_H1))
        async with ws_client(url) as ws:
            await subscribe(ws, "patient:p-001:vitals")
            await asyncio.to_thread(publish_readings, bridge, 1)
            last_id = (await recv(ws))["id"]
        missed = await asyncio.to_thread(publish_readings, bridge, 7)
        async with ws_client(url) as ws:
            assert await subscribe(ws, "patient:p-001:vitals", since=last_id) == {
                "type": "subscribed", "room": "patient:p-001:vitals", "replayed": 7}
            got = [await recv(ws) for _ in range(7)]
            assert [e["data"]["seq"] for e in got] == missed
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv(ws))["type"] == "pong", "a duplicate arrived after the replay"

    asyncio.run(main())


def test_sse_reconnect_with_last_event_id_gets_exactly_what_it_missed(bridge: BridgeThread) -> None:
    params = {"token": token(**CLINICIAN_H1), "room": "vitals"}
    with httpx.stream("GET", f"{bridge.url}/realtime/events/patient/p-001", params=params, timeout=20) as response:
        publish_readings(bridge, 1)
        last_id = read_sse(response, 1)[0]["id"]
    missed = publish_readings(bridge, 5)
    with httpx.stream("GET", f"{bridge.url}/realtime/events/patient/p-001", params=params,
                      headers={"Last-Event-ID": last_id}, timeout=20) as response:
        replayed = read_sse(response, 5)
    assert [json.loads(e["data"])["seq"] for e in replayed] == missed
    with httpx.stream("GET", f"{bridge.url}/realtime/events/patient/p-001",
                      params={**params, "last_event_id": last_id}, timeout=20) as response:
        assert [json.loads(e["data"])["seq"] for e in read_sse(response, 5)] == missed


def test_history_that_no_longer_reaches_back_yields_resync(bridge: BridgeThread) -> None:
    async def main() -> None:
        async with ws_client(ws_url(bridge, token=token())) as ws, bridge.async_http() as client:
            await subscribe(ws, "system")
            first = (await client.post("/realtime/test/publish", json={
                "room": "system", "event": "system.maintenance", "data": {"n": 0}})).json()
            for n in range(1, bridge.settings.history_size + 20):  # the first one falls out of the history
                response = await client.post("/realtime/test/publish", json={
                    "room": "system", "event": "system.maintenance", "data": {"n": n}})
                assert response.status_code == 200, response.text
        async with ws_client(ws_url(bridge, token=token())) as ws:
            answer = await subscribe(ws, "system", since=first["id"])
            assert (answer["type"], answer["room"]) == ("resync", "system")

    asyncio.run(main())
    with httpx.stream("GET", f"{bridge.url}/realtime/events", params={"token": token(), "last_event_id": "old:1"},
                      timeout=20) as response:
        assert read_sse(response, 1)[0]["event"] == "resync"


# --- limits and backpressure ---------------------------------------------------------------

def test_slow_client_never_delays_a_fast_one_and_an_alert_it_cannot_take_disconnects_it(bridge: BridgeThread) -> None:
    big = "x" * 60_000

    async def main() -> None:
        url = ws_url(bridge, token=token(**CLINICIAN_H1))
        fast = await websockets.connect(url, max_size=2**24)
        slow = await websockets.connect(url, max_size=2**24, max_queue=1)
        for ws in (fast, slow):
            await recv(ws)
            await subscribe(ws, "hospital:h1:alerts")
        slow.transport.pause_reading()  # a client that stopped reading

        async def read_fast() -> list[str]:
            ids: list[str] = []
            while len(ids) < 150:
                message = await recv(fast)
                if "n" in message.get("data", {}):  # not a technical alarm of the module's devices
                    ids.append(message["id"])
            return ids

        fast_reader = asyncio.create_task(read_fast())
        published: list[str] = []
        async with bridge.async_http() as client:
            for n in range(150):
                published.append((await client.post("/realtime/test/publish", json={
                    "room": "hospital:h1:alerts", "event": "patient.alert.raised",
                    "data": {"n": n, "pad": big}})).json()["id"])
        assert await fast_reader == published, "the fast client lost or reordered events"
        slow.transport.resume_reading()
        code = None
        seen = []
        try:
            while True:
                message = json.loads(await asyncio.wait_for(slow.recv(), 30))
                if message["type"] == "alert_raised" and "n" in message["data"]:
                    seen.append(message["id"])
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
        assert code == CLOSE_CODES["slow_consumer"]
        assert seen == published[:len(seen)] and len(seen) < len(published)
        async with ws_client(url) as again:  # recovery through replay: no alert is lost
            answer = await subscribe(again, "hospital:h1:alerts", since=seen[-1])
            replayed = [await recv(again) for _ in range(answer["replayed"])]
            rest = [m["id"] for m in replayed if "n" in m["data"]]
        assert seen + rest == published
        await fast.close()

    asyncio.run(main())
    stats = bridge.stats()["realtime"]
    assert stats["forced_disconnects"]["slow_consumer"] >= 1


def test_inbound_rate_limit_message_size_and_connections_per_user(bridge: BridgeThread) -> None:
    async def flood() -> list[str]:
        async with ws_client(ws_url(bridge, token=token(sub="flooder"))) as ws:
            for _ in range(30):
                await ws.send(json.dumps({"type": "ping"}))
            return [(await recv(ws)).get("code", "pong") for _ in range(30)]

    answers = asyncio.run(flood())
    assert "rate_limited" in answers and "pong" in answers

    async def too_big() -> int:
        async with ws_client(ws_url(bridge, token=token(sub="big"))) as ws:
            await ws.send(json.dumps({"type": "ping", "pad": "x" * 10_000}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1

    assert asyncio.run(too_big()) == CLOSE_CODES["message_too_large"]

    async def many() -> int:
        url = ws_url(bridge, token=token(sub="greedy"))
        clients = [await websockets.connect(url) for _ in range(5)]
        try:
            return (await closed_with(url))[0]
        finally:
            for c in clients:
                await c.close()

    assert asyncio.run(many()) == CLOSE_CODES["too_many_connections"]
    assert bridge.stats()["realtime"]["rate_limited"] >= 1


# --- operations ----------------------------------------------------------------------------

def test_test_publish_is_admin_only_and_reaches_the_room(bridge: BridgeThread) -> None:
    body = {"room": "system", "event": "system.maintenance", "data": {"window": "tonight"}}
    doctor = httpx.post(f"{bridge.url}/realtime/test/publish", json=body,
                        headers={"Authorization": f"Bearer {token(**CLINICIAN_H1)}"})
    assert doctor.status_code == 403

    async def main() -> dict[str, Any]:
        async with ws_client(ws_url(bridge, token=token(**CLINICIAN_H1))) as ws:
            await subscribe(ws, "system")
            await asyncio.to_thread(httpx.post, f"{bridge.url}/realtime/test/publish", json=body,
                                    headers={"Authorization": f"Bearer {token()}"})
            return await recv(ws)

    event = asyncio.run(main())
    assert (event["type"], event["event"], event["data"]) == (
        "maintenance", "system.maintenance", {"window": "tonight"})


def test_presence_stats_and_metrics_follow_connections(bridge: BridgeThread) -> None:
    async def main() -> None:
        watcher = token(sub="watcher", role="admin")
        async with ws_client(ws_url(bridge, "/realtime/ws/patient/p-001", token=watcher)) as ws:
            await recv(ws)
            members = httpx.get(f"{bridge.url}/realtime/presence", params={"room": "patient:p-001"},
                                headers={"Authorization": f"Bearer {token()}"}).json()
            assert "watcher" in [m["user"] for m in members["members"]]
            stats = bridge.stats()["realtime"]
            assert stats["connections_per_user"]["watcher"] == 1 and stats["rooms"]["patient:p-001"] >= 1
        wait_until(lambda: "watcher" not in bridge.stats()["realtime"]["connections_per_user"], what="cleanup")

    asyncio.run(main())
    metrics = httpx.get(f"{bridge.url}/metrics").text
    assert 'firstcare_realtime_connections{transport="ws"} ' in metrics and "firstcare_hub_delivered_total " in metrics
    assert "watcher" not in metrics and "p-001" not in metrics


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", "{\"no\": \"type\"}", "[" * 1500, "{\"type\": \"dance\"}"])
def test_malformed_client_messages_get_an_error_and_the_connection_lives_on(bridge: BridgeThread, raw: str) -> None:
    async def main() -> tuple[dict, dict]:
        async with ws_client(ws_url(bridge, token=token(sub=f"odd-{len(raw)}"))) as ws:
            await ws.send(raw)
            error = await recv(ws)
            await ws.send(json.dumps({"type": "ping"}))
            return error, await recv(ws)

    error, pong = asyncio.run(main())
    assert (error["type"], error["code"]) == ("error", "bad_request")
    assert pong["type"] == "pong"


def test_subscribing_without_since_gives_the_rooms_position_as_a_cursor(bridge: BridgeThread) -> None:
    async def main() -> None:
        url = ws_url(bridge, token=token(**CLINICIAN_H1))
        async with ws_client(url) as ws:
            await asyncio.to_thread(publish_readings, bridge, 1)
            answer = await subscribe(ws, "patient:p-001:vitals")
            cursor = answer["last_id"]
            assert answer["replayed"] == 0 and cursor
        missed = await asyncio.to_thread(publish_readings, bridge, 2)
        async with ws_client(url) as ws:
            assert (await subscribe(ws, "patient:p-001:vitals", since=cursor))["replayed"] == 2
            assert [(await recv(ws))["data"]["seq"] for _ in missed] == missed

    asyncio.run(main())
