"""The write path's adapters (bridge/server.py, ``firstcare.frames`` and ``firstcare.stream``)
against a real uvicorn and real clients over TCP: the frame bytes, a paused transport queues
and its resume drains in order, close codes with and without a full buffer; a streamed HTTP
response written in chunks, and told when its client goes away."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from bridge.hub import Delivery
from bridge.realtime_outlet import Outlet
from bridge.realtime_wire import chunk, sse_event, ws_json_frame, ws_text_frame
from bridge.server import FRAMES_EXTENSION, STREAM_EXTENSION, FrameSink, HttpProtocol, StreamSink, WebSocketProtocol

SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70_000)
FLOOD = 4000
PAD = "p" * 8000


class Transport:
    def control(self, delivery: Delivery) -> bytes | None:
        return None

    def overflow(self) -> None:
        raise AssertionError("the test queue is large enough")

    def paused(self, since: float) -> None:
        pass


async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    sink: FrameSink = ws.scope["extensions"][FRAMES_EXTENSION]
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        command = message["text"]
        if command == "frames":
            for n in SIZES:
                sink.write_frame(ws_text_frame(("é" * (n // 2) + "x" * (n % 2)).encode()))
        elif command == "flood":  # through an outlet: the queue takes over once the transport pauses
            out = Outlet(FLOOD * 2, "test")
            out.attach(sink, lambda d: ws_text_frame(d.data), Transport())
            out.rooms.add("r")
            outcomes: dict[str, int] = {}
            for i in range(FLOOD):
                outcome = out.offer(Delivery("r", f"e:{i}", json.dumps({"i": i, "pad": PAD}).encode()))
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            out.send(ws_json_frame({"done": outcomes, "paused": sink.paused_since is not None,
                                    "queued": out.qsize()}))
        elif command == "flood-close":  # straight to the buffer, then a close behind it
            for i in range(FLOOD):
                sink.write_frame(ws_text_frame(json.dumps({"i": i, "pad": PAD}).encode()))
            paused = sink.paused_since is not None
            sink.close_now(4000, f"slow paused={paused}")
            assert not sink.open
            sink.write_frame(ws_text_frame(b"never"))  # nothing after the close
        elif command.startswith("close "):
            sink.close_now(int(command.split()[1]), "as asked")


ENDS: list[str] = []


async def stream(scope: Any, receive: Any, send: Any) -> None:
    """``/stream?n=``: n events in chunks, then the end; ``/stream?hold=1``: until the client leaves."""
    sink: StreamSink = scope["extensions"][STREAM_EXTENSION]
    assert not sink.open  # nothing may be written before the response starts
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    assert sink.open and sink.chunked
    query = dict(part.split("=") for part in scope["query_string"].decode().split("&"))
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    sink.on_end = ended.set_result
    for i in range(int(query.get("n", 1))):
        sink.write_frame(chunk(sse_event(json.dumps({"i": i}), "x", f"e:{i}")))
    if query.get("hold"):
        ENDS.append(await ended)
        return
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class AsgiApp:  # an instance, so that Starlette calls it as an ASGI app, not as a request handler
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await stream(scope, receive, send)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app = Starlette(routes=[WebSocketRoute("/ws", endpoint), Route("/stream", AsgiApp())])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, ws=WebSocketProtocol, http=HttpProtocol,
                            ws_per_message_deflate=False, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"ws://127.0.0.1:{port}/ws"
    server.should_exit = True
    thread.join(10)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_frames_of_every_length_class_arrive_intact(url: str) -> None:
    async def main() -> None:
        async with websockets.connect(url, max_size=2**20) as ws:
            await ws.send("frames")
            for n in SIZES:
                text = await ws.recv()
                assert isinstance(text, str) and len(text.encode()) == n
                assert text == "é" * (n // 2) + "x" * (n % 2)

    run(main())


def test_a_paused_transport_queues_and_its_resume_drains_everything_in_order(url: str) -> None:
    async def main() -> None:
        async with websockets.connect(url, max_size=2**20, max_queue=4) as ws:
            ws.transport.pause_reading()  # a client that stopped reading
            await ws.send("flood")
            await asyncio.sleep(1.0)
            ws.transport.resume_reading()
            seen = [json.loads(await ws.recv())["i"] for _ in range(FLOOD)]
            report = json.loads(await ws.recv())
        assert seen == list(range(FLOOD))
        assert report["paused"] and report["done"].get("queued", 0) > 0 and report["done"].get("sent", 0) > 0
        assert report["done"]["sent"] + report["done"]["queued"] == FLOOD

    run(main())


def test_close_now_goes_behind_what_is_buffered_even_on_a_paused_transport(url: str) -> None:
    async def main() -> None:
        async with websockets.connect(url, max_size=2**20, max_queue=4) as ws:
            ws.transport.pause_reading()
            await ws.send("flood-close")
            await asyncio.sleep(1.0)
            ws.transport.resume_reading()
            seen = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    seen.append(json.loads(await ws.recv())["i"])
        assert seen == list(range(FLOOD))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
        assert closed.value.rcvd.reason == "slow paused=True"

    run(main())


@pytest.mark.parametrize("code", [4001, 4410, 4403])
def test_close_codes_reach_the_client(url: str, code: int) -> None:
    async def main() -> None:
        async with websockets.connect(url) as ws:
            await ws.send(f"close {code}")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, "as asked")

    run(main())


def test_a_streamed_response_carries_the_chunks_written_to_its_socket_then_ends(url: str) -> None:
    base = url.replace("ws://", "http://").removesuffix("/ws")
    with httpx.stream("GET", f"{base}/stream?n=300", timeout=10) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        body = b"".join(response.iter_raw())
    events = [block for block in body.decode().split("\r\n\r\n") if block]
    assert [json.loads(e.split("data: ")[1])["i"] for e in events] == list(range(300))
    assert events[7] == 'id: e:7\r\nevent: x\r\ndata: {"i": 7}'


def test_a_stream_is_told_when_its_client_goes_away(url: str) -> None:
    base = url.replace("ws://", "http://").removesuffix("/ws")
    with httpx.stream("GET", f"{base}/stream?n=1&hold=1", timeout=10) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 10
    while not ENDS:
        assert time.monotonic() < deadline, "the stream was not told"
        time.sleep(0.05)
    assert ENDS == ["lost"]
