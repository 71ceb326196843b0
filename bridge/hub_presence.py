"""Presence announcements: ``presence.join`` / ``presence.leave`` to a room's members, bounded.

Who is in a room lives in the hub backend (every process sharing it); this module tells the
members when that changes. Local joins and leaves are noted as they happen and announced at
most once per room per interval (``PRESENCE_INTERVAL_S``), so a reconnect storm cannot flood a
room:

- a user who left and came back within the interval (a reconnect) is not announced at all;
- a user ``joins`` when every connection they now have in the room, on any process, arrived in
  the interval; they ``leave`` when they have none left;
- at most ``PRESENCE_MAX_PER_ROOM`` announcements per room and interval; the rest are counted
  (``presence_suppressed``) and the last announcement says how many were left out, so a client
  that cares reloads ``GET /realtime/presence``.

Announcements are ephemeral (never in a room's history, ``id: null``) and are not delivered to
the connections of the user they are about. The notifier's state is owned by the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from bridge.hub import Hub, HubError, Member
from firstcare.events import make_event
from firstcare.payloads import now_ms

log = logging.getLogger("firstcare.presence")

PRESENCE_INTERVAL_S = 1.0
PRESENCE_MAX_PER_ROOM = 20


@dataclass
class Window:
    """What happened in one room during one interval, on this process."""

    joined: dict[str, str] = field(default_factory=dict)  # conn_id -> user
    left: dict[str, str] = field(default_factory=dict)


def presence_changes(window: Window, members: list[dict[str, Any]], since_ms: int) -> list[tuple[str, str, int]]:
    """``(user, "join" | "leave", connections now)`` for each user whose presence in the room
    changed, from this process's window and the room's members now (every process).

    >>> w = Window(joined={"c2": "bob", "c3": "ann"}, left={"c1": "ann", "c9": "eve"})
    >>> now = [{"conn_id": "c2", "user": "bob", "joined_ms": 10}, {"conn_id": "c3", "user": "ann", "joined_ms": 11}]
    >>> presence_changes(w, now, since_ms=5)
    [('bob', 'join', 1), ('eve', 'leave', 0)]
    """
    now: dict[str, set[str]] = {}
    new = set(window.joined)
    for m in members:
        now.setdefault(m["user"], set()).add(m["conn_id"])
        if m.get("joined_ms", 0) >= since_ms:
            new.add(m["conn_id"])
    changes = []
    for user in sorted(set(window.joined.values()) | set(window.left.values())):
        after = now.get(user, set())
        before = (after - new) | {c for c, u in window.left.items() if u == user and c not in window.joined}
        if after and not before:
            changes.append((user, "join", len(after)))
        elif before and not after:
            changes.append((user, "leave", 0))
    return changes


class PresenceNotifier:
    def __init__(self, hub: Hub, interval_s: float = PRESENCE_INTERVAL_S,
                 max_per_room: int = PRESENCE_MAX_PER_ROOM) -> None:
        self.hub = hub
        self.interval_s = interval_s
        self.max_per_room = max_per_room
        self._windows: dict[str, Window] = {}
        self._since_ms = now_ms()
        self.counters = {"presence_announced": 0, "presence_suppressed": 0, "presence_failures": 0}

    def joined(self, room: str, member: Member) -> None:
        self._windows.setdefault(room, Window()).joined[member.conn_id] = member.user

    def left(self, room: str, member: Member) -> None:
        self._windows.setdefault(room, Window()).left[member.conn_id] = member.user

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - presence must never stop for one bad interval
                self.counters["presence_failures"] += 1
                log.exception("presence announcement failed")

    async def flush(self) -> None:
        windows, self._windows = self._windows, {}
        since, self._since_ms = self._since_ms, now_ms()
        for room, window in windows.items():
            try:
                members = await self.hub.backend.presence(room)
                changes = presence_changes(window, members, since)
                announced = changes[:self.max_per_room]
                suppressed = len(changes) - len(announced)
                for i, (user, kind, connections) in enumerate(announced):
                    data: dict[str, Any] = {"room": room, "user": user, "connections": connections}
                    if suppressed and i == len(announced) - 1:
                        data["suppressed"] = suppressed
                    await self.hub.announce(make_event(f"presence.{kind}", data), [room], user)
            except HubError:
                self.counters["presence_failures"] += 1
                continue
            self.counters["presence_announced"] += len(announced)
            self.counters["presence_suppressed"] += suppressed
