"""MQTT consumption with a persistent QoS 1 session whose messages are acknowledged only once
the caller has stored them durably (the bridge's database, the edge gateway's spool).

paho-mqtt runs on its own network thread with ``manual_ack``: PUBACK is sent after the batch
holding the message has committed, never on receipt (aiomqtt cannot do this). The thread owns
the reconnect loop, outside the client, with exponential backoff and full jitter; the session
(fixed client id, clean session off) makes the broker keep and redeliver what we did not ack.

    paho thread --(bounded: blocks when full)--> asyncio queue --> batch --> Writer (commit)
        ^                                                                     |
        +-------------------------- ack(mid) after commit <-------------------+

A message redelivered after a reconnect carries a new packet id; an ack meant for an old
connection is discarded (the broker resends that message and (device, seq) dedup absorbs it).
"""

from __future__ import annotations

import asyncio
from collections import deque
import logging
import queue
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from firstcare.errors import StoreError
from firstcare.payloads import now_ms

log = logging.getLogger("firstcare.mqtt")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message as received from MQTT, before any validation."""

    topic: str
    payload: bytes
    received_ms: int
    retained: bool = False


@dataclass(frozen=True, slots=True)
class MqttTarget:
    host: str
    port: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str, default_port: int = 1883) -> "MqttTarget":
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ValueError(f"expected mqtt://[user:pass@]host[:port], got {url!r}")
        return cls(parts.hostname, parts.port or default_port,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, min * 2^attempt)], so a fleet of restarted
    bridges (or devices) does not reconnect in lockstep."""
    return rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** attempt)) + BACKOFF_MIN_S / 2


@dataclass(frozen=True, slots=True)
class _Received:
    inbound: Inbound
    generation: int
    mid: int
    qos: int


class AckingConsumer:
    def __init__(
        self,
        target: MqttTarget,
        client_id: str,
        topic_filter: str,
        handle_batch: Callable[[list[Inbound]], Awaitable[None]],
        queue_size: int = 10000,
        batch_max: int = 500,
        linger_ms: float = 5.0,
    ) -> None:
        self.target = target
        self.client_id = client_id
        self.topic_filter = topic_filter
        self._handle_batch = handle_batch
        self._batch_max = batch_max
        self._linger_s = linger_ms / 1000
        self._slots = threading.Semaphore(queue_size)
        self._queue_size = queue_size
        # Filled by the paho thread (deque appends are thread-safe); the event loop is woken once
        # per burst rather than once per message.
        self._inbox: deque[_Received] = deque()
        self._ready: asyncio.Event | None = None
        self._wakeup_pending = False
        self._acks: queue.SimpleQueue[tuple[int, int, int]] = queue.SimpleQueue()
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self.state = "starting"
        self.last_error: str | None = None
        self.store_error: str | None = None  # why the last batch could not be stored, until one is
        self.counters = {"received": 0, "acked": 0, "stale_acks": 0, "connects": 0, "disconnects": 0,
                         "queue_full_waits": 0, "store_retries": 0}

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def queue_depth(self) -> int:
        return len(self._inbox)

    # --- network thread -----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
            protocol=mqtt.MQTTv311, manual_ack=True,
        )
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, properties: object) -> None:
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            return
        self.state = "connected"
        self.counters["connects"] += 1
        self.last_error = None
        client.subscribe(self.topic_filter, qos=1)
        log.info("MQTT connected to %s:%s (session present: %s)", self.target.host, self.target.port,
                 flags.session_present)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, properties: object) -> None:
        self.counters["disconnects"] += 1
        if self.state == "connected":
            log.warning("MQTT disconnected: %s", reason)
        self.state = "disconnected"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received = _Received(Inbound(msg.topic, bytes(msg.payload), now_ms(), bool(msg.retain)),
                             self._generation, msg.mid, msg.qos)
        if not self._slots.acquire(blocking=False):
            # Queue full: stop reading the socket until the writer catches up. The broker keeps
            # the unacknowledged messages; nothing is dropped.
            self.counters["queue_full_waits"] += 1
            while not self._slots.acquire(timeout=0.5):
                if self._stop.is_set():
                    return
        self.counters["received"] += 1
        assert self._loop is not None
        self._inbox.append(received)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._loop.call_soon_threadsafe(self._wake)

    def _send_acks(self, client: mqtt.Client) -> None:
        while True:
            try:
                generation, mid, qos = self._acks.get_nowait()
            except queue.Empty:
                return
            if generation != self._generation:
                self.counters["stale_acks"] += 1
                continue
            client.ack(mid, qos)
            self.counters["acked"] += 1

    def _network(self) -> None:
        rng = random.Random()
        failures = 0
        client = self._client = self._make_client()
        while not self._stop.is_set():
            self.state = "connecting"
            self._generation += 1
            try:
                client.connect(self.target.host, self.target.port, keepalive=30)
            except OSError as exc:
                self.last_error = f"cannot connect to {self.target.host}:{self.target.port}: {exc}"
            else:
                while not self._stop.is_set():
                    rc = client.loop(timeout=0.02)
                    self._send_acks(client)
                    if self.connected:
                        failures = 0
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        break
                self.last_error = self.last_error or "connection lost"
            if self._stop.is_set():
                break
            self.state = "disconnected"
            delay = backoff_delay(failures, rng)
            failures += 1
            log.warning("MQTT %s; reconnecting in %.1fs", self.last_error, delay)
            self._stop.wait(delay)
        self._send_acks(client)
        client.disconnect()
        self.state = "stopped"

    # --- event loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup_pending = False
        assert self._ready is not None
        self._ready.set()

    async def _next_batch(self) -> list[_Received]:
        """Wait for a message, linger a moment so a burst commits together, take a batch."""
        assert self._ready is not None
        while not self._inbox:
            self._ready.clear()
            if self._inbox:
                break
            await self._ready.wait()
        if len(self._inbox) < self._batch_max and self._linger_s > 0:
            await asyncio.sleep(self._linger_s)
        inbox = self._inbox
        return [inbox.popleft() for _ in range(min(len(inbox), self._batch_max))]

    async def run(self) -> None:
        """Consume until cancelled. A failing store is retried with backoff, holding the batch
        (and the broker's copy) until it commits."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._network, name=f"fc-mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        rng = random.Random()
        try:
            while True:
                batch = await self._next_batch()
                attempt = 0
                while True:
                    try:
                        await self._handle_batch([r.inbound for r in batch])
                        self.store_error = None
                        break
                    except Exception as exc:  # noqa: BLE001 - keep the batch; the broker holds it too
                        self.counters["store_retries"] += 1
                        if not isinstance(exc, StoreError):
                            log.exception("unexpected error processing a batch")
                        self.store_error = str(exc)
                        delay = backoff_delay(attempt, rng)
                        attempt += 1
                        log.error("store failed (%s); retrying batch of %d in %.1fs", exc, len(batch), delay)
                        await asyncio.sleep(delay)
                for r in batch:
                    if r.qos > 0:
                        self._acks.put((r.generation, r.mid, r.qos))
                    self._slots.release()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)
