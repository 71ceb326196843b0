"""The Server-Sent Events transport: one room per stream, resumed with ``Last-Event-ID``.

Threads: the event loop owns each stream (its generator runs in the response's task).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from bridge.hub import RESYNC, HubError
from bridge.realtime import GAP_MESSAGE, Realtime, Refused
from bridge.realtime_wire import sse_delivery


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

    async def stream() -> Any:
        try:
            if since:
                missed = await rt.replay(conn, room, since)
                if missed is None:
                    yield ServerSentEvent(data=json.dumps({"room": room, "reason": "history does not reach back"}),
                                          event="resync")
                    missed = []
                for delivery in missed:
                    if conn.subscriber.replay_fresh(delivery):
                        yield sse_delivery(delivery)
            while True:
                remaining = conn.expires_at - time.time()
                if remaining <= 0:
                    rt.counters.forced_disconnects["token_expired"] += 1
                    yield ServerSentEvent(data=json.dumps({"reason": "token expired"}), event="reauth")
                    return
                if rt.closing.is_set():
                    return
                try:
                    delivery = await asyncio.wait_for(conn.subscriber.get(), min(remaining, 5.0))
                except asyncio.TimeoutError:
                    continue
                except HubError:
                    rt.counters.forced_disconnects["slow_consumer"] += 1
                    return  # the browser reconnects with Last-Event-ID and replays
                if conn.revoked and delivery.room in conn.revoked:
                    # a refreshed token of the same subject no longer allows the room: the
                    # stream ends (a reconnect with this token is refused with 403)
                    rt.counters.forced_disconnects["forbidden"] += 1
                    yield ServerSentEvent(data=json.dumps({"room": room, "reason": "forbidden"}), event="forbidden")
                    return
                if delivery.control == RESYNC:
                    conn.subscriber.forget(room)
                    rt.counters.live_resync += 1
                    yield ServerSentEvent(data=json.dumps({"room": room, "reason": GAP_MESSAGE}), event="resync")
                elif delivery.control is None and conn.subscriber.fresh(delivery):
                    rt.counters.sent += 1
                    yield sse_delivery(delivery)
        finally:
            await rt.release(conn)

    return EventSourceResponse(stream(), ping=rt.settings.ws_ping_seconds,
                               send_timeout=rt.settings.ws_send_timeout_seconds,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


