"""The hub's contract, one test body per backend: memory:// and redis:// (a real Redis).

Each Redis test gets its own key prefix, so tests never see each other's rooms."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bridge.hub import Hub, Member, Subscriber, open_hub, subscription
from firstcare.events import make_event, parse_event_id

T0 = 1_795_688_130_120


@pytest.fixture(params=["memory", "redis"])
def hub_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return f"{request.getfixturevalue('redis_url')}?prefix=test-{secrets.token_hex(4)}:"


def vitals(n: int = 0, pid: str = "p", device: str = "m1"):
    return make_event("patient.vitals.update", {"patient_id": pid, "hospital_id": "h", "device_type": "monitor",
                                                "device_id": device, "seq": n, "metrics": {"heart_rate": 60 + n}}, T0)


def alert(n: int = 0):
    return make_event("patient.alert.raised", {"patient_id": "p", "hospital_id": "h", "id": f"a{n}",
                                               "kind": "clinical"}, T0)


def run(hub_url: str, body: Callable[[Hub], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        hub = open_hub(hub_url, **kw)
        await hub.start()
        try:
            return await body(hub)
        finally:
            await hub.stop()

    return asyncio.run(main())


async def take(sub: Subscriber, n: int) -> list[Any]:
    return [await asyncio.wait_for(sub.get(), 10) for _ in range(n)]


def test_an_event_reaches_a_subscriber_in_several_of_its_rooms_once(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        sub = Subscriber()
        for room in ("hospital:h", "patient:p", "device:monitor:m1"):
            hub.join(sub, room)
        await hub.publish(vitals(1))
        (delivery,) = await take(sub, 1)
        envelope = json.loads(delivery.data)
        assert (envelope["room"], envelope["type"], envelope["data"]["seq"]) == ("patient:p", "vitals_update", 1)
        assert delivery.id == envelope["id"]
        await asyncio.sleep(0.1)
        assert sub.qsize() == 0

    run(hub_url, body)


@pytest.mark.parametrize("missed", [0, 1, 5])
def test_history_gives_exactly_what_was_missed_in_order(hub_url: str, missed: int) -> None:
    async def body(hub: Hub) -> None:
        first = await hub.publish(vitals(0))
        last_seen = first.deliveries[0].id
        for n in range(1, missed + 1):
            await hub.publish(vitals(n))
        got = await hub.history("patient:p:vitals", last_seen)
        assert got is not None
        assert [json.loads(d.data)["data"]["seq"] for d in got] == list(range(1, missed + 1))
        epoch, offset = parse_event_id(last_seen)
        assert [d.id for d in got] == [f"{epoch}:{offset + i}" for i in range(1, missed + 1)]

    run(hub_url, body)


@pytest.mark.parametrize("since", ["other-epoch:1", "garbage", "{epoch}:999", "{epoch}:1"])
def test_history_that_cannot_cover_the_gap_is_a_resync(hub_url: str, since: str) -> None:
    """Trimming is approximate on Redis (whole stream nodes), so publish well past the size."""
    async def body(hub: Hub) -> None:
        for n in range(300):
            publication = await hub.publish(vitals(n))
        epoch = parse_event_id(publication.deliveries[0].id)[0]
        assert await hub.history("patient:p:vitals", since.format(epoch=epoch)) is None

    run(hub_url, body, history_size=3)


def test_two_hubs_on_one_redis_share_rooms_and_history(redis_url: str) -> None:
    """Two processes' hubs (memory:// is one process by definition)."""
    hub_url = f"{redis_url}?prefix=test-{secrets.token_hex(4)}:"

    async def main() -> None:
        a, b = open_hub(hub_url), open_hub(hub_url)
        await a.start()
        await b.start()
        try:
            sub = Subscriber()
            b.join(sub, "patient:p:vitals")
            first = await a.publish(vitals(1))
            (got,) = await take(sub, 1)
            assert got.id == first.deliveries[0].id
            await a.publish(vitals(2))
            replay = await b.history("patient:p:vitals", got.id)
            assert replay is not None
            assert [json.loads(d.data)["data"]["seq"] for d in replay] == [2]
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_a_full_queue_coalesces_and_drops_vitals_but_never_an_alert(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        sub = Subscriber(maxsize=4)
        hub.join(sub, "patient:p")
        for n in range(2):
            await hub.publish(vitals(n, device=f"d{n}"))
        await hub.publish(vitals(10, device="d0"))       # queue half full: replaces d0's reading
        await hub.publish(vitals(11, device="d2"))
        await hub.publish(vitals(12, device="d3"))
        await hub.publish(vitals(13, device="d4"))       # full, nothing to coalesce with: dropped
        await asyncio.sleep(0.2)
        assert not sub.overflowed
        await hub.publish(alert(1))
        await asyncio.sleep(0.2)
        stats = hub.stats()
        assert (stats["coalesced"], stats["dropped"], stats["overflowed"]) == (1, 1, 1)
        assert sub.overflowed
        with pytest.raises(Exception, match="overflowed"):
            await sub.get()

    run(hub_url, body)


def test_subscription_context_leaves_every_room(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        async with subscription(hub, ["patient:p", "hospital:h"]) as sub:
            assert hub.stats()["subscribers"] == 1
            await hub.publish(vitals(1))
            await take(sub, 1)
        assert hub.stats()["subscribers"] == 0
        assert hub.local_rooms() == {}

    run(hub_url, body)


def test_presence_lists_members_and_forgets_those_who_leave(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        backend = hub.backend
        await backend.presence_join("patient:p", Member("c1", "alice", "node-a", T0))
        await backend.presence_join("patient:p", Member("c2", "bob", "node-b", T0))
        members = await backend.presence("patient:p")
        assert sorted((m["conn_id"], m["user"], m["node"]) for m in members) == [
            ("c1", "alice", "node-a"), ("c2", "bob", "node-b")]
        await backend.presence_leave("patient:p", Member("c1", "alice", "node-a", T0))
        assert [m["user"] for m in await backend.presence("patient:p")] == ["bob"]

    run(hub_url, body)


def test_tickets_are_single_use(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        await hub.backend.put_ticket("t1", '{"sub": "x"}', 30)
        assert await hub.backend.take_ticket("t1") == '{"sub": "x"}'
        assert await hub.backend.take_ticket("t1") is None
        assert await hub.backend.take_ticket("never-issued") is None

    run(hub_url, body)


# --- replay is exact or a resync, never partial (the same body on both backends) -----------

HISTORY = 20


@pytest.mark.parametrize("published", [HISTORY - 1, HISTORY, HISTORY + 1, HISTORY + 2, 31, 150, 260])
def test_replay_is_exact_or_a_resync_never_partial(hub_url: str, published: int) -> None:
    """Every cursor a client could hold, against rooms just below, at and above the history
    size. Redis trims approximately (whole stream nodes of 100 entries), so at 150 and 260
    it still holds more than the history size: replay must not be decided from what it holds."""

    async def body(hub: Hub) -> None:
        ids = [(await hub.publish(vitals(n))).deliveries[0].id for n in range(published)]
        epoch = parse_event_id(ids[0])[0]
        cursors = [f"{epoch}:0", *ids]
        for offset, since in enumerate(cursors):
            got = await hub.history("patient:p:vitals", since)
            missed = ids[offset:]
            if len(missed) <= HISTORY:
                assert got is not None, f"since {since}: {len(missed)} missed is within the history: replay"
                assert [d.id for d in got] == missed, f"since {since}: not exactly what was missed"
                assert [json.loads(d.data)["data"]["seq"] for d in got] == list(range(offset, published))
            else:
                assert got is None, f"since {since}: {len(missed)} missed > history {HISTORY}: resync, " \
                                    f"not {len(got or [])} of them"
        if hub.backend.name == "redis" and published >= 150:
            redis_backend: Any = hub.backend  # its Redis client and key names, beyond the interface
            held = await redis_backend._redis.xlen(redis_backend._room_keys("patient:p:vitals")[2])
            assert held > HISTORY, "approximate trimming kept more than the history size"

    run(hub_url, body, history_size=HISTORY)


def test_the_issue_case_one_then_thirty_is_a_resync(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        first = (await hub.publish(vitals(0))).deliveries[0].id
        for n in range(1, 31):
            await hub.publish(vitals(n))
        assert await hub.history("patient:p:vitals", first) is None

    run(hub_url, body, history_size=HISTORY)


def test_replay_stops_at_what_has_aged_out(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        old = [(await hub.publish(vitals(n))).deliveries[0].id for n in range(3)]
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # let the first three age out (history_age_s=1)
            await asyncio.sleep(0.1)
        new = [(await hub.publish(vitals(n))).deliveries[0].id for n in range(3, 5)]
        assert await hub.history("patient:p:vitals", old[0]) is None, "an aged-out event would be skipped"
        assert await hub.history("patient:p:vitals", old[1]) is None
        got = await hub.history("patient:p:vitals", old[2])
        assert got is not None and [d.id for d in got] == new

    run(hub_url, body, history_size=HISTORY, history_age_s=1.0)


# --- a room that missed publications starts over, and its subscribers hear it at once ------------

def test_a_room_that_missed_publications_tells_its_subscribers_and_starts_a_new_epoch(hub_url: str) -> None:
    async def body(hub: Hub) -> None:
        sub = Subscriber()
        hub.join(sub, "patient:p:vitals")
        hub.join(sub, "hospital:h")
        first = await hub.publish(vitals(1))
        before = (await take(sub, 1))[0]
        hub.backend.mark_lost(["patient:p:vitals", "patient:p", "hospital:h", "device:monitor:m1"])
        after = await hub.publish(vitals(2))
        got = await take(sub, 3)
        controls = [(d.control, d.room) for d in got[:2]]
        assert sorted(controls) == [("resync", "hospital:h"), ("resync", "patient:p:vitals")], \
            "one resync per joined room, before anything new"
        assert got[2].id == after.deliveries[0].id
        assert parse_event_id(got[2].id)[0] != parse_event_id(before.id)[0], "a new epoch"
        assert await hub.history("patient:p:vitals", first.deliveries[0].id) is None
        assert hub.stats()["resyncs_sent"] == 4

    run(hub_url, body)


def test_every_process_hears_of_a_gap_another_one_could_not_record(redis_url: str) -> None:
    hub_url = f"{redis_url}?prefix=test-{secrets.token_hex(4)}:"

    async def main() -> None:
        a, b = open_hub(hub_url), open_hub(hub_url)
        await a.start()
        await b.start()
        try:
            sub = Subscriber()
            b.join(sub, "hospital:h:alerts")
            await a.publish(alert(1))
            (old,) = await take(sub, 1)
            a.backend.mark_lost(["hospital:h:alerts"])  # as after a publish that failed on a only
            new = await a.publish(alert(2))
            resync, event = await take(sub, 2)
            assert (resync.control, resync.room) == ("resync", "hospital:h:alerts")
            assert event.id == new.deliveries[2].id and event.id.split(":")[0] != old.id.split(":")[0]
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())
