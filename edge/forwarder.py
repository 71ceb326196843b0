"""Forward the spool upstream: QoS 1, in spool order, an entry removed only after its PUBACK.

The forwarder owns its connection loop (backoff with jitter) and makes a new paho client for
each connection, so nothing but the spool remembers what is unacknowledged: after a reconnect
everything still in the spool is sent again, oldest first. A message the broker received but
whose PUBACK was lost arrives twice; the bridge's deduplication (same identity, same content) absorbs it.

The drain is paced by a token bucket (``rate`` messages/s), so a backlog after an outage does
not swamp the bridge; live messages join the same queue and keep flowing behind the backlog.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import paho.mqtt.client as mqtt

from edge.spool import Entry, Spool
from firstcare.mqtt import MqttTarget, backoff_delay
from firstcare.payloads import now_ms
from firstcare.ratelimit import TokenBucket
from firstcare.tls import describe_tls_error

log = logging.getLogger("firstcare.edge")


class Forwarder:
    def __init__(self, spool: Spool, target: MqttTarget, client_id: str, status_topic: str,
                 rate: float, inflight: int) -> None:
        self.spool = spool
        self.target = target
        self.client_id = client_id
        self.status_topic = status_topic
        self.pacer = TokenBucket(rate, max(1.0, min(rate, inflight)))
        self.window = inflight
        self.state = "starting"
        self.last_error: str | None = None
        self.counters = {"published": 0, "acked": 0, "connects": 0, "disconnects": 0, "republished": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[int, int] = {}  # paho mid -> spool id
        self._acked: list[int] = []
        self._lock = threading.Lock()
        self.status_extra: dict = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fc-edge-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        self.target.apply(client)
        client.will_set(self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
        client.max_inflight_messages_set(self.window)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                    properties: object) -> None:
        if reason.is_failure:
            self.last_error = f"upstream refused the connection: {reason}"
            return
        self.state = "connected"
        self.last_error = None
        self.counters["connects"] += 1
        log.info("upstream connected to %s:%s", self.target.host, self.target.port)
        self.publish_status(client)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                       properties: object) -> None:
        self.counters["disconnects"] += 1
        if self.state == "connected":  # our own disconnect at a clean stop is no warning
            (log.info if self._stop.is_set() else log.warning)("upstream disconnected: %s", reason)
        self.state = "disconnected"

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: mqtt.ReasonCode,
                    properties: object) -> None:
        with self._lock:
            spool_id = self._inflight.pop(mid, None)
            if spool_id is not None:
                self._acked.append(spool_id)

    def publish_status(self, client: mqtt.Client) -> None:
        body = {"state": "online", "ts": now_ms(), **self.status_extra}
        client.publish(self.status_topic, json.dumps(body), qos=1, retain=True)

    def _flush_acked(self) -> None:
        with self._lock:
            acked, self._acked = self._acked, []
        if acked:
            self.spool.remove(acked)
            self.counters["acked"] += len(acked)

    def _send(self, client: mqtt.Client) -> None:
        with self._lock:
            room = self.window - len(self._inflight)
            skip = set(self._inflight.values())
        budget = min(room, self.pacer.available())
        if budget <= 0:
            return
        entries: list[Entry] = self.spool.next(budget, skip)
        for entry in entries:
            info = client.publish(entry.topic, entry.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            with self._lock:
                self._inflight[info.mid] = entry.id
            self.pacer.take()
            self.counters["published"] += 1

    def _run(self) -> None:
        rng = random.Random()
        failures = 0
        last_status = 0.0
        while not self._stop.is_set():
            client = self._client()
            self.state = "connecting"
            try:
                client.connect(self.target.host, self.target.port, keepalive=15)
            except (OSError, ValueError) as exc:  # ssl errors included: a wrong certificate is never accepted
                self.last_error = f"cannot reach upstream {self.target}: {describe_tls_error(exc)}"
            else:
                while not self._stop.is_set():
                    if client.loop(timeout=0.01) != mqtt.MQTT_ERR_SUCCESS:
                        break
                    self._flush_acked()
                    if self.state == "connected":
                        failures = 0
                        self._send(client)
                        if time.monotonic() - last_status > 10:
                            last_status = time.monotonic()
                            self.publish_status(client)
                if self._stop.is_set():
                    client.disconnect()
                    client.loop(timeout=0.1)
                self._flush_acked()
                self.last_error = self.last_error or "upstream connection lost"
            with self._lock:
                self.counters["republished"] += len(self._inflight)
                self._inflight.clear()
            sock = client.socket()
            if sock is not None:
                sock.close()
            if self._stop.is_set():
                break
            self.state = "disconnected"
            delay = backoff_delay(failures, rng)
            failures += 1
            log.warning("upstream %s; retrying in %.1fs", self.last_error, delay)
            self._stop.wait(delay)
        self.state = "stopped"

    @property
    def inflight(self) -> int:
        return len(self._inflight)
