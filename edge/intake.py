"""The embedded ward broker's device publishes, committed to the spool before the device is
acknowledged.

    device PUBLISH --> amqtt handler task --> WardIntake.put (queued in arrival order)
                                                  |  batch (a few ms of linger)
                                                  v
                                   Settler: stamp + spool commit (or isolate the poison)
                                                  |
       device <-- PUBACK (amqtt) <-- put() returns True <--+

So a PUBACK means "on the gateway's disk", whatever happens to the gateway afterwards
(SIGKILL, SIGTERM, power cut): there is no window between the broker's acknowledgement and the
spool, and no moment after a restart when the broker accepts publishes that nobody consumes,
because the intake runs before the broker listens. A publish the intake cannot keep (the
gateway is stopping) is never acknowledged; the device sends it again after reconnecting.

Bounded: at most ``queue_size`` publishes wait for the spool; beyond that a publish waits its
turn (first come, first served, so each device's order is kept) before it is even queued, and
the device's in-flight window fills up (counted in ``queue_full_waits``).

Owned by the gateway's event loop (amqtt runs on it too); ``counters`` has fixed keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from firstcare.mqtt import LinkState, Settler
from firstcare.payloads import Inbound

log = logging.getLogger("firstcare.edge")


@dataclass(slots=True)
class _Waiting:
    inbound: Inbound
    kept: asyncio.Future[bool]


class WardIntake:
    def __init__(self, handle_batch: Callable[[list[Inbound]], Awaitable[None]],
                 quarantine: Callable[[Inbound, Exception], Awaitable[None]] | None,
                 queue_size: int = 10_000, batch_max: int = 500, linger_ms: float = 2.0) -> None:
        self.counters = {"received": 0, "acked": 0, "not_kept": 0, "queue_full_waits": 0, "store_retries": 0,
                         "batch_splits": 0, "poison_isolated": 0}
        self.settler: Settler[_Waiting] = Settler(handle_batch, quarantine, self.counters, lambda w: w.inbound)
        self.state: LinkState = LinkState.STARTING
        self.last_error: str | None = None
        self._queue_size = queue_size
        self._batch_max = batch_max
        self._linger_s = linger_ms / 1000
        self._inbox: deque[_Waiting] = deque()
        self._turns: deque[asyncio.Future[None]] = deque()  # publishes waiting for room, in arrival order
        self._ready = asyncio.Event()
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def health(self) -> str | None:
        return self.settler.health()

    async def put(self, inbound: Inbound) -> bool:
        """Keep one device publish; True once it is committed to the spool, False when it was
        not kept (the gateway is stopping): the caller must not acknowledge it then."""
        if self._closing:
            self.counters["not_kept"] += 1
            return False
        self.counters["received"] += 1
        if self._turns or len(self._inbox) >= self._queue_size:
            self.counters["queue_full_waits"] += 1
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._turns.append(turn)
            await turn
            if self._closing:
                self.counters["not_kept"] += 1
                return False
        waiting = _Waiting(inbound, asyncio.get_running_loop().create_future())
        self._inbox.append(waiting)
        self._ready.set()
        return await waiting.kept

    def _let_in(self) -> None:
        while self._turns and len(self._inbox) < self._queue_size:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)

    def _ack(self, part: list[_Waiting]) -> None:
        for waiting in part:
            if not waiting.kept.done():
                waiting.kept.set_result(True)
        self.counters["acked"] += len(part)

    async def run(self) -> None:
        """Settle batches until cancelled (stored or isolated, then acknowledged, in order)."""
        self.state = LinkState.LISTENING
        while True:
            while not self._inbox:
                self._ready.clear()
                await self._ready.wait()
            if len(self._inbox) < self._batch_max and self._linger_s > 0:
                await asyncio.sleep(self._linger_s)
            batch = [self._inbox.popleft() for _ in range(min(len(self._inbox), self._batch_max))]
            self._let_in()
            self._idle.clear()
            try:
                await self.settler.settle(batch, self._ack)
            finally:
                self._idle.set()

    async def close(self) -> None:
        """Take nothing more: what is queued and not yet in a batch is answered "not kept" (no
        acknowledgement); the batch being committed finishes and is acknowledged."""
        self._closing = True
        self.state = LinkState.STOPPING
        while self._inbox:
            waiting = self._inbox.popleft()
            if not waiting.kept.done():
                waiting.kept.set_result(False)
                self.counters["not_kept"] += 1
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
        await self._idle.wait()
        self.state = LinkState.STOPPED
