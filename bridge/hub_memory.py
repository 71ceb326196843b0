"""In-process hub backend: one process is the whole system.

All state lives on the event loop's thread (every method is called from it)."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.hub import Delivery, HubState, Member, Publication, coalesce_key, resync_publication
from firstcare.events import Event, encode_ephemeral, envelope_parts, event_id, parse_event_id, splice
from firstcare.payloads import now_ms

LAST_SEEN_TTL_MS = 86_400_000
LAST_SEEN_PER_ROOM = 1000


@dataclass
class _Room:
    history: deque[tuple[int, float, Delivery]]
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    offset: int = 0


@dataclass
class _Presence:
    members: dict[str, tuple[Member, int]] = field(default_factory=dict)


class MemoryBackend:
    name = "memory"

    def __init__(self, history_size: int = 1000, history_age_s: float = 3600.0, presence_ttl_s: float = 60.0) -> None:
        self._history_size = history_size
        self._history_age_s = history_age_s
        self._presence_ttl_ms = int(presence_ttl_s * 1000)
        self._rooms: dict[str, _Room] = {}
        self._presence: dict[str, _Presence] = {}
        self._seen: dict[str, dict[str, int]] = {}
        self._tickets: dict[str, tuple[str, float]] = {}
        self._deliver: Callable[[Publication], None] = lambda p: None

    async def start(self, deliver: Callable[[Publication], None]) -> None:
        self._deliver = deliver

    async def stop(self) -> None:
        self._rooms.clear()

    async def publish(self, event: Event, rooms: list[str]) -> Publication:
        now = time.monotonic()
        key = coalesce_key(event)
        parts = envelope_parts(event)  # the event's data encoded once, for all its rooms
        deliveries = []
        for name in rooms:
            room = self._rooms.get(name)
            if room is None:
                room = self._rooms[name] = _Room(deque(maxlen=self._history_size))
            room.offset += 1
            id = event_id(room.epoch, room.offset)
            delivery = Delivery(name, id, splice(parts, name, id), event.is_alert, key)
            room.history.append((room.offset, now, delivery))
            deliveries.append(delivery)
        publication = Publication(tuple(deliveries))
        self._deliver(publication)
        return publication

    async def announce(self, event: Event, rooms: list[str], origin: str) -> None:
        self._deliver(Publication(tuple(Delivery(room, "", encode_ephemeral(event, room)) for room in rooms),
                                  "presence", origin))

    async def announce_rights(self, claims: str, origin: str) -> None:
        """One process: its own streams were narrowed where the refresh happened."""

    async def history(self, room: str, since: str) -> list[Delivery] | None:
        try:
            epoch, offset = parse_event_id(since)
        except ValueError:
            return None
        state = self._rooms.get(room)
        if state is None or epoch != state.epoch or offset > state.offset:
            return None
        if state.offset - offset > self._history_size:
            return None
        cutoff = time.monotonic() - self._history_age_s
        kept = [(o, d) for o, t, d in state.history if t >= cutoff]
        oldest = kept[0][0] if kept else state.offset + 1
        if offset + 1 < oldest:
            return None
        return [d for o, d in kept if o > offset]

    async def position(self, room: str) -> str | None:
        state = self._rooms.get(room)
        return event_id(state.epoch, state.offset) if state is not None and state.offset else None

    async def presence_join(self, room: str, member: Member) -> None:
        now = now_ms()
        self._presence.setdefault(room, _Presence()).members[member.conn_id] = (member, now)
        self._saw(room, member.user, now)

    async def presence_leave(self, room: str, member: Member) -> None:
        state = self._presence.get(room)
        if state is not None:
            state.members.pop(member.conn_id, None)
            if not state.members:
                del self._presence[room]
        self._saw(room, member.user, now_ms())

    async def presence_refresh(self, memberships: list[tuple[str, Member]]) -> None:
        now = now_ms()
        for room, member in memberships:
            self._presence.setdefault(room, _Presence()).members[member.conn_id] = (member, now)
            self._saw(room, member.user, now)

    def _saw(self, room: str, user: str, at_ms: int) -> None:
        """Last seen per user and room, bounded: a day, and the newest users of each room."""
        seen = self._seen.setdefault(room, {})
        seen.pop(user, None)
        seen[user] = at_ms  # insertion order is recency order
        cutoff = at_ms - LAST_SEEN_TTL_MS
        while seen and (len(seen) > LAST_SEEN_PER_ROOM or next(iter(seen.values())) < cutoff):
            del seen[next(iter(seen))]

    async def last_seen(self, room: str) -> dict[str, int]:
        cutoff = now_ms() - LAST_SEEN_TTL_MS
        return {user: at for user, at in self._seen.get(room, {}).items() if at >= cutoff}

    async def presence(self, room: str) -> list[dict[str, Any]]:
        state = self._presence.get(room)
        if state is None:
            return []
        cutoff = now_ms() - self._presence_ttl_ms
        return [{"conn_id": m.conn_id, "user": m.user, "node": m.node, "joined_ms": m.joined_ms, "last_seen_ms": seen}
                for m, seen in state.members.values() if seen >= cutoff]

    async def put_ticket(self, ticket: str, value: str, ttl_s: int) -> None:
        now = time.monotonic()
        self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
        self._tickets[ticket] = (value, now + ttl_s)

    async def take_ticket(self, ticket: str) -> str | None:
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def mark_lost(self, rooms: list[str]) -> None:
        """Events of these rooms were never published: start the rooms over in a new epoch, so
        a client replaying from before is told to resync instead of silently missing them, and
        tell the connected ones now."""
        for room in rooms:
            self._rooms.pop(room, None)
        if rooms:
            self._deliver(resync_publication(rooms))

    def state(self) -> HubState:
        return HubState.OK

    def stats(self) -> dict[str, Any]:
        return {"history_rooms": len(self._rooms)}
