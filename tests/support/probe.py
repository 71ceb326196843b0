"""A paho 2.x MQTT client for broker tests (Mosquitto and the embedded broker), events in queues.

"Not delivered" is never proven by waiting: a denied message is followed by an allowed
"marker" published after the broker acknowledged the denied one; a broker routes a QoS 1
message to its subscribers before it sends the PUBACK, so once the marker has arrived the
denied message would have arrived before it.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from firstcare.tls import ClientTls, client_context

WAIT = 30.0  # generous: a timeout here means "never", not "slow" (TLS on a loaded machine)
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code


class Probe:
    """It never reconnects by itself: a reconnect would hide a disconnect and would re-send a
    refused oversize publish forever."""

    def __init__(self, host: str, port: int, client_id: str, username: str | None = None,
                 password: str | None = None, *, tls: ClientTls | None = None,
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311, clean_session: bool = True,
                 live_only: bool = False, will: tuple[str, bytes] | None = None) -> None:
        self.host, self.port = host, port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  reconnect_on_failure=False,
                                  clean_session=None if protocol == mqtt.MQTTv5 else clean_session)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set_context(client_context(tls))
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connacks: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.pubacks: dict[int, object] = {}
        self.disconnected = threading.Event()
        self.disconnect_reason = None
        self._puback_cond = threading.Condition()
        c = self.client
        c.on_connect = lambda _c, _u, _flags, rc, _props: self.connacks.put(rc)
        # live_only: ignore retained messages left by earlier tests
        c.on_message = lambda _c, _u, msg: None if live_only and msg.retain else self.messages.put(msg)
        c.on_subscribe = lambda _c, _u, _mid, rcs, _props: self.subacks.put(rcs)
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _props: Any) -> None:
        with self._puback_cond:
            self.pubacks[mid] = rc
            self._puback_cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any) -> None:
        self.disconnect_reason = rc
        self.disconnected.set()

    def connect(self, **kwargs: Any) -> mqtt.ReasonCode:
        """Connect and return the CONNACK reason code (loop stopped on refusal)."""
        self.client.connect(self.host, self.port, keepalive=30, **kwargs)
        self.client.loop_start()
        rc = self.connacks.get(timeout=WAIT)
        if rc.is_failure:
            self.client.loop_stop()
        return rc

    def connect_ok(self, **kwargs: Any) -> Probe:
        rc = self.connect(**kwargs)
        assert not rc.is_failure, f"{self.client._client_id!r} refused: {rc}"
        return self

    def refusal(self) -> str:
        """Try to connect; return how the broker refused (fails the test if it accepted).

        A refused TLS handshake surfaces either in ``connect`` (an SSL error: the server's
        certificate, or TLS 1.2 client certificate checks) or, with TLS 1.3, once the client
        reads the server's alert: the connection closes before any CONNACK."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            return f"handshake: {exc}"
        self.client.loop_start()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                rc = self.connacks.get(timeout=0.05)
                break
            except queue.Empty:
                if self.disconnected.is_set():
                    return f"closed before CONNACK: {self.disconnect_reason}"
                assert time.monotonic() < deadline, "neither accepted nor refused"
        if not rc.is_failure:
            assert self.disconnected.wait(WAIT), f"accepted ({rc}) and kept connected"
            return f"closed after CONNACK: {self.disconnect_reason}"
        return f"CONNACK {rc}"

    def subscribe(self, topic: str, qos: int = 1) -> list:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Any:
        """Publish and wait for the broker's ack; return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._puback_cond:
            assert self._puback_cond.wait_for(lambda: info.mid in self.pubacks, WAIT), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def next_message(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def drain(self) -> list[mqtt.MQTTMessage]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()
        # paho closes its sockets only in __del__; inside a reference cycle the
        # socket may be finalized first and warn (ResourceWarning -> error).
        self.client._reset_sockets()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def received(probe: Probe, until_payload: bytes) -> list[bytes]:
    """Payloads received up to and including ``until_payload`` (the marker)."""
    seen: list[bytes] = []
    while True:
        try:
            msg = probe.next_message()
        except queue.Empty:
            pytest.fail(f"marker {until_payload!r} never arrived; got {seen}")
        seen.append(bytes(msg.payload))
        if msg.payload == until_payload:
            return seen
