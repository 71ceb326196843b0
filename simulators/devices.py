"""Simulated devices: one real paho MQTT client each, behaving like device firmware.

A device connects with its device id as client id (the production broker's ACL requires it),
sets its last will to ``offline`` on its status topic, announces itself ``online`` (retained)
on every connect, and publishes QoS 1 readings with its own increasing ``seq``. Faults make it
misbehave the way field devices do, so QA can see the bridge cope:

``device-offline``  after ``fault_after`` seconds the TCP connection dies without a DISCONNECT
                    packet, so the broker publishes the will; the device never comes back.
``flaky``           every ``fault_after`` seconds the connection drops (paho reconnects); it
                    re-sends earlier readings (duplicates), swaps some (out of order) and skips
                    a seq now and then (gaps).
``malformed``       every third message is bad, cycling through :data:`MALFORMED_KINDS`.

Every message that leaves a device takes the next ``seq``, so the bridge also sees the gaps
that rejected or skipped messages leave behind. Like firmware that cannot persist its counter,
each run starts at ``seq`` 1 under a fresh random ``boot`` id, announced in the ``online``
status and carried by every reading, so a restarted simulation is a new sequence to the bridge
and shows live at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import threading
from collections import Counter, deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firstcare.errors import BrokerError, ConfigError
from firstcare.metrics import METRICS
from firstcare.mqtt import MqttTarget
from firstcare.payloads import MAX_PAYLOAD_BYTES, encode_status, encode_vitals, now_ms
from firstcare.signing import sign
from firstcare.tls import ClientTls, describe_tls_error
from firstcare.topics import DEFAULT_ROOT, parse_topic, status_topic, vitals_topic
from simulators.physiology import Patient, measure

FAULTS: tuple[str, ...] = ("device-offline", "flaky", "malformed")
MALFORMED_KINDS: tuple[str, ...] = (
    "not_json", "unknown_metric", "impossible_value", "missing_seq",
    "wrong_unit", "string_value", "oversized", "unknown_device_type",
)
FIRMWARE = "sim-1.0.0"
KEEPALIVE_SECONDS = 30
BATTERY_DRAIN_PER_SECOND = 1 / 300
OVERSIZE_LIMIT_BYTES = MAX_PAYLOAD_BYTES + 512
"""Only the deliberate ``oversized`` message may pass MAX_PAYLOAD_BYTES, and only by a little,
so that with its topic it stays under the broker's ``max_packet_size`` (65 KiB in
broker-config/): a bigger packet gets the client dropped, and paho re-sends it on every
reconnect, forever."""

_WRONG_UNITS = {
    "heart_rate": "bpm", "spo2": "percent", "systolic_bp": "mmHg", "diastolic_bp": "mmHg",
    "respiratory_rate": "breaths/min", "temperature": "C", "glucose": "mg/dl", "weight": "lbs",
}
"""Units firmware authors really write instead of the contract's UCUM codes."""
_KIND_COUNTERS = {"duplicate": "duplicates_sent", "malformed": "malformed_sent"}


MqttEndpoint = MqttTarget  # the simulator's broker address: the one URL grammar of firstcare.mqtt


def parse_endpoint(url: str, tls: ClientTls | None = None) -> MqttTarget:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (user and password
    percent-encoded, as ``urllib.parse.quote`` writes them); ConfigError naming the URL."""
    try:
        return MqttTarget.parse(url, tls=tls)
    except ValueError as exc:
        raise ConfigError(f"invalid MQTT URL {url!r}: {exc}", "mqtt_url_invalid") from exc


def malformed_message(
    kind: str, topic: str, seq: int, ts_ms: int, metrics: dict[str, float], patient_id: str | None,
    root: str = DEFAULT_ROOT,
) -> tuple[str, bytes]:
    """A bad message of ``kind``, built by breaking a valid one, so each has one flaw.

    >>> malformed_message("impossible_value", "fc/v1/h1/oximeter/o-1/vitals", 1, 1_800_000_000_000,
    ...                   {"spo2": 97}, None)[1]
    b'{"seq":1,"ts":"2027-01-15T08:00:00.000Z","metrics":{"spo2":140}}'
    """
    body = json.loads(encode_vitals(seq, ts_ms, metrics, patient_id))
    first = next(iter(metrics))
    if kind == "not_json":
        return topic, f'{{"seq": {seq}, "metrics": {{{first}: '.encode()
    if kind == "unknown_metric":
        body["metrics"]["blood_alcohol"] = 0.4
    elif kind == "impossible_value":
        body["metrics"][first] = round(METRICS[first].high * 1.4)
    elif kind == "missing_seq":
        del body["seq"]
    elif kind == "wrong_unit":
        body["metrics"][first] = {"value": metrics[first], "unit": _WRONG_UNITS[first]}
    elif kind == "string_value":
        body["metrics"][first] = str(metrics[first])
    elif kind == "oversized":
        size = len(_dump(body | {"debug_log": ""}))
        body["debug_log"] = "x" * (MAX_PAYLOAD_BYTES + 1 - size)
    elif kind == "unknown_device_type":
        topic = str(dataclasses.replace(parse_topic(topic, root), device_type="toaster"))
    else:
        raise ValueError(f"unknown malformed kind {kind!r} (one of {', '.join(MALFORMED_KINDS)})")
    return topic, _dump(body)


def _dump(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Who a simulated device is and how it misbehaves (``fault`` is one of :data:`FAULTS`)."""

    hospital_id: str
    device_type: str
    device_id: str
    patient_id: str | None
    root: str = DEFAULT_ROOT
    fault: str | None = None
    fault_after: float = 10.0
    seed: int | str = 0

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (one of {', '.join(FAULTS)})")
        vitals_topic(self.hospital_id, self.device_type, self.device_id, self.root)


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Vitals messages only: ``published`` counts what paho accepted (duplicates and
    malformed included), ``acknowledged`` the PUBACKs for them."""

    published: int = 0
    acknowledged: int = 0
    errors: int = 0
    duplicates_sent: int = 0
    malformed_sent: int = 0
    unacknowledged: int = 0
    connected: bool = False
    dead: bool = False


class SimulatedDevice:
    """One device on its own paho network thread (``loop_start``).

    :meth:`tick` is called by one scheduler thread; paho callbacks run on the network thread,
    so everything they share sits behind ``_lock``.
    """

    def __init__(self, spec: DeviceSpec, endpoint: MqttTarget, patient: Patient,
                 signing_key: Ed25519PrivateKey | None = None, kid: str | None = None) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self._signing = (signing_key, kid or f"{spec.hospital_id}/{spec.device_type}/{spec.device_id}") \
            if signing_key is not None else None
        self._patient = patient
        self._rng = random.Random(f"device:{spec.seed}:{spec.device_id}")
        self._vitals_topic = vitals_topic(spec.hospital_id, spec.device_type, spec.device_id, spec.root)
        self._status_topic = status_topic(spec.hospital_id, spec.device_type, spec.device_id, spec.root)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._pending: dict[int, bool] = {}
        self._acked_early: set[int] = set()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._ever_connected = False
        self._dead = False
        self._seq = 0
        self.boot = os.urandom(6).hex()  # a new power cycle per run: never seeded, never reused
        self._ticks = 0
        self._recent: deque[bytes] = deque(maxlen=5)
        self._held: bytes | None = None
        self._next_drop = spec.fault_after
        self._battery_start = self._rng.uniform(60, 100)
        self._battery = round(self._battery_start)

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=spec.device_id, protocol=mqtt.MQTTv311)
        endpoint.apply(client)
        client.will_set(self._status_topic, encode_status("offline"), qos=1, retain=True)
        client.reconnect_delay_set(1, 8)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client

    @property
    def refused(self) -> str | None:
        """Why the broker refused the connection (CONNACK reason), if it did."""
        return self._refused

    def connect(self) -> None:
        """Open the TCP connection and start the network thread; CONNACK arrives later."""
        try:
            self._client.connect(self.endpoint.host, self.endpoint.port, keepalive=KEEPALIVE_SECONDS)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to {self.endpoint}: {describe_tls_error(exc)}",
                              "broker_unreachable") from exc
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stats(self) -> DeviceStats:
        with self._lock:
            return DeviceStats(
                **self._counts, unacknowledged=len(self._pending), connected=self._connected.is_set(), dead=self._dead
            )

    def tick(self, elapsed: float) -> None:
        """Take one reading at ``elapsed`` seconds into the run and publish it, faults included."""
        if self._dead:
            return
        fault = self.spec.fault
        if fault == "device-offline" and elapsed >= self.spec.fault_after:
            self._die()
            return
        if fault == "flaky" and elapsed >= self._next_drop:
            self._next_drop += self.spec.fault_after
            self._drop_connection()
        self._drain_battery(elapsed)
        self._ticks += 1
        metrics = measure(self._patient.vitals(elapsed), self.spec.device_type)
        if fault == "malformed" and self._ticks % 3 == 0:
            kind = MALFORMED_KINDS[(self._ticks // 3 - 1) % len(MALFORMED_KINDS)]
            topic, payload = malformed_message(
                kind, self._vitals_topic, self._next_seq(), now_ms(), metrics, self.spec.patient_id, self.spec.root
            )
            limit = OVERSIZE_LIMIT_BYTES if kind == "oversized" else MAX_PAYLOAD_BYTES
            self._publish(topic, payload, "malformed", limit=limit)
        elif fault == "flaky":
            self._publish_flaky(metrics)
        else:
            self._publish(self._vitals_topic, self._reading(metrics))

    def say_goodbye(self) -> None:
        """What firmware does on a clean power-off: last readings out, retained ``offline``."""
        if self._dead:
            return
        if self._held is not None:
            self._publish(self._vitals_topic, self._held)
            self._held = None
        self._publish_status("offline")

    def disconnect(self) -> None:
        if not self._dead:
            self._client.disconnect()

    def join(self) -> None:
        """Wait for the network thread; call :meth:`disconnect` first or this waits for PUBACKs."""
        self._client.loop_stop()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reading(self, metrics: dict[str, float]) -> bytes:
        return encode_vitals(self._next_seq(), now_ms(), metrics, self.spec.patient_id, self.boot)

    def _publish_flaky(self, metrics: dict[str, float]) -> None:
        """Gaps, out-of-order and duplicate readings on a fixed rhythm, so a short run shows all three."""
        k = self._ticks
        if k % 11 == 0:
            self._next_seq()
        payload = self._reading(metrics)
        self._recent.append(payload)
        if k % 7 == 3 and self._held is None:
            self._held = payload
            return
        self._publish(self._vitals_topic, payload)
        if self._held is not None:
            self._publish(self._vitals_topic, self._held)
            self._held = None
        if k % 5 == 0:
            sent = [p for p in self._recent if p is not payload]
            for old in self._rng.sample(sent, min(len(sent), self._rng.randint(1, 3))):
                self._publish(self._vitals_topic, old, "duplicate")

    def _drain_battery(self, elapsed: float) -> None:
        level = max(1, round(self._battery_start - BATTERY_DRAIN_PER_SECOND * elapsed))
        if level != self._battery:
            self._battery = level
            self._publish_status("online")

    def _publish_status(self, state: str) -> None:
        boot = self.boot if state == "online" else None
        self._publish(self._status_topic, encode_status(state, self._battery, FIRMWARE, now_ms(), boot), "status")

    def _publish(self, topic: str, payload: bytes, kind: str = "reading", *, limit: int = MAX_PAYLOAD_BYTES) -> None:
        """Publish at QoS 1. ``kind`` is ``reading``, ``duplicate``, ``malformed`` or ``status``;
        all but status count as published vitals. A signing device wraps every vitals message
        (firstcare.signing), unless the wrapper would outgrow the limit (only ``oversized`` can)."""
        if self._signing is not None and kind != "status":
            signed = sign(self._signing[0], self._signing[1], topic, payload)
            if len(signed) <= limit:
                payload = signed
        if len(payload) > limit:
            self._count("errors")
            return
        info = self._client.publish(topic, payload, qos=1, retain=kind == "status")
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._count("errors")
            return
        counted = kind != "status"
        with self._lock:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
                self._counts["acknowledged"] += counted
            else:
                self._pending[info.mid] = counted
            self._counts["published"] += counted
            if kind in _KIND_COUNTERS:
                self._counts[_KIND_COUNTERS[kind]] += 1

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _drop_connection(self) -> None:
        """Cut the TCP connection under paho, with no DISCONNECT packet: to the broker this is a
        device that lost power or signal, so it publishes the will. ``shutdown`` (not ``close``)
        leaves paho to notice the end of stream and close its own socket."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # TCP or TLS (paho's WebSocket wrapper has no shutdown)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _die(self) -> None:
        self._dead = True
        self._drop_connection()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._count("errors")
            return
        if self._dead:
            self._drop_connection()
            return
        self._ever_connected = True
        self._connected.set()
        self._publish_status("online")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._ever_connected and self.endpoint.tls is not None and self._refused is None:
            # a TLS 1.3 server refuses a client certificate after the client's handshake is done:
            # the connection then ends before any CONNACK
            self._refused = f"closed the connection before CONNACK ({reason_code}): is the device's certificate valid?"
        self._connected.clear()
        if self._dead:
            client.loop_stop()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            counted = self._pending.pop(mid, None)
            if counted is None:
                self._acked_early.add(mid)
            else:
                self._counts["acknowledged"] += counted
