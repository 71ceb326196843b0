"""The Server-Sent Events transport: one room per stream, resumed with ``Last-Event-ID``.

A stream is the server's own ASGI task, waiting on one future until the stream ends. Events are
written by the hub's dispatch loop through the connection's outlet (bridge/realtime_outlet.py)
straight to the response's socket as pre-encoded chunks (the ``firstcare.stream`` extension of
bridge/server.py); the outlet queues only while the transport is paused or the replay is
written. Keepalive comments, the token's expiry and a transport paused too long come from the
shared timer wheel; the client going away and server shutdown from the protocol.

How a stream ends: ``event: reauth`` (token expired), ``event: forbidden`` (a refreshed token of
the same subject no longer allows the room), or simply ends (slow consumer, shutdown): the
browser reconnects with ``Last-Event-ID`` and replays.

Threads: the event loop owns every stream (its task, the dispatch loop and the wheel run there).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from bridge.hub import FORBIDDEN, RESYNC, Delivery
from bridge.realtime import GAP_MESSAGE, Connection, Realtime, Refused, log
from bridge.realtime_wire import chunk, sse_delivery, sse_event, sse_frame
from bridge.server import STREAM_EXTENSION, StreamSink

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
           (b"connection", b"keep-alive"), (b"x-accel-buffering", b"no")]


def _plain(delivery: Delivery) -> bytes:
    return sse_delivery(delivery)


class SseSession:
    """One stream: the outlet's transport (controls, overflow) and a wheel item."""

    def __init__(self, rt: Realtime, conn: Connection, sink: StreamSink, room: str) -> None:
        self.rt = rt
        self.conn = conn
        self.sink = sink
        self.room = room
        self.out = conn.subscriber
        self.chunked = sink.chunked
        self.next_ping = time.monotonic() + rt.settings.ws_ping_seconds
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        conn.end = self.end
        sink.on_end = self.end

    def frame(self, body: bytes) -> bytes:
        return chunk(body) if self.chunked else body

    def event(self, data: dict[str, Any], event: str) -> bytes:
        return self.frame(sse_event(json.dumps(data), event))

    def end(self, why: str) -> None:
        if not self.ended.done():
            self.ended.set_result(why)

    def forced(self, code: str) -> None:
        if not self.ended.done():
            self.rt.counters.forced_disconnects[code] += 1
        self.end(code)

    # --- the outlet's transport ---------------------------------------------------------------

    def control(self, delivery: Delivery) -> bytes | None:
        out = self.out
        if delivery.control == FORBIDDEN:
            if delivery.room in out.revoked and delivery.room not in out.rooms:
                self.forced("forbidden")
                return self.event({"room": self.room, "reason": "forbidden"}, "forbidden")
            return None
        if delivery.control == RESYNC and delivery.room in out.rooms:
            out.forget(delivery.room)
            self.rt.counters.live_resync += 1
            return self.event({"room": self.room, "reason": GAP_MESSAGE}, "resync")
        return None

    def overflow(self) -> None:
        self.forced("slow_consumer")

    def paused(self, since: float) -> None:
        self.rt.wheel.at(since + self.rt.settings.ws_send_timeout_seconds, self)

    # --- the wheel ----------------------------------------------------------------------------

    def schedule(self) -> None:
        self.rt.wheel.at(min(self.next_ping, time.monotonic() + self.conn.expires_at - time.time()), self)

    def tick(self, now: float) -> float | None:
        if self.ended.done():
            return None
        remaining = self.conn.expires_at - time.time()
        if remaining <= 0:
            self.out.send(self.event({"reason": "token expired"}, "reauth"))
            self.forced("token_expired")
            return None
        paused = self.sink.paused_since
        timeout = self.rt.settings.ws_send_timeout_seconds
        if paused is not None and now - paused >= timeout:
            self.forced("slow_consumer")
            return None
        if now >= self.next_ping:
            self.next_ping = now + self.rt.settings.ws_ping_seconds
            self.out.send(self.frame(b": ping\r\n\r\n"))
        upcoming = min(self.next_ping, now + remaining)
        return upcoming if paused is None else min(upcoming, paused + timeout)


class SseStream(Response):
    """The ASGI response of an admitted stream (the connection has joined its room)."""

    media_type = "text/event-stream"

    def __init__(self, rt: Realtime, conn: Connection, room: str, since: str | None) -> None:
        super().__init__()
        self.rt, self.conn, self.room, self.since = rt, conn, room, since

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        rt, conn = self.rt, self.conn
        session: SseSession | None = None
        try:
            sink: StreamSink | None = scope.get("extensions", {}).get(STREAM_EXTENSION)
            if sink is None:
                log.error("Server-Sent Events need bridge.server.HttpProtocol (server_config); refusing")
                await send({"type": "http.response.start", "status": 500, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            session = SseSession(rt, conn, sink, self.room)
            out = conn.subscriber
            out.hold()  # live events of the room wait behind the replay
            try:
                out.attach(sink, sse_frame if session.chunked else _plain, session)
                if self.since:
                    missed = await rt.replay(conn, self.room, self.since)
                    if missed is None:
                        out.write_now(session.event({"room": self.room, "reason": "history does not reach back"},
                                                    "resync"))
                        missed = []
                    for delivery in missed:
                        if out.replay_fresh(delivery):
                            out.write_now(session.frame(sse_delivery(delivery)))
                            out.sent += 1
            finally:
                out.release()
            if not sink.open:
                session.end("lost")  # went away before the stream was set up: no callback will say so
            if out.overflowed:
                session.forced("slow_consumer")
            if rt.closing.is_set():
                session.end("server_shutdown")
            session.schedule()
            why = await session.ended
            if why != "lost" and sink.open:
                # the end goes behind what is buffered; a client that does not take it in time is
                # cut off (the browser reconnects with Last-Event-ID and replays)
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}),
                                           rt.settings.ws_send_timeout_seconds)
                except TimeoutError:
                    sink.abort()
        finally:
            if session is not None:
                rt.wheel.discard(session)
                # the connection may serve another request (keep-alive): it must not call us
                session.sink.on_end = session.sink.on_resume = None
                conn.subscriber.sink = None
            await rt.release(conn)


def _sse_error(refused: Refused) -> JSONResponse:
    return JSONResponse({"error": refused.code, "detail": refused.message}, refused.status,
                        headers={"WWW-Authenticate": "Bearer"} if refused.status == 401 else None)


async def serve_sse(rt: Realtime, request: Request, room: str) -> Any:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" and value.strip() else request.query_params.get("token")
    try:
        rt.check_origin(request.headers)
        claims = await rt.authenticate(token, request.query_params.get("ticket"))
        request.state.audit_claims, request.state.audit_resource = claims, room  # bridge/audit_http.py
        if await rt.room_allowed(claims, room) is None:
            rt.counters.subscribe_refused += 1
            raise Refused("forbidden", "unknown room or not allowed", 403)
        conn = rt.admit("sse", claims)
    except Refused as refused:
        rt.counters.refused[refused.code] += 1
        request.state.audit_detail = refused.code
        return _sse_error(refused)
    since = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    await rt.join(conn, room)
    return SseStream(rt, conn, room, since)
