"""The exact bytes a delivery puts on the wire: a WebSocket text frame, an SSE chunk.

Pure functions, no I/O. Each is made once per delivery (per room), however many connections
receive it: :class:`FrameCache` keeps the frame of the delivery being dispatched, and the hub
dispatches one delivery to all its subscribers before the next one.

A server-to-client WebSocket frame is never masked (RFC 6455 5.1), and per-message deflate is
off (bridge/server.py), so the frame is a fixed header and the payload itself.

Threads: the event loop owns the caches (one per transport kind, module-level).
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable

from bridge.hub import Delivery


def ws_text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (UTF-8).

    >>> ws_text_frame(b"hi")
    b'\\x81\\x02hi'
    >>> ws_text_frame(b"x" * 126)[:4]
    b'\\x81~\\x00~'
    >>> ws_text_frame(b"x" * 65536)[:10]
    b'\\x81\\x7f\\x00\\x00\\x00\\x00\\x00\\x01\\x00\\x00'
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def ws_json_frame(message: dict[str, object]) -> bytes:
    return ws_text_frame(json.dumps(message, separators=(",", ":")).encode())


def sse_event(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """One Server-Sent Event, lines ended with ``\\r\\n`` as sse-starlette writes them.

    >>> sse_event('{"a":1}', "x.y", "e:3")
    b'id: e:3\\r\\nevent: x.y\\r\\ndata: {"a":1}\\r\\n\\r\\n'
    """
    out = []
    if id:
        out.append(f"id: {id}")
    if event:
        out.append(f"event: {event}")
    out.extend(f"data: {line}" for line in data.splitlines() or [""])
    return ("\r\n".join(out) + "\r\n\r\n").encode()


@functools.lru_cache(maxsize=4096)
def sse_delivery(delivery: Delivery) -> bytes:
    """The SSE form of an envelope: ``id:`` the event id, ``event:`` the dotted name, ``data:``
    the envelope's ``data``."""
    envelope = json.loads(delivery.data)
    return sse_event(json.dumps(envelope["data"], separators=(",", ":")), envelope["event"], envelope["id"] or None)


def chunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunk (``Transfer-Encoding: chunked``).

    >>> chunk(b"abc")
    b'3\\r\\nabc\\r\\n'
    """
    return b"%x\r\n%s\r\n" % (len(body), body)


class FrameCache:
    """The frame of the last delivery encoded: a delivery goes to all its subscribers in a row,
    so one slot keyed by identity makes it once per room (``is``, never a hash of the bytes)."""

    __slots__ = ("_encode", "_last", "_frame", "made")

    def __init__(self, encode: Callable[[Delivery], bytes]) -> None:
        self._encode = encode
        self._last: Delivery | None = None
        self._frame = b""
        self.made = 0

    def __call__(self, delivery: Delivery) -> bytes:
        if delivery is not self._last:
            self._frame = self._encode(delivery)
            self._last = delivery
            self.made += 1
        return self._frame


def _ws_delivery(delivery: Delivery) -> bytes:
    return ws_text_frame(delivery.data)


def _sse_chunk(delivery: Delivery) -> bytes:
    return chunk(sse_delivery(delivery))


ws_frame = FrameCache(_ws_delivery)
sse_frame = FrameCache(_sse_chunk)
