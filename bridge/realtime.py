"""Real-time streams, the part both transports share: admission (origin, token, ticket, the
per-user limit), rooms and their permissions, replay, presence, the registry and its counters.

    bridge/realtime.py         this: Realtime (registry, admission, auth, rooms), Connection
    bridge/realtime_outlet.py  the write path (dispatch loop -> socket) and the timer wheel
    bridge/realtime_wire.py    the bytes on the wire (WebSocket frames, SSE chunks)
    bridge/realtime_ws.py      the WebSocket transport and its protocol
    bridge/realtime_sse.py     the Server-Sent Events transport
    bridge/realtime_routes.py  the HTTP routes

Close codes (also in the README): 4000-4099 mean "reconnect, with ``since``"; 4400-4499 mean
"do not reconnect without changing something" (a new token, another room, fewer connections).

Threads: the event loop owns the connection registry, ``by_user``, the counters and every
connection's state; the stats are read on the loop (``/realtime/stats`` and ``/metrics`` are
async endpoints).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from bridge.audit_http import audit_stream, audited_room
from bridge.hub import FORBIDDEN, Delivery, Hub, HubError, Member
from bridge.hub_presence import PresenceNotifier
from bridge.hub_rights import announce_rights, rights_from_elsewhere
from bridge.realtime_outlet import Outlet, TimerWheel
from bridge.store import Store
from firstcare.auth import LEEWAY_SECONDS, TokenVerifier, claims_from_payload
from firstcare.errors import AuthError, RoomError
from firstcare.payloads import now_ms
from firstcare.permissions import Claims, can_subscribe
from firstcare.rooms import Room, parse_room
from firstcare.settings import Settings, own_origins

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
    """One WebSocket or SSE stream: its claims, its outlet (queue and write path) and what it
    has been sent. ``end`` is the transport's way to close it (a CLOSE_CODES key), synchronous."""

    def __init__(self, kind: str, claims: Claims, maxsize: int) -> None:
        self.kind = kind
        self.claims = claims
        self.id = f"{kind}-{next(_conn_ids)}-{secrets.token_hex(3)}"
        self.subscriber = Outlet(maxsize, claims.sub)
        self.joined_ms = now_ms()
        self.room_joined_ms: dict[str, int] = {}
        # A refresh of another connection of the same subject narrows this one: rooms must be
        # allowed by the refreshed claims too, and the ones they no longer allow are revoked
        # (their queued events are not sent).
        self.ceiling: Claims | None = None
        self.end: Callable[[str], None] = lambda code: None

    @property
    def revoked(self) -> set[str]:
        return self.subscriber.revoked

    @property
    def expires_at(self) -> float:
        """When the stream ends: the token's ``exp`` plus the one leeway every check uses."""
        return self.claims.exp + LEEWAY_SECONDS



class RealtimeHost(Protocol):
    """What the real-time streams need from the running bridge (bridge/app.py's Runtime)."""

    settings: Settings
    hub: Hub
    store: Store
    verifier: TokenVerifier
    node: str


class Realtime:
    """Connection registry, permission checks, presence and counters, shared by both transports."""

    def __init__(self, runtime: RealtimeHost) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.connections: dict[str, Connection] = {}
        self.by_user: Counter[str] = Counter()
        self.counters = RealtimeCounters()
        self._tasks: list[asyncio.Task[None]] = []
        self.closing = asyncio.Event()
        self.wheel = TimerWheel()
        self.presence = PresenceNotifier(runtime.hub)
        self.origins = frozenset(self.settings.allowed_origins) | own_origins(self.settings)

    @property
    def hub(self) -> Hub:
        return self.runtime.hub

    def start(self) -> None:
        self.hub.on_rights = functools.partial(rights_from_elsewhere, self)
        self.wheel.start()
        self._tasks = [asyncio.create_task(self._refresh_presence(), name="fc-presence"),
                       asyncio.create_task(self.presence.run(), name="fc-presence-announce")]

    def shut(self) -> None:
        """Server shutdown: every stream is ended now (WebSocket 4001), new ones are refused."""
        self.closing.set()
        for conn in list(self.connections.values()):
            conn.end("server_shutdown")

    async def stop(self) -> None:
        self.shut()
        self.wheel.stop()
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
            self.counters.sent += conn.subscriber.sent
            conn.subscriber.sent = 0
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
        this process and on the others sharing the hub (a refresh narrows them, it never widens
        them). Returns the rooms ``conn`` must leave; the other streams get a ``forbidden``
        control delivery per room."""
        conn.claims = claims
        conn.ceiling = None
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
        conn.subscriber.forget(room)
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
            "subscribe_refused": c.subscribe_refused, "rate_limited": c.rate_limited,
            "sent": c.sent + sum(conn.subscriber.sent for conn in self.connections.values()),
            **self.presence.counters,
            "rooms": self.hub.local_rooms(),
        }


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
    import ipaddress
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin)
        ipaddress.ip_address((parts.hostname or "").strip("[]"))
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host
