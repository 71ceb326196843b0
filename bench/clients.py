"""Client processes: many WebSocket or SSE clients (or one MQTT subscriber) in one process.

Browser-like on the wire (RFC 6455 handshake and masked client frames; ``text/event-stream``
over HTTP/1.1 chunked), but written on bare asyncio protocols so that 10,000 of them fit in a
few processes and leave the CPU to the servers being measured. No per-message deflate is
offered (browsers do offer it; the product turns it off, uvicorn and ``websockets`` would
accept it by default, so a browser would widen the peers' cost, not narrow it).

Run by the scenarios as ``python -m bench.clients SPEC.json``, driven over stdin/stdout with one
JSON object per line::

    child  -> {"event": "connected", "ok": n, "failed": n, "errors": {...}}
    parent -> reset      child -> {"event": "reset"}           (zero the counters)
    parent -> report     child -> {"event": "report", "vitals": n, "other": n, "first": t,
                                   "last": t, "hist": {...}, "max_ms": x, "closed": n}
    parent -> quit

Latency is ``receive wall clock - ts`` of the reading inside the message (``data.ts`` of an
envelope, or ``ts`` of a raw device payload). Both clocks are this machine's; ``ts`` has
millisecond resolution, so every figure includes up to 1 ms of rounding, on every path alike.
``hist`` counts latencies in 0.1 ms buckets below 100 ms, 1 ms buckets above.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

_MINUTE_CACHE: dict[bytes, float] = {}
_TS_CACHE: dict[bytes, float] = {}


def parse_ts(raw: bytes) -> float:
    """``2026-11-26T10:15:30.120Z`` -> epoch seconds (cached: 10,000 clients see one ts)."""
    value = _TS_CACHE.get(raw)
    if value is not None:
        return value
    minute = raw[:16]
    base = _MINUTE_CACHE.get(minute)
    if base is None:
        base = datetime.strptime(minute.decode(), "%Y-%m-%dT%H:%M").replace(tzinfo=UTC).timestamp()
        _MINUTE_CACHE[minute] = base
    value = base + float(raw[17:23])
    if len(_TS_CACHE) > 20000:
        _TS_CACHE.clear()
    _TS_CACHE[raw] = value
    return value


class Stats:
    def __init__(self) -> None:
        self.reset()
        self.closed = 0

    def reset(self) -> None:
        self.vitals = 0
        self.other = 0
        self.first = 0.0
        self.last = 0.0
        self.hist: Counter[int] = Counter()
        self.max_ms = 0.0

    def message(self, body: bytes, now: float) -> None:
        if b'"metrics"' not in body:
            self.other += 1
            return
        start = body.find(b'"data":')
        i = body.find(b'"ts":"', max(start, 0))
        if i < 0:
            self.other += 1
            return
        latency_ms = (now - parse_ts(body[i + 6:i + 30])) * 1000.0
        self.vitals += 1
        if not self.first:
            self.first = now
        self.last = now
        self.max_ms = max(self.max_ms, latency_ms)
        self.hist[int(latency_ms * 10) if latency_ms < 100 else int(latency_ms) * 10] += 1

    def report(self) -> dict[str, Any]:
        return {"event": "report", "vitals": self.vitals, "other": self.other, "first": self.first,
                "last": self.last, "hist": dict(self.hist), "max_ms": self.max_ms, "closed": self.closed}


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big") if n else b""
    return key + masked


def ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + _mask(payload)


class WsClient(asyncio.Protocol):
    def __init__(self, host: str, port: int, path: str, send: list[str], ready_on: bytes | None,
                 stats: Stats, done: asyncio.Future) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.send = send
        self.ready_on = ready_on
        self.stats = stats
        self.done = done
        self.buf = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def _ready(self, error: str | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(self)
            else:
                self.done.set_exception(ConnectionError(error))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[:end].split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self._ready(f"handshake: {status.decode(errors='replace')}")
                self.transport.close()  # type: ignore[union-attr]
                return
            self.upgraded = True
            buf = buf[end + 4:]
            for text in self.send:
                self.transport.write(ws_frame(1, text.encode()))  # type: ignore[union-attr]
            if self.ready_on is None:
                self._ready()
        pos, n = 0, len(buf)
        stats = self.stats
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if n - pos < head + length:
                break
            body = buf[pos + head:pos + head + length]
            pos += head + length
            opcode = b0 & 0x0F
            if opcode in (1, 2, 0):
                if self.ready_on is not None and not self.done.done() and self.ready_on in body:
                    self._ready()
                stats.message(body, now)
            elif opcode == 9:
                self.transport.write(ws_frame(10, body))  # type: ignore[union-attr]
            elif opcode == 8:
                self.transport.close()  # type: ignore[union-attr]
                break
        self.buf = buf[pos:] if pos < n else b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        self._ready("connection lost before ready")


class SseClient(asyncio.Protocol):
    def __init__(self, host: str, port: int, path: str, stats: Stats, done: asyncio.Future) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                        "Cache-Control: no-cache\r\n\r\n").encode()
        self.stats = stats
        self.done = done
        self.raw = b""
        self.text = b""
        self.headers_done = False
        self.chunked = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        raw = self.raw + data
        if not self.headers_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw
                return
            head = raw[:end]
            status = head.split(b"\r\n", 1)[0]
            if b" 200" not in status:
                if not self.done.done():
                    self.done.set_exception(ConnectionError(f"SSE: {status.decode(errors='replace')}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.headers_done = True
            self.chunked = b"transfer-encoding: chunked" in head.lower()
            raw = raw[end + 4:]
            if not self.done.done():
                self.done.set_result(self)
        if self.chunked:
            out = []
            pos = 0
            while True:
                line_end = raw.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(raw[pos:line_end].split(b";", 1)[0] or b"0", 16)
                if len(raw) < line_end + 2 + size + 2:
                    break
                out.append(raw[line_end + 2:line_end + 2 + size])
                pos = line_end + 2 + size + 2
            self.raw = raw[pos:]
            text = self.text + b"".join(out)
        else:
            self.raw = b""
            text = self.text + raw
        text = text.replace(b"\r\n", b"\n")
        blocks = text.split(b"\n\n")
        self.text = blocks.pop()
        for block in blocks:
            if b"data:" in block:
                self.stats.message(block, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.closed += 1
        if not self.done.done():
            self.done.set_exception(ConnectionError("connection lost before ready"))


async def connect_all(spec: dict[str, Any], stats: Stats) -> tuple[list[Any], Counter[str]]:
    loop = asyncio.get_running_loop()
    host, port, kind = spec["host"], spec["port"], spec["kind"]
    ready_on = spec.get("ready_on")
    ready_on_b = ready_on.encode() if ready_on else None
    sem = asyncio.Semaphore(spec.get("concurrency", 100))
    errors: Counter[str] = Counter()
    clients: list[Any] = []

    async def one(entry: dict[str, Any]) -> None:
        async with sem:
            for attempt in range(3):
                done: asyncio.Future = loop.create_future()
                try:
                    if kind == "ws":
                        def factory(done=done):
                            return WsClient(host, port, entry["path"], entry.get("send", []), ready_on_b, stats,
                                            done)
                    else:
                        def factory(done=done):
                            return SseClient(host, port, entry["path"], stats, done)
                    transport, _ = await asyncio.wait_for(loop.create_connection(factory, host, port), 30)
                    await asyncio.wait_for(done, 60)
                    clients.append(transport)
                    return
                except (TimeoutError, OSError, ConnectionError) as exc:
                    if attempt == 2:
                        errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                    else:
                        await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(entry) for entry in spec["clients"]))
    return clients, errors


def mqtt_subscriber(spec: dict[str, Any], stats: Stats, loop: asyncio.AbstractEventLoop) -> Any:
    """The floor: a paho subscriber straight on the broker (no bridge, no WebSocket)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-floor-{os.getpid()}",
                         protocol=mqtt.MQTTv311, clean_session=True)
    subscribed = asyncio.Event()

    def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe(spec["topic"], qos=1)

    def on_subscribe(c: Any, u: Any, mid: Any, rc: Any, p: Any) -> None:
        loop.call_soon_threadsafe(subscribed.set)

    def on_message(c: Any, u: Any, msg: Any) -> None:
        stats.message(msg.payload, time.time())

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(spec["host"], spec["port"], keepalive=60)
    client.loop_start()
    return client, subscribed


async def main_async(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    if spec["kind"] == "mqtt":
        client, subscribed = mqtt_subscriber(spec, stats, loop)
        await asyncio.wait_for(subscribed.wait(), 30)
        clients, errors = [client], Counter[str]()
    else:
        clients, errors = await connect_all(spec, stats)
    out = sys.stdout
    out.write(json.dumps({"event": "connected", "ok": len(clients), "failed": sum(errors.values()),
                          "errors": dict(errors)}) + "\n")
    out.flush()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        if line == "reset":
            stats.reset()
            out.write(json.dumps({"event": "reset"}) + "\n")
        elif line == "report":
            out.write(json.dumps(stats.report()) + "\n")
        out.flush()
    if spec["kind"] == "mqtt":
        clients[0].disconnect()
        clients[0].loop_stop()
    else:
        for transport in clients:
            transport.close()
        await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        import uvloop  # the clients' own overhead is what we do not want to measure

        uvloop.run(main_async(spec))
    except ImportError:
        asyncio.run(main_async(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
