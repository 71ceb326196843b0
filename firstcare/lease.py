"""One process per MQTT client id and broker: a lease held on the broker itself.

A persistent session belongs to a client id. When two processes connect with the same id the
broker gives the session to the newer one and drops the other, which reconnects and takes it
back: they steal it from each other several times a second, and the readings end up split
between two databases. So before it opens its session, the bridge claims the id::

    topic    firstcare/lease/{client_id}                     retained, QoS 1
    payload  {"nonce", "host", "pid", "since_ms", "heartbeat_ms", "heartbeat_s", "lease_s", "replaces"}

**Acquire** (its own connection, client id ``{client_id}.lease.{nonce}``, so it never touches
the session): subscribe and read the retained claim. A claim of another instance whose
heartbeat is younger than its lease is watched for two heartbeats: refreshed means its owner is
alive, and the start is refused (:class:`LeaseHeld`); not refreshed (or older than the lease)
means its owner is gone (SIGKILL, power cut) and the claim is taken over. Then our claim is
published; a live claim of anyone else seen before ours comes back means a bridge started at
the same moment and got there first: refused as well.

**Hold**: the claim is refreshed every ``heartbeat_s``. A claim of the owner this instance took
over that shows up again (its clock was skewed beyond the lease, or it was cut off from the
broker for that long) means two live bridges: this one, the newcomer, *yields* (``on_yield``)
instead of fighting. A newer rival is ignored: it yields when it sees our next heartbeat.

**Release**: a clean stop clears the claim, so a restart is never delayed.

Limits: the lease protects one broker (a cluster must replicate retained messages); it needs
the bridge's user to have ``readwrite firstcare/lease/#`` (without it the start is refused, with
that hint). Thread model: paho's network thread runs the callbacks and owns ``_claims`` and the
events; the heartbeat thread only publishes; :meth:`acquire` blocks its caller (run it in a
worker thread) and reads what the callbacks recorded under ``_lock``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

import paho.mqtt.client as mqtt

from firstcare.errors import BrokerError
from firstcare.tls import ClientTls, client_context, describe_tls_error

log = logging.getLogger("firstcare.lease")

TOPIC_PREFIX = "firstcare/lease/"
HEARTBEAT_S = 2.0
LEASE_S = 10.0
CONNECT_TIMEOUT_S = 10.0
RETAINED_GRACE_S = 0.3


class LeaseState(StrEnum):
    """Where this bridge's claim on its client id stands (``lease_state`` in ``/realtime/stats``)."""

    IDLE = "idle"
    ACQUIRING = "acquiring"
    HELD = "held"
    YIELDED = "yielded"  # a newer bridge took the client id over
    RELEASED = "released"


class LeaseError(BrokerError):
    """The lease could not be checked or taken (broker unreachable, topic not allowed)."""

    reason = "lease_failed"


class BrokerUnreachable(LeaseError):
    """The broker did not answer: the lease could not be checked yet (retry)."""

    reason = "broker_unreachable"


class LeaseHeld(LeaseError):
    """Another live process holds the client id on this broker."""

    reason = "client_id_in_use"


def lease_topic(client_id: str) -> str:
    return TOPIC_PREFIX + client_id


@dataclass(frozen=True, slots=True)
class Claim:
    nonce: str
    host: str
    pid: int
    since_ms: int
    heartbeat_ms: int
    heartbeat_s: float = HEARTBEAT_S
    lease_s: float = LEASE_S
    replaces: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Claim | None:
        """None for an empty (cleared) or unreadable claim."""
        try:
            raw = json.loads(payload)
            return cls(str(raw["nonce"]), str(raw["host"]), int(raw["pid"]), int(raw["since_ms"]),
                       int(raw["heartbeat_ms"]), float(raw.get("heartbeat_s", HEARTBEAT_S)),
                       float(raw.get("lease_s", LEASE_S)), raw.get("replaces"))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now_ms: int) -> str:
        return f"the process {self.pid} on {self.host} (claimed {max(0, now_ms - self.heartbeat_ms) / 1000:.1f} s ago)"


def is_fresh(claim: Claim, now_ms: int) -> bool:
    """Young enough that its owner may be alive: watch it for a refresh before taking over."""
    return now_ms - claim.heartbeat_ms < claim.lease_s * 1000


def watch_seconds(claim: Claim) -> float:
    """How long to wait for a live owner's refresh: two heartbeats and a margin."""
    return claim.heartbeat_s * 2 + 1.0


@dataclass(frozen=True, slots=True)
class _Seen:
    claim: Claim
    live: bool  # False: the retained copy delivered on subscribe


class LeaseKeeper:
    def __init__(self, host: str, port: int, username: str | None, password: str | None, client_id: str,
                 on_yield: Callable[[str], object] | None = None, heartbeat_s: float = HEARTBEAT_S,
                 lease_s: float = LEASE_S, clock: Callable[[], int] | None = None,
                 tls: ClientTls | None = None) -> None:
        self.host, self.port = host, port
        self.client_id = client_id
        self.topic = lease_topic(client_id)
        self.nonce = secrets.token_hex(8)
        self._sync_topic = f"{self.topic}/sync/{self.nonce}"
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self._clock = clock or (lambda: int(time.time() * 1000))
        self._on_yield = on_yield
        self.since_ms = self._clock()
        self.replaces: str | None = None
        self.state = LeaseState.IDLE
        self.conflict: str | None = None
        self.rivals = 0
        self._lock = threading.Lock()
        self._seen: list[_Seen] = []
        self._subscribed = threading.Event()
        self._sub_failed = False
        self._refused: str | None = None
        self._synced = threading.Event()
        self._echoed = threading.Event()
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{client_id}.lease.{self.nonce}",
                                   clean_session=True, protocol=mqtt.MQTTv311)
        if username:
            self._client.username_pw_set(username, password)
        if tls is not None:  # the same TLS identity as the bridge's session (firstcare.tls)
            self._client.tls_set_context(client_context(tls))
        self._client.reconnect_delay_set(0.5, 10)  # type: ignore[arg-type]  # seconds; paho hints int, takes float
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # --- paho thread ----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                    properties: object) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._subscribed.set()
            return
        client.subscribe([(self.topic, 1), (self._sync_topic, 1)])
        if self.state == LeaseState.HELD:
            self._publish()  # a broker restarted without persistence has forgotten the claim

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                      properties: object) -> None:
        self._sub_failed = any(r.is_failure for r in reasons)
        self._subscribed.set()
        client.publish(self._sync_topic, b"sync", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._sync_topic:
            self._synced.set()
            return
        claim = Claim.decode(bytes(msg.payload))
        if claim is None:
            return
        if claim.nonce == self.nonce:
            self._echoed.set()
            return
        with self._lock:
            self._seen.append(_Seen(claim, not msg.retain))
        if self.state != LeaseState.HELD:
            return
        if claim.nonce == self.replaces:
            self._yield(f"client id {self.client_id!r} is still in use on {self.host}:{self.port} by "
                        f"{claim.describe(self._clock())}, whose claim this bridge had taken for dead; this bridge"
                        " stops its session instead of fighting over it")
        else:
            self.rivals += 1
            log.warning("another process (%s on %s) claims MQTT client id %r; keeping it (it started later and"
                        " will yield)", claim.pid, claim.host, self.client_id)
            self._publish()

    # --- acquire / hold / release ------------------------------------------------------------

    def _claim(self) -> Claim:
        return Claim(self.nonce, socket.gethostname(), os.getpid(), self.since_ms, self._clock(),
                     self.heartbeat_s, self.lease_s, self.replaces)

    def _publish(self) -> None:
        self._client.publish(self.topic, self._claim().encode(), qos=1, retain=True)

    def _live_rivals(self) -> list[Claim]:
        with self._lock:
            return [s.claim for s in self._seen if s.live]

    def acquire(self) -> None:
        """Block until the lease is ours; raise LeaseHeld or LeaseError."""
        self.state = LeaseState.ACQUIRING
        for event in (self._subscribed, self._synced, self._echoed):
            event.clear()
        self._sub_failed, self._refused = False, None
        with self._lock:
            self._seen.clear()
        where = f"{self.host}:{self.port}"
        hint = (f"the bridge's MQTT user needs readwrite access to {TOPIC_PREFIX}# on the broker"
                " (see broker-config/acl)")
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:  # TLS refusals included
            raise BrokerUnreachable(f"cannot reach the MQTT broker at {where} to check the client-id lease: "
                                    f"{describe_tls_error(exc)}") from exc
        self._client.loop_start()
        try:
            if not self._subscribed.wait(CONNECT_TIMEOUT_S):
                raise BrokerUnreachable(f"the MQTT broker at {where} did not accept the lease connection in time"
                                        " (refused credentials?)")
            if self._refused is not None:
                raise LeaseError(f"the MQTT broker at {where} refused the bridge's connection ({self._refused}):"
                                 " check the user and password in FC_MQTT_URL")
            if self._sub_failed:
                raise LeaseError(f"the MQTT broker at {where} refused the subscription to {self.topic}: {hint}")
            self._synced.wait(CONNECT_TIMEOUT_S)
            time.sleep(RETAINED_GRACE_S)
            with self._lock:
                retained = [s.claim for s in self._seen if not s.live]
            held = retained[-1] if retained else None
            if held is not None and is_fresh(held, self._clock()):
                deadline = time.monotonic() + watch_seconds(held)
                while time.monotonic() < deadline and not self._live_rivals():
                    time.sleep(0.05)
            live = self._live_rivals()
            if live:
                raise LeaseHeld(self._held_message(live[-1]))
            self.replaces = held.nonce if held is not None else None
            if held is not None:
                log.info("taking over MQTT client id %r from %s: no heartbeat within its lease",
                         self.client_id, held.describe(self._clock()))
            self._publish()
            if not self._echoed.wait(CONNECT_TIMEOUT_S):
                raise LeaseError(f"the lease claim on {self.topic} never came back from the broker at {where}: {hint}")
            live = self._live_rivals()
            if live:
                raise LeaseHeld(self._held_message(live[0]))
        except BaseException:
            self._client.loop_stop()
            self._client.disconnect()
            self.state = LeaseState.IDLE
            raise
        with self._lock:
            self._seen.clear()
        self.state = LeaseState.HELD
        self._beat_thread = threading.Thread(target=self._beat, name=f"fc-lease-{self.client_id}", daemon=True)
        self._beat_thread.start()

    def _held_message(self, claim: Claim) -> str:
        return (f"MQTT client id {self.client_id!r} is in use on {self.host}:{self.port} by "
                f"{claim.describe(self._clock())}: two bridges with one client id take the session from each other"
                " and split the readings between them. Stop the other bridge, or give this one its own"
                " FC_MQTT_CLIENT_ID (and its own database)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.state == LeaseState.HELD and self._client.is_connected():
                self._publish()

    def _yield(self, message: str) -> None:
        if self.state == LeaseState.YIELDED:
            return
        self.state = LeaseState.YIELDED
        self.conflict = message
        log.error("%s", message)
        if self._on_yield is not None:
            self._on_yield(message)

    def release(self) -> None:
        """Stop heartbeating; clear the claim unless another process owns it now."""
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(5)
        if self.state == LeaseState.HELD and self._client.is_connected():
            info = self._client.publish(self.topic, b"", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        if self.state in (LeaseState.HELD, LeaseState.YIELDED):
            self._client.loop_stop()
            self._client.disconnect()
        self.state = LeaseState.RELEASED if self.state == LeaseState.HELD else self.state
