"""A device as firmware would be: a paho client with a will, publishing QoS 1."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import paho.mqtt.client as mqtt

from firstcare.payloads import encode_status, format_ts
from firstcare.signing import sign
from firstcare.tls import ClientTls, client_context
from firstcare.topics import status_topic, vitals_topic


class Device:
    def __init__(self, port: int, device_id: str = "ox-1", device_type: str = "oximeter", hospital_id: str = "h1",
                 host: str = "127.0.0.1", username: str | None = None, password: str | None = None,
                 will: bool = True, tls: ClientTls | None = None, signing_key: Any = None,
                 kid: str | None = None) -> None:
        self.device_type, self.device_id, self.hospital_id = device_type, device_id, hospital_id
        self.vitals_topic = vitals_topic(hospital_id, device_type, device_id)
        self.status_topic = status_topic(hospital_id, device_type, device_id)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(client_context(tls))
        self.signing_key, self.kid = signing_key, kid or f"{hospital_id}/{device_type}/{device_id}"
        if will:
            self.client.will_set(self.status_topic, encode_status("offline"), qos=1, retain=True)
        self.client.connect(host, port, keepalive=5)
        self.client.loop_start()
        self.seq = 0

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def vitals(self, metrics: dict[str, Any], seq: int | None = None, patient_id: str | None = "p-001",
               ts_ms: int | None = None) -> int:
        """Publish a reading; signed when the device has a signing key."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.publish(self.vitals_topic, self.reading(metrics, seq, patient_id, ts_ms))
        return seq

    def reading(self, metrics: dict[str, Any], seq: int, patient_id: str | None = "p-001",
                ts_ms: int | None = None, topic: str | None = None) -> bytes:
        """The payload of a reading as this device sends it (a signature wrapper when it signs)."""
        body: dict[str, Any] = {"seq": seq, "ts": format_ts(ts_ms or int(time.time() * 1000)), "metrics": metrics}
        if patient_id is not None:
            body["patient_id"] = patient_id
        payload = json.dumps(body).encode()
        if self.signing_key is None:
            return payload
        return sign(self.signing_key, self.kid, topic or self.vitals_topic, payload)

    def status(self, state: str = "online", battery: int | None = None) -> None:
        self.publish(self.status_topic, encode_status(state, battery=battery, firmware="1.0.0"), retain=True)

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT packet, as a dead battery would: the
        broker then publishes the will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CountingDevice:
    """A device publishing ``count`` readings at ``rate``/s on its own thread, counting every
    PUBACK it gets (paho's ``on_publish``): ``acked`` is exactly what the device was told is
    safe. paho keeps an unacknowledged QoS 1 message and sends it again after a reconnect, as
    firmware does; the client reconnects by itself within a second or two."""

    def __init__(self, port: int, device_id: str, count: int, rate: float, device_type: str = "oximeter",
                 hospital_id: str = "h1", host: str = "127.0.0.1") -> None:
        import threading

        self.device_id, self.count, self.rate = device_id, count, rate
        self.topic = vitals_topic(hospital_id, device_type, device_id)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]  # seconds; paho hints int, takes float
        self.client.max_inflight_messages_set(20)
        self._lock = threading.Lock()
        self._mids: dict[int, int] = {}
        self._early: set[int] = set()
        self.acked: set[int] = set()
        self.published = 0
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=5)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object, properties: object) -> None:
        with self._lock:  # never held while paho's own locks are (publish): paho holds them here
            seq = self._mids.pop(mid, None)
            if seq is None:
                self._early.add(mid)  # acknowledged before publish() returned its mid
            else:
                self.acked.add(seq)

    def _run(self) -> None:
        start = time.monotonic()
        for seq in range(1, self.count + 1):
            body = {"seq": seq, "ts": format_ts(int(time.time() * 1000)), "metrics": {"spo2": 90 + seq % 10}}
            info = self.client.publish(self.topic, json.dumps(body).encode(), qos=1)
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    self.acked.add(seq)
                else:
                    self._mids[info.mid] = seq
            self.published += 1
            delay = start + seq / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def start(self) -> CountingDevice:
        self._thread.start()
        return self

    def finished(self) -> bool:
        """Every reading published and acknowledged."""
        return not self._thread.is_alive() and len(self.acked) == self.count

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
