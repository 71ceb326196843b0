"""Forward the spool upstream: QoS 1, in spool order, an entry removed only after its PUBACK, and
a message the upstream will never take moved to the quarantine instead of retried forever.

The forwarder runs its connections on its own thread through the product's one reconnect loop
(:func:`firstcare.mqtt.reconnect_loop`: backoff with full jitter, outside the client) and makes a
new paho client for each connection, so nothing but the spool remembers what is unacknowledged:
after a reconnect everything still in the spool is sent again, oldest first. A message the
broker received but whose PUBACK was lost arrives twice; the bridge's deduplication (same
identity, same content) absorbs it.

**MQTT 5 where the upstream speaks it** (``protocol="auto"``, the default; else ``"5"`` or
``"3.1.1"``), because only MQTT 5 tells a refusal apart from an acceptance:

* a PUBACK reason code of 0x80 or more refuses the message (:func:`edge.packets.puback_refusal`):
  not authorised (0x87), topic name invalid (0x90), packet too large (0x95) and payload format
  invalid (0x99) quarantine it at once; quota exceeded (0x97), unspecified (0x80) and
  implementation specific (0x83) errors are tried again with backoff, and quarantined after
  ``quarantine_after`` refusals. The queue behind it moves on meanwhile.
* the CONNACK's Maximum Packet Size (and Receive Maximum) are honoured: an entry is measured
  before it is published, an oversize vitals batch is split into batches that fit
  (:func:`edge.packets.fit`), and what cannot be split is quarantined ``packet_too_large``.

An upstream that does not answer an MQTT 5 CONNECT (amqtt, MQTT 3.1.1 only) gets 3.1.1 from
then on, until the gateway restarts. MQTT 3.1.1 has no negative PUBACK: a broker that denies a
publish (ACL) acknowledges it and drops it, and the gateway cannot know.

**A message that gets the connection dropped** (a broker that closes the connection on a packet
it will not take, without saying why): when the connection drops while several entries are in
flight, those entries become suspects and are sent again one at a time; a drop while exactly one
entry is in flight counts against it (not a keepalive timeout: that is the network), and at
``quarantine_after`` drops it is quarantined ``connection_dropped``. The count is kept in the
spool, so it survives restarts.

The drain is paced by a token bucket (``rate`` messages/s), so a backlog after an outage does
not swamp the bridge; live messages join the same queue and keep flowing behind the backlog.

The gateway's own status (``status_body()``) is published retained every ``status_every_s`` and
soon after :meth:`status_changed`; a clean stop publishes ``offline``, and the will does when the
gateway dies.

Threads: the forwarder thread owns the client, the in-flight tables and ``counters`` (fixed
keys; other threads copy it); other threads read ``state``, ``last_error``, ``inflight``,
``protocol`` and ``max_packet`` (single attribute reads) and call :meth:`status_changed`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge.packets import DISCONNECT_PACKET_TOO_LARGE, Refusal, fit, puback_refusal
from edge.spool import Spool
from firstcare.errors import FirstCareError
from firstcare.mqtt import LinkState, MqttTarget, backoff_delay, describe_error, reconnect_loop
from firstcare.payloads import now_ms
from firstcare.ratelimit import TokenBucket
from firstcare.tls import describe_tls_error

log = logging.getLogger("firstcare.edge")

PROTOCOLS = ("auto", "5", "3.1.1")
CONNACK_TIMEOUT_S = 10.0
KEEPALIVE_S = 15
KEEPALIVE_TIMEOUT = 0x8D  # DISCONNECT reason: our own keepalive expired (the network, not a message)
STATUS_MIN_INTERVAL_S = 1.0


class Forwarder:
    def __init__(self, spool: Spool, target: MqttTarget, client_id: str, status_topic: str,
                 rate: float, inflight: int, *, protocol: str = "auto", max_packet_bytes: int = 0,
                 quarantine_after: int = 3, status_every_s: float = 10.0,
                 status_body: Callable[[], dict[str, Any]] | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self.spool = spool
        self.target = target
        self.client_id = client_id
        self.status_topic = status_topic
        self.pacer = TokenBucket(rate, max(1.0, min(rate, inflight)))
        self.window = inflight
        self.protocol_setting = protocol
        self.max_packet_setting = max_packet_bytes
        self.quarantine_after = quarantine_after
        self.status_every_s = status_every_s
        self._status_body = status_body or (lambda: {})
        self.state: LinkState = LinkState.STARTING
        self.last_error: str | None = None
        self.protocol: str | None = None  # what the current (or last) connection speaks
        self.max_packet = 0  # the largest packet the upstream takes: the setting, or what it advertised
        self.counters = {"published": 0, "acked": 0, "connects": 0, "disconnects": 0, "republished": 0,
                         "split": 0, "quarantined": 0, "refusals": 0, "drops": 0, "status_published": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mqtt5_ok: bool | None = None if protocol == "auto" else protocol == "5"
        self._receive_maximum = inflight
        self._flights: dict[int, int] = {}  # paho mid -> spool id
        self._parts_left: dict[int, int] = {}  # spool id -> parts not yet acknowledged
        self._done: list[int] = []  # acknowledged, to be removed from the spool
        self._refused: list[tuple[int, Refusal]] = []
        self._deferred: dict[int, float] = {}  # spool id -> monotonic time of its next try
        self._suspects: set[int] = set()  # in flight when the connection dropped: sent one at a time
        self._status_mids: set[int] = set()
        self._disconnect: tuple[int, bool] | None = None  # (reason code, sent by the broker)
        self._connack: int | None = None  # reason code of this connection's CONNACK
        self._status_due = threading.Event()
        self._last_status = 0.0

    # --- control (any thread) --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fc-edge-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def status_changed(self) -> None:
        """Something the hospital should hear (a discard, a quarantine): publish the status soon."""
        self._status_due.set()

    @property
    def inflight(self) -> int:
        return len(self._flights)

    # --- the connection (forwarder thread) ---------------------------------------------------

    def _run(self) -> None:
        reconnect_loop(self._session, self._stop, self._will_reconnect)
        self.state = LinkState.STOPPED

    def _will_reconnect(self, delay: float) -> None:
        self.state = LinkState.DISCONNECTED
        log.warning("%s; connecting to the upstream again in %.1fs", self.last_error, delay)

    def _use_mqtt5(self) -> bool:
        return self._mqtt5_ok is not False

    def _client(self, mqtt5: bool) -> mqtt.Client:
        if mqtt5:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                                 protocol=mqtt.MQTTv311)
        self.target.apply(client)
        client.will_set(self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
        client.max_inflight_messages_set(0)  # the window is ours (_send)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _session(self) -> bool:
        """One connection, until it drops or the forwarder stops; True if it got connected."""
        mqtt5 = self._use_mqtt5()
        client = self._client(mqtt5)
        self.state = LinkState.CONNECTING
        self._disconnect = None
        self._connack = None
        try:
            if mqtt5:
                client.connect(self.target.host, self.target.port, keepalive=KEEPALIVE_S, clean_start=True)
            else:
                client.connect(self.target.host, self.target.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as exc:  # ssl errors included: a wrong certificate is never accepted
            self.last_error = f"cannot reach upstream {self.target}: {describe_tls_error(exc)}"
            return False
        connected = False
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while not self._stop.is_set():
            try:
                rc = client.loop(timeout=0.01)
            except Exception as exc:  # noqa: BLE001 - a CONNACK paho cannot read (an MQTT 3.1.1-only broker)
                self.last_error = f"upstream answered in a way the client cannot read: {describe_error(exc)}"
                break
            if rc != mqtt.MQTT_ERR_SUCCESS:
                break
            self._flush()
            if self.state == LinkState.CONNECTED:
                connected = True
                self._send(client)
                self._maybe_publish_status(client)
            elif self._connack is not None:
                break  # refused
            elif time.monotonic() > deadline:
                self.last_error = f"no CONNACK from upstream {self.target} within {CONNACK_TIMEOUT_S:.0f}s"
                break
        if self._stop.is_set() and connected:  # a clean stop says so (the will covers a crash)
            client.publish(self.status_topic, json.dumps({"state": "offline", "ts": now_ms()}), qos=1, retain=True)
            client.disconnect()
            client.loop(timeout=0.1)
        self._flush()
        if not connected and mqtt5 and self._mqtt5_ok is None and self._connack in (None, 0x84):
            self._mqtt5_ok = False
            log.info("upstream %s did not accept MQTT 5 (%s): speaking MQTT 3.1.1 to it from now on, which cannot"
                     " tell a refused message from a delivered one", self.target, self.last_error)
        elif connected and not self._stop.is_set():
            self._attribute_drop()
        self.last_error = self.last_error or "upstream connection lost"
        self.counters["republished"] += len(self._flights)
        self._flights.clear()
        self._parts_left.clear()
        self._status_mids.clear()
        sock = client.socket()
        if sock is not None:
            sock.close()
        return connected

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                    properties: Any) -> None:
        self._connack = reason.value
        if reason.is_failure:  # 0x84, unsupported protocol version, makes an "auto" gateway speak 3.1.1
            self.last_error = f"upstream refused the connection: {reason}"
            return
        mqtt5 = client.protocol == mqtt.MQTTv5
        if mqtt5:
            self._mqtt5_ok = True
        self.protocol = "5" if mqtt5 else "3.1.1"
        advertised = int(getattr(properties, "MaximumPacketSize", 0) or 0) if mqtt5 else 0
        limits = [n for n in (advertised, self.max_packet_setting) if n > 0]
        self.max_packet = min(limits) if limits else 0
        self._receive_maximum = int(getattr(properties, "ReceiveMaximum", 0) or 65535) if mqtt5 else 65535
        self.state = LinkState.CONNECTED
        self.last_error = None
        self.counters["connects"] += 1
        log.info("upstream connected to %s (MQTT %s, maximum packet %s)", self.target, self.protocol,
                 self.max_packet or "not stated")
        self._publish_status(client)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: mqtt.ReasonCode, properties: object) -> None:
        self.counters["disconnects"] += 1
        self._disconnect = (int(getattr(reason, "value", 0x80)), bool(getattr(flags, "is_disconnect_packet_from_server",
                                                                                False)))
        if self.state == LinkState.CONNECTED:  # our own disconnect at a clean stop is no warning
            (log.info if self._stop.is_set() else log.warning)("upstream disconnected: %s", reason)
            self.last_error = f"disconnected: {reason}"
        self.state = LinkState.DISCONNECTED

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: mqtt.ReasonCode,
                    properties: object) -> None:
        if mid in self._status_mids:
            self._status_mids.discard(mid)
            return
        spool_id = self._flights.pop(mid, None)
        if spool_id is None or spool_id not in self._parts_left:
            return  # a part of an entry already refused
        refusal = puback_refusal(reason.value, str(reason)) if client.protocol == mqtt.MQTTv5 else None
        if refusal is not None:
            del self._parts_left[spool_id]
            self._refused.append((spool_id, refusal))
            return
        self._parts_left[spool_id] -= 1
        if self._parts_left[spool_id] == 0:
            del self._parts_left[spool_id]
            self._done.append(spool_id)

    # --- the queue ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Acknowledged entries leave the spool; refused ones are quarantined or tried later.
        A spool that refuses the write keeps them for the next round."""
        try:
            if self._done:
                self.spool.remove(self._done)
                self.counters["acked"] += len(self._done)
                self._suspects.difference_update(self._done)
                self._done = []
            while self._refused:
                spool_id, refusal = self._refused[0]
                self._refuse(spool_id, refusal)
                self._refused.pop(0)
        except FirstCareError as exc:
            self.last_error = f"spool: {exc}"

    def _refuse(self, spool_id: int, refusal: Refusal) -> None:
        self.counters["refusals"] += 1
        tries = 1 if refusal.permanent else self.spool.record_refusal(spool_id)
        if refusal.permanent or tries >= self.quarantine_after:
            self._quarantine(spool_id, refusal)
            return
        delay = backoff_delay(tries, random.Random())
        self._deferred[spool_id] = time.monotonic() + delay
        log.warning("upstream refused spool entry %d (%s); trying it again in %.1fs", spool_id, refusal.detail, delay)

    def _quarantine(self, spool_id: int, refusal: Refusal) -> None:
        if self.spool.quarantine(spool_id, refusal.reason, refusal.detail, now_ms()):
            self.counters["quarantined"] += 1
            log.warning("quarantined spool entry %d: %s (%s)", spool_id, refusal.reason, refusal.detail)
        self._suspects.discard(spool_id)
        self._deferred.pop(spool_id, None)
        self.status_changed()

    def _attribute_drop(self) -> None:
        """The connection dropped while connected: was it one message?"""
        in_flight = set(self._flights.values()) | set(self._parts_left)
        reason, from_broker = self._disconnect or (0x80, False)
        if not in_flight or (reason == KEEPALIVE_TIMEOUT and not from_broker):
            return
        if len(in_flight) > 1:
            self._suspects |= in_flight
            return
        (spool_id,) = in_flight
        try:
            if reason == DISCONNECT_PACKET_TOO_LARGE and from_broker:
                self._quarantine(spool_id, Refusal("packet_too_large", "the upstream disconnected with 0x95 packet too"
                                                   " large while this message was in flight"))
                return
            self.counters["drops"] += 1
            drops = self.spool.record_drop(spool_id)
            if drops >= self.quarantine_after:
                self._quarantine(spool_id, Refusal(
                    "connection_dropped", f"the upstream dropped the connection {drops} times while this message was"
                    " the only one in flight"))
            else:
                self._suspects.add(spool_id)
        except FirstCareError as exc:
            self.last_error = f"spool: {exc}"

    def _send(self, client: mqtt.Client) -> None:
        now = time.monotonic()
        for spool_id in [i for i, due in self._deferred.items() if due <= now]:
            del self._deferred[spool_id]
        busy = set(self._flights.values()) | set(self._parts_left)
        if self._suspects and busy:
            return  # suspects go one entry at a time
        room = (1 if self._suspects else min(self.window, self._receive_maximum)) - len(self._flights)
        budget = min(room, self.pacer.available())
        if budget <= 0:
            return
        try:
            entries = self.spool.next(budget, busy | set(self._deferred))
        except FirstCareError as exc:
            self.last_error = f"spool: {exc}"
            return
        mqtt5 = client.protocol == mqtt.MQTTv5
        for entry in entries:
            if self._suspects and entry.id not in self._suspects:
                self._suspects.clear()  # the suspects are gone (delivered, evicted): back to the full window
            parts = fit(entry.topic, entry.payload, self.max_packet, mqtt5)
            if isinstance(parts, Refusal):
                self._refused.append((entry.id, parts))
                continue
            if len(parts) > 1:
                self.counters["split"] += 1
            self._parts_left[entry.id] = len(parts)
            for payload in parts:
                info = client.publish(entry.topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return
                self._flights[info.mid] = entry.id
                self.pacer.take()
                self.counters["published"] += 1
            if self._suspects:
                return

    # --- status --------------------------------------------------------------------------------

    def _maybe_publish_status(self, client: mqtt.Client) -> None:
        since = time.monotonic() - self._last_status
        if since >= self.status_every_s or (self._status_due.is_set() and since >= STATUS_MIN_INTERVAL_S):
            self._publish_status(client)

    def _publish_status(self, client: mqtt.Client) -> None:
        self._status_due.clear()
        self._last_status = time.monotonic()
        try:
            body = {"state": "online", "ts": now_ms(), **self._status_body()}
        except Exception as exc:  # noqa: BLE001 - the status must not stop the forwarding
            log.warning("gateway status not built: %s", describe_error(exc))
            return
        info = client.publish(self.status_topic, json.dumps(body), qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._status_mids.add(info.mid)
            self.counters["status_published"] += 1
