"""What a user would otherwise pick, and the limits, run beside the product.

Each is a process of its own, fed from the same MQTT broker and the same load generator as the
product (``python -m bench.peers KIND ...``):

``ws-broadcast``  a bare server on the ``websockets`` library (``serve`` + ``broadcast()``), fed
                  by a paho subscriber: parse each reading once, wrap it once, broadcast. Rooms are
                  paths (``/ws``: everything; ``/ws/hospital/{hid}``; ``/ws/patient/{pid}``). No
                  auth, no storage, no history, no backpressure: the Python limit.
``fastapi-docs``  the ``ConnectionManager`` of FastAPI's WebSocket documentation
                  (``for connection in self.active_connections: await connection.send_text(m)``)
                  behind uvicorn with its defaults, fed the same way: what a user writes by hand.
``sse-starlette`` Server-Sent Events as users write them by hand: FastAPI, sse-starlette's
                  ``EventSourceResponse`` and an ``asyncio.Queue`` per client, fed the same way
                  (``/sse/hospital/{hid}``): each reading wrapped once, put into every client's queue.
``paho-sub``      a bare paho subscriber that only parses (``json.loads``), QoS 1: the ingest peer.
``mosquitto-sub`` ``mosquitto_sub`` itself (C), QoS 1: the broker's own delivery limit.

Node-RED (``mqtt in`` -> ``websocket out``) is started by :func:`bench.procs.start_node_red`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from fastapi import (  # module level: annotations are resolved here
    FastAPI,
    WebSocket,
    WebSocketDisconnect,
)


def envelope(topic: str, payload: bytes) -> tuple[str, str, str]:
    """(hospital id, patient id, message): parse once, wrap once (the product's envelope shape)."""
    reading = json.loads(payload)
    hid = topic.split("/", 3)[2]
    pid = reading.get("patient_id", "")
    ms = int(time.time() * 1000)
    message = (f'{{"type":"vitals_update","event":"patient.vitals.update","room":"hospital:{hid}","ts":{ms},'
               f'"data":{payload.decode()}}}')
    return hid, pid, message


def mqtt_feed(host: str, port: int, topic: str, client_id: str,
              on_message: Any) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=True)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, msg: on_message(msg.topic, msg.payload)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    return client


# --- the bare websockets broadcast server --------------------------------------------------------


async def ws_broadcast(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import broadcast, serve

    rooms: dict[str, set[Any]] = {}
    loop = asyncio.get_running_loop()

    async def handler(conn: Any) -> None:
        path = conn.request.path
        parts = path.strip("/").split("/")
        room = "all" if len(parts) < 3 else f"{parts[1]}:{parts[2]}"
        members = rooms.setdefault(room, set())
        members.add(conn)
        try:
            await conn.wait_closed()
        finally:
            members.discard(conn)

    def deliver(topic: str, payload: bytes) -> None:
        hid, pid, message = envelope(topic, payload)
        for room in ("all", f"hospital:{hid}", f"patient:{pid}"):
            members = rooms.get(room)
            if members:
                broadcast(members, message)

    async with serve(handler, "127.0.0.1", args.port, compression=None):
        feed = mqtt_feed("127.0.0.1", args.mqtt_port, args.topic, f"bench-wsb-{args.port}",
                         lambda t, p: loop.call_soon_threadsafe(deliver, t, p))
        print("ready", flush=True)
        await asyncio.Event().wait()
        feed.loop_stop()


# --- FastAPI's documentation ConnectionManager -------------------------------------------------


def fastapi_docs(args: argparse.Namespace) -> None:
    import uvicorn

    class ConnectionManager:  # as in https://fastapi.tiangolo.com/advanced/websockets/
        def __init__(self) -> None:
            self.active_connections: list[WebSocket] = []

        async def connect(self, websocket: WebSocket) -> None:
            await websocket.accept()
            self.active_connections.append(websocket)

        def disconnect(self, websocket: WebSocket) -> None:
            self.active_connections.remove(websocket)

        async def broadcast(self, message: str) -> None:
            for connection in self.active_connections:
                await connection.send_text(message)

    manager = ConnectionManager()
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def pump() -> None:
        while True:
            message = await queue.get()
            with contextlib.suppress(Exception):  # a closed client must not stop the feed
                await manager.broadcast(message)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(pump())
        feed = mqtt_feed("127.0.0.1", args.mqtt_port, args.topic, f"bench-fastapi-{args.port}",
                         lambda t, p: loop.call_soon_threadsafe(queue.put_nowait, envelope(t, p)[2]))
        print("ready", flush=True)
        yield
        feed.loop_stop()
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/ws/{client_id}")
    async def websocket_endpoint(websocket: WebSocket, client_id: str) -> None:
        await manager.connect(websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            manager.disconnect(websocket)

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# --- sse-starlette with a queue per client ----------------------------------------------------


def sse_starlette_peer(args: argparse.Namespace) -> None:
    import uvicorn
    from sse_starlette import EventSourceResponse, ServerSentEvent

    rooms: dict[str, set[asyncio.Queue[str]]] = {}

    def deliver(topic: str, payload: bytes) -> None:
        hid, _pid, _message = envelope(topic, payload)
        data = payload.decode()
        for queue in rooms.get(hid, ()):
            queue.put_nowait(data)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loop = asyncio.get_running_loop()
        feed = mqtt_feed("127.0.0.1", args.mqtt_port, args.topic, f"bench-sse-{args.port}",
                         lambda t, p: loop.call_soon_threadsafe(deliver, t, p))
        print("ready", flush=True)
        yield
        feed.loop_stop()

    app = FastAPI(lifespan=lifespan)

    @app.get("/sse/hospital/{hid}")
    async def stream(hid: str) -> EventSourceResponse:
        queue: asyncio.Queue[str] = asyncio.Queue()
        rooms.setdefault(hid, set()).add(queue)

        async def events() -> Any:
            try:
                while True:
                    yield ServerSentEvent(data=await queue.get(), event="patient.vitals.update")
            finally:
                rooms[hid].discard(queue)

        return EventSourceResponse(events())

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# --- ingest peers -------------------------------------------------------------------------------


def paho_sub(args: argparse.Namespace) -> dict[str, Any]:
    """Count messages and readings until ``expect`` readings or ``idle`` seconds of silence."""
    state = {"messages": 0, "readings": 0, "first": 0.0, "last": 0.0, "cpu_first": 0.0, "cpu_last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe(args.topic, qos=args.qos)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        n = len(body["readings"]) if "readings" in body else 1
        now = time.time()
        if not state["first"]:
            state["first"] = now
            state["cpu_first"] = time.process_time()
        state["last"] = now
        state["cpu_last"] = time.process_time()
        state["messages"] += 1
        state["readings"] += n
        if args.expect and state["readings"] >= args.expect:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv311,
                         clean_session=not args.persistent)
    client.on_connect = on_connect
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
    client.on_message = on_message
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", args.mqtt_port, keepalive=60)
    client.loop_start()
    subscribed.wait(30)
    if args.register:
        client.disconnect()
        client.loop_stop()
        return {"registered": True}
    print(json.dumps({"event": "subscribed"}), flush=True)
    deadline = time.monotonic() + args.timeout
    while not done.wait(0.1):
        idle_since = state["last"] or 0
        if idle_since and time.time() - idle_since > args.idle:
            break
        if time.monotonic() > deadline:
            break
    client.disconnect()
    client.loop_stop()
    span = state["last"] - state["first"]
    return {"messages": state["messages"], "readings": state["readings"], "first": state["first"],
            "last": state["last"], "cores": (state["cpu_last"] - state["cpu_first"]) / span if span > 0 else None}


def mosquitto_sub(args: argparse.Namespace) -> dict[str, Any]:
    """``mosquitto_sub`` printing one short line per message; we count lines as they arrive."""
    argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(args.mqtt_port), "-t", args.topic, "-q", str(args.qos),
            "-i", args.client_id, "-F", "%l"]
    if args.persistent:
        argv.append("-c")
    if args.register:
        subprocess.run(argv + ["-E"], check=True, timeout=30, capture_output=True)
        return {"registered": True}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=0)
    if not args.persistent:
        time.sleep(0.5)  # live: mosquitto_sub says nothing when its SUBACK arrives
    # (a backlog drain starts at once: read from the first byte, or the pipe hides the start)
    print(json.dumps({"event": "subscribed"}), flush=True)
    import psutil

    child = psutil.Process(proc.pid)
    messages, first, last, cpu_first, cpu_last, first_messages = 0, 0.0, 0.0, 0.0, 0.0, 0
    expect_messages = args.expect // max(1, args.batch) if args.expect else 0
    stream = proc.stdout
    assert stream is not None
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + args.timeout
    while True:
        if time.monotonic() > deadline:
            break
        if not sel.select(timeout=args.idle if first else args.timeout):
            break
        chunk = stream.read(512)  # small reads: a drain's start and end are seen to the ms
        if not chunk:
            break
        now = time.time()
        times = child.cpu_times()
        if not first:
            first, cpu_first = now, times.user + times.system
            first_messages = chunk.count(b"\n")
        last, cpu_last = now, times.user + times.system
        messages += chunk.count(b"\n")
        if expect_messages and messages >= expect_messages:
            break
    proc.terminate()
    proc.wait(10)
    span = last - first
    # the rate counts from the first read: the messages of that read are left out of it
    return {"messages": messages, "readings": messages * max(1, args.batch), "first": first, "last": last,
            "first_messages": first_messages, "cores": (cpu_last - cpu_first) / span if span > 0 else None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["ws-broadcast", "fastapi-docs", "sse-starlette", "paho-sub", "mosquitto-sub"])
    p.add_argument("--port", type=int, default=0, help="HTTP/WebSocket port of a server peer")
    p.add_argument("--mqtt-port", type=int, required=True)
    p.add_argument("--topic", default="fc/v1/+/+/+/vitals")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--client-id", default="bench-sub")
    p.add_argument("--persistent", action="store_true", help="clean session off (a backlog waits for us)")
    p.add_argument("--register", action="store_true", help="only create the persistent session, then leave")
    p.add_argument("--expect", type=int, default=0, help="readings to wait for")
    p.add_argument("--batch", type=int, default=1, help="readings per message (mosquitto-sub does not parse)")
    p.add_argument("--idle", type=float, default=3.0, help="stop after this many seconds without a message")
    p.add_argument("--timeout", type=float, default=300.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "ws-broadcast":
        try:
            import uvloop  # as uvicorn does for the product and the FastAPI peer when it is installed

            uvloop.run(ws_broadcast(args))
        except ImportError:
            asyncio.run(ws_broadcast(args))
    elif args.kind == "fastapi-docs":
        fastapi_docs(args)
    elif args.kind == "sse-starlette":
        sse_starlette_peer(args)
    elif args.kind == "paho-sub":
        print(json.dumps(paho_sub(args)), flush=True)
    else:
        print(json.dumps(mosquitto_sub(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
