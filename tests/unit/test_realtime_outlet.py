"""The write path without sockets: an outlet writes to a writable sink at once, queues while it is
paused or a replay is written, drains in order, keeps the queue's rules; the timer wheel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bridge.hub import FORBIDDEN, RESYNC, Delivery, Hub
from bridge.hub_memory import MemoryBackend
from bridge.realtime_outlet import Outlet, TimerWheel
from bridge.realtime_wire import FrameCache, sse_event, ws_text_frame


class FakeSink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.paused_since: float | None = None
        self.on_resume: Callable[[], None] | None = None
        self.closed: tuple[int, str] | None = None

    @property
    def open(self) -> bool:
        return self.closed is None

    def buffered(self) -> int:
        return 0

    def write_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close_now(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def pause(self) -> None:
        self.paused_since = 1.0

    def resume(self) -> None:
        self.paused_since = None
        assert self.on_resume is not None
        self.on_resume()


class FakeTransport:
    def __init__(self) -> None:
        self.overflows = 0
        self.paused_at: list[float] = []
        self.controls: list[Delivery] = []

    def control(self, delivery: Delivery) -> bytes | None:
        self.controls.append(delivery)
        return f"<{delivery.control}:{delivery.room}>".encode()

    def overflow(self) -> None:
        self.overflows += 1

    def paused(self, since: float) -> None:
        self.paused_at.append(since)


def outlet(maxsize: int = 10) -> tuple[Outlet, FakeSink, FakeTransport]:
    out, sink, transport = Outlet(maxsize, "dr"), FakeSink(), FakeTransport()
    out.attach(sink, lambda d: d.data, transport)
    out.rooms.add("r")
    return out, sink, transport


def event(offset: int, *, alert: bool = False, key: str | None = None, room: str = "r") -> Delivery:
    return Delivery(room, f"e:{offset}", f"{room}#{offset}".encode(), alert, key)


def test_a_writable_sink_gets_each_delivery_at_once_and_nothing_is_queued() -> None:
    out, sink, _ = outlet()
    assert [out.offer(event(i)) for i in (1, 2)] == ["sent", "sent"]
    assert sink.frames == [b"r#1", b"r#2"] and out.qsize() == 0 and out.sent == 2
    assert out.last_sent == {"r": "e:2"}


def test_a_paused_sink_queues_and_its_resume_drains_in_order_behind_replies() -> None:
    out, sink, transport = outlet()
    out.offer(event(1))
    sink.pause()
    assert out.offer(event(2)) == "queued"
    out.send(b"pong")
    assert out.offer(event(3)) == "queued"
    assert sink.frames == [b"r#1"] and transport.paused_at == [1.0]
    sink.resume()
    assert sink.frames == [b"r#1", b"r#2", b"pong", b"r#3"] and out.qsize() == 0
    assert out.offer(event(4)) == "sent"


def test_while_paused_the_queue_keeps_its_rules_coalesce_drop_and_alert_overflow() -> None:
    out, sink, transport = outlet(maxsize=4)
    sink.pause()
    for i, key in enumerate((None, "ox-1", "ox-2", "ox-3"), start=1):
        assert out.offer(event(i, key=key)) == "queued"
    assert out.offer(event(5, key="ox-1")) == "coalesced"
    assert out.offer(event(6)) == "dropped"
    assert out.offer(event(7, alert=True)) == "overflow" and transport.overflows == 1 and out.overflowed
    sink.resume()
    assert sink.frames == [b"r#1", b"r#5", b"r#3", b"r#4"]


def test_a_replay_holds_live_deliveries_and_what_it_sent_is_not_sent_twice() -> None:
    out, sink, _ = outlet()
    out.hold()
    out.offer(event(3))  # live, published while the history is read
    out.offer(event(4))
    for d in (event(2), event(3)):  # the replay overlaps the live queue
        if out.replay_fresh(d):
            out.write_now(d.data)
    assert sink.frames == [b"r#2", b"r#3"]
    out.release()
    assert sink.frames == [b"r#2", b"r#3", b"r#4"]


def test_controls_go_through_the_transport_and_revoked_rooms_are_not_sent() -> None:
    out, sink, transport = outlet()
    sink.pause()
    out.offer(event(1))
    out.revoked.add("r")
    out.rooms.discard("r")
    out.offer(Delivery("r", "", b"", True, None, FORBIDDEN))
    sink.resume()
    assert sink.frames == [b"<forbidden:r>"]
    out.rooms.add("x")
    out.offer(Delivery("x", "", b"", True, None, RESYNC))
    assert sink.frames[-1] == b"<resync:x>" and [d.control for d in transport.controls] == [FORBIDDEN, RESYNC]


def test_the_hub_counts_deliveries_written_at_once() -> None:
    async def main() -> None:
        hub = Hub(MemoryBackend())
        await hub.start()
        out, sink, _ = outlet()
        hub.join(out, "system")
        from firstcare.events import make_event

        await hub.publish(make_event("system.alert", {"n": 1}), ["system"])
        assert len(sink.frames) == 1 and hub.counters.delivered.total == 1
        await hub.stop()

    asyncio.run(main())


def test_a_frame_is_made_once_per_delivery() -> None:
    made: list[Delivery] = []
    def frame(d: Delivery) -> bytes:
        made.append(d)
        return ws_text_frame(d.data)

    cache = FrameCache(frame)
    a, b = event(1), event(2)
    assert cache(a) == cache(a) == b"\x81\x03r#1"
    cache(b)
    assert made == [a, b] and cache.made == 2


def test_sse_event_lines() -> None:
    assert sse_event("a\nb", "x") == b"event: x\r\ndata: a\r\ndata: b\r\n\r\n"


class Item:
    def __init__(self, every: float) -> None:
        self.every, self.ticks = every, 0

    def tick(self, now: float) -> float | None:
        self.ticks += 1
        return now + self.every if self.ticks < 3 else None


def test_the_timer_wheel_turns_each_item_when_due_and_forgets_it_when_done() -> None:
    async def main() -> None:
        wheel = TimerWheel(resolution=0.01)
        wheel.start()
        loop = asyncio.get_running_loop()
        a, b, gone = Item(0.02), Item(0.02), Item(0.02)
        for item in (a, b, gone):
            wheel.at(loop.time(), item)
        wheel.discard(gone)
        while a.ticks < 3 or b.ticks < 3:
            await asyncio.sleep(0.01)
        assert gone.ticks == 0 and len(wheel) == 0
        wheel.stop()

    asyncio.run(main())
