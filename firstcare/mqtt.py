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
connection is discarded (the broker resends that message and the bridge's deduplication absorbs it).

Shared by every MQTT client of the product (bridge ingest, edge ward consumer, edge forwarder):
:class:`MqttTarget` (the one URL parser), :func:`reconnect_loop` (the one reconnect loop, outside
the client, with exponential backoff and full jitter) and :class:`Settler` (store a batch or
isolate the message that cannot be stored, then acknowledge; the edge's embedded ward broker
settles its device publishes with it too).

A session is only worth something if the broker really kept it. ``session_expected`` says
whether one ought to exist (the caller remembers across restarts that it established one);
a CONNACK with ``session present: false`` when one was expected means the broker lost the
queue (restarted without persistence, session expired): ``on_session_lost`` is called, on the
event loop, so the caller can raise an alarm. ``on_session_established`` is called once the
subscription of a new session is granted. With MQTT 5 the session gets a Session Expiry
Interval (without one it would end at every disconnect), and a broker that says "session
taken over" three times within a minute makes the consumer stop fighting (state ``conflict``).

Threads: the paho thread owns the connection, ``state``, ``last_error`` and the counters it
increments; the event loop owns the batches and the settler (``store_error``, ``busy_since``). ``counters``
has a fixed set of keys made here and never added to, so any thread may copy it (``dict.copy``
runs under the GIL in one step); readers never iterate it live. ``close_intake`` (handing an
ingest slot over) may be called from any thread: ``_intake`` orders it with the paho thread's
appends to the inbox, so nothing is taken after it returns.

No message can stall the stream (poison isolation, :class:`Settler`): when the
batch handler raises :class:`~firstcare.errors.StoreUnavailable` the store itself is down, so
the whole batch is retried with backoff and stays unacknowledged. Any other exception is
blamed on the batch's content: the batch is split in halves, each re-run in order, until the
failing message stands alone; ``quarantine(message, exc)`` then records it durably (a dead
letter) and it is acknowledged like the rest. Parts that succeed are acknowledged at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from firstcare.errors import StoreUnavailable
from firstcare.payloads import Inbound, now_ms
from firstcare.tls import ClientTls, client_context, describe_tls_error

log = logging.getLogger("firstcare.mqtt")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code
TAKEOVER_LIMIT = 3
TAKEOVER_WINDOW_S = 60.0


class LinkState(StrEnum):
    """An MQTT link's state, as the bridge's consumer, the edge's forwarder and its ward intake report it
    (``/readyz``, ``/realtime/stats``, the ``firstcare_mqtt_state`` gauge): the values are what
    those spell."""

    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"
    CONFLICT = "conflict"  # another bridge holds the client id (see firstcare.lease)
    LISTENING = "listening"  # the edge's embedded ward broker, taking device connections
    STOPPING = "stopping"


PLAIN_SCHEMES = ("mqtt", "tcp")
TLS_SCHEMES = ("mqtts", "ssl")
URL_GRAMMAR = "mqtt://[user:pass@]host[:port] or mqtts://[user:pass@]host[:port]"


@dataclass(frozen=True, slots=True)
class MqttTarget:
    """A broker address: ``mqtt://[user:pass@]host[:port]`` (plain, port 1883) or
    ``mqtts://[user:pass@]host[:port]`` (TLS, port 8883). The one parser for bridge, edge and
    simulator; the CA, client certificate and key come from their settings as :class:`ClientTls`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: ClientTls | None = None

    @classmethod
    def parse(cls, url: str, default_port: int | None = None, tls: ClientTls | None = None) -> MqttTarget:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"expected {URL_GRAMMAR}, got {url!r}: {exc}") from exc
        if parts.scheme not in PLAIN_SCHEMES + TLS_SCHEMES or not parts.hostname or port == 0:
            raise ValueError(f"expected {URL_GRAMMAR}, got {url!r}")
        secure = parts.scheme in TLS_SCHEMES
        return cls(parts.hostname, port or default_port or (8883 if secure else 1883),
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None,
                   (tls or ClientTls()) if secure else None)

    def apply(self, client: mqtt.Client) -> None:
        """Credentials and TLS on a paho client, before it connects."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls is not None:
            client.tls_set_context(client_context(self.tls))

    def __str__(self) -> str:
        """The URL with the password hidden, for messages and logs."""
        user = f"{self.username}{':***' if self.password else ''}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


def is_tls_url(url: str) -> bool:
    """``mqtts://`` (or ``ssl://``): the scheme alone, for any URL :meth:`MqttTarget.parse` takes."""
    return url.partition("://")[0] in TLS_SCHEMES


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, min * 2^attempt)], so a fleet of restarted
    bridges (or devices) does not reconnect in lockstep."""
    return rng.uniform(0, min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** attempt)) + BACKOFF_MIN_S / 2


def reconnect_loop(session: Callable[[], bool], stop: threading.Event,
                   on_retry: Callable[[float], None], rng: random.Random | None = None) -> None:
    """The reconnect loop, outside the client, on the caller's network thread.

    ``session()`` runs one connection to its end (connect, loop until the link drops or ``stop``
    is set) and returns whether it got connected. Between sessions the loop waits
    :func:`backoff_delay` (full jitter), counting failures since the last session that got
    connected, and tells ``on_retry(delay)`` first (state, log). Returns once ``stop`` is set.
    Whatever must outlive a connection (the bridge's acknowledgements, the edge's spool) lives
    with the caller, never in the client."""
    rng = rng or random.Random()
    failures = 0
    while not stop.is_set():
        if session():
            failures = 0
        if stop.is_set():
            return
        delay = backoff_delay(failures, rng)
        failures += 1
        on_retry(delay)
        stop.wait(delay)


@dataclass(frozen=True, slots=True)
class _Received:
    inbound: Inbound
    generation: int
    mid: int
    qos: int


BATCH_MAX_BYTES = 256 * 1024
"""Payload bytes one batch (one transaction) takes at most, beside its message count: 500
gateway messages of 50 readings would be 25,000 readings in one transaction, their alarms
and acknowledgements waiting for all of them."""


def take_batch(inbox: deque[_Received], most: int, most_bytes: int) -> list[_Received]:
    """The next batch from the front of ``inbox``: at most ``most`` messages and ``most_bytes``
    of payload, and at least one message when there is one (a message larger than the budget
    goes alone).

    >>> q = deque(_Received(Inbound("t", b"x" * n, 0), 1, i, 1) for i, n in enumerate([40, 40, 40, 10]))
    >>> [len(take_batch(q, 500, 100)), len(take_batch(q, 500, 100)), len(q)]
    [2, 2, 0]
    """
    batch: list[_Received] = []
    size = 0
    while inbox and len(batch) < most:
        size += len(inbox[0].inbound.payload)
        if batch and size > most_bytes:
            break
        batch.append(inbox.popleft())
    return batch


STALL_SECONDS = 10.0
"""A batch still in the handler after this long makes :meth:`AckingConsumer.health` report a
stall (a handler that hangs raises nothing that could be isolated)."""


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """``ExceptionClass: message``, shortened: the detail of an ``internal_error`` dead letter."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


T = TypeVar("T")


class Settler(Generic[T]):
    """Store a batch, or isolate what cannot be stored; acknowledge each part once it is done.

    ``handle_batch`` stores the inbound messages of a part; ``ack(part)`` is called once that
    part is stored (or its one failing message quarantined), in order. The store down
    (:class:`StoreUnavailable`, or a quarantine that fails): the same part is retried with
    backoff and jitter, unacknowledged, for as long as it takes. Any other exception is blamed
    on the content: the part is halved and both halves re-run in order, down to one message,
    which goes to ``quarantine`` (or, without one, is retried like a store failure).

    Owned by one event loop; ``counters`` (``store_retries``, ``batch_splits``,
    ``poison_isolated``) is the owner's dict and gets no new keys here.
    """

    def __init__(self, handle_batch: Callable[[list[Inbound]], Awaitable[None]],
                 quarantine: Callable[[Inbound, Exception], Awaitable[None]] | None,
                 counters: dict[str, int], inbound: Callable[[T], Inbound]) -> None:
        self._handle_batch = handle_batch
        self._quarantine = quarantine
        self._inbound = inbound
        self.counters = counters
        self.store_error: str | None = None  # why the last batch could not be stored, until one is
        self.busy_since: float | None = None  # monotonic time the batch in the handler started

    def health(self, stall_seconds: float = STALL_SECONDS) -> str | None:
        """``None`` while batches go through; else why not (retrying a store that refuses
        writes, or one batch in the handler for too long). Readiness reports it."""
        if self.store_error is not None:
            return f"retrying: {self.store_error}"
        started = self.busy_since
        if started is not None and (busy := time.monotonic() - started) >= stall_seconds:
            return f"stalled: one batch in processing for {busy:.0f}s"
        return None

    async def settle(self, batch: list[T], ack: Callable[[list[T]], None]) -> None:
        rng = random.Random()
        attempt = 0
        parts = [batch]
        self.busy_since = time.monotonic()
        try:
            while parts:
                part = parts[0]
                try:
                    await self._handle_batch([self._inbound(item) for item in part])
                except StoreUnavailable as exc:
                    attempt = await self._retry_later(exc, len(part), attempt, rng)
                    continue
                except Exception as exc:  # noqa: BLE001 - blamed on the content; isolated below
                    if len(part) > 1:
                        self.counters["batch_splits"] += 1
                        half = len(part) // 2
                        parts[:1] = [part[:half], part[half:]]
                        log.warning("batch of %d failed (%s); splitting it to isolate the message",
                                    len(part), describe_error(exc))
                        continue
                    if not await self._isolate(self._inbound(part[0]), exc):
                        attempt = await self._retry_later(exc, 1, attempt, rng)
                        continue
                parts.pop(0)
                self.store_error = None
                attempt = 0
                ack(part)
                self.busy_since = time.monotonic()
        finally:
            self.busy_since = None

    async def _isolate(self, inbound: Inbound, exc: Exception) -> bool:
        """Hand the one failing message to ``quarantine``; False if that did not work."""
        if self._quarantine is None:
            log.error("message on %s failed and there is no quarantine: %s", inbound.topic,
                      describe_error(exc), exc_info=exc)
            return False
        log.error("message on %s quarantined: %s", inbound.topic, describe_error(exc), exc_info=exc)
        try:
            await self._quarantine(inbound, exc)
        except Exception as failure:  # noqa: BLE001 - the dead letter could not be written: keep it
            log.error("quarantine of a message on %s failed: %s", inbound.topic, describe_error(failure))
            return False
        self.counters["poison_isolated"] += 1
        return True

    async def _retry_later(self, exc: Exception, size: int, attempt: int, rng: random.Random) -> int:
        self.counters["store_retries"] += 1
        self.store_error = str(exc) or type(exc).__name__
        delay = backoff_delay(attempt, rng)
        log.error("store failed (%s); retrying %d message(s) in %.1fs", self.store_error, size, delay)
        await asyncio.sleep(delay)
        self.busy_since = time.monotonic()
        return attempt + 1


class AckingConsumer:
    def __init__(
        self,
        target: MqttTarget,
        client_id: str,
        topic_filter: str | Sequence[str],
        handle_batch: Callable[[list[Inbound]], Awaitable[None]],
        queue_size: int = 10000,
        batch_max: int = 500,
        linger_ms: float = 5.0,
        protocol: str = "3.1.1",
        session_expiry_s: int = 0,
        session_expected: bool = False,
        on_session_lost: Callable[[], None] | None = None,
        on_session_established: Callable[[], None] | None = None,
        quarantine: Callable[[Inbound, Exception], Awaitable[None]] | None = None,
        batch_max_bytes: int = BATCH_MAX_BYTES,
    ) -> None:
        if target.tls is not None:
            client_context(target.tls)  # a missing or bad file fails here, at start, not on the network thread
        self.target = target
        self.protocol = protocol
        self.session_expiry_s = session_expiry_s
        self.session_expected = session_expected
        self._on_session_lost = on_session_lost
        self._on_session_established = on_session_established
        self._takeovers: deque[float] = deque()
        self.conflict: str | None = None
        self.client_id = client_id
        self.topic_filters = (topic_filter,) if isinstance(topic_filter, str) else tuple(topic_filter)
        self.topic_filter = self.topic_filters[0]
        self._match_filters = tuple(f.split("/", 2)[2] if f.startswith("$share/") else f for f in self.topic_filters)
        self._ours: dict[str, bool] = {}  # topic -> matches a filter (paho's matcher is slow); MQTT thread
        self._batch_max = batch_max
        self._batch_max_bytes = batch_max_bytes
        self._linger_s = linger_ms / 1000
        self._slots = threading.Semaphore(queue_size)
        self._queue_size = queue_size
        # Filled by the paho thread (deque appends are thread-safe); the event loop is woken once
        # per burst rather than once per message.
        self._inbox: deque[_Received] = deque()
        self._ready: asyncio.Event | None = None
        self._wakeup_pending = False
        self._acks: queue.SimpleQueue[list[tuple[int, int, int]]] = queue.SimpleQueue()  # one list per part
        self._generation = 0
        self._stop = threading.Event()
        self._intake = threading.Lock()  # orders appends to the inbox with close_intake
        self._closing = False  # close_intake was called: take nothing more, settle what was taken
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self.state: LinkState = LinkState.STARTING
        self.last_error: str | None = None
        self.counters = {"received": 0, "acked": 0, "stale_acks": 0, "connects": 0, "disconnects": 0,
                         "queue_full_waits": 0, "store_retries": 0, "sessions_lost": 0, "taken_over": 0, "foreign": 0,
                         "batch_splits": 0, "poison_isolated": 0}
        self.settler: Settler[_Received] = Settler(handle_batch, quarantine, self.counters, lambda r: r.inbound)

    @property
    def connected(self) -> bool:
        return self.state == LinkState.CONNECTED

    def queue_depth(self) -> int:
        return len(self._inbox)

    def health(self, stall_seconds: float = STALL_SECONDS) -> str | None:
        """``None`` while batches go through; else why not (see :meth:`Settler.health`)."""
        return self.settler.health(stall_seconds)

    @property
    def store_error(self) -> str | None:
        """Why the last batch could not be stored, until one is."""
        return self.settler.store_error

    @property
    def busy_since(self) -> float | None:
        """Monotonic time the batch in the handler started."""
        return self.settler.busy_since

    @busy_since.setter
    def busy_since(self, value: float | None) -> None:
        self.settler.busy_since = value

    # --- network thread -----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        if self.protocol == "5":
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv5, manual_ack=True)
        else:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                protocol=mqtt.MQTTv311, manual_ack=True,
            )
        self.target.apply(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self, client: mqtt.Client) -> None:
        if self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            client.connect(self.target.host, self.target.port, keepalive=30, clean_start=False,
                           properties=properties)
        else:
            client.connect(self.target.host, self.target.port, keepalive=30)

    def _call_soon(self, callback: Callable[[], None] | None) -> None:
        if callback is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(callback)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, properties: object) -> None:
        if reason.is_failure:
            self.last_error = f"connection refused: {reason}"
            return
        self.state = LinkState.CONNECTED
        self.counters["connects"] += 1
        self.last_error = None
        client.subscribe([(f, 1) for f in self.topic_filters])
        log.info("MQTT connected to %s:%s (session present: %s)", self.target.host, self.target.port,
                 flags.session_present)
        if self.session_expected and not flags.session_present:
            self.counters["sessions_lost"] += 1
            log.warning("MQTT session %r lost: the broker at %s:%s answered 'session present: false' where it"
                        " should have kept the session; readings it held for the bridge may be lost",
                        self.client_id, self.target.host, self.target.port)
            self._call_soon(self._on_session_lost)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                      properties: object) -> None:
        if any(r.is_failure for r in reasons):
            self.last_error = f"subscription to {', '.join(self.topic_filters)} refused: {reasons[0]}"
            log.error("MQTT %s", self.last_error)
            return
        self.session_expected = True
        self._call_soon(self._on_session_established)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: mqtt.ReasonCode, properties: object) -> None:
        self.counters["disconnects"] += 1
        if self.state == LinkState.CONNECTED:  # our own disconnect at a clean stop is no warning
            (log.info if self._stop.is_set() else log.warning)("MQTT disconnected: %s", reason)
        self.state = LinkState.DISCONNECTED
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self.counters["taken_over"] += 1
            now = time.monotonic()
            self._takeovers.append(now)
            while self._takeovers and self._takeovers[0] < now - TAKEOVER_WINDOW_S:
                self._takeovers.popleft()
            if len(self._takeovers) >= TAKEOVER_LIMIT:
                self.yield_session(f"the broker gave MQTT session {self.client_id!r} to another client"
                                   f" {len(self._takeovers)} times within {TAKEOVER_WINDOW_S:.0f} s: another process"
                                   " uses this client id; this bridge stops its session instead of fighting over it")

    def yield_session(self, message: str) -> None:
        """Stop fighting over a client id another process holds: disconnect and stay down
        (``state`` ``conflict``), leaving the session and its queue to the other process."""
        if self.conflict is None:
            self.conflict = message
            log.error("%s", message)
        self._stop.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if not self._is_ours(msg.topic):
            # Not ours: amqtt sends a connecting client the retained messages of every client's
            # subscriptions (e.g. another process's lease topic). Counted, acknowledged, skipped.
            self.counters["foreign"] += 1
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
        received = _Received(Inbound(msg.topic, bytes(msg.payload), now_ms(), bool(msg.retain)),
                             self._generation, msg.mid, msg.qos)
        if not self._slots.acquire(blocking=False):
            # Queue full: stop reading the socket until the writer catches up. The broker keeps
            # the unacknowledged messages; nothing is dropped.
            self.counters["queue_full_waits"] += 1
            while not self._slots.acquire(timeout=0.5):
                if self._stop.is_set() or self._closing:
                    return
        with self._intake:
            if self._closing:
                # Left unacknowledged: the session keeps it and resends it to whoever connects
                # with this client id next (an ingest slot's next holder).
                self._slots.release()
                return
            self.counters["received"] += 1
            assert self._loop is not None
            self._inbox.append(received)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._loop.call_soon_threadsafe(self._wake)

    def _is_ours(self, topic: str) -> bool:
        """Whether a topic matches one of our filters, remembered per topic (a device's topic
        recurs with every reading; the table is emptied when it grows past 65,536 topics)."""
        ours = self._ours.get(topic)
        if ours is None:
            if len(self._ours) >= 65_536:
                self._ours.clear()
            ours = self._ours[topic] = any(mqtt.topic_matches_sub(f, topic) for f in self._match_filters)
        return ours

    def _send_acks(self, client: mqtt.Client) -> None:
        while True:
            try:
                acks = self._acks.get_nowait()
            except queue.Empty:
                return
            for generation, mid, qos in acks:
                if generation != self._generation:
                    self.counters["stale_acks"] += 1
                    continue
                client.ack(mid, qos)
                self.counters["acked"] += 1

    def _network(self) -> None:
        client = self._client = self._make_client()
        reconnect_loop(lambda: self._session(client), self._stop, self._will_reconnect)
        self._send_acks(client)
        client.disconnect()
        self.state = LinkState.CONFLICT if self.conflict is not None else LinkState.STOPPED

    def _session(self, client: mqtt.Client) -> bool:
        """One connection, until it drops or the consumer stops; True if it got connected."""
        self.state = LinkState.CONNECTING
        self._generation += 1
        try:
            self._connect(client)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError, CertificateError a ValueError
            self.last_error = f"cannot connect to {self.target}: {describe_tls_error(exc)}"
            return False
        connected = False
        while not self._stop.is_set():
            rc = client.loop(timeout=0.02)
            self._send_acks(client)
            connected = connected or self.connected
            if rc != mqtt.MQTT_ERR_SUCCESS:
                break
        self.last_error = self.last_error or "connection lost"
        return connected

    def _will_reconnect(self, delay: float) -> None:
        self.state = LinkState.DISCONNECTED
        log.warning("MQTT %s; reconnecting in %.1fs", self.last_error, delay)

    # --- event loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup_pending = False
        assert self._ready is not None
        self._ready.set()

    def close_intake(self) -> None:
        """Take no more messages (those arriving stay unacknowledged with the session) and let
        :meth:`run` return once everything taken is settled and acknowledged: how an ingest slot
        is handed over without two bridges processing one message at once. Any thread."""
        with self._intake:
            self._closing = True
        if self._loop is not None and self._ready is not None:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def _next_batch(self) -> list[_Received]:
        """Wait for a message, linger a moment so a burst commits together, take a batch
        (empty once the intake is closed and nothing is left)."""
        assert self._ready is not None
        while not self._inbox:
            if self._closing:
                return []
            self._ready.clear()
            if self._inbox:
                break
            await self._ready.wait()
        if len(self._inbox) < self._batch_max and self._linger_s > 0:
            await asyncio.sleep(self._linger_s)
        return take_batch(self._inbox, self._batch_max, self._batch_max_bytes)

    async def run(self) -> None:
        """Consume until cancelled (or, after :meth:`close_intake`, drained); every batch is
        settled (stored or quarantined, then acknowledged) before the next is taken, so
        per-device order is kept."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._network, name=f"fc-mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        try:
            while batch := await self._next_batch():
                await self._settle(batch)
        finally:
            await self.stop()  # sends the acknowledgements of every settled batch, then disconnects

    async def _settle(self, batch: list[_Received]) -> None:
        await self.settler.settle(batch, self._ack)

    def _ack(self, part: list[_Received]) -> None:
        acks = [(r.generation, r.mid, r.qos) for r in part if r.qos > 0]
        if acks:
            self._acks.put(acks)
        if part:
            self._slots.release(len(part))

    async def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)
