"""The fan-out hub: rooms, per-room history with offset and epoch, presence, bounded subscribers.

    Hub (this module)                       one per process; owns the local subscribers
      publish(event) -> backend.publish     history + cross-process broadcast
      backend -> Hub._dispatch(publication) the one place where local fan-out happens
    HubBackend: hub_memory.MemoryBackend (memory://) | hub_redis.RedisBackend (redis://...)

Backends never see local subscribers; the backend module is imported only when its URL is
chosen. Every publication in a room gets the id ``"<epoch>:<offset>"``: a client that comes
back with the last id it saw gets exactly what it missed from :meth:`Hub.history`, or ``None``
(resync) when the epoch changed or the history no longer reaches back that far. "Reaches back"
is decided from the room's own offsets, never from what a bounded read returned: a room keeps
the last ``history_size`` offsets (and ``history_age_s`` seconds), on every backend alike.

Continuity loss is always told. When a backend could not record a publication (Redis down, the
outbox full), the rooms it would have reached start a new epoch before the next publication is
accepted, and every process sharing the hub delivers a ``resync`` control delivery to its
subscribers of those rooms. Presence announcements (``presence.join`` / ``presence.leave``) are
ephemeral: they reach the members of a room but never its history, so they cannot push clinical
events out of it.

Subscribers have bounded queues. Under pressure a vitals delivery replaces the older queued one
from the same device in the same room (coalesced) or, failing that, is dropped; an alert is
never dropped: the subscriber is marked ``overflowed`` and its connection must be closed so the
client recovers through replay. Every drop, coalesce and overflow is counted. A subscriber may
write a delivery to its socket at once instead of queuing it (``offer`` returns ``sent``: the
WebSocket outlet of bridge/realtime_outlet.py); the queue is then used only while it cannot.

Threads: the event loop owns the hub, its rooms, subscribers and counters; read them (stats)
on the loop only. ``on_dispatch`` (optional) is told, on the loop, how many local subscribers
each publication reached: the latency metrics' "first delivery".
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from bridge.router import rooms_for
from firstcare.errors import FirstCareError
from firstcare.events import Event, parse_event_id

DEFAULT_QUEUE = 1000
COALESCE_FROM = 0.5  # fraction of the queue in use from which vitals are coalesced


class Offer(StrEnum):
    """What :meth:`Subscriber.offer` did with a delivery (counted per publication)."""

    SENT = "sent"  # written straight to the connection (bridge.realtime_outlet), nothing queued
    QUEUED = "queued"
    COALESCED = "coalesced"  # replaced a queued older vitals update of the same device and room
    DROPPED = "dropped"  # a vitals update that did not fit
    OVERFLOW = "overflow"  # an alert that did not fit: the connection is closed


class HubState(StrEnum):
    """A hub backend's health, as ``/readyz`` reports it (``checks.hub``)."""

    STARTING = "starting"
    OK = "ok"
    DEGRADED = "degraded"  # Redis unreachable: deliveries stay local, rooms marked for resync


class HubError(FirstCareError):
    reason = "hub_unavailable"


RESYNC = "resync"  # control: the room's history has a gap; reload from the REST API
FORBIDDEN = "forbidden"  # control (local only): the connection's token no longer allows the room
RIGHTS = "rights"  # a subject's refreshed claims, for every process's streams of that subject


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a subscriber receives. ``id`` is ``""`` for ephemeral events (presence) and
    control deliveries; ``control`` names a control delivery (``data`` is then empty)."""

    room: str
    id: str
    data: bytes
    is_alert: bool = False
    coalesce_key: str | None = None
    control: str | None = None

    @property
    def offset(self) -> int:
        return parse_event_id(self.id)[1]


@dataclass(frozen=True, slots=True)
class Publication:
    """One event as published: a delivery per room, most specific room first.

    ``kind`` is ``event`` (a subscriber in several of its rooms gets it once), ``presence``
    (ephemeral; not delivered to the subscribers of ``origin``, the user it is about) or
    ``resync`` (a control delivery per room: a subscriber gets one for each of its rooms)."""

    deliveries: tuple[Delivery, ...]
    kind: str = "event"
    origin: str | None = None


def resync_publication(rooms: Iterable[str]) -> Publication:
    """Never dropped (``is_alert``): a subscriber that cannot take it overflows and is closed,
    and its reconnect with ``since`` meets the new epoch, which is a resync too."""
    return Publication(tuple(Delivery(room, "", b"", True, None, RESYNC) for room in rooms), RESYNC)


def coalesce_key(event: Event) -> str | None:
    """Vitals from one device supersede each other; nothing else may be merged."""
    if event.name in ("patient.vitals.update", "device.data.update"):
        return f"{event.data.get('device_type')}:{event.data.get('device_id')}"
    return None


class _Slot:
    """A queue entry whose delivery a newer one from the same device may replace in place."""

    __slots__ = ("delivery",)

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery


class Subscriber:
    """A bounded, non-blocking inbox for one connection. Every operation is O(1): the newest
    queued vitals slot of each (room, device) is indexed, so coalescing never scans the queue."""

    def __init__(self, maxsize: int = DEFAULT_QUEUE, owner: str = "") -> None:
        self.maxsize = maxsize
        self.owner = owner
        self.rooms: set[str] = set()
        self.overflowed = False
        self.dropped = 0
        self.coalesced = 0
        self._items: deque[_Slot] = deque()
        self._latest: dict[tuple[str, str], _Slot] = {}
        self._coalesce_from = maxsize * COALESCE_FROM
        self._ready: asyncio.Event | None = None  # made by the first get(): an outlet never waits

    def offer(self, delivery: Delivery) -> Offer:
        """Queue without ever blocking the publisher. Returns ``queued``, ``coalesced``,
        ``dropped`` or ``overflow`` (an alert that did not fit: close the connection); a
        subclass that writes the delivery out at once returns ``sent``
        (bridge/realtime_outlet.py)."""
        items = self._items
        key = (delivery.room, delivery.coalesce_key) if delivery.coalesce_key is not None else None
        if key is not None and len(items) >= self._coalesce_from:
            slot = self._latest.get(key)
            if slot is not None:
                slot.delivery = delivery
                self.coalesced += 1
                return Offer.COALESCED
        if len(items) >= self.maxsize:
            if delivery.is_alert:
                self.overflowed = True
                if self._ready is not None:
                    self._ready.set()
                return Offer.OVERFLOW
            self.dropped += 1
            return Offer.DROPPED
        slot = _Slot(delivery)
        items.append(slot)
        if key is not None:
            self._latest[key] = slot
        if self._ready is not None:
            self._ready.set()
        return Offer.QUEUED

    def qsize(self) -> int:
        return len(self._items)

    def get_nowait(self) -> Delivery | None:
        if not self._items:
            if self._ready is not None:
                self._ready.clear()
            return None
        slot = self._items.popleft()
        delivery = slot.delivery
        if delivery.coalesce_key is not None:
            key = (delivery.room, delivery.coalesce_key)
            if self._latest.get(key) is slot:
                del self._latest[key]
        return delivery

    async def get(self) -> Delivery:
        """The next delivery; raises :class:`HubError` once the subscriber has overflowed."""
        while True:
            if self.overflowed:
                raise HubError("subscriber overflowed: an alert did not fit its queue", "slow_consumer")
            item = self.get_nowait()
            if item is not None:
                return item
            if self._ready is None:
                self._ready = asyncio.Event()
            await self._ready.wait()

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Delivery:
        return await self.get()


@dataclass(frozen=True, slots=True)
class Member:
    conn_id: str
    user: str
    node: str
    joined_ms: int


class HubBackend(Protocol):
    name: str

    async def start(self, deliver: Callable[[Publication], None]) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, event: Event, rooms: list[str]) -> Publication: ...
    async def announce(self, event: Event, rooms: list[str], origin: str) -> None: ...
    async def announce_rights(self, claims: str, origin: str) -> None: ...
    async def history(self, room: str, since: str) -> list[Delivery] | None: ...
    async def position(self, room: str) -> str | None: ...
    async def presence_join(self, room: str, member: Member) -> None: ...
    async def presence_leave(self, room: str, member: Member) -> None: ...
    async def presence_refresh(self, memberships: list[tuple[str, Member]]) -> None: ...
    async def presence(self, room: str) -> list[dict[str, Any]]: ...
    async def last_seen(self, room: str) -> dict[str, int]: ...
    async def put_ticket(self, ticket: str, value: str, ttl_s: int) -> None: ...
    async def take_ticket(self, ticket: str) -> str | None: ...
    def mark_lost(self, rooms: list[str]) -> None: ...
    def state(self) -> HubState: ...
    def stats(self) -> dict[str, Any]: ...


class RateMeter:
    """Events per second over the last ``window`` seconds."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.total = 0
        self._buckets: deque[list[int]] = deque()

    def add(self, n: int = 1) -> None:
        self.total += n
        now = int(time.monotonic())
        if self._buckets and self._buckets[-1][0] == now:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([now, n])
        while self._buckets and self._buckets[0][0] <= now - self.window:
            self._buckets.popleft()

    def rate(self) -> float:
        now = int(time.monotonic())
        return round(sum(n for t, n in self._buckets if t > now - self.window) / self.window, 2)


@dataclass
class HubCounters:
    published: RateMeter = field(default_factory=RateMeter)
    delivered: RateMeter = field(default_factory=RateMeter)
    dropped: int = 0
    coalesced: int = 0
    overflowed: int = 0
    publish_failures: int = 0
    resyncs_sent: int = 0
    rights_received: int = 0  # refreshed claims announced by other processes
    rights_unannounced: int = 0  # refreshed claims this process could not announce (hub down)


class Hub:
    def __init__(self, backend: HubBackend) -> None:
        self.backend = backend
        self._rooms: dict[str, set[Subscriber]] = {}
        self.counters = HubCounters()
        self.on_dispatch: Callable[[Publication, int], None] | None = None
        # told, on the loop, of a subject's refreshed claims announced by another process
        self.on_rights: Callable[[str], None] | None = None

    async def start(self) -> None:
        await self.backend.start(self._dispatch)

    async def stop(self) -> None:
        await self.backend.stop()
        self._rooms.clear()

    async def publish(self, event: Event, rooms: list[str] | None = None) -> Publication:
        """Publish to the router's rooms for ``event`` (or to ``rooms``); raises HubError."""
        try:
            publication = await self.backend.publish(event, rooms if rooms is not None else rooms_for(event))
        except HubError:
            self.counters.publish_failures += 1
            raise
        self.counters.published.add()
        return publication

    async def announce(self, event: Event, rooms: list[str], origin: str) -> None:
        """An ephemeral event (presence): to the rooms' members on every process, never into a
        room's history and never to ``origin``'s own connections. Raises HubError."""
        await self.backend.announce(event, rooms, origin)

    async def announce_rights(self, claims: str) -> None:
        """A subject's refreshed claims (JSON), to every other process sharing the hub: each
        narrows its own streams of that subject (bridge.realtime). Raises HubError."""
        await self.backend.announce_rights(claims, getattr(self.backend, "node", ""))

    def _dispatch(self, publication: Publication) -> None:
        if publication.kind == RIGHTS:
            own = publication.origin == getattr(self.backend, "node", None)
            if self.on_rights is not None and publication.deliveries and not own:
                self.on_rights(publication.deliveries[0].data.decode())
            return
        c = self.counters
        deliveries = publication.deliveries
        rooms = self._rooms
        outcomes: dict[str, int] = {"sent": 0, "queued": 0, "coalesced": 0, "dropped": 0, "overflow": 0}
        if publication.kind != "event":
            self._dispatch_special(publication, outcomes)
        elif len(deliveries) == 1:
            delivery = deliveries[0]
            for subscriber in rooms.get(delivery.room, ()):
                outcomes[subscriber.offer(delivery)] += 1
        else:
            reached: set[Subscriber] = set()
            for delivery in deliveries:
                for subscriber in rooms.get(delivery.room, ()):
                    if subscriber not in reached:
                        reached.add(subscriber)
                        outcomes[subscriber.offer(delivery)] += 1
        delivered = outcomes["sent"] + outcomes["queued"]
        if delivered:
            c.delivered.add(delivered)
        c.coalesced += outcomes["coalesced"]
        c.dropped += outcomes["dropped"]
        c.overflowed += outcomes["overflow"]
        if self.on_dispatch is not None and publication.kind == "event":  # committed events only
            self.on_dispatch(publication, delivered + outcomes["coalesced"])

    def _dispatch_special(self, publication: Publication, outcomes: dict[str, int]) -> None:
        if publication.kind == RESYNC:
            self.counters.resyncs_sent += len(publication.deliveries)
            for delivery in publication.deliveries:  # one per room: the cursor of each room is gone
                for subscriber in self._rooms.get(delivery.room, ()):
                    outcomes[subscriber.offer(delivery)] += 1
            return
        origin = publication.origin
        reached: set[Subscriber] = set()
        for delivery in publication.deliveries:
            for subscriber in self._rooms.get(delivery.room, ()):
                if subscriber.owner != origin and subscriber not in reached:
                    reached.add(subscriber)
                    outcomes[subscriber.offer(delivery)] += 1

    def join(self, subscriber: Subscriber, room: str) -> None:
        self._rooms.setdefault(room, set()).add(subscriber)
        subscriber.rooms.add(room)

    def leave(self, subscriber: Subscriber, room: str) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._rooms[room]
        subscriber.rooms.discard(room)

    def leave_all(self, subscriber: Subscriber) -> None:
        for room in list(subscriber.rooms):
            self.leave(subscriber, room)

    async def history(self, room: str, since: str) -> list[Delivery] | None:
        return await self.backend.history(room, since)

    def local_rooms(self) -> dict[str, int]:
        return {room: len(members) for room, members in self._rooms.items()}

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "backend": self.backend.name, "backend_state": self.backend.state(),
            "published": c.published.total, "published_per_s": c.published.rate(),
            "delivered": c.delivered.total, "delivered_per_s": c.delivered.rate(),
            "dropped": c.dropped, "coalesced": c.coalesced, "overflowed": c.overflowed,
            "publish_failures": c.publish_failures, "resyncs_sent": c.resyncs_sent,
            "rights_received": c.rights_received, "rights_unannounced": c.rights_unannounced, "rooms": len(self._rooms),
            "subscribers": len({s for members in self._rooms.values() for s in members}),
            **{f"backend_{k}": v for k, v in self.backend.stats().items()},
        }


@asynccontextmanager
async def subscription(hub: Hub, rooms: Iterable[str], maxsize: int = DEFAULT_QUEUE) -> AsyncIterator[Subscriber]:
    """Membership as a context: the subscriber leaves every room however the block ends."""
    subscriber = Subscriber(maxsize=maxsize)
    try:
        for room in rooms:
            hub.join(subscriber, room)
        yield subscriber
    finally:
        hub.leave_all(subscriber)


def open_hub(url: str, history_size: int = 1000, history_age_s: float = 3600.0, node: str = "") -> Hub:
    """``memory://`` or ``redis://host:port/db``; the backend module is imported only when chosen."""
    scheme = url.split(":", 1)[0]
    if scheme == "memory":
        from bridge.hub_memory import MemoryBackend

        return Hub(MemoryBackend(history_size=history_size, history_age_s=history_age_s))
    if scheme in ("redis", "rediss"):
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        from bridge.hub_redis import RedisBackend

        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        prefix = query.pop("prefix", "fc:hub:")
        plain = urlunsplit(parts._replace(query=urlencode(query)))
        return Hub(RedisBackend(plain, history_size=history_size, history_age_s=history_age_s, node=node,
                                prefix=prefix))
    raise ValueError(f"unsupported hub URL scheme {scheme!r} in {url!r} (expected memory:// or redis://)")
