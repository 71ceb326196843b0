"""The WebSocket transport: its protocol, one task per connection, writes on the write path.

Protocol (``/realtime/ws``; the patient and hospital variants subscribe on connect)::

    client -> {"type": "subscribe", "room": "patient:p-001:vitals", "since": "<last id seen>"}
              {"type": "unsubscribe", "room": "..."}   {"type": "ping"}
              {"type": "auth", "token": "<fresh jwt>"}   (same sub: rooms re-checked, expiry moved)
    server -> {"type": "welcome", "conn_id": ..., "user": ..., "expires_at": ...}
              {"type": "subscribed", "room": ..., "replayed": n} | {"type": "resync", "room": ...}
              {"type": "unsubscribed", "room": ...[, "reason": "forbidden"]}
              {"type": "authenticated", "expires_at": ...}   {"type": "pong"}   {"type": "ping"}
              {"type": "error", "code": ..., "message": ..., "room": ...}
              <event envelopes>   (presence_join / presence_leave carry "id": null)

A connection has one task, the server's own ASGI task, which reads the client's messages.
Events are written by the hub's dispatch loop through the connection's outlet
(bridge/realtime_outlet.py) straight to the socket (the ``firstcare.frames`` extension of
bridge/server.py). Keepalive pings, the token's expiry and a transport paused too long are
looked at by the shared timer wheel; shutdown closes every connection at once. All of those
close synchronously (:meth:`WebSocketSession.close`), behind what is already buffered.

Replay is race-free: a subscribe holds the outlet (live events of the room queue) while it
joins the room, reads the history and writes it; then the queue drains, skipping anything at or
below the offset already sent for that room. Control deliveries (``resync``, ``forbidden``) come
through the same outlet, so they are ordered with the events.

Threads: the event loop owns every session (its task, the dispatch loop and the wheel run there).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import WebSocket
from starlette.concurrency import run_in_threadpool

from bridge.audit_http import audit_stream, audited_room
from bridge.hub import FORBIDDEN, RESYNC, Delivery, HubError
from bridge.realtime import (
    CLOSE_CODES,
    GAP_MESSAGE,
    MAX_RATE_VIOLATIONS,
    RESYNC_MESSAGE,
    SUBPROTOCOL,
    TOKEN_PROTOCOL_PREFIX,
    Connection,
    Realtime,
    Refused,
    log,
    utf8_size,
)
from bridge.realtime_wire import ws_frame, ws_json_frame, ws_text_frame
from bridge.server import FRAMES_EXTENSION, FrameSink
from firstcare.errors import AuthError
from firstcare.payloads import now_ms
from firstcare.ratelimit import TokenBucket


class _Close(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _ws_credentials(ws: WebSocket) -> tuple[str | None, str | None, str | None]:
    """(token, ticket, subprotocol to echo). The token may come as ``?token=``, as
    ``Authorization: Bearer``, or as a ``bearer.<jwt>`` subprotocol offered next to
    ``firstcare.v1`` (the server echoes ``firstcare.v1``, never the token)."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    token = next((p[len(TOKEN_PROTOCOL_PREFIX):] for p in offered if p.startswith(TOKEN_PROTOCOL_PREFIX)), None)
    scheme, _, value = ws.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        token = token or value.strip()
    token = token or ws.query_params.get("token")
    return token, ws.query_params.get("ticket"), SUBPROTOCOL if SUBPROTOCOL in offered else None


class WebSocketSession:
    """One accepted WebSocket: the outlet's transport (controls, overflow), a wheel item
    (keepalive, expiry, slow consumer) and the reader of client messages."""

    def __init__(self, rt: Realtime, ws: WebSocket, conn: Connection, sink: FrameSink) -> None:
        self.rt = rt
        self.ws = ws
        self.conn = conn
        self.sink = sink
        self.out = conn.subscriber
        settings = rt.settings
        self.bucket = TokenBucket(settings.ws_rate_per_second, settings.ws_rate_per_second * 2)
        self.violations = 0
        self.next_ping = time.monotonic() + settings.ws_ping_seconds
        self.out.attach(sink, ws_frame, self)
        conn.end = self.end

    # --- writing ----------------------------------------------------------------------------

    def send_json(self, message: dict[str, Any]) -> None:
        self.out.send(ws_json_frame(message))

    def close(self, code: str, message: str) -> None:
        """Close now with ``code`` (a CLOSE_CODES key), behind what is already buffered."""
        if self.sink.open:
            self.sink.close_now(CLOSE_CODES[code], message[:120])

    def end(self, code: str) -> None:
        if code == "server_shutdown":
            self.close(code, "server shutting down; reconnect")

    def forced(self, code: str, message: str) -> None:
        if self.sink.open:
            self.rt.counters.forced_disconnects[code] += 1
        self.close(code, message)

    # --- the outlet's transport ---------------------------------------------------------------

    def control(self, delivery: Delivery) -> bytes | None:
        out = self.out
        if delivery.control == FORBIDDEN:
            if delivery.room in out.revoked and delivery.room not in out.rooms:
                return ws_json_frame({"type": "unsubscribed", "room": delivery.room, "reason": "forbidden"})
            return None
        if delivery.control == RESYNC and delivery.room in out.rooms:
            out.forget(delivery.room)
            self.rt.counters.live_resync += 1
            return ws_json_frame({"type": "resync", "room": delivery.room, "message": GAP_MESSAGE})
        return None

    def overflow(self) -> None:
        self.forced("slow_consumer", "an alert did not fit the send queue; reconnect with since")

    def paused(self, since: float) -> None:
        self.rt.wheel.at(since + self.rt.settings.ws_send_timeout_seconds, self)

    # --- the wheel ----------------------------------------------------------------------------

    def schedule(self) -> None:
        self.rt.wheel.at(min(self.next_ping, time.monotonic() + self.conn.expires_at - time.time()), self)

    def tick(self, now: float) -> float | None:
        """Keepalive, the token's expiry, a transport paused too long (``now``: loop time)."""
        if not self.sink.open:
            return None
        remaining = self.conn.expires_at - time.time()
        if remaining <= 0:
            self.forced("token_expired", "token expired; reconnect with a fresh token")
            return None
        paused = self.sink.paused_since
        timeout = self.rt.settings.ws_send_timeout_seconds
        if paused is not None and now - paused >= timeout:
            self.forced("slow_consumer", "send timed out")
            return None
        if now >= self.next_ping:
            self.next_ping = now + self.rt.settings.ws_ping_seconds
            self.send_json({"type": "ping", "ts": now_ms()})
        upcoming = min(self.next_ping, now + remaining)
        return upcoming if paused is None else min(upcoming, paused + timeout)

    # --- reading ------------------------------------------------------------------------------

    async def subscribe(self, room: str | None, since: str | None) -> None:
        rt, out = self.rt, self.out
        if not isinstance(room, str) or await rt.allowed(self.conn, room) is None:
            rt.counters.subscribe_refused += 1
            self.audit("realtime.subscribe", str(room), "denied", CLOSE_CODES["forbidden"])
            self.send_json({"type": "error", "code": "forbidden", "room": room,
                            "message": "unknown room or not allowed"})
            return
        out.hold()  # live events of the room wait behind the replay
        try:
            answer: dict[str, Any] = {"type": "subscribed", "room": room}
            if since is None:
                # The room's position before joining, so a client with nothing to replay still
                # gets a cursor; whatever is published while joining follows as a replay.
                since = answer["last_id"] = await self._position(room)
            await rt.join(self.conn, room)
            if audited_room(room):
                self.audit("realtime.subscribe", room, "success")
            if since is None:
                position = await self._position(room)
                since = f"{position.rpartition(':')[0]}:0" if position else None
            missed: list[Delivery] | None = []
            if since is not None:
                missed = await rt.replay(self.conn, room, str(since))
            if missed is None:
                out.write_now(ws_json_frame({"type": "resync", "room": room, "message": RESYNC_MESSAGE}))
                return
            answer["replayed"] = len(missed)
            out.write_now(ws_json_frame(answer))
            for delivery in missed:  # bounded by the history size, written even to a paused transport
                if out.replay_fresh(delivery):
                    out.write_now(ws_text_frame(delivery.data))
                    out.sent += 1
        finally:
            out.release()

    def audit(self, action: str, resource: str, outcome: str, status: int | None = None) -> None:
        audit_stream(self.rt.runtime, self.ws.headers, self.ws.client, self.conn.claims, action, resource, outcome,
                     status)

    async def _position(self, room: str) -> str | None:
        try:
            return await self.rt.hub.backend.position(room)
        except HubError:
            return None

    async def handle(self, raw: str) -> None:
        if not self.bucket.take():
            self.rt.counters.rate_limited += 1
            self.violations += 1
            if self.violations >= MAX_RATE_VIOLATIONS:
                raise _Close("rate_limited", "too many messages")
            self.send_json({"type": "error", "code": "rate_limited",
                            "message": f"at most {self.rt.settings.ws_rate_per_second:g} messages/s"})
            return
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, KeyError, TypeError, RecursionError):
            self.send_json({"type": "error", "code": "bad_request", "message": "expected a JSON object with a 'type'"})
            return
        if kind == "subscribe":
            await self.subscribe(message.get("room"), message.get("since"))
        elif kind == "unsubscribe":
            room = message.get("room")
            if isinstance(room, str):
                await self.rt.leave(self.conn, room)
            self.send_json({"type": "unsubscribed", "room": room})
        elif kind == "ping":
            self.send_json({"type": "pong", "ts": now_ms()})
        elif kind == "auth":
            await self.refresh(message.get("token"))
        else:
            self.send_json({"type": "error", "code": "bad_request", "message": f"unknown type {kind!r}"})

    async def refresh(self, token: Any) -> None:
        """``{"type": "auth"}``: a fresh token for the same subject. Every joined room is checked
        again with it; the ones it no longer allows are left (``unsubscribed`` with ``reason:
        forbidden``) before the ``authenticated`` answer. Another subject closes the stream."""
        try:
            claims = await run_in_threadpool(self.rt.runtime.verifier.verify, token if isinstance(token, str) else None)
        except AuthError as exc:
            self.send_json({"type": "error", "code": exc.reason, "message": str(exc)})
            return
        if claims.sub != self.conn.claims.sub:
            raise _Close("token_invalid", "a refreshed token must have the same subject")
        self.out.hold()
        try:
            for room in await self.rt.refresh(self.conn, claims):
                self.out.write_now(ws_json_frame({"type": "unsubscribed", "room": room, "reason": "forbidden"}))
            self.out.write_now(ws_json_frame({"type": "authenticated", "expires_at": claims.exp}))
        finally:
            self.out.release()
        self.schedule()  # the expiry follows the newest token

    async def read(self) -> None:
        limit = self.rt.settings.ws_max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                data = message.get("bytes") or b""
                size = len(data)
                raw = data.decode("utf-8", "replace") if size <= limit else ""
            else:
                size = utf8_size(raw, limit)
            if size > limit:
                raise _Close("message_too_large", f"messages are limited to {limit} bytes")
            await self.handle(raw)


async def _refuse(rt: Realtime, ws: WebSocket, subprotocol: str | None, code: str, message: str) -> None:
    # accept first: a browser sees a refusal before accept() only as 1006, with no reason
    await ws.accept(subprotocol=subprotocol)
    sink: FrameSink | None = ws.scope.get("extensions", {}).get(FRAMES_EXTENSION)
    if sink is not None:
        sink.close_now(CLOSE_CODES[code], message[:120])
    else:
        await ws.close(CLOSE_CODES[code], message[:120])


async def serve_websocket(rt: Realtime, ws: WebSocket, auto_rooms: list[str]) -> None:
    token, ticket, subprotocol = _ws_credentials(ws)
    if FRAMES_EXTENSION not in ws.scope.get("extensions", {}):
        log.error("the WebSocket write path needs bridge.server.WebSocketProtocol (server_config); refusing")
        await ws.close(1011)
        return
    try:
        rt.check_origin(ws.headers)
        claims = await rt.authenticate(token, ticket)
        conn = rt.admit("ws", claims)
    except Refused as refused:
        rt.counters.refused[refused.code] += 1
        audit_stream(rt.runtime, ws.headers, ws.client, None, "realtime.connect", ws.url.path,
                     "denied" if refused.code != "server_shutdown" else "error", CLOSE_CODES[refused.code],
                     detail=refused.code)
        await _refuse(rt, ws, subprotocol, refused.code, refused.message)
        return
    session: WebSocketSession | None = None
    try:
        await ws.accept(subprotocol=subprotocol)
        session = WebSocketSession(rt, ws, conn, ws.scope["extensions"][FRAMES_EXTENSION])
        try:
            for room in auto_rooms:
                if await rt.room_allowed(claims, room) is None:
                    rt.counters.subscribe_refused += 1
                    session.audit("realtime.subscribe", room, "denied", CLOSE_CODES["forbidden"])
                    raise _Close("forbidden", f"room {room!r}: unknown room or not allowed")
            session.send_json({"type": "welcome", "conn_id": conn.id, "user": claims.sub,
                               "expires_at": claims.exp, "close_codes": CLOSE_CODES})
            for room in auto_rooms:
                await session.subscribe(room, ws.query_params.get("since"))
            if rt.closing.is_set():
                raise _Close("server_shutdown", "server shutting down; reconnect")
            session.schedule()
            await session.read()
        except _Close as close:
            session.forced(close.code, close.message)
    except (ConnectionError, RuntimeError):
        pass  # the client went away
    finally:
        if session is not None:
            rt.wheel.discard(session)
        await rt.release(conn)
