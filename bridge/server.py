"""The HTTP server's configuration, in one place for ``firstcare up``/``bridge`` and the tests.

uvicorn's defaults are not ours:
- ``ws_max_size``: a WebSocket message over it is refused by the protocol layer with 1009,
  before our own limit (``FC_WS_MAX_MESSAGE_BYTES``, close code 4413) can see it. It is set well
  above our limit, so 4413 is what a client gets for any message up to ``ws_frame_limit``.
- an upgrade request whose request line or a header exceeds 8 KiB (the WebSocket library's
  limit) got no answer at all and its socket was held open. :class:`WebSocketProtocol` answers
  such a request ``431 Request Header Fields Too Large`` (``400`` for any other malformed
  handshake) and closes the connection.
- per-message deflate is off: it halved fan-out throughput and cost 58-230 KB per connection.

The write path (``FRAMES_EXTENSION``): the one place the application reaches past ASGI. An
accepted WebSocket's scope carries ``scope["extensions"]["firstcare.frames"]``, the protocol
object itself, offering :class:`FrameSink`: write an already encoded frame to the socket now
(no task, no await, no ASGI message), see whether the transport is paused (its write buffer is
above the high-water mark), be told when it resumes, and close with a code without waiting for
the buffer to drain. It is offered only when no extension was negotiated (frames are written as
they are: never compressed). Tested against the uvicorn range pinned in pyproject.toml
(tests/integration/test_ws_adapter.py); a uvicorn without ``WebSocketsSansIOProtocol`` fails at
import, not at run time.

The same for a streamed HTTP response (Server-Sent Events), ``STREAM_EXTENSION``: an HTTP
request's scope carries ``scope["extensions"]["firstcare.stream"]``, the HTTP protocol object
(:class:`HttpProtocol`, uvicorn's h11 protocol, chosen in :func:`server_config`), offering
:class:`StreamSink`: once the application has sent ``http.response.start``, write body bytes
already framed for the wire (``chunked`` says whether chunks are expected), see whether the
transport is paused, be told when it resumes, and be told when the client went away or the
server shuts down (``on_end``), so a stream needs no task reading ``receive()``.

Threads: everything here runs on the event loop (asyncio protocol callbacks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import SecurityError

from firstcare.settings import Settings

WS_FRAME_FLOOR = 1 << 20  # 1 MiB
MAX_HANDSHAKE_BYTES = 16 * 1024


def ws_frame_limit(settings: Settings) -> int:
    """The largest WebSocket message the protocol layer reads (beyond it: 1009)."""
    return max(WS_FRAME_FLOOR, settings.ws_max_message_bytes * 4)


FRAMES_EXTENSION = "firstcare.frames"


class FrameSink(Protocol):
    """What the application may do with an accepted WebSocket's socket, synchronously."""

    on_resume: Callable[[], None] | None  # called when a paused transport drains below its low mark
    paused_since: float | None  # loop time the transport paused; None while it is writable

    @property
    def open(self) -> bool: ...
    def buffered(self) -> int: ...
    def write_frame(self, frame: bytes) -> None: ...
    def close_now(self, code: int, reason: str) -> None: ...


class _WriteFlow:
    """Flow-control bookkeeping both protocols share: when the transport paused (the outlet's
    slow-consumer check reads ``paused_since``) and who to call when it drains again."""

    loop: asyncio.AbstractEventLoop
    on_resume: Callable[[], None] | None = None
    paused_since: float | None = None

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self.paused_since = self.loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self.paused_since = None
        if self.on_resume is not None:
            self.on_resume()


class WebSocketProtocol(_WriteFlow, WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol, answering a handshake it cannot parse, and offering
    the direct write path (:class:`FrameSink`) as the ``firstcare.frames`` ASGI extension."""

    _handshake_bytes = 0

    # --- the FrameSink ------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.handshake_complete and not self.close_sent and not self.disconnected

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def write_frame(self, frame: bytes) -> None:
        """Put ``frame`` (a complete WebSocket frame) on the socket; nothing once closing."""
        if self.handshake_complete and not self.close_sent and not self.disconnected:
            self.transport.write(frame)

    def close_now(self, code: int, reason: str) -> None:
        """Send a close frame behind what is buffered and tell the application, without waiting
        for a paused transport. As uvicorn does, the socket is closed ``close_timeout`` after
        (once the buffer has gone out): a slow client that reads again later still gets
        everything before the close frame, and the code."""
        if not self.handshake_complete or self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_resume = None
        super().connection_lost(exc)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "request", None) is not None:
            # the handshake's request and response (headers twice over) are no longer needed;
            # the ASGI scope keeps the headers the application reads
            self.request = self.response = None  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101 and not self.conn.extensions:
            self.scope["extensions"][FRAMES_EXTENSION] = self

    # --- handshakes it cannot parse -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.handshake_initiated:
            self._handshake_bytes += len(data)
            if self._handshake_bytes > MAX_HANDSHAKE_BYTES:
                self._refuse(431, "Request Header Fields Too Large")
                return
        super().data_received(data)
        failure = self.conn.handshake_exc
        if not self.handshake_initiated and failure is not None and not self.transport.is_closing():
            if isinstance(failure, SecurityError) or isinstance(failure.__cause__, SecurityError):
                self._refuse(431, "Request Header Fields Too Large")
            else:
                self._refuse(400, "Bad Request")

    def _refuse(self, status: int, phrase: str) -> None:
        body = f"{phrase}\n".encode()
        self.transport.write(f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.handshake_complete = True
        self.close_sent = True
        self.transport.close()


STREAM_EXTENSION = "firstcare.stream"


class StreamSink(Protocol):
    """What the application may do with a streamed HTTP response's socket, synchronously."""

    on_resume: Callable[[], None] | None
    on_end: Callable[[str], None] | None  # "lost" (the client went away) or "shutdown"
    paused_since: float | None

    @property
    def open(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...
    def buffered(self) -> int: ...
    def write_frame(self, frame: bytes) -> None: ...
    def abort(self) -> None: ...


class HttpProtocol(_WriteFlow, H11Protocol):
    """uvicorn's h11 protocol offering the streamed-response write path (:class:`StreamSink`)
    as the ``firstcare.stream`` ASGI extension. One request at a time per connection (h11
    pauses pipelined requests), so the protocol object is the sink of the current one."""

    on_end: Callable[[str], None] | None = None

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.scope.setdefault("extensions", {})[STREAM_EXTENSION] = self  # type: ignore[index, typeddict-unknown-key]

    @property
    def open(self) -> bool:
        cycle = self.cycle
        return (cycle is not None and cycle.response_started and not cycle.response_complete
                and not cycle.disconnected and not self.transport.is_closing())

    @property
    def chunked(self) -> bool:
        return self.conn.their_http_version == b"1.1"

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def write_frame(self, frame: bytes) -> None:
        if self.open:
            self.transport.write(frame)

    def abort(self) -> None:
        self.transport.abort()

    def _end(self, why: str) -> None:
        on_end, self.on_end, self.on_resume = self.on_end, None, None
        if on_end is not None:
            on_end(why)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._end("lost")

    def shutdown(self) -> None:
        self._end("shutdown")
        super().shutdown()


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.http_host, "port": settings.http_port, "timeout_graceful_shutdown": 5,
        "http": HttpProtocol, "ws": WebSocketProtocol, "ws_max_size": ws_frame_limit(settings),
        "ws_per_message_deflate": False,
        "log_level": settings.log_level.lower(), "lifespan": "on", "access_log": False,
        "ssl_certfile": settings.http_cert_file, "ssl_keyfile": settings.http_key_file,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
