"""In-process hub: one process is the whole system."""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from bridge.hub import Delivery, Subscriber
from bridge.router import rooms_for
from firstcare.events import Event, encode_envelope, event_id, parse_event_id


@dataclass
class _Room:
    history: deque[tuple[int, float, Delivery]]
    subscribers: set[Subscriber] = field(default_factory=set)
    offset: int = 0


class MemoryHub:
    def __init__(self, history_size: int = 1000, history_age_s: float = 3600.0) -> None:
        self.epoch = secrets.token_hex(4)
        self._history_size = history_size
        self._history_age_s = history_age_s
        self._rooms: dict[str, _Room] = {}
        self.counters = {"published": 0, "deliveries": 0, "dropped": 0, "overflowed": 0}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._rooms.clear()

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = _Room(deque(maxlen=self._history_size))
        return room

    async def publish(self, event: Event) -> list[Delivery]:
        self.counters["published"] += 1
        now = time.monotonic()
        reached: set[Subscriber] = set()
        deliveries = []
        for name in rooms_for(event):
            room = self._room(name)
            room.offset += 1
            delivery = Delivery(name, event_id(self.epoch, room.offset),
                                encode_envelope(event, name, event_id(self.epoch, room.offset)), event.is_alert)
            room.history.append((room.offset, now, delivery))
            deliveries.append(delivery)
            for subscriber in room.subscribers - reached:
                reached.add(subscriber)
                if subscriber.offer(delivery):
                    self.counters["deliveries"] += 1
                elif delivery.is_alert:
                    self.counters["overflowed"] += 1
                else:
                    self.counters["dropped"] += 1
        return deliveries

    def join(self, subscriber: Subscriber, room: str) -> None:
        self._room(room).subscribers.add(subscriber)
        subscriber.rooms.add(room)

    def leave(self, subscriber: Subscriber, room: str) -> None:
        state = self._rooms.get(room)
        if state is not None:
            state.subscribers.discard(subscriber)
        subscriber.rooms.discard(room)

    async def history(self, room: str, since: str) -> list[Delivery] | None:
        try:
            epoch, offset = parse_event_id(since)
        except ValueError:
            return None
        state = self._rooms.get(room)
        if epoch != self.epoch or state is None:
            return None
        if offset > state.offset:
            return None
        cutoff = time.monotonic() - self._history_age_s
        kept = [(o, d) for o, t, d in state.history if t >= cutoff]
        oldest = kept[0][0] if kept else state.offset + 1
        if offset + 1 < oldest:
            return None
        return [d for o, d in kept if o > offset]

    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "rooms": len(self._rooms),
            "subscribers": len({s for r in self._rooms.values() for s in r.subscribers}),
        }
