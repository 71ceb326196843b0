"""Presence announcements: who changed (pure), and the bound per room and interval."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.hub import Member, Subscriber, open_hub
from bridge.hub_presence import PresenceNotifier, Window, presence_changes

OLD, NOW = 1_000, 5_000  # joined_ms before / inside the interval that starts at NOW


def member(conn: str, user: str, joined: int = OLD) -> dict:
    return {"conn_id": conn, "user": user, "joined_ms": joined}


@pytest.mark.parametrize(("window", "members", "expected"), [
    (Window(joined={"c1": "ann"}), [member("c1", "ann", NOW)], [("ann", "join", 1)]),
    (Window(left={"c1": "ann"}), [], [("ann", "leave", 0)]),
    # a reconnect within the interval: nothing to tell
    (Window(joined={"c2": "ann"}, left={"c1": "ann"}), [member("c2", "ann", NOW)], []),
    # a second connection of someone already there
    (Window(joined={"c2": "ann"}), [member("c1", "ann"), member("c2", "ann", NOW)], []),
    # one of two connections leaves
    (Window(left={"c1": "ann"}), [member("c2", "ann")], []),
    # came and went within the interval: nothing to tell
    (Window(joined={"c1": "ann"}, left={"c1": "ann"}), [], []),
    # joined on another process in the same interval too: still a join (it arrived in it)
    (Window(joined={"c1": "ann"}), [member("c1", "ann", NOW), member("c9", "ann", NOW + 1)], [("ann", "join", 2)]),
    # several users, sorted
    (Window(joined={"c1": "bob", "c2": "ann"}), [member("c1", "bob", NOW), member("c2", "ann", NOW)],
     [("ann", "join", 1), ("bob", "join", 1)]),
])
def test_presence_changes(window: Window, members: list[dict], expected: list) -> None:
    assert presence_changes(window, members, since_ms=NOW) == expected


def test_a_storm_is_announced_at_most_max_per_room_with_the_rest_counted() -> None:
    async def main() -> None:
        hub = open_hub("memory://")
        await hub.start()
        watcher = Subscriber(owner="watcher")
        hub.join(watcher, "hospital:h")
        notifier = PresenceNotifier(hub, max_per_room=5)
        for n in range(30):
            m = Member(f"c{n}", f"user-{n}", "node", 0)
            await hub.backend.presence_join("hospital:h", m)
            notifier.joined("hospital:h", m)
        await notifier.flush()
        got = [json.loads(d.data) for _ in range(watcher.qsize()) if (d := watcher.get_nowait()) is not None]
        assert [e["event"] for e in got] == ["presence.join"] * 5
        assert [e["data"].get("suppressed") for e in got] == [None] * 4 + [25]
        assert notifier.counters["presence_suppressed"] == 25 and notifier.counters["presence_announced"] == 5
        assert all(e["id"] is None for e in got), "presence never takes a place in a room's history"
        assert await hub.backend.position("hospital:h") is None
        await notifier.flush()
        assert watcher.qsize() == 0, "nothing new: nothing announced"
        await hub.stop()

    asyncio.run(main())


def test_a_user_is_not_told_about_itself() -> None:
    async def main() -> None:
        hub = open_hub("memory://")
        await hub.start()
        mine, other = Subscriber(owner="ann"), Subscriber(owner="bob")
        for s in (mine, other):
            hub.join(s, "patient:p")
        notifier = PresenceNotifier(hub)
        m = Member("c1", "ann", "node", 0)
        await hub.backend.presence_join("patient:p", m)
        notifier.joined("patient:p", m)
        await notifier.flush()
        assert (mine.qsize(), other.qsize()) == (0, 1)
        await hub.stop()

    asyncio.run(main())
