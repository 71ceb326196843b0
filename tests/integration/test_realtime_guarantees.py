"""The real-time guarantees the README promises, against a real uvicorn server with WebSocket
(`websockets`) and SSE (httpx) clients over TCP, on both hub backends (memory:// and a real
Redis): replay exact or resync at the history size, rights that follow a refreshed token,
presence announcements, byte-counted message limits, origins, one token leeway, and handshakes
too large to parse."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from bridge.realtime import CLOSE_CODES
from firstcare.auth import LEEWAY_SECONDS
from tests.integration.test_realtime import closed_with, read_sse, recv, subscribe, ws_client, ws_url
from tests.support.bridge import SECRET, BridgeProcess, BridgeThread, bridge_settings, token, wait_until
from tests.support.brokers import free_port
from tests.support.devices import Device

HISTORY = 20
BOTH: dict[str, Any] = {"role": "clinician", "sub": "dr-ab", "hospitals": ("h1", "h2")}
ONLY_H1: dict[str, Any] = {"role": "clinician", "sub": "dr-ab", "hospitals": ("h1",)}


@pytest.fixture(scope="module", params=["memory", "redis"])
def bridge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    hub_url = "memory://"
    if request.param == "redis":
        hub_url = f"{request.getfixturevalue('redis_url')}?prefix=rg-{secrets.token_hex(4)}:"
    settings = bridge_settings(tmp_path_factory.mktemp(f"rg-{request.param}"), hub_url=hub_url,
                               history_size=HISTORY, allowed_origins=("http://dashboard.example",))
    with BridgeThread(settings) as b:
        b.h1 = Device(b.mqtt_port, "ox-a1")  # type: ignore[attr-defined]
        b.h2 = Device(b.mqtt_port, "ox-b1", hospital_id="h2")  # type: ignore[attr-defined]
        b.h1.vitals({"spo2": 97}, patient_id="pA1")  # type: ignore[attr-defined]
        b.h2.vitals({"spo2": 97}, patient_id="pB1")  # type: ignore[attr-defined]
        wait_until(lambda: b.runtime.store.patient_hospital("pB1") == "h2"
                   and b.runtime.store.patient_hospital("pA1") == "h1", what="seed patients")
        with b.http() as admin:
            b.admin = admin  # type: ignore[attr-defined]
            yield b
        b.h1.close()  # type: ignore[attr-defined]
        b.h2.close()  # type: ignore[attr-defined]


def publish(bridge: BridgeThread, room: str, n: int = 0) -> str:
    response = bridge.admin.post(  # type: ignore[attr-defined]
        "/realtime/test/publish", json={"room": room, "event": "system.maintenance", "data": {"n": n}})
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def until_pong(ws: Any) -> list[dict[str, Any]]:
    """Everything (but keepalives) the server sends before the answer to a ping of ours."""
    await ws.send(json.dumps({"type": "ping"}))
    seen: list[dict[str, Any]] = []
    while True:
        message = await recv(ws)
        if message["type"] == "pong":
            return seen
        seen.append(message)


# --- replay: exact or resync, decided at the history size on both backends -----------------

def test_subscribe_since_one_then_thirty_is_a_resync_and_twenty_back_is_exact(bridge: BridgeThread) -> None:
    """With FC_HISTORY_SIZE=20: one event (E:1), thirty more; since E:1 misses 30 > 20."""
    room = f"hospital:h{secrets.token_hex(3)}"
    ids = [publish(bridge, room, n) for n in range(31)]

    async def main() -> None:
        async with ws_client(ws_url(bridge, token=token())) as ws:
            answer = await subscribe(ws, room, since=ids[0])
            assert (answer["type"], answer["room"]) == ("resync", room), answer
            answer = await subscribe(ws, room, since=ids[30 - (HISTORY + 1)])  # 21 missed
            assert answer["type"] == "resync", answer
            answer = await subscribe(ws, room, since=ids[30 - HISTORY])  # exactly 20 missed
            assert (answer["type"], answer["replayed"]) == ("subscribed", HISTORY)
            assert [(await recv(ws))["id"] for _ in range(HISTORY)] == ids[-HISTORY:]

    asyncio.run(main())


# --- rights follow the token -----------------------------------------------------------------

def test_a_narrower_token_leaves_the_rooms_it_no_longer_allows(bridge: BridgeThread) -> None:
    async def main() -> None:
        async with ws_client(ws_url(bridge, token=token(**BOTH))) as ws:
            assert (await subscribe(ws, "patient:pB1:vitals"))["type"] == "subscribed"
            assert (await subscribe(ws, "patient:pA1:vitals"))["type"] == "subscribed"
            await ws.send(json.dumps({"type": "auth", "token": token(**ONLY_H1)}))
            assert await recv(ws) == {"type": "unsubscribed", "room": "patient:pB1:vitals", "reason": "forbidden"}
            assert (await recv(ws))["type"] == "authenticated"
            # one fan-out task publishes in commit order: pB1's reading would come before pA1's
            await asyncio.to_thread(bridge.h2.vitals, {"spo2": 90}, patient_id="pB1")  # type: ignore[attr-defined]
            seq = await asyncio.to_thread(bridge.h1.vitals, {"spo2": 91}, patient_id="pA1")  # type: ignore[attr-defined]
            event = await recv(ws)
            assert (event["room"], event["data"]["seq"]) == ("patient:pA1:vitals", seq), "pB1 still arrives"
            again = await subscribe(ws, "patient:pB1:vitals")
            assert (again["type"], again["code"]) == ("error", "forbidden")

    asyncio.run(main())


def test_a_refresh_for_another_subject_closes_the_stream(bridge: BridgeThread) -> None:
    async def main() -> tuple[int, str]:
        async with ws_client(ws_url(bridge, token=token(**BOTH))) as ws:
            other = token("clinician", sub="someone-else", hospitals=("h1",))
            await ws.send(json.dumps({"type": "auth", "token": other}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason
        raise AssertionError("not closed")

    code, reason = asyncio.run(main())
    assert code == CLOSE_CODES["token_invalid"] and "same subject" in reason


def test_a_refresh_ends_the_subjects_sse_stream_its_token_no_longer_allows(bridge: BridgeThread) -> None:
    """The narrower token arrives on the WebSocket; the same clinician's EventSource for pB1
    (opened with the wider token) ends with `event: forbidden`, and pA1's stream goes on."""
    params = {"token": token(**BOTH), "room": "vitals"}
    with httpx.stream("GET", f"{bridge.url}/realtime/events/patient/pB1", params=params, timeout=30) as b1, \
            httpx.stream("GET", f"{bridge.url}/realtime/events/patient/pA1", params=params, timeout=30) as a1:
        assert (b1.status_code, a1.status_code) == (200, 200)
        wait_until(lambda: bridge.stats()["realtime"]["connections_per_user"].get("dr-ab") == 2, what="streams")

        async def refresh() -> None:
            async with ws_client(ws_url(bridge, token=token(**BOTH))) as ws:
                await ws.send(json.dumps({"type": "auth", "token": token(**ONLY_H1)}))
                assert (await recv(ws))["type"] == "authenticated"

        asyncio.run(refresh())
        events = []
        for line in b1.iter_lines():  # ends: the generator returns when the server closes it
            events.append(line)
        assert "event: forbidden" in events
        seq = bridge.h1.vitals({"spo2": 93}, patient_id="pA1")  # type: ignore[attr-defined]
        assert json.loads(read_sse(a1, 1)[0]["data"])["seq"] == seq
    reconnect = httpx.get(f"{bridge.url}/realtime/events/patient/pB1", params={"token": token(**ONLY_H1)}, timeout=10)
    assert reconnect.status_code == 403


def test_the_expiry_follows_the_refreshed_token(bridge: BridgeThread) -> None:
    async def main() -> int:
        async with ws_client(ws_url(bridge, token=token(**BOTH))) as ws:
            short = token(**ONLY_H1, ttl=2 - LEEWAY_SECONDS)  # past its exp: 2 s of the leeway left
            await ws.send(json.dumps({"type": "auth", "token": short}))
            answer = await recv(ws)
            assert answer["type"] == "authenticated" and answer["expires_at"] <= time.time() + 2
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 60)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1
        raise AssertionError("not closed")

    assert asyncio.run(main()) == CLOSE_CODES["token_expired"]


# --- presence ---------------------------------------------------------------------------------

def test_presence_tells_the_others_who_joins_and_leaves_and_keeps_last_seen(bridge: BridgeThread) -> None:
    room = "patient:pA1"

    async def main() -> None:
        async with ws_client(ws_url(bridge, token=token("clinician", sub="watcher-a", hospitals=("h1",)))) as a:
            assert (await subscribe(a, room))["type"] == "subscribed"
            async with ws_client(ws_url(bridge, token=token("clinician", sub="nurse-b", hospitals=("h1",)))) as b:
                assert (await subscribe(b, room))["type"] == "subscribed"
                joined = await next_presence(a, "nurse-b")
                assert (joined["type"], joined["event"], joined["room"], joined["id"]) == (
                    "presence_join", "presence.join", room, None)
                assert (joined["data"]["user"], joined["data"]["connections"]) == ("nurse-b", 1)
                assert [m for m in await until_pong(b) if m["type"].startswith("presence_")
                        and m["data"]["user"] == "nurse-b"] == [], "a user is not told about itself"
            left = await next_presence(a, "nurse-b")
            assert (left["type"], left["data"]["user"], left["data"]["connections"]) == ("presence_leave", "nurse-b", 0)

    asyncio.run(main())
    body = httpx.get(f"{bridge.url}/realtime/presence", params={"room": room},
                     headers={"Authorization": f"Bearer {token()}"}, timeout=10).json()
    assert body["users"]["nurse-b"]["online"] is False and body["users"]["nurse-b"]["last_seen"]
    assert "watcher-a" in body["users"]


async def next_presence(ws: Any, user: str, timeout: float = 20) -> dict[str, Any]:
    """The next presence announcement about ``user`` (keepalives and other users skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
        if message["type"].startswith("presence_") and message["data"]["user"] == user:
            return message


def test_a_reconnect_is_not_announced_as_a_leave(bridge: BridgeThread) -> None:
    """A user whose connection drops and comes back within the interval stays present."""
    room = "patient:pA1:alerts"

    async def main() -> None:
        async with ws_client(ws_url(bridge, token=token("clinician", sub="watcher-c", hospitals=("h1",)))) as a:
            await subscribe(a, room)
            async with ws_client(ws_url(bridge, token=token("clinician", sub="nurse-d", hospitals=("h1",)))) as d:
                await subscribe(d, room)
                assert (await next_presence(a, "nurse-d"))["type"] == "presence_join"
                again = await websockets.connect(ws_url(bridge, token=token("clinician", sub="nurse-d",
                                                                           hospitals=("h1",))))
                await recv(again)
                assert (await subscribe(again, room))["type"] == "subscribed"
            # d is gone, its second connection stays: nurse-d is still in the room
            await asyncio.sleep(0)
            with pytest.raises(asyncio.TimeoutError):  # nothing at all about nurse-d, for 3 intervals
                await next_presence(a, "nurse-d", timeout=3)
            await again.close()
            left = await next_presence(a, "nurse-d")
            assert (left["type"], left["data"]["user"]) == ("presence_leave", "nurse-d")

    asyncio.run(main())


# --- message limits count bytes -----------------------------------------------------------------

@pytest.mark.parametrize(("pad", "what"), [
    ("é" * 3000, "6,000 bytes of accented letters (3,000 characters)"),
    ("😀" * 3000, "12,000 bytes of emoji (3,000 characters)"),
    ("x" * 100_000, "100 KB, over uvicorn's former 64 KiB frame limit"),
    ("x" * 900_000, "900 KB"),
])
def test_messages_over_the_byte_limit_close_with_4413(bridge: BridgeThread, pad: str, what: str) -> None:
    async def main() -> int:
        async with ws_client(ws_url(bridge, token=token(sub=f"big-{len(pad.encode())}"))) as ws:
            await ws.send(json.dumps({"type": "ping", "pad": pad}, ensure_ascii=False))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1
        raise AssertionError("not closed")

    assert asyncio.run(main()) == CLOSE_CODES["message_too_large"], what


def test_a_message_within_the_byte_limit_is_answered(bridge: BridgeThread) -> None:
    async def main() -> str:
        async with ws_client(ws_url(bridge, token=token(sub="accented"))) as ws:
            await ws.send(json.dumps({"type": "ping", "pad": "é" * 2000}, ensure_ascii=False))  # ~4,030 bytes
            return (await recv(ws))["type"]

    assert asyncio.run(main()) == "pong"


# --- origins: the allow-list and the server's own names, never the Host header ----------------

def test_a_dns_rebinding_page_is_refused(bridge: BridgeThread) -> None:
    """The attacker's name resolves to this server: Origin and Host both say evil.example."""
    port = bridge.settings.http_port
    evil = f"evil.example:{port}"

    async def rebound() -> int:
        async with websockets.connect(f"ws://{evil}/realtime/ws?token={token()}", host="127.0.0.1", port=port,
                                      origin=websockets.Origin(f"http://{evil}"), open_timeout=10) as ws:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1
        raise AssertionError("not closed")

    assert asyncio.run(rebound()) == CLOSE_CODES["origin_forbidden"]
    sse = httpx.get(f"{bridge.url}/realtime/events", params={"token": token()}, timeout=10,
                    headers={"Origin": f"http://{evil}", "Host": evil})
    assert (sse.status_code, sse.json()["error"]) == (403, "origin_forbidden")


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:{port}", "http://dashboard.example"])
def test_the_servers_own_origins_and_the_allow_list_are_accepted(bridge: BridgeThread, origin: str) -> None:
    async def main() -> str:
        url = ws_url(bridge, token=token())
        async with ws_client(url, origin=origin.format(port=bridge.settings.http_port)) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            return (await recv(ws))["type"]

    assert asyncio.run(main()) == "pong"


# --- one token leeway everywhere --------------------------------------------------------------

def test_a_token_just_past_exp_is_accepted_everywhere_alike(bridge: BridgeThread) -> None:
    late = token(ttl=-(LEEWAY_SECONDS // 2))  # within the leeway
    headers = {"Authorization": f"Bearer {late}"}
    assert httpx.get(f"{bridge.url}/api/devices", headers=headers, timeout=10).status_code == 200

    async def main() -> str:
        async with ws_client(ws_url(bridge, token=late)) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            return (await recv(ws))["type"]

    assert asyncio.run(main()) == "pong", "the WebSocket closed at once while REST accepts the token"
    with httpx.stream("GET", f"{bridge.url}/realtime/events", params={"token": late}, timeout=30) as response:
        assert response.status_code == 200
        assert read_sse(response, 1)[0]["event"] == "reauth"  # and ends once the leeway is over


def test_a_token_past_the_leeway_is_refused_everywhere_alike(bridge: BridgeThread) -> None:
    stale = token(ttl=-(LEEWAY_SECONDS + 5))
    rest = httpx.get(f"{bridge.url}/api/devices", headers={"Authorization": f"Bearer {stale}"}, timeout=10)
    assert (rest.status_code, rest.json()["error"]) == (401, "token_expired")
    assert asyncio.run(closed_with(ws_url(bridge, token=stale)))[0] == CLOSE_CODES["token_expired"]
    sse = httpx.get(f"{bridge.url}/realtime/events", params={"token": stale}, timeout=10)
    assert (sse.status_code, sse.json()["error"]) == (401, "token_expired")


# --- handshakes too large to parse are answered, not held ------------------------------------

UPGRADE = (b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large"


@pytest.mark.parametrize(("request_head", "answers"), [
    (b"GET /realtime/ws?pad=" + b"a" * 9000 + b" HTTP/1.1\r\n" + UPGRADE + b"\r\n", (TOO_LARGE,)),
    (b"GET /realtime/ws HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n" + UPGRADE + b"\r\n", (TOO_LARGE,)),
    # 20 headers of 1 KB: each line parses; the whole is over 16 KiB. uvicorn's HTTP parser
    # answers 400 itself when it has buffered 16 KiB of an unfinished request.
    (b"GET /realtime/ws HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
     + UPGRADE + b"\r\n", (TOO_LARGE, b"HTTP/1.1 400 Bad Request")),
], ids=["request line 9 KB", "one header 9 KB", "headers 20 KB"])
def test_an_oversized_upgrade_request_is_answered_and_closed(bridge: BridgeThread, request_head: bytes,
                                                             answers: tuple[bytes, ...]) -> None:
    with socket.create_connection(("127.0.0.1", bridge.settings.http_port), timeout=10) as sock:
        sock.sendall(request_head)
        answer = b""
        while chunk := sock.recv(4096):  # the server closes: recv returns b"" (no answer: a timeout raises)
            answer += chunk
    assert answer.split(b"\r\n", 1)[0] in answers, answer[:200]


# --- the same, as `firstcare bridge` runs: its own server configuration and logging ------------

def test_firstcare_bridge_redacts_encoded_tokens_closes_big_messages_with_4413_and_answers_big_handshakes(
        tmp_path: Path) -> None:
    """One process for three checks (every test's child processes are stopped after it)."""
    env = {"FC_MQTT_URL": "embedded", "FC_MQTT_PORT": str(free_port()), "FC_HTTP_PORT": str(free_port()),
           "FC_JWT_SECRET": SECRET, "FC_STORE_URL": f"sqlite:///{tmp_path}/bridge.db", "FC_LOG_LEVEL": "INFO",
           "FC_MQTT_CLIENT_ID": f"rg-{secrets.token_hex(3)}"}
    process = BridgeProcess(env, tmp_path / "bridge.log").start()
    base = process.url.replace("http", "ws")
    jwt = token()

    async def encoded_name() -> str:
        async with ws_client(f"{base}/realtime/ws?%74oken={jwt}") as ws:  # %74 is "t": the server reads "token"
            await ws.send(json.dumps({"type": "ping"}))
            return (await recv(ws))["type"]

    assert asyncio.run(encoded_name()) == "pong"
    wait_until(lambda: "[accepted]" in process.log_path.read_text(), what="the server's log line")
    log = process.log_path.read_text()
    assert jwt.split(".")[2] not in log, "the token reached the log"
    assert "%74oken=[redacted]" in log

    async def big_message() -> int:
        async with ws_client(f"{base}/realtime/ws?token={token(sub='big-process')}") as ws:
            await ws.send(json.dumps({"type": "ping", "pad": "x" * 100_000}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1
        raise AssertionError("not closed")

    assert asyncio.run(big_message()) == CLOSE_CODES["message_too_large"], "1009 is uvicorn's frame limit"

    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(b"GET /realtime/ws?pad=" + b"a" * 9000 + b" HTTP/1.1\r\n" + UPGRADE + b"\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(TOO_LARGE), answer[:200]
    process.stop()
