"""broker-config/ proven against a real Mosquitto 2.0.

Who may publish and read what (acl + passwd), the packet size limit, the
persistent-session queue, and the dev config. "Not delivered" is never proven
by waiting: a denied message is followed by an allowed "marker", published
after the broker acknowledged the denied one. Mosquitto routes a QoS 1 message
to its subscribers before it sends the PUBACK, so once the marker has arrived
the denied message would have arrived before it.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from tests.support.brokers import (
    BRIDGE_PASSWORD,
    BRIDGE_USER,
    DEV_CONF,
    DEVICE_PASSWORD,
    DEVICE_USER,
    GATEWAY_PASSWORD,
    GATEWAY_USER,
    PRODUCTION_CONF,
    SIMULATOR_PASSWORD,
    SIMULATOR_USER,
    MosquittoInstance,
    parse_config,
    require_mosquitto,
    start_mosquitto,
)

WAIT = 10.0  # generous: a timeout here means "never", not "slow"
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code


class Probe:
    """A paho 2.x client (VERSION2 callbacks) whose events land in queues.

    It never reconnects by itself: a reconnect would hide a disconnect and
    would re-send a refused oversize publish forever.
    """

    def __init__(
        self,
        broker: MosquittoInstance,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
        clean_session: bool = True,
        live_only: bool = False,
    ) -> None:
        self.broker = broker
        session = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean_session}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **session,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
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
        c.on_message = lambda _c, _u, msg: (
            None if live_only and msg.retain else self.messages.put(msg)
        )
        c.on_subscribe = lambda _c, _u, _mid, rcs, _props: self.subacks.put(rcs)
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect

    def _on_publish(self, _c, _u, mid, rc, _props) -> None:
        with self._puback_cond:
            self.pubacks[mid] = rc
            self._puback_cond.notify_all()

    def _on_disconnect(self, _c, _u, _flags, rc, _props) -> None:
        self.disconnect_reason = rc
        self.disconnected.set()

    def connect(self, **kwargs) -> mqtt.ReasonCode:
        """Connect and return the CONNACK reason code (loop stopped on refusal)."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=30, **kwargs)
        self.client.loop_start()
        rc = self.connacks.get(timeout=WAIT)
        if rc.is_failure:
            self.client.loop_stop()
        return rc

    def connect_ok(self, **kwargs) -> Probe:
        rc = self.connect(**kwargs)
        assert not rc.is_failure, f"{self.client._client_id!r} refused: {rc}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> list:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False):
        """Publish and wait for the broker's ack; return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._puback_cond:
            assert self._puback_cond.wait_for(lambda: info.mid in self.pubacks, WAIT), (
                f"no PUBACK for {topic}"
            )
            return self.pubacks[info.mid]

    def publish_nowait(self, topic: str, payload: bytes | str, qos: int = 1):
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


@pytest.fixture
def probes() -> Iterator:
    """Factory for probes, all closed after the test."""
    made: list[Probe] = []

    def make(broker, client_id=None, username=None, password=None, **kwargs) -> Probe:
        probe = Probe(broker, client_id or f"t-{uuid.uuid4().hex[:10]}", username, password, **kwargs)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def bridge(make, broker, topic: str = "fc/#", **kwargs) -> Probe:
    probe = make(broker, unique("bridge"), BRIDGE_USER, BRIDGE_PASSWORD, live_only=True, **kwargs)
    probe.connect_ok()
    rcs = probe.subscribe(topic, 1)
    assert not rcs[0].is_failure, rcs
    return probe


def received(probe: Probe, until_payload: bytes) -> list[bytes]:
    """Payloads received up to and including ``until_payload`` (the marker)."""
    seen = []
    while True:
        try:
            msg = probe.next_message()
        except queue.Empty:
            pytest.fail(f"marker {until_payload!r} never arrived; got {seen}")
        seen.append(msg.payload)
        if msg.payload == until_payload:
            return seen


# --------------------------------------------------------------------------
# authentication
# --------------------------------------------------------------------------

def test_anonymous_connect_is_refused(mosquitto_secure, probes):
    rc = probes(mosquitto_secure).connect()
    assert rc.is_failure
    assert rc == "Not authorized"


def test_wrong_password_is_refused(mosquitto_secure, probes):
    rc = probes(mosquitto_secure, "ox-1", DEVICE_USER, "not-the-password").connect()
    assert rc.is_failure
    assert rc == "Not authorized"
    rc = probes(mosquitto_secure, "ox-1", "nobody", DEVICE_PASSWORD).connect()
    assert rc.is_failure


@pytest.mark.parametrize(
    ("user", "password"),
    [(BRIDGE_USER, BRIDGE_PASSWORD), (DEVICE_USER, DEVICE_PASSWORD),
     (SIMULATOR_USER, SIMULATOR_PASSWORD), (GATEWAY_USER, GATEWAY_PASSWORD)],
)
def test_every_dev_login_works(mosquitto_secure, probes, user, password):
    probes(mosquitto_secure, unique(user), user, password).connect_ok()


# --------------------------------------------------------------------------
# devices write only under their own client id
# --------------------------------------------------------------------------

def test_device_publishes_under_its_own_id_and_bridge_receives(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    device = probes(mosquitto_secure, "ox-1", DEVICE_USER, DEVICE_PASSWORD).connect_ok()
    rc = device.publish("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 1}')
    assert not rc.is_failure
    msg = bridge_probe.next_message()
    assert (msg.topic, msg.payload, msg.qos) == ("fc/v1/h1/oximeter/ox-1/vitals", b'{"seq": 1}', 1)

    device.publish("fc/v1/h1/oximeter/ox-1/status", b'{"state": "online"}', retain=True)
    assert bridge_probe.next_message().topic == "fc/v1/h1/oximeter/ox-1/status"


def test_device_cannot_publish_as_another_device(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    device = probes(mosquitto_secure, "ox-1", DEVICE_USER, DEVICE_PASSWORD).connect_ok()
    denied = [
        "fc/v1/h1/oximeter/ox-2/vitals",  # someone else's id
        "fc/v1/h1/oximeter/ox-2/status",
        "fc/v1/h1/oximeter/ox-1/other",  # not a contract topic
        "fc/edge/ox-1/status",
        "elsewhere",
    ]
    for topic in denied:
        # MQTT 3.1.1 cannot say no: Mosquitto acks a denied publish and drops it.
        assert not device.publish(topic, b"denied").is_failure
    device.publish("fc/v1/h1/oximeter/ox-1/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_device_with_another_client_id_cannot_publish_as_the_device(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    impostor = probes(mosquitto_secure, "not-ox-1", DEVICE_USER, DEVICE_PASSWORD).connect_ok()
    impostor.publish("fc/v1/h1/oximeter/ox-1/vitals", b"denied")
    impostor.publish("fc/v1/h1/oximeter/not-ox-1/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_mqtt5_device_is_told_its_publish_was_not_authorized(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    device = probes(
        mosquitto_secure, "ox-5", DEVICE_USER, DEVICE_PASSWORD, protocol=mqtt.MQTTv5
    ).connect_ok()
    rc = device.publish("fc/v1/h1/oximeter/ox-2/vitals", b"denied")
    assert rc.value == NOT_AUTHORIZED
    assert not device.publish("fc/v1/h1/oximeter/ox-5/vitals", b"marker").is_failure
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_device_cannot_read_readings(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    device = probes(mosquitto_secure, "ox-1", DEVICE_USER, DEVICE_PASSWORD).connect_ok()
    # Mosquitto 2.0.11 grants every SUBSCRIBE (MQTT 3.1.1 and 5, even "#") and
    # applies the read ACL to each message at delivery: only delivery counts.
    device.subscribe("fc/#")
    device.subscribe("fc/v1/h1/oximeter/ox-1/vitals")  # not even its own
    simulator = probes(mosquitto_secure, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    simulator.connect_ok()
    simulator.publish("fc/v1/h1/oximeter/ox-9/vitals", b"reading")
    device.publish("fc/v1/h1/oximeter/ox-1/vitals", b"own")
    assert received(bridge_probe, b"own") == [b"reading", b"own"]
    # The device's PUBACK came after anything the broker sent it before:
    # had it been allowed to read, "reading" would already be queued here.
    assert device.drain() == []


def test_device_last_will_marks_it_offline(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    sock = raw_connect(
        mosquitto_secure, "ox-7", DEVICE_USER, DEVICE_PASSWORD,
        will=("fc/v1/h1/oximeter/ox-7/status", b'{"state": "offline"}'),
    )
    sock.close()  # no DISCONNECT: the broker must publish the will
    msg = bridge_probe.next_message()
    assert (msg.topic, msg.payload) == ("fc/v1/h1/oximeter/ox-7/status", b'{"state": "offline"}')


def test_device_cannot_set_a_will_for_another_device(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    try:
        sock = raw_connect(
            mosquitto_secure, "ox-8", DEVICE_USER, DEVICE_PASSWORD,
            will=("fc/v1/h1/oximeter/ox-2/status", b"denied"),
        )
    except ConnectionRefusedByBroker:
        pass  # refusing at CONNECT is fine too
    else:
        sock.close()
    device = probes(mosquitto_secure, "ox-8", DEVICE_USER, DEVICE_PASSWORD).connect_ok()
    device.publish("fc/v1/h1/oximeter/ox-8/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


# --------------------------------------------------------------------------
# bridge, simulator and gateway
# --------------------------------------------------------------------------

def test_bridge_only_reads(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    other = probes(mosquitto_secure, unique("bridge"), BRIDGE_USER, BRIDGE_PASSWORD).connect_ok()
    other.publish("fc/v1/h1/monitor/m-1/vitals", b"denied")
    other.publish("fc/edge/gw-1/status", b"denied")
    simulator = probes(mosquitto_secure, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    simulator.connect_ok().publish("fc/v1/h1/monitor/m-1/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_bridge_shared_subscription_mqtt5(mosquitto_secure, probes):
    """Scaled-out bridges share one subscription; the ACL must allow it."""
    bridge_probe = bridge(
        probes, mosquitto_secure, f"$share/{unique('ingest')}/fc/v1/#", protocol=mqtt.MQTTv5
    )
    device = probes(mosquitto_secure, "bp-1", DEVICE_USER, DEVICE_PASSWORD).connect_ok()
    device.publish("fc/v1/h2/bp/bp-1/vitals", b"shared")
    assert bridge_probe.next_message().payload == b"shared"


def test_simulator_publishes_as_any_device_but_reads_nothing(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    simulator = probes(mosquitto_secure, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    simulator.connect_ok().subscribe("fc/#")
    for device_id in ("ox-1", "ox-2", "mon-77"):
        simulator.publish(f"fc/v1/h1/oximeter/{device_id}/vitals", device_id.encode())
    simulator.publish("fc/edge/gw-1/status", b"denied")
    simulator.publish("fc/v1/h1/oximeter/ox-3/status", b"marker")
    assert received(bridge_probe, b"marker") == [b"ox-1", b"ox-2", b"mon-77", b"marker"]
    assert simulator.drain() == []


def test_gateway_forwards_readings_and_owns_fc_edge(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    gateway = probes(mosquitto_secure, unique("gw"), GATEWAY_USER, GATEWAY_PASSWORD).connect_ok()
    assert not gateway.subscribe("fc/edge/#")[0].is_failure
    gateway.subscribe("fc/v1/#")  # granted or not, nothing may arrive
    gateway.publish("fc/v1/h1/monitor/m-1/vitals", b"forwarded")
    gateway.publish("fc/edge/gw-1/status", b'{"state": "online"}')
    assert received(bridge_probe, b'{"state": "online"}') == [b"forwarded", b'{"state": "online"}']
    # Its own edge status comes back to it; the forwarded reading, published
    # first, would have come back first had the gateway been allowed to read it.
    assert gateway.next_message().payload == b'{"state": "online"}'


# --------------------------------------------------------------------------
# packet size
# --------------------------------------------------------------------------

def test_contract_sized_payload_passes(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    simulator = probes(mosquitto_secure, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    simulator.connect_ok()
    long_id = "d" * 64  # longest id the contract allows
    topic = f"fc/v1/{'h' * 64}/thermometer/{long_id}/vitals"
    for size in (60 * 1024, 64 * 1024):
        payload = bytes([size % 251]) * size
        simulator.publish(topic, payload)
        assert bridge_probe.next_message().payload == payload


def test_oversize_packet_disconnects_publisher_and_is_dropped(mosquitto_secure, probes):
    bridge_probe = bridge(probes, mosquitto_secure)
    publisher = probes(mosquitto_secure, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    publisher.connect_ok()
    publisher.publish_nowait("fc/v1/h1/monitor/m-1/vitals", b"x" * (66 * 1024))
    assert publisher.disconnected.wait(WAIT), "broker kept a client that sent an oversize packet"
    marker = probes(mosquitto_secure, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    marker.connect_ok().publish("fc/v1/h1/monitor/m-1/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


# --------------------------------------------------------------------------
# persistent sessions: an offline bridge loses nothing
# --------------------------------------------------------------------------

def publish_many(probe: Probe, topic: str, count: int) -> None:
    infos = [probe.publish_nowait(topic, str(i).encode()) for i in range(count)]
    for info in infos:
        info.wait_for_publish(WAIT)
        assert info.is_published()


def queued_for_offline_bridge(broker: MosquittoInstance, make, count: int, restart=None) -> list[int]:
    """Bridge subscribes (clean session off), goes away, ``count`` readings are
    published, the broker is optionally restarted, the bridge comes back."""
    bridge_id = unique("bridge")
    first = make(broker, bridge_id, BRIDGE_USER, BRIDGE_PASSWORD, clean_session=False).connect_ok()
    first.subscribe("fc/#", 1)
    first.close()
    simulator = make(broker, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD)
    simulator.client.max_inflight_messages_set(1000)  # paho allows this only before connect
    simulator.connect_ok()
    publish_many(simulator, "fc/v1/h1/monitor/m-1/vitals", count)
    simulator.close()
    if restart is not None:
        restart()
    again = make(broker, bridge_id, BRIDGE_USER, BRIDGE_PASSWORD, clean_session=False).connect_ok()
    # A marker published now is queued behind everything the session holds.
    marker = make(broker, unique("sim"), SIMULATOR_USER, SIMULATOR_PASSWORD).connect_ok()
    marker.publish("fc/v1/h1/monitor/m-1/vitals", b"-1")
    return [int(p) for p in received(again, b"-1")[:-1]]


@pytest.fixture
def own_broker(tmp_path):
    """A production broker of the test's own, free to restart or kill."""
    require_mosquitto()
    broker = start_mosquitto(tmp_path, dev=False)
    yield broker
    broker.stop()


def test_offline_bridge_queue_outlives_mosquitto_default_limit(own_broker, probes):
    # Mosquitto's default (max_queued_messages 1000) would drop the last 500.
    got = queued_for_offline_bridge(own_broker, probes, 1500)
    assert got == list(range(1500))
    assert "dropped" not in own_broker.log_text()


def test_default_queue_limit_would_silently_drop(tmp_path, probes):
    """The trap the production value avoids (proves the test above can fail)."""
    require_mosquitto()
    with start_mosquitto(tmp_path, overrides={"max_queued_messages": "1000"}) as broker:
        got = queued_for_offline_bridge(broker, probes, 1500)
        assert got == list(range(1000))
        assert "Outgoing messages are being dropped" in broker.log_text()


def test_offline_bridge_queue_survives_broker_restart(own_broker, probes):
    got = queued_for_offline_bridge(own_broker, probes, 1500, restart=own_broker.restart)
    assert got == list(range(1500))


def test_broker_crash_loses_at_most_one_autosave_interval(own_broker, probes):
    interval = int(dict(parse_config(PRODUCTION_CONF))["autosave_interval"])
    count = interval + 2000
    got = queued_for_offline_bridge(
        own_broker, probes, count, restart=lambda: own_broker.restart(crash=True)
    )
    # All were acked to the publisher; what survives a SIGKILL is what the last
    # change-counted snapshot held (without autosave_on_changes: nothing).
    assert count - interval <= len(got) <= count
    assert got == list(range(len(got)))


# --------------------------------------------------------------------------
# dev config
# --------------------------------------------------------------------------

def test_dev_config_accepts_anonymous_publish_and_subscribe(mosquitto, probes):
    reader = probes(mosquitto).connect_ok()
    reader.subscribe("fc/#")
    writer = probes(mosquitto).connect_ok()
    writer.publish("fc/v1/h1/oximeter/any-id/vitals", b"anon")
    assert reader.next_message().payload == b"anon"
    # credentialed clients (compose URLs) work too; passwords are not checked
    named = probes(mosquitto, unique("bridge"), BRIDGE_USER, "whatever").connect_ok()
    named.publish("fc/edge/gw-1/status", b"named")
    assert reader.next_message().payload == b"named"


def test_dev_config_differs_from_production_only_in_auth():
    auth = {"allow_anonymous", "password_file", "acl_file"}
    prod = [kv for kv in parse_config(PRODUCTION_CONF) if kv[0] not in auth]
    dev = [kv for kv in parse_config(DEV_CONF) if kv[0] not in auth]
    assert dev == prod
    assert ("allow_anonymous", "true") in parse_config(DEV_CONF)
    assert ("allow_anonymous", "false") in parse_config(PRODUCTION_CONF)


# --------------------------------------------------------------------------
# raw MQTT 3.1.1 CONNECT (to drop a connection without DISCONNECT)
# --------------------------------------------------------------------------

class ConnectionRefusedByBroker(Exception):
    pass


def _utf8(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_connect(broker, client_id, username, password, *, will) -> socket.socket:
    will_topic, will_payload = will
    flags = 0x80 | 0x40 | 0x20 | (1 << 3) | 0x04 | 0x02  # user, pass, will retain, will QoS 1, will, clean
    variable = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body = variable + _utf8(client_id) + _utf8(will_topic) + _utf8(will_payload)
    body += _utf8(username) + _utf8(password)
    sock = socket.create_connection((broker.host, broker.port), timeout=WAIT)
    try:
        sock.sendall(bytes([0x10]) + _remaining_length(len(body)) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionRefusedByBroker("closed before CONNACK")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionRefusedByBroker(f"CONNACK {connack.hex()}")
    except BaseException:
        sock.close()
        raise
    return sock
