"""From committed events to the hub: a bounded outbox, one publishing task, and the alarm
catch-up after the hub could not take them.

    writer commits -> FanOut.offer(events)   never blocks ingest; a full outbox drops (counted)
                   -> FanOut.run()           the one task that publishes to the hub

An event the hub could not take is never silent. Its rooms start a new epoch and their clients
are told to resync (the hub does that, see :mod:`bridge.hub`), and the REST API has its data.
An alarm needs more than a reload someone may not do: alarms are in the database, so once the
hub takes publications again this task re-publishes, in commit order, every alarm transition
stored since the first one that was lost. It does so before any later alarm event leaves the
outbox, so each alarm's transitions reach clients in order; an outbox event whose transition
was re-published that way is skipped. The catch-up reads every bridge's transitions, not only
this one's: the Redis hub publishes an alarm transition once however many bridges offer it
(bridge/hub_redis.py), so what another bridge published already is not repeated.

The latency tracker (bridge/telemetry.py), when given, sees each committed event as before:
marked when offered, told just before and after its publish. Re-published alarms are not
measured (their latency is the outage's).

Everything here runs on the event loop; store queries go to a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from bridge.core import PUBLISHED_ALERT_ACTIONS, alert_event
from bridge.hub import Hub, HubError
from bridge.router import rooms_for
from bridge.store import Store
from firstcare.events import Event, transition_key

log = logging.getLogger("firstcare.fanout")

OUTBOX_SIZE = 10_000
CATCH_UP_PAGE = 500
RETRY_S = 1.0  # how often a pending catch-up is retried while the hub is still failing


class _NoLatency:
    def committed(self, event: Event) -> None:
        return None

    def publishing(self, marks: Any) -> None:
        pass

    def published(self, publication: Any) -> None:
        pass


class FanOut:
    def __init__(self, hub: Hub, store: Store, size: int = OUTBOX_SIZE, latency: Any = None) -> None:
        self.hub = hub
        self.store = store
        self.latency = latency if latency is not None else _NoLatency()
        self._outbox: asyncio.Queue[tuple[Event, Any]] = asyncio.Queue(size)
        # The first alarm lost by a failing publish and the first dropped from a full outbox:
        # events leave the outbox in commit order, so between them they hold the earliest loss.
        self._lost: dict[str, Event] = {}
        self._catch_up_after: int | None = None  # the catch-up goes on after this transition id
        self._replayed: list[tuple[int, int]] = []  # transition id ranges re-published
        self._failing = False
        self.counters = {"outbox_dropped": 0, "alerts_caught_up": 0, "alerts_skipped_as_caught_up": 0}

    def offer(self, events: Iterable[Event]) -> None:
        """Hand committed events over; never blocks. An event that does not fit is counted and
        its rooms are told to resync; a lost alarm is caught up from the database."""
        for event in events:
            try:
                self._outbox.put_nowait((event, self.latency.committed(event)))
            except asyncio.QueueFull:
                self.counters["outbox_dropped"] += 1
                self.hub.backend.mark_lost(rooms_for(event))
                self._note_lost("dropped", event)

    def _note_lost(self, how: str, event: Event) -> None:
        if transition_key(event) is not None:
            self._lost.setdefault(how, event)

    @property
    def catch_up_pending(self) -> bool:
        return bool(self._lost) or self._catch_up_after is not None

    async def run(self) -> None:
        while True:
            if self.catch_up_pending and self._outbox.empty():
                await self._catch_up()
                if self.catch_up_pending:  # the hub is still failing
                    try:
                        event, marks = await asyncio.wait_for(self._outbox.get(), RETRY_S)
                    except TimeoutError:
                        continue
                else:
                    event, marks = await self._outbox.get()
            else:
                event, marks = await self._outbox.get()
            await self._publish(event, marks)
            if self._outbox.empty() and not self.catch_up_pending:
                self._replayed.clear()  # every event committed before the catch-up is through

    async def _publish(self, event: Event, marks: Any = None) -> None:
        key = transition_key(event)
        if key is not None and (self._replayed or self.catch_up_pending):
            try:
                tid = await asyncio.to_thread(self.store.alert_transition_id, *key)
            except Exception as exc:  # noqa: BLE001 - the store may be failing too
                log.warning("alarm catch-up cannot read the store: %s", exc)
                tid = None
            if tid is not None and self.catch_up_pending:
                await self._resolve_lost()
                if self._catch_up_after is not None and tid > self._catch_up_after:
                    await self._catch_up()  # older alarm transitions first: this one is among them
            if tid is not None and any(low <= tid <= high for low, high in self._replayed):
                self.counters["alerts_skipped_as_caught_up"] += 1
                return
        self.latency.publishing(marks)
        try:
            self.latency.published(await self.hub.publish(event))
        except HubError as exc:
            self.latency.publishing(None)
            if not self._failing:
                log.warning("fan-out failing, events are stored but not delivered live: %s", exc)
            self._failing = True
            self._note_lost("failed", event)
            return
        if self._failing:
            log.info("fan-out restored")
        self._failing = False

    async def _resolve_lost(self) -> None:
        """Turn the lost alarm events into the transition id the catch-up starts after."""
        for how, event in list(self._lost.items()):
            key = transition_key(event)
            if key is None:  # only alarm events are noted
                del self._lost[how]
                continue
            try:
                tid = await asyncio.to_thread(self.store.alert_transition_id, *key)
            except Exception as exc:  # noqa: BLE001 - the store may be failing too: next time
                log.warning("alarm catch-up cannot read the store: %s", exc)
                return
            del self._lost[how]
            if tid is not None:  # None: purged meanwhile, nothing to catch up
                start = tid - 1
                self._catch_up_after = start if self._catch_up_after is None else min(self._catch_up_after, start)

    async def _catch_up(self) -> None:
        """Re-publish the alarm transitions stored since the first lost one. On a hub failure
        it stops where it got to and goes on from there next time."""
        await self._resolve_lost()
        replayed = 0
        while self._catch_up_after is not None:
            low = self._catch_up_after + 1
            try:
                page = await asyncio.to_thread(self.store.alert_transitions_after, self._catch_up_after, CATCH_UP_PAGE)
            except Exception as exc:  # noqa: BLE001
                log.warning("alarm catch-up cannot read the store: %s", exc)
                break
            for tid, transition in page:
                if transition.action in PUBLISHED_ALERT_ACTIONS:
                    self.latency.publishing(None)
                    try:
                        await self.hub.publish(alert_event(transition))
                    except HubError:
                        self._failing = True
                        self.counters["alerts_caught_up"] += replayed
                        return  # still down: go on after the last one published
                    replayed += 1
                self._catch_up_after = tid
                self._mark_replayed(low, tid)
            if len(page) < CATCH_UP_PAGE:
                self._catch_up_after = None
        self.counters["alerts_caught_up"] += replayed
        if replayed:
            log.info("re-published %d alarm transition(s) stored while the hub could not take them", replayed)
        if self._failing and not self.catch_up_pending:
            log.info("fan-out restored")
            self._failing = False

    def _mark_replayed(self, low: int, high: int) -> None:
        """Transitions ``low..high`` are through (published, or not published by design)."""
        if self._replayed and self._replayed[-1][0] <= low <= self._replayed[-1][1] + 1:
            self._replayed[-1] = (self._replayed[-1][0], max(high, self._replayed[-1][1]))
        else:
            self._replayed.append((low, high))

    def stats(self) -> dict[str, Any]:
        return {"outbox_depth": self._outbox.qsize(), **self.counters,
                "alerts_catch_up_pending": self.catch_up_pending}
