"""The fan-out's alarm catch-up (bridge/fanout.py) on a real SQLite store, with a hub that can
be made to fail: alarm transitions the hub could not take are re-published from the database,
in order, once; nothing that was delivered is repeated."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bridge.alerts import Alert, AlertAction, AlertState, Transition
from bridge.core import alert_event
from bridge.fanout import FanOut
from bridge.hub import HubError
from bridge.store_sqlite import SQLiteStore
from firstcare.events import Event, make_event

T0 = 1_795_688_130_120


class FlakyHub:
    """Stands in for bridge.hub.Hub: records what it published, fails while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.published: list[tuple[str, Any]] = []
        self.lost: list[list[str]] = []
        self.backend = self

    async def publish(self, event: Event) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise HubError("hub down")
        self.published.append((event.name, event.data.get("id") or event.data.get("seq")))

    def mark_lost(self, rooms: list[str]) -> None:
        self.lost.append(rooms)


def alarm(id: str, state: str = "raised", at: int = T0, **changes: Any) -> Alert:
    return Alert(id=id, rule_id="spo2.low.critical", kind="clinical", priority="high", state=AlertState(state),
                 subject="patient:p1", patient_id="p1", hospital_id="h1", device_type="oximeter", device_id="ox1",
                 metric="spo2", value=80.0, threshold=88.0, message="Severe desaturation", latching=True,
                 condition_active=True, raised_ms=T0, updated_ms=at, **changes)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "fanout.db"))
    yield s
    s.close()


def commit(store: SQLiteStore, *transitions: Transition) -> list[Event]:
    """Store transitions as the writer does; the events it would hand to the fan-out."""
    with store.transaction() as tx:
        tx.save_transitions(transitions)
    return [alert_event(t) for t in transitions]


def vitals(seq: int) -> Event:
    return make_event("patient.vitals.update", {"patient_id": "p1", "hospital_id": "h1", "seq": seq}, T0 + seq)


async def drain(fanout: FanOut, hub: FlakyHub, until: int) -> None:
    task = asyncio.create_task(fanout.run())
    try:
        for _ in range(500):
            if len(hub.published) >= until and fanout._outbox.empty() and not fanout.catch_up_pending:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"published {hub.published}")
    finally:
        task.cancel()


def test_alarms_lost_while_the_hub_is_down_are_republished_in_order_once(store: SQLiteStore) -> None:
    async def main() -> None:
        hub = FlakyHub()
        fanout = FanOut(hub, store)  # type: ignore[arg-type]
        raised = commit(store, Transition(AlertAction.RAISED, alarm("a1"), T0))
        hub.down = True
        fanout.offer([vitals(1), *raised])
        task = asyncio.create_task(fanout.run())
        for _ in range(200):
            if fanout._outbox.empty() and fanout.catch_up_pending:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        assert hub.published == [] and fanout.catch_up_pending
        hub.down = False
        acked_alarm = alarm("a1", "acknowledged", T0 + 5, acknowledged_by="dr", acknowledged_ms=T0 + 5)
        acked = commit(store, Transition(AlertAction.ACKNOWLEDGED, acked_alarm, T0 + 5))
        fanout.offer([vitals(2), *acked])
        await drain(fanout, hub, 3)
        # the raise comes back from the database before the acknowledgement, which is not repeated
        assert hub.published == [("patient.vitals.update", 2), ("patient.alert.raised", "a1"),
                                 ("patient.alert.acknowledged", "a1")]
        assert fanout.stats()["alerts_caught_up"] == 2 and fanout.stats()["alerts_skipped_as_caught_up"] == 1

    asyncio.run(main())


def test_an_alarm_dropped_from_a_full_outbox_comes_after_what_was_queued(store: SQLiteStore) -> None:
    async def main() -> None:
        hub = FlakyHub()
        fanout = FanOut(hub, store, size=2)  # type: ignore[arg-type]
        first = commit(store, Transition(AlertAction.RAISED, alarm("a1"), T0))
        second = commit(store, Transition(AlertAction.RAISED, alarm("a2"), T0 + 1))
        fanout.offer([*first, vitals(1), *second])  # a2 does not fit
        assert fanout.stats()["outbox_dropped"] == 1 and hub.lost
        await drain(fanout, hub, 3)
        assert hub.published == [("patient.alert.raised", "a1"), ("patient.vitals.update", 1),
                                 ("patient.alert.raised", "a2")]

    asyncio.run(main())


def test_the_stored_alarm_is_rebuilt_as_it_was_at_its_transition(store: SQLiteStore) -> None:
    raised = alarm("a1")
    acked = replace(raised, state=AlertState.ACKNOWLEDGED, acknowledged_by="dr", acknowledged_ms=T0 + 5,
                    updated_ms=T0 + 5)
    resolved = replace(acked, state=AlertState.RESOLVED, condition_active=False, resolved_ms=T0 + 9, updated_ms=T0 + 9)
    commit(store, Transition(AlertAction.RAISED, raised, T0), Transition(AlertAction.ACKNOWLEDGED, acked, T0 + 5),
           Transition(AlertAction.RESOLVED, resolved, T0 + 9))
    got = store.alert_transitions_after(0, 10)
    assert [(t.action, t.alert.state, t.alert.acknowledged_by, t.alert.resolved_ms) for _, t in got] == [
        ("raised", "raised", None, None), ("acknowledged", "acknowledged", "dr", None),
        ("resolved", "resolved", "dr", T0 + 9)]
    assert [tid for tid, _ in got] == sorted(tid for tid, _ in got)
    assert store.alert_transition_id("a1", "acknowledged", T0 + 5) == got[1][0]
    assert store.alert_transition_id("a1", "escalated", T0 + 5) is None
