"""Ingest through slots: the bridge's share of the cluster's persistent MQTT sessions.

    ingest = SlotIngest(total=8, client_id="firstcare-bridge", cluster=..., node=..., open_slot=...,
                        make_lease=...)
    task = asyncio.create_task(ingest.run())   # claims, hands over, takes over, every TICK_S
    ingest.held                                # slot numbers consuming now
    await ingest.stop()                        # drains every slot, then ends the cluster session

Each tick the manager reads the cluster from the database (``Cluster.census``: live members,
locked slots), plans with :func:`bridge.slots.plan_slots`, and:

* **claims** a free slot: its session lock (``pg_try_advisory_lock``) first, then the slot's
  client-id lease on the broker (``firstcare.lease``, as for a single bridge: it also protects
  against a second cluster on the same broker), then a consumer with client id
  ``{client id}-{n}`` on the shared subscription, whose persistent session hands it whatever the
  broker queued for that client id (a dead bridge's backlog, mosquitto#2662);
* **releases** a slot (above its fair share, or at a clean stop): closes the consumer's intake,
  lets it settle and acknowledge everything it took, disconnects, clears the lease, and only then
  unlocks, so the next holder never processes a message this bridge is still processing;
* **drops** a slot whose lock was lost with the database connection: its consumer stops at once
  (whatever it took and did not acknowledge goes to the next holder; the store's identity
  absorbs a reading committed by both).

Threads: everything here runs on the event loop except the cluster's database calls (one at a
time, under ``_db_lock``, in a worker thread) and the leases' and consumers' own paho threads.
``counters`` is built on demand from the live consumers plus those retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bridge.cluster import MEMBER, SLOT, Cluster, LockKey, name_hash, slot_key, unsigned_hash
from bridge.slots import plan_slots, slot_client_id
from firstcare.lease import LeaseError, LeaseKeeper
from firstcare.mqtt import AckingConsumer

log = logging.getLogger("firstcare.slots")

TICK_S = 1.0
CONFLICT_BACKOFF_S = 30.0
DRAIN_TIMEOUT_S = 20.0  # at a clean stop only; a hand-over waits as long as the store needs
T = TypeVar("T")


@dataclass(eq=False)
class _Slot:
    number: int
    client_id: str
    state: str = "claiming"  # claiming | held | releasing
    consumer: AckingConsumer | None = None
    lease: LeaseKeeper | None = None
    task: asyncio.Task[Any] | None = None
    since: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> LockKey:
        return slot_key(self.number)


class SlotIngest:
    """The slots this bridge holds, with the interface of one :class:`AckingConsumer` for the
    rest of the bridge (``connected``, ``state``, ``counters``, ``store_error``, ...)."""

    def __init__(self, total: int, client_id: str, cluster: Cluster, node: str,
                 open_slot: Callable[[str], Any], make_lease: Callable[[str, Callable[[str], object]], LeaseKeeper],
                 tag: str = "", tick_s: float = TICK_S) -> None:
        self.total = total
        self.client_id = client_id
        self.cluster = cluster
        self.node = node
        self.member = LockKey(MEMBER, f"{node}-{secrets.token_hex(4)}")  # unique even for two bridges in one process
        self.tag = tag
        self._open_slot = open_slot  # async (client_id) -> AckingConsumer, not yet running
        self._make_lease = make_lease
        self.tick_s = tick_s
        self._slots: dict[int, _Slot] = {}
        self._hashes = {unsigned_hash(slot_key(n).name): n for n in range(total)}
        self._start = name_hash(node) % total if total else 0
        self._cooldown: dict[int, float] = {}
        self._db_lock = asyncio.Lock()
        self._retired: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.members = 0
        self.locked = 0  # slots locked cluster-wide at the last census
        self.census_ok = False
        self.conflict: str | None = None
        self.mismatch: str | None = None  # other bridges of the database use other slot settings
        self.last_error: str | None = None
        self.counters_extra = {"slots_claimed": 0, "slots_released": 0, "slots_lost": 0}

    # --- what the rest of the bridge reads ----------------------------------------------------

    @property
    def held(self) -> list[int]:
        return sorted(n for n, s in self._slots.items() if s.state == "held")

    def _consumers(self) -> list[AckingConsumer]:
        return [s.consumer for s in self._slots.values() if s.consumer is not None]

    @property
    def connected(self) -> bool:
        """Every slot held is connected, and there is one at least (or none is free for us)."""
        held = [self._slots[n] for n in self.held]
        if any(s.consumer is None or not s.consumer.connected for s in held):
            return False
        return bool(held) or self.standby

    @property
    def standby(self) -> bool:
        """Holding nothing because the other bridges hold every slot: ready, serving the API."""
        return self.census_ok and not self._slots and self.locked >= self.total

    @property
    def state(self) -> str:
        if self.conflict is not None:
            return "conflict"
        if self.mismatch is not None:
            return f"conflict: {self.mismatch}"
        held = [self._slots[n] for n in self.held]
        if held and all(s.consumer is not None and s.consumer.connected for s in held):
            return "connected"
        if not held and self.standby:
            return "connected"
        if not self.census_ok:
            return "waiting for the database"
        waiting = [f"slot {s.number}: {s.consumer.state if s.consumer else s.state}"
                   for s in sorted(self._slots.values(), key=lambda s: s.number)
                   if s.consumer is None or not s.consumer.connected]
        return "; ".join(waiting) if waiting else "claiming slots"

    @property
    def counters(self) -> dict[str, int]:
        total: Counter[str] = Counter(self._retired)
        for consumer in self._consumers():
            total.update(consumer.counters.copy())
        return {**total, **self.counters_extra}

    @property
    def store_error(self) -> str | None:
        return next((c.store_error for c in self._consumers() if c.store_error), None)

    def queue_depth(self) -> int:
        return sum(c.queue_depth() for c in self._consumers())

    def yield_session(self, message: str) -> None:
        """Another process uses the whole set of client ids: stop contending (state conflict)."""
        self.conflict = message

    def _lease_lost(self, number: int, message: str) -> None:
        """A slot's lease owner came back (called on the loop): give that slot up and leave it
        alone a while; the others go on."""
        slot = self._slots.get(number)
        self.last_error = message
        self._cooldown[number] = time.monotonic() + CONFLICT_BACKOFF_S
        if slot is not None and slot.state != "releasing":
            slot.state = "releasing"
            self._spawn(self._release(slot))

    def slot_stats(self) -> dict[str, Any]:
        return {"total": self.total, "held": self.held, "members": self.members,
                "locked": self.locked, "client_ids": [slot_client_id(self.client_id, n) for n in self.held],
                **self.counters_extra}

    # --- the manager ---------------------------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._db_lock:
            return await asyncio.to_thread(fn, *args)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.tick()
                except Exception:  # noqa: BLE001 - the next tick tries again
                    log.exception("ingest slot tick failed")
                await asyncio.sleep(self.tick_s)
        finally:
            await self.stop()

    async def tick(self) -> None:
        census = await self._db(self.cluster.census, self.member, SLOT)
        for slot in list(self._slots.values()):
            if slot.state != "releasing" and not self.cluster.holding(slot.key):
                slot.state = "releasing"  # at once, so this tick's plan neither counts nor claims it
                self._spawn(self._drop(slot))  # the database session is gone, and the lock with it
        if census is None:
            self.census_ok = False
            self.last_error = "the database cannot be reached: no slot held"
            return
        self.census_ok, self.last_error = True, None
        self.members = census.members
        strangers = census.tags - {self.tag}
        if self.tag and strangers:
            # Another bridge of this database uses other slot settings: its sessions and ours
            # would split the shared subscription, and slots nobody claims would strand readings.
            if self.mismatch is None:
                log.error("bridges of this database use different FC_MQTT_CLIENT_ID, FC_INGEST_SLOTS or"
                          " FC_INGEST_SHARE_GROUP settings (%s here, %s elsewhere): no further slot is claimed"
                          " until they agree", self.tag, ", ".join(sorted(t or "no slots" for t in strangers)))
            self.mismatch = ("bridges of this database disagree on FC_MQTT_CLIENT_ID, FC_INGEST_SLOTS or"
                             " FC_INGEST_SHARE_GROUP; give them all the same values")
            return
        self.mismatch = None
        locked = {self._hashes[h] for h in census.locked if h in self._hashes}
        self.locked = len(locked)
        now = time.monotonic()
        cooling = {n for n, until in self._cooldown.items() if until > now}
        holding = {n for n, s in self._slots.items() if s.state != "releasing"}
        leaving = {n for n, s in self._slots.items() if s.state == "releasing"}
        plan = plan_slots(self.total, census.members, holding, leaving | cooling, locked, self._start)
        for n in plan.release:
            slot = self._slots[n]
            if slot.state == "held":
                slot.state = "releasing"
                self._spawn(self._release(slot))
        taken = 0
        for n in plan.claim:
            if taken >= plan.want:
                break
            if await self._db(self.cluster.hold, slot_key(n)):
                taken += 1
                slot = self._slots[n] = _Slot(n, slot_client_id(self.client_id, n))
                self._spawn(self._claim(slot))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        lease = slot.lease = self._make_lease(
            slot.client_id, lambda message: loop.call_soon_threadsafe(self._lease_lost, slot.number, message))
        try:
            await asyncio.to_thread(lease.acquire)
        except LeaseError as exc:
            log.error("ingest slot %d (client id %s) not taken: %s", slot.number, slot.client_id, exc)
            self._cooldown[slot.number] = time.monotonic() + CONFLICT_BACKOFF_S
            self.last_error = str(exc)
            slot.lease = None
            await self._unlock(slot)
            return
        if self._slots.get(slot.number) is not slot or not self.cluster.holding(slot.key):
            await asyncio.to_thread(lease.release)  # lost meanwhile
            return
        try:
            consumer = slot.consumer = await self._open_slot(slot.client_id)
        except Exception as exc:  # noqa: BLE001 - the store could not say whether a session exists: later
            log.warning("ingest slot %d not opened: %s", slot.number, exc)
            self._cooldown[slot.number] = time.monotonic() + self.tick_s * 3
            await self._end_lease(slot)
            await self._unlock(slot)
            return
        if self._slots.get(slot.number) is not slot or slot.state != "claiming" or not self.cluster.holding(slot.key):
            self._retire(slot)  # lost while the store answered: never start a consumer we do not own
            await self._end_lease(slot)
            return
        slot.state = "held"
        slot.task = asyncio.create_task(consumer.run(), name=f"fc-slot-{slot.number}")
        self.counters_extra["slots_claimed"] += 1
        log.info("ingest slot %d taken (client id %s)", slot.number, slot.client_id)

    async def _release(self, slot: _Slot, timeout: float | None = None) -> None:
        """Hand a slot over: settle and acknowledge what it took, disconnect, clear the lease, unlock."""
        slot.state = "releasing"
        if slot.consumer is not None and slot.task is not None:
            slot.consumer.close_intake()
            try:
                await asyncio.wait_for(asyncio.shield(slot.task), timeout)
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                slot.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await slot.task
        await self._end_lease(slot)
        await self._unlock(slot)
        self.counters_extra["slots_released"] += 1
        log.info("ingest slot %d handed over", slot.number)

    async def _drop(self, slot: _Slot) -> None:
        """The lock is gone with the database session: stop consuming at once."""
        slot.state = "releasing"
        log.warning("ingest slot %d lost with the database session: its consumer stops now", slot.number)
        self.counters_extra["slots_lost"] += 1
        if slot.task is not None:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await slot.task
        await self._end_lease(slot)
        self._retire(slot)
        if self._slots.get(slot.number) is slot:
            del self._slots[slot.number]

    async def _end_lease(self, slot: _Slot) -> None:
        if slot.lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(slot.lease.release)
            slot.lease = None

    async def _unlock(self, slot: _Slot) -> None:
        self._retire(slot)
        if self._slots.get(slot.number) is slot:
            del self._slots[slot.number]
        await self._db(self.cluster.release, slot.key)

    def _retire(self, slot: _Slot) -> None:
        if slot.consumer is not None:
            self._retired.update(slot.consumer.counters.copy())
            slot.consumer = None

    async def stop(self) -> None:
        """A clean stop: hand every slot over (drained), then end the cluster session."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        slots = list(self._slots.values())
        await asyncio.gather(*(self._release(s, DRAIN_TIMEOUT_S) for s in slots), return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.cluster.close)
