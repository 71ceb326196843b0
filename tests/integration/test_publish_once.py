"""Several bridges on one Redis hub publish each alarm transition once.

The fan-out's catch-up re-publishes every alarm transition stored since its first loss, whoever
committed it; another bridge may have published some of them already, or publish them live
after the catch-up. The Redis hub records an alarm transition once (bridge/hub_redis.py), so
clients see each once; readings and other events are not affected."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.alerts import AlertAction, Transition
from bridge.core import alert_event
from bridge.fanout import FanOut
from bridge.hub import Hub, Subscriber, open_hub
from bridge.store_sqlite import SQLiteStore
from firstcare.events import make_event
from tests.integration.test_fanout import T0, alarm, commit, vitals

ROOM = "hospital:h1:alerts"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "shared.db"))
    yield s
    s.close()


async def two_hubs(redis_url: str) -> tuple[Hub, Hub]:
    url = f"{redis_url}?prefix=once-{secrets.token_hex(4)}:"
    a, b = open_hub(url, node="a"), open_hub(url, node="b")
    await a.start()
    await b.start()
    return a, b


async def received(sub: Subscriber, settle: float = 1.0) -> list[tuple[str, str]]:
    """(event, alert id) of every alarm delivered until nothing comes for ``settle`` seconds."""
    out: list[tuple[str, str]] = []
    while True:
        try:
            delivery = await asyncio.wait_for(sub.get(), settle)
        except TimeoutError:
            return out
        if delivery.control is None:
            envelope = json.loads(delivery.data)
            out.append((envelope["event"], envelope["data"].get("id") or envelope["data"].get("seq")))


def test_the_same_alarm_transition_from_two_bridges_is_one_publication(redis_url: str) -> None:
    async def main() -> None:
        a, b = await two_hubs(redis_url)
        try:
            sub = Subscriber()
            b.join(sub, ROOM)
            raised = make_event("patient.alert.raised", {"id": "a1", "patient_id": "p1", "hospital_id": "h1",
                                                         "kind": "clinical"}, T0)
            first = await a.publish(raised)
            again = await b.publish(raised)
            assert len(first.deliveries) > 0 and again.deliveries == ()
            acked = make_event("patient.alert.acknowledged", {**raised.data}, T0 + 5)
            assert (await b.publish(acked)).deliveries  # another transition of the same alarm
            reading = make_event("patient.vitals.update", {"patient_id": "p1", "hospital_id": "h1", "seq": 1}, T0)
            assert (await a.publish(reading)).deliveries and (await b.publish(reading)).deliveries, \
                "only alarm transitions are published once"
            assert await received(sub) == [("patient.alert.raised", "a1"), ("patient.alert.acknowledged", "a1")]
            assert b.backend.stats()["alerts_already_published"] == 1
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_a_catch_up_does_not_repeat_what_another_bridge_published(store: SQLiteStore, redis_url: str) -> None:
    """Bridge A's outbox overflows (its alarms are lost to the hub): A catches up every transition
    stored since, bridge B's among them, which B had published; B then publishes live one that A's
    catch-up got to first. Clients get each transition once."""

    async def main() -> None:
        hub_a, hub_b = await two_hubs(redis_url)
        a, b = FanOut(hub_a, store, size=1), FanOut(hub_b, store)
        tasks: list[asyncio.Task[None]] = []
        try:
            sub = Subscriber()
            hub_b.join(sub, ROOM)
            on_a = commit(store, Transition(AlertAction.RAISED, alarm("a1"), T0))
            b1 = replace(alarm("b1"), subject="patient:p2", patient_id="p2")
            on_b = commit(store, Transition(AlertAction.RAISED, b1, T0 + 1))
            b.offer(on_b)
            tasks.append(asyncio.create_task(b.run()))
            later_a = commit(store, Transition(AlertAction.ACKNOWLEDGED, alarm("a1", "acknowledged", T0 + 5,
                                                                     acknowledged_by="dr", acknowledged_ms=T0 + 5),
                                              T0 + 5))
            b1_resolved = replace(alarm("b1", "resolved", T0 + 6), subject="patient:p2", patient_id="p2")
            late_b = commit(store, Transition(AlertAction.RESOLVED, b1_resolved, T0 + 6))
            a.offer([vitals(1), *on_a, *later_a])  # only the reading fits: both alarms are lost
            assert a.catch_up_pending
            tasks.append(asyncio.create_task(a.run()))
            for _ in range(500):
                if not a.catch_up_pending and a.stats()["outbox_depth"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert not a.catch_up_pending
            b.offer(late_b)  # B's live publish of a transition A's catch-up already published
            got = await received(sub)
            assert Counter(got) == Counter({("patient.alert.raised", "a1"): 1, ("patient.alert.raised", "b1"): 1,
                                            ("patient.alert.acknowledged", "a1"): 1,
                                            ("patient.alert.resolved", "b1"): 1}), got
            assert hub_a.backend.stats()["alerts_already_published"] + \
                hub_b.backend.stats()["alerts_already_published"] == 2
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await hub_a.stop()
            await hub_b.stop()

    asyncio.run(main())


def test_events_of_a_caught_up_alarm_keep_their_shape() -> None:
    """The catch-up rebuilds the event from the stored transition: its key is the live one's."""
    from firstcare.events import transition_key

    live = alert_event(Transition(AlertAction.RAISED, alarm("a1"), T0))
    assert transition_key(live) == ("a1", "raised", T0)
