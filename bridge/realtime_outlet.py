"""The write path: from the hub's dispatch loop to the socket, and the one timer wheel.

    Hub._dispatch -> Outlet.offer(delivery)
        writable, nothing queued, not replaying -> sink.write_frame(frame)  (synchronous: no task
                                                    is woken, no timer is armed, no ASGI message)
        otherwise                               -> the bounded queue (Subscriber's rules: vitals
                                                    coalesced then dropped, an alert that does not
                                                    fit closes the connection with 4000)
    transport resumes / replay ends             -> Outlet.drain(): the queue in order, while writable

The frame of a delivery is made once per room (``bridge.realtime_wire``), whatever the number of
connections. A connection is a slow consumer when its transport stayed paused (write buffer above
the high-water mark) for ``FC_WS_SEND_TIMEOUT_SECONDS``, or when an alert does not fit its queue;
the first is found by the timer wheel, the second at once. Replies to the client (``pong``,
``subscribed``...) go through the same path, so they are ordered with the events.

:class:`TimerWheel`: one timer for every connection's keepalive, token expiry and slow-consumer
age, not a task or a timer per connection. Items are looked at when their slot comes round; an
item looks at everything it is due for and names its next time itself, so a stale slot is harmless.

Threads: the event loop owns every outlet, its queue and the wheel (the hub dispatches, the
transport calls ``on_resume`` and the wheel turns on it).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Protocol

from bridge.hub import Delivery, Offer, Subscriber
from bridge.server import FrameSink
from firstcare.events import parse_event_id

FRAME = "frame"  # control of a queued delivery whose ``data`` is an encoded frame (a reply)


class Transport(Protocol):
    """What a stream kind (WebSocket, SSE) does with what the outlet cannot write as is."""

    def control(self, delivery: Delivery) -> bytes | None:
        """The frame for a control delivery (resync, forbidden), or None; may close the stream."""
        ...

    def overflow(self) -> None:
        """An alert did not fit the queue: close the stream (4000)."""
        ...

    def paused(self, since: float) -> None:
        """The transport has been paused since ``since`` (loop time) and deliveries queue."""
        ...


class Outlet(Subscriber):
    """A subscriber that writes to its socket from the dispatch loop when it can."""


    def __init__(self, maxsize: int, owner: str) -> None:
        super().__init__(maxsize=maxsize, owner=owner)
        self.sink: FrameSink | None = None  # None: queue only (a stream read by its own task)
        self.encode: Callable[[Delivery], bytes] = lambda d: d.data
        self.transport: Transport | None = None
        self.holds = 0  # > 0 while a replay is written: live deliveries wait in the queue
        self.last_sent: dict[str, str] = {}  # room -> id of the last event sent
        self.replayed: dict[str, tuple[str, int]] = {}  # room -> (epoch, offset) a replay sent up to
        self.revoked: set[str] = set()  # rooms taken away by a refreshed token: queued events are not sent
        self.sent = 0
        self.pause_noted: float | None = None

    def attach(self, sink: FrameSink, encode: Callable[[Delivery], bytes], transport: Transport) -> None:
        self.sink, self.encode, self.transport = sink, encode, transport
        sink.on_resume = self.drain

    # --- from the dispatch loop ---------------------------------------------------------------

    def offer(self, delivery: Delivery) -> Offer:
        sink = self.sink
        if sink is not None and not self._items and not self.holds and sink.paused_since is None:
            if delivery.control is None:
                if delivery.id:
                    self.last_sent[delivery.room] = delivery.id
                sink.write_frame(self.encode(delivery))
                self.sent += 1
                return Offer.SENT
            self._emit(delivery)
            return Offer.SENT
        outcome = super().offer(delivery)
        if sink is not None and self.transport is not None:
            if outcome == "overflow":
                self.transport.overflow()
            elif sink.paused_since is not None and sink.paused_since != self.pause_noted:
                self.pause_noted = sink.paused_since
                self.transport.paused(sink.paused_since)
        return outcome

    def send(self, frame: bytes) -> None:
        """A reply to the client, in order with the events; never dropped (an outlet too full
        to take it overflows)."""
        self.offer(Delivery("", "", frame, True, None, FRAME))

    # --- queue ---------------------------------------------------------------------------------

    def fresh(self, delivery: Delivery) -> bool:
        """False for a queued event a replay has already sent. Only the replay's own mark counts:
        a coalesced vitals slot carries a newer offset than the events queued behind it, which
        must still be sent (an alert among them above all)."""
        if not delivery.id:
            return True  # ephemeral (presence): no cursor
        mark = self.replayed.get(delivery.room) if self.replayed else None
        if mark is not None:
            epoch, offset = parse_event_id(delivery.id)
            if epoch == mark[0] and offset <= mark[1]:
                return False
        self.last_sent[delivery.room] = delivery.id
        return True

    def replay_fresh(self, delivery: Delivery) -> bool:
        """False for a replayed event already sent live (a subscribe again with an older
        ``since``); otherwise it is marked, so the live queue behind the replay skips it."""
        epoch, offset = parse_event_id(delivery.id)
        last = self.last_sent.get(delivery.room)
        if last is not None:
            last_epoch, last_offset = parse_event_id(last)
            if last_epoch == epoch and offset <= last_offset:
                return False
        self.last_sent[delivery.room] = delivery.id
        self.replayed[delivery.room] = (epoch, offset)
        return True

    def forget(self, room: str) -> None:
        """``room`` was left (or its history restarted): its cursors go."""
        self.last_sent.pop(room, None)
        self.replayed.pop(room, None)

    def _emit(self, delivery: Delivery) -> None:
        sink = self.sink
        assert sink is not None and self.transport is not None
        if delivery.control is None:
            if self.revoked and delivery.room in self.revoked and delivery.room not in self.rooms:
                return  # queued before the room was taken away
            if self.fresh(delivery):
                sink.write_frame(self.encode(delivery))
                self.sent += 1
        elif delivery.control == FRAME:
            sink.write_frame(delivery.data)
        else:
            frame = self.transport.control(delivery)
            if frame is not None:
                sink.write_frame(frame)

    def drain(self) -> None:
        """Write what is queued, in order, while the transport takes it (on resume, after a
        replay)."""
        sink = self.sink
        if sink is None or self.holds:
            return
        while self._items and sink.paused_since is None and sink.open:
            delivery = self.get_nowait()
            if delivery is not None:
                self._emit(delivery)

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        self.drain()

    def write_now(self, frame: bytes) -> None:
        """Bypass the queue (a replay, written while live deliveries wait behind it)."""
        if self.sink is not None:
            self.sink.write_frame(frame)


class Ticking(Protocol):
    def tick(self, now: float) -> float | None:
        """Do what is due at ``now``; the next time to be looked at, or None."""
        ...


class TimerWheel:
    """One ``call_later`` chain for all connections, in slots of ``resolution`` seconds."""

    def __init__(self, resolution: float = 0.5) -> None:
        self.resolution = resolution
        self._slots: dict[int, set[Ticking]] = {}
        self._keys: list[int] = []
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.turns = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.resolution, self._turn)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._slots.clear()
        self._keys.clear()

    def at(self, when: float, item: Ticking) -> None:
        key = math.ceil(when / self.resolution)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            heapq.heappush(self._keys, key)
        slot.add(item)

    def discard(self, item: Ticking) -> None:
        for slot in self._slots.values():
            slot.discard(item)

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def _turn(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.turns += 1
        try:
            while self._keys and self._keys[0] * self.resolution <= now:
                for item in self._slots.pop(heapq.heappop(self._keys), ()):
                    upcoming = item.tick(now)
                    if upcoming is not None:
                        self.at(max(upcoming, now + self.resolution), item)
        finally:
            self._handle = self._loop.call_later(self.resolution, self._turn)
