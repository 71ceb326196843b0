"""WebSocket and Server-Sent Events: rooms, replay, presence, limits.

WebSocket protocol (``/realtime/ws``; the patient and hospital variants subscribe on connect)::

    client -> {"type": "subscribe", "room": "patient:p-001:vitals", "since": "<last id seen>"}
              {"type": "unsubscribe", "room": "..."}   {"type": "ping"}
              {"type": "auth", "token": "<fresh jwt>"}   (same sub: rooms re-checked, expiry moved)
    server -> {"type": "welcome", "conn_id": ..., "user": ..., "expires_at": ...}
              {"type": "subscribed", "room": ..., "replayed": n} | {"type": "resync", "room": ...}
              {"type": "unsubscribed", "room": ...[, "reason": "forbidden"]}
              {"type": "authenticated", "expires_at": ...}   {"type": "pong"}   {"type": "ping"}
              {"type": "error", "code": ..., "message": ..., "room": ...}
              <event envelopes>   (presence_join / presence_leave carry "id": null)

Replay is race-free because each connection owns one send lock: a subscribe joins the room
first (live events start queuing), reads the history while holding the lock, and the sender
then skips anything at or below the offset already sent for that room.

Control deliveries come through the same queue as events, so they are ordered with them: a
``resync`` (the room's history has a gap: the hub could not record something) and a
``forbidden`` (a refreshed token of the same subject no longer allows the room).

Each connection's state is owned by its own tasks on the event loop; :class:`Realtime` (the
registry, the presence notifier) is owned by the event loop too.

Close codes (also in the README): 4000-4099 mean "reconnect, with ``since``"; 4400-4499 mean
"do not reconnect without changing something" (a new token, another room, fewer connections).

Threads: the event loop owns the connection registry, ``by_user`` and the counters; the stats
are read on the loop (``/realtime/stats`` and ``/metrics`` are async endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from bridge.api import ApiError, Auth, admin
from bridge.audit_http import audit_stream, audited_room
from bridge.hub import FORBIDDEN, RESYNC, Delivery, HubError, Member, Subscriber
from bridge.hub_presence import PresenceNotifier
from bridge.hub_rights import announce_rights, rights_from_elsewhere
from firstcare.auth import LEEWAY_SECONDS, claims_from_payload
from firstcare.errors import AuthError, RoomError
from firstcare.events import make_event, parse_event_id
from firstcare.payloads import format_ts, now_ms
from firstcare.permissions import Claims, can_subscribe
from firstcare.ratelimit import TokenBucket
from firstcare.rooms import Room, hospital_room, parse_room, patient_room
from firstcare.settings import own_origins

log = logging.getLogger("firstcare.realtime")

CLOSE_CODES: dict[str, int] = {
    # reconnect (with since / Last-Event-ID)
    "slow_consumer": 4000,
    "server_shutdown": 4001,
    # do not reconnect without changing something
    "token_invalid": 4401,
    "forbidden": 4403,
    "origin_forbidden": 4405,
    "too_many_connections": 4409,
    "token_expired": 4410,
    "message_too_large": 4413,
    "rate_limited": 4429,
}
SUBPROTOCOL = "firstcare.v1"
TOKEN_PROTOCOL_PREFIX = "bearer."
MAX_RATE_VIOLATIONS = 50
PRESENCE_REFRESH_S = 20.0
RESYNC_MESSAGE = "history does not reach back that far; reload from the REST API"
GAP_MESSAGE = "events of this room could not be recorded; reload from the REST API"

_conn_ids = itertools.count(1)


class Refused(Exception):
    """A connection refused before it streams: ``code`` is a CLOSE_CODES key."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class RealtimeCounters:
    connections_opened: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    forced_disconnects: Counter[str] = field(default_factory=Counter)
    replay_served: int = 0
    replay_events: int = 0
    replay_resync: int = 0
    live_resync: int = 0
    rooms_revoked: int = 0
    subscribe_refused: int = 0
    rate_limited: int = 0
    sent: int = 0


class Connection:
    """One WebSocket or SSE stream: its claims, its inbox and what it has been sent."""

    def __init__(self, kind: str, claims: Claims, maxsize: int) -> None:
        self.kind = kind
        self.claims = claims
        self.id = f"{kind}-{next(_conn_ids)}-{secrets.token_hex(3)}"
        self.subscriber = Subscriber(maxsize=maxsize, owner=claims.sub)
        self.sent: dict[str, tuple[str, int]] = {}
        self.joined_ms = now_ms()
        self.room_joined_ms: dict[str, int] = {}
        # A refresh of another connection of the same subject narrows this one: rooms must be
        # allowed by the refreshed claims too, and the ones they no longer allow are revoked
        # (their queued events are not sent).
        self.ceiling: Claims | None = None
        self.revoked: set[str] = set()
        self.wake = asyncio.Event()  # set on a refresh and at shutdown: the expiry is looked at again

    @property
    def expires_at(self) -> float:
        """When the stream ends: the token's ``exp`` plus the one leeway every check uses."""
        return self.claims.exp + LEEWAY_SECONDS

    def fresh(self, delivery: Delivery) -> bool:
        """False for a delivery already sent (a replay overlapping the live queue)."""
        if not delivery.id:
            return True  # ephemeral (presence): no cursor
        epoch, offset = parse_event_id(delivery.id)
        last = self.sent.get(delivery.room)
        if last is not None and last[0] == epoch and offset <= last[1]:
            return False
        self.sent[delivery.room] = (epoch, offset)
        return True


class _Closing(asyncio.Event):
    """Server shutdown: setting it also wakes every connection's housekeeping."""

    def __init__(self, connections: dict[str, Connection]) -> None:
        super().__init__()
        self._connections = connections

    def set(self) -> None:
        super().set()
        for conn in list(self._connections.values()):
            conn.wake.set()


class Realtime:
    """Connection registry, permission checks, presence and counters, shared by both transports."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.connections: dict[str, Connection] = {}
        self.by_user: Counter[str] = Counter()
        self.counters = RealtimeCounters()
        self._tasks: list[asyncio.Task[None]] = []
        self.closing = _Closing(self.connections)
        self.presence = PresenceNotifier(runtime.hub)
        self.origins = frozenset(self.settings.allowed_origins) | own_origins(self.settings)

    @property
    def hub(self) -> Any:
        return self.runtime.hub

    def start(self) -> None:
        self.hub.on_rights = functools.partial(rights_from_elsewhere, self)
        self._tasks = [asyncio.create_task(self._refresh_presence(), name="fc-presence"),
                       asyncio.create_task(self.presence.run(), name="fc-presence-announce")]

    async def stop(self) -> None:
        self.closing.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- admission ------------------------------------------------------------------------

    def check_origin(self, headers: Any) -> None:
        """A browser's ``Origin`` must be one of this server's own origins (FC_PUBLIC_ORIGINS,
        else derived from FC_HTTP_HOST and FC_HTTP_PORT) or listed in FC_ALLOWED_ORIGINS. It is
        never compared with ``Host``: a DNS-rebinding page sends its own name in both. The one
        exception is an IP-address origin equal to ``Host``: an address cannot be rebound."""
        origin = headers.get("origin")
        if origin is None:
            return  # not a browser
        if origin in self.origins or _ip_origin_of_host(origin, headers.get("host", "")):
            return
        raise Refused("origin_forbidden", f"origin {origin!r} is not allowed (FC_PUBLIC_ORIGINS, FC_ALLOWED_ORIGINS)",
                      403)

    async def authenticate(self, token: str | None, ticket: str | None) -> Claims:
        if ticket:
            try:
                value = await self.hub.backend.take_ticket(ticket)
            except HubError as exc:
                raise Refused("token_invalid", f"tickets unavailable: {exc}", 401) from exc
            if value is None:
                raise Refused("token_invalid", "unknown, used or expired ticket", 401)
            claims = claims_from_payload(json.loads(value))
            if claims.exp + LEEWAY_SECONDS <= time.time():
                raise Refused("token_expired", "token expired", 401)
            return claims
        try:
            return await run_in_threadpool(self.runtime.verifier.verify, token)
        except AuthError as exc:
            code = "token_expired" if exc.reason == "token_expired" else "token_invalid"
            raise Refused(code, str(exc), 401) from exc

    def admit(self, kind: str, claims: Claims) -> Connection:
        if self.closing.is_set():
            raise Refused("server_shutdown", "server is shutting down", 503)
        if self.by_user[claims.sub] >= self.settings.max_connections_per_user:
            raise Refused("too_many_connections",
                          f"{claims.sub!r} already has {self.by_user[claims.sub]} connections "
                          f"(FC_MAX_CONNECTIONS_PER_USER)", 429)
        conn = Connection(kind, claims, self.settings.ws_queue_size)
        self.connections[conn.id] = conn
        self.by_user[claims.sub] += 1
        self.counters.connections_opened[kind] += 1
        return conn

    async def release(self, conn: Connection) -> None:
        rooms = list(conn.subscriber.rooms)
        self.hub.leave_all(conn.subscriber)
        if self.connections.pop(conn.id, None) is not None:
            self.by_user[conn.claims.sub] -= 1
            if self.by_user[conn.claims.sub] <= 0:
                del self.by_user[conn.claims.sub]
        for room in rooms:
            member = self._member(conn, room)
            await self.hub.backend.presence_leave(room, member)
            self.presence.left(room, member)

    def _member(self, conn: Connection, room: str) -> Member:
        return Member(conn.id, conn.claims.sub, self.runtime.node, conn.room_joined_ms.get(room, conn.joined_ms))

    async def allowed(self, conn: Connection, name: str) -> Room | None:
        """The room if ``conn`` may be in it: its own claims, and the subject's refreshed ones."""
        room = await self.room_allowed(conn.claims, name)
        if room is not None and conn.ceiling is not None and await self.room_allowed(conn.ceiling, name) is None:
            return None
        return room

    async def refresh(self, conn: Connection, claims: Claims) -> list[str]:
        """Rights follow the token: ``conn`` now holds ``claims`` (same subject), every room it
        has joined is checked again, and so is every room of the subject's other streams, on
        this process and on the others sharing the hub (a refresh narrows them, it never widens them). Returns the rooms ``conn``
        must leave; the other streams get a ``forbidden`` control delivery per room."""
        conn.claims = claims
        conn.ceiling = None
        conn.wake.set()
        revoked = [room for room in sorted(conn.subscriber.rooms) if await self.allowed(conn, room) is None]
        for room in revoked:
            await self.withdraw(conn, room)
        await self.narrow(claims, conn)
        announce_rights(self.hub, claims)  # and on the other bridges (bridge/hub_rights.py)
        return revoked

    async def narrow(self, claims: Claims, skip: Connection | None = None) -> None:
        """The subject's streams on this process (but ``skip``) keep only what ``claims`` allow."""
        for other in list(self.connections.values()):
            if other is skip or other.claims.sub != claims.sub:
                continue
            other.ceiling = claims
            for room in sorted(other.subscriber.rooms):
                if await self.allowed(other, room) is None:
                    await self.withdraw(other, room)
                    # its own writer tells the client, in order with its events; never dropped
                    # (a connection too slow to take it is closed and must reconnect)
                    other.subscriber.offer(Delivery(room, "", b"", True, None, FORBIDDEN))

    async def withdraw(self, conn: Connection, room: str) -> None:
        """Take ``room`` away from ``conn``: what is still queued for it is not sent."""
        await self.leave(conn, room)
        conn.revoked.add(room)
        self.counters.rooms_revoked += 1

    async def room_allowed(self, claims: Claims, name: str) -> Room | None:
        """The room if ``claims`` may join it; None for unknown and forbidden alike."""
        try:
            room = parse_room(name)
        except RoomError:
            return None
        owner = None
        store = self.runtime.store
        if room.patient_id is not None:
            owner = await run_in_threadpool(store.patient_hospital, room.patient_id)
        elif room.device is not None:
            device = await run_in_threadpool(store.device, *room.device)
            owner = device.hospital_id if device is not None else None
        return room if can_subscribe(claims, room, owner) else None

    async def join(self, conn: Connection, room: str) -> None:
        fresh = room not in conn.subscriber.rooms
        self.hub.join(conn.subscriber, room)
        conn.revoked.discard(room)
        if fresh:
            conn.room_joined_ms[room] = now_ms()
        member = self._member(conn, room)
        await self.hub.backend.presence_join(room, member)
        if fresh:
            self.presence.joined(room, member)

    async def leave(self, conn: Connection, room: str) -> None:
        was_in = room in conn.subscriber.rooms
        self.hub.leave(conn.subscriber, room)
        conn.sent.pop(room, None)
        if was_in:
            member = self._member(conn, room)
            conn.room_joined_ms.pop(room, None)
            await self.hub.backend.presence_leave(room, member)
            self.presence.left(room, member)

    async def replay(self, conn: Connection, room: str, since: str) -> list[Delivery] | None:
        """What ``conn`` missed in ``room`` since ``since``, or None (resync). The permission
        is checked again here because the claims may have changed since the subscribe."""
        if await self.allowed(conn, room) is None:
            return None
        try:
            missed = await self.hub.history(room, since)
        except HubError:
            missed = None
        if audited_room(room):  # who replayed what (bridge/audit_http.py)
            audit_stream(self.runtime, None, None, conn.claims, "realtime.replay", room, "success",
                         detail=f"since {since}: {'resync' if missed is None else f'{len(missed)} events'}")
        if missed is None:
            self.counters.replay_resync += 1
            return None
        self.counters.replay_served += 1
        self.counters.replay_events += len(missed)
        return missed

    async def _refresh_presence(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_REFRESH_S)
            memberships = [(room, self._member(c, room))
                           for c in list(self.connections.values()) for room in c.subscriber.rooms]
            await self.hub.backend.presence_refresh(memberships)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        kinds = Counter(conn.kind for conn in self.connections.values())
        return {
            "connections": len(self.connections), "connections_ws": kinds["ws"], "connections_sse": kinds["sse"],
            "connections_per_user": dict(self.by_user), "connections_opened": dict(c.connections_opened),
            "refused": dict(c.refused), "forced_disconnects": dict(c.forced_disconnects),
            "replay_served": c.replay_served, "replay_events": c.replay_events, "replay_resync": c.replay_resync,
            "live_resync": c.live_resync, "rooms_revoked": c.rooms_revoked,
            "subscribe_refused": c.subscribe_refused, "rate_limited": c.rate_limited, "sent": c.sent,
            **self.presence.counters,
            "rooms": self.hub.local_rooms(),
        }


# --- WebSocket ----------------------------------------------------------------------------


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
    def __init__(self, rt: Realtime, ws: WebSocket, conn: Connection) -> None:
        self.rt = rt
        self.ws = ws
        self.conn = conn
        self.lock = asyncio.Lock()
        settings = rt.settings
        self.bucket = TokenBucket(settings.ws_rate_per_second, settings.ws_rate_per_second * 2)
        self.violations = 0
        self.close_reason: str | None = None

    async def send_text(self, text: str) -> None:
        async with asyncio.timeout(self.rt.settings.ws_send_timeout_seconds):  # no task per send
            await self.ws.send_text(text)
        self.rt.counters.sent += 1

    async def send_json(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self.send_text(json.dumps(message, separators=(",", ":")))

    async def subscribe(self, room: str | None, since: str | None) -> None:
        if not isinstance(room, str) or await self.rt.allowed(self.conn, room) is None:
            self.rt.counters.subscribe_refused += 1
            self.audit("realtime.subscribe", str(room), "denied", CLOSE_CODES["forbidden"])
            await self.send_json({"type": "error", "code": "forbidden", "room": room,
                                  "message": "unknown room or not allowed"})
            return
        async with self.lock:
            answer: dict[str, Any] = {"type": "subscribed", "room": room}
            if since is None:
                # The room's position before joining, so a client with nothing to replay still
                # gets a cursor; whatever is published while joining follows as a replay.
                since = answer["last_id"] = await self._position(room)
            await self.rt.join(self.conn, room)
            if audited_room(room):
                self.audit("realtime.subscribe", room, "success")
            if since is None:
                position = await self._position(room)
                since = f"{position.rpartition(':')[0]}:0" if position else None
            missed: list[Delivery] | None = []
            if since is not None:
                missed = await self.rt.replay(self.conn, room, str(since))
            if missed is None:
                await self.send_text(json.dumps({"type": "resync", "room": room, "message": RESYNC_MESSAGE}))
                return
            answer["replayed"] = len(missed)
            await self.send_text(json.dumps(answer))
            for delivery in missed:
                if self.conn.fresh(delivery):
                    await self.send_text(ws_text(delivery))

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
            await self.send_json({"type": "error", "code": "rate_limited",
                                  "message": f"at most {self.rt.settings.ws_rate_per_second:g} messages/s"})
            return
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, KeyError, TypeError, RecursionError):
            await self.send_json({"type": "error", "code": "bad_request",
                                  "message": "expected a JSON object with a 'type'"})
            return
        if kind == "subscribe":
            await self.subscribe(message.get("room"), message.get("since"))
        elif kind == "unsubscribe":
            room = message.get("room")
            if isinstance(room, str):
                await self.rt.leave(self.conn, room)
            await self.send_json({"type": "unsubscribed", "room": room})
        elif kind == "ping":
            await self.send_json({"type": "pong", "ts": now_ms()})
        elif kind == "auth":
            await self.refresh(message.get("token"))
        else:
            await self.send_json({"type": "error", "code": "bad_request", "message": f"unknown type {kind!r}"})

    async def refresh(self, token: Any) -> None:
        """``{"type": "auth"}``: a fresh token for the same subject. Every joined room is checked
        again with it; the ones it no longer allows are left (``unsubscribed`` with ``reason:
        forbidden``) before the ``authenticated`` answer. Another subject closes the stream."""
        try:
            claims = await run_in_threadpool(self.rt.runtime.verifier.verify, token if isinstance(token, str) else None)
        except AuthError as exc:
            await self.send_json({"type": "error", "code": exc.reason, "message": str(exc)})
            return
        if claims.sub != self.conn.claims.sub:
            raise _Close("token_invalid", "a refreshed token must have the same subject")
        async with self.lock:
            for room in await self.rt.refresh(self.conn, claims):
                await self.send_text(json.dumps({"type": "unsubscribed", "room": room, "reason": "forbidden"}))
            await self.send_text(json.dumps({"type": "authenticated", "expires_at": claims.exp}))

    async def reader(self) -> None:
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

    async def writer(self) -> None:
        conn = self.conn
        subscriber = conn.subscriber
        while True:
            try:
                delivery = await subscriber.get()
            except HubError as exc:
                raise _Close("slow_consumer", "an alert did not fit the send queue; reconnect with since") from exc
            async with self.lock:
                if conn.revoked and delivery.room in conn.revoked and delivery.room not in subscriber.rooms:
                    if delivery.control == FORBIDDEN:
                        await self.send_text(json.dumps({"type": "unsubscribed", "room": delivery.room,
                                                         "reason": "forbidden"}))
                    continue  # queued before the room was taken away
                if delivery.control == RESYNC:
                    if delivery.room in subscriber.rooms:
                        conn.sent.pop(delivery.room, None)
                        self.rt.counters.live_resync += 1
                        await self.send_text(json.dumps({"type": "resync", "room": delivery.room,
                                                         "message": GAP_MESSAGE}))
                elif delivery.control is None and conn.fresh(delivery):
                    await self.send_text(ws_text(delivery))

    async def housekeeping(self) -> None:
        """Keepalive pings, the token's expiry and server shutdown, in one task per connection
        (every task costs memory, and a server holds thousands of connections). A refresh
        wakes it, so the expiry always follows the newest token."""
        interval = self.rt.settings.ws_ping_seconds
        next_ping = time.monotonic() + interval
        wake = self.conn.wake
        while True:
            if self.rt.closing.is_set():
                raise _Close("server_shutdown", "server shutting down; reconnect")
            remaining = self.conn.expires_at - time.time()
            if remaining <= 0:
                raise _Close("token_expired", "token expired; reconnect with a fresh token")
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), min(remaining, max(0.0, next_ping - time.monotonic())))
            if wake.is_set():
                continue  # shutdown or a refreshed token: look again
            if time.monotonic() >= next_ping:
                next_ping = time.monotonic() + interval
                await self.send_json({"type": "ping", "ts": now_ms()})


class _Close(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def _close(ws: WebSocket, code: str, message: str) -> None:
    if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(CLOSE_CODES[code], message[:120]), 5)


async def serve_websocket(rt: Realtime, ws: WebSocket, auto_rooms: list[str]) -> None:
    token, ticket, subprotocol = _ws_credentials(ws)
    try:
        rt.check_origin(ws.headers)
        claims = await rt.authenticate(token, ticket)
        conn = rt.admit("ws", claims)
    except Refused as refused:
        rt.counters.refused[refused.code] += 1
        audit_stream(rt.runtime, ws.headers, ws.client, None, "realtime.connect", ws.url.path,
                     "denied" if refused.code != "server_shutdown" else "error", CLOSE_CODES[refused.code],
                     detail=refused.code)
        # accept first: a browser sees a refusal before accept() only as 1006, with no reason
        await ws.accept(subprotocol=subprotocol)
        await _close(ws, refused.code, refused.message)
        return
    await ws.accept(subprotocol=subprotocol)
    session = WebSocketSession(rt, ws, conn)
    try:
        for room in auto_rooms:
            if await rt.room_allowed(claims, room) is None:
                rt.counters.subscribe_refused += 1
                session.audit("realtime.subscribe", room, "denied", CLOSE_CODES["forbidden"])
                raise _Close("forbidden", f"room {room!r}: unknown room or not allowed")
        await session.send_json({"type": "welcome", "conn_id": conn.id, "user": claims.sub,
                                 "expires_at": claims.exp, "close_codes": CLOSE_CODES})
        for room in auto_rooms:
            await session.subscribe(room, ws.query_params.get("since"))
        tasks = [asyncio.create_task(coro) for coro in
                 (session.reader(), session.writer(), session.housekeeping())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
    except _Close as close:
        rt.counters.forced_disconnects[close.code] += 1
        await _close(ws, close.code, close.message)
    except (WebSocketDisconnect, asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
        if isinstance(exc, asyncio.TimeoutError):
            rt.counters.forced_disconnects["slow_consumer"] += 1
            await _close(ws, "slow_consumer", "send timed out")
    finally:
        await rt.release(conn)


# --- Server-Sent Events -------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def ws_text(delivery: Delivery) -> str:
    """Decoded once per delivery, however many connections send it."""
    return delivery.data.decode()


@functools.lru_cache(maxsize=4096)
def sse_frame(delivery: Delivery) -> bytes:
    """The SSE form of a delivery, made once per delivery however many clients get it:
    ``id:`` the event id, ``event:`` the dotted name, ``data:`` the envelope's ``data``."""
    envelope = json.loads(delivery.data)
    return ServerSentEvent(data=json.dumps(envelope["data"], separators=(",", ":")), event=envelope["event"],
                           id=envelope["id"] or None).encode()


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
                    if conn.fresh(delivery):
                        yield sse_frame(delivery)
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
                    conn.sent.pop(room, None)
                    rt.counters.live_resync += 1
                    yield ServerSentEvent(data=json.dumps({"room": room, "reason": GAP_MESSAGE}), event="resync")
                elif delivery.control is None and conn.fresh(delivery):
                    rt.counters.sent += 1
                    yield sse_frame(delivery)
        finally:
            await rt.release(conn)

    return EventSourceResponse(stream(), ping=rt.settings.ws_ping_seconds,
                               send_timeout=rt.settings.ws_send_timeout_seconds,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# --- routes -------------------------------------------------------------------------------

router = APIRouter()


def _rt(request_or_ws: Request | WebSocket) -> Realtime:
    return request_or_ws.app.state.runtime.realtime


@router.websocket("/realtime/ws")
async def ws_rooms(ws: WebSocket) -> None:
    await serve_websocket(_rt(ws), ws, [])


@router.websocket("/realtime/ws/patient/{patient_id}")
async def ws_patient(ws: WebSocket, patient_id: str) -> None:
    await serve_websocket(_rt(ws), ws, [patient_room(patient_id)])


@router.websocket("/realtime/ws/hospital/{hospital_id}")
async def ws_hospital(ws: WebSocket, hospital_id: str) -> None:
    await serve_websocket(_rt(ws), ws, [hospital_room(hospital_id)])


def _sub_room(base: str, room: str | None, allowed: tuple[str, ...]) -> str:
    return f"{base}:{room}" if room in allowed else base


@router.get("/realtime/events", tags=["realtime"])
async def sse_system(request: Request) -> Any:
    """The ``system`` room (maintenance, system alerts) as Server-Sent Events."""
    return await serve_sse(_rt(request), request, "system")


@router.get("/realtime/events/patient/{patient_id}", tags=["realtime"])
async def sse_patient(request: Request, patient_id: str, room: str | None = None) -> Any:
    """``patient:{id}`` (or ``?room=vitals`` / ``?room=alerts`` for the narrower rooms)."""
    return await serve_sse(_rt(request), request, _sub_room(patient_room(patient_id), room, ("vitals", "alerts")))


@router.get("/realtime/events/hospital/{hospital_id}", tags=["realtime"])
async def sse_hospital(request: Request, hospital_id: str, room: str | None = None) -> Any:
    """``hospital:{id}`` (or ``?room=alerts`` for ``hospital:{id}:alerts``)."""
    return await serve_sse(_rt(request), request, _sub_room(hospital_room(hospital_id), room, ("alerts",)))


@router.get("/realtime/events/device/{device_type}/{device_id}", tags=["realtime"])
async def sse_device(request: Request, device_type: str, device_id: str) -> Any:
    return await serve_sse(_rt(request), request, f"device:{device_type}:{device_id}")


class TestPublish(BaseModel):
    room: str = Field(description="room to publish to, e.g. 'system' or 'patient:p-001:vitals'")
    event: str = Field(default="system.alert", description="dotted event name")
    data: dict[str, Any] = Field(default_factory=dict)


@router.post("/realtime/test/publish", tags=["realtime"])
async def test_publish(request: Request, c: Annotated[Claims, Depends(admin)], body: TestPublish) -> dict[str, Any]:
    """Admin only: publish a test event to one room (end-to-end checks of dashboards)."""
    try:
        parse_room(body.room)
        event = make_event(body.event, body.data)
    except (RoomError, ValueError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    try:
        publication = await request.app.state.runtime.hub.publish(event, [body.room])
    except HubError as exc:
        raise ApiError(503, "hub_unavailable", str(exc)) from exc
    return {"room": body.room, "id": publication.deliveries[0].id, "event": body.event}


@router.post("/realtime/ticket", tags=["realtime"])
async def ticket(request: Request, c: Auth) -> dict[str, Any]:
    """Trade the bearer token for a short-lived single-use ticket, for ``EventSource`` and
    ``WebSocket`` URLs (``?ticket=``), so the long-lived token never appears in a URL."""
    rt = _rt(request)
    value = secrets.token_urlsafe(24)
    payload = {"sub": c.sub, "role": c.role, "exp": c.exp, "hospitals": sorted(c.hospitals),
               "patients": sorted(c.patients)}
    try:
        await rt.hub.backend.put_ticket(value, json.dumps(payload), rt.settings.ticket_seconds)
    except HubError as exc:
        raise ApiError(503, "hub_unavailable", str(exc)) from exc
    return {"ticket": value, "expires_in": rt.settings.ticket_seconds}


@router.get("/realtime/presence", tags=["realtime"])
async def presence(request: Request, c: Auth, room: str) -> dict[str, Any]:
    """Who is in a room, across every bridge process sharing the hub, and when each user who
    was in it during the last day was last seen there (online users: now)."""
    rt = _rt(request)
    if await rt.room_allowed(c, room) is None:
        raise ApiError(403, "forbidden", "unknown room or not allowed")
    try:
        members = await rt.hub.backend.presence(room)
        seen = await rt.hub.backend.last_seen(room)
    except HubError as exc:
        raise ApiError(503, "hub_unavailable", str(exc)) from exc
    online = {m["user"] for m in members}
    last_seen = {user: {"last_seen": format_ts(at), "last_seen_ms": at, "online": user in online}
                 for user, at in sorted(seen.items(), key=lambda item: -item[1])}
    return {"room": room, "count": len(members), "members": members, "users": last_seen}


def utf8_size(text: str, limit: int) -> int:
    """The UTF-8 size of ``text``, counted only when it could exceed ``limit`` (a character is
    at most 4 bytes): the message limit counts bytes, never characters.

    >>> utf8_size("é" * 3000, 4096), utf8_size("ab", 4096)
    (6000, 2)
    """
    return len(text) if len(text) * 4 <= limit else len(text.encode("utf-8", "surrogatepass"))


def _ip_origin_of_host(origin: str, host: str) -> bool:
    """True for ``http(s)://<IP address>[:port]`` naming exactly the ``Host`` the request was
    sent to: an address cannot be rebound by DNS, so that page is this server's own."""
    from urllib.parse import urlsplit
    import ipaddress

    try:
        parts = urlsplit(origin)
        ipaddress.ip_address((parts.hostname or "").strip("[]"))
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host
