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
"""

from __future__ import annotations

from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import SecurityError

from firstcare.settings import Settings

WS_FRAME_FLOOR = 1 << 20  # 1 MiB
MAX_HANDSHAKE_BYTES = 16 * 1024


def ws_frame_limit(settings: Settings) -> int:
    """The largest WebSocket message the protocol layer reads (beyond it: 1009)."""
    return max(WS_FRAME_FLOOR, settings.ws_max_message_bytes * 4)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol, answering a handshake it cannot parse."""

    _handshake_bytes = 0

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


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.http_host, "port": settings.http_port, "timeout_graceful_shutdown": 5,
        "ws": WebSocketProtocol, "ws_max_size": ws_frame_limit(settings), "ws_per_message_deflate": False,
        "log_level": settings.log_level.lower(), "lifespan": "on", "access_log": False,
        "ssl_certfile": settings.http_cert_file, "ssl_keyfile": settings.http_key_file,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
