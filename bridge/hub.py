"""The fan-out hub: rooms, per-room history with offset and epoch, and bounded subscribers.

A backend is chosen by URL (``memory://``); its module is imported only when chosen.

Every publication in a room gets the id ``"<epoch>:<offset>"``. A client that comes back with
the last id it saw gets exactly what it missed from :meth:`Hub.history`, or ``None`` (resync)
when the epoch changed or the history no longer reaches back that far.

Subscribers have bounded queues. Under pressure a vitals event is dropped (counted); an alert
is never dropped: the subscriber is marked ``overflowed`` and its connection must be closed so
the client recovers through replay.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from firstcare.events import Event

DEFAULT_QUEUE = 1000
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Delivery:
    room: str
    id: str
    data: bytes
    is_alert: bool


@dataclass(eq=False)
class Subscriber:
    rooms: set[str] = field(default_factory=set)
    maxsize: int = DEFAULT_QUEUE
    id: int = field(default_factory=lambda: next(_ids))
    overflowed: bool = False
    dropped: int = 0
    queue: asyncio.Queue[Delivery] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.maxsize)

    def offer(self, delivery: Delivery) -> bool:
        """Queue without blocking the publisher; False when the delivery did not fit."""
        try:
            self.queue.put_nowait(delivery)
            return True
        except asyncio.QueueFull:
            if delivery.is_alert:
                self.overflowed = True
            else:
                self.dropped += 1
            return False

    def __aiter__(self) -> "Subscriber":
        return self

    async def __anext__(self) -> Delivery:
        return await self.queue.get()


class Hub(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, event: Event) -> list[Delivery]: ...
    def join(self, subscriber: Subscriber, room: str) -> None: ...
    def leave(self, subscriber: Subscriber, room: str) -> None: ...
    async def history(self, room: str, since: str) -> list[Delivery] | None: ...
    def stats(self) -> dict[str, int]: ...


@asynccontextmanager
async def subscription(hub: Hub, rooms: Iterable[str], maxsize: int = DEFAULT_QUEUE) -> AsyncIterator[Subscriber]:
    """Membership as a context: the subscriber leaves every room however the block ends."""
    subscriber = Subscriber(maxsize=maxsize)
    try:
        for room in rooms:
            hub.join(subscriber, room)
        yield subscriber
    finally:
        for room in list(subscriber.rooms):
            hub.leave(subscriber, room)


def open_hub(url: str, history_size: int = 1000, history_age_s: float = 3600.0) -> Hub:
    scheme = url.split(":", 1)[0]
    if scheme == "memory":
        from bridge.hub_memory import MemoryHub

        return MemoryHub(history_size=history_size, history_age_s=history_age_s)
    raise ValueError(f"unsupported hub URL scheme {scheme!r} in {url!r} (expected memory://)")
