"""broker-config/ proven against a real Mosquitto 2.0 with real TLS handshakes.

Who may connect (a client certificate from our CA, valid now), who may publish and read
what (acl, with the certificate's common name as the identity), the packet size limit, the
persistent-session queue, and the dev config. "Not delivered" is proven with markers
(tests/support/probe.py), never by waiting.
"""

from __future__ import annotations

import socket
import ssl

import paho.mqtt.client as mqtt
import pytest

from firstcare.tls import ClientTls, client_context
from tests.support.brokers import (
    DEV_CONF,
    PRODUCTION_CONF,
    MosquittoInstance,
    parse_config,
    require_mosquitto,
    start_mosquitto,
)
from tests.support.pki import TEST_GATEWAY, Certs, gateway_acl_lines
from tests.support.probe import NOT_AUTHORIZED, WAIT, Probe, received, unique

M7, M8 = "h1/monitor/monitor-7", "h1/monitor/monitor-8"
M7_TOPIC = "fc/v1/h1/monitor/monitor-7/vitals"


class Services:
    """The service listener (8884) of a production broker: bridges and gateways connect there."""

    def __init__(self, broker: MosquittoInstance) -> None:
        self.host, self.port = broker.host, broker.service_port


def bridge(make, broker, certs: Certs, topic: str = "fc/#", identity: str = "bridge", **kwargs) -> Probe:
    probe = make(Services(broker), unique("bridge"), tls=certs.client(identity), live_only=True, **kwargs)
    probe.connect_ok()
    rcs = probe.subscribe(topic, 1)
    assert not rcs[0].is_failure, rcs
    return probe


def device(make, broker, certs: Certs, identity: str = M7, **kwargs) -> Probe:
    return make(broker, identity.rsplit("/", 1)[1], tls=certs.client(identity), **kwargs).connect_ok()


def drop(probe: Probe) -> None:
    """Lose the connection without DISCONNECT (a dead battery): the broker publishes the will."""
    probe.client.loop_stop()
    sock = probe.client.socket()
    if isinstance(sock, socket.socket):
        sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------
# TLS: who may connect at all
# --------------------------------------------------------------------------

def test_device_with_its_certificate_publishes_and_the_bridge_receives(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    dev = device(probes, mosquitto_secure, certs)
    assert not dev.publish(M7_TOPIC, b'{"seq": 1}').is_failure
    msg = bridge_probe.next_message()
    assert (msg.topic, msg.payload, msg.qos) == (M7_TOPIC, b'{"seq": 1}', 1)
    dev.publish("fc/v1/h1/monitor/monitor-7/status", b'{"state": "online"}', retain=True)
    assert bridge_probe.next_message().topic == "fc/v1/h1/monitor/monitor-7/status"


@pytest.mark.parametrize("case", ["no certificate", "expired certificate", "another CA's certificate",
                                  "plain MQTT", "no TLS verification but no certificate"])
def test_refused_clients_never_connect_and_nothing_reaches_the_bridge(mosquitto_secure, probes, certs, case):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    tls = {"no certificate": certs.server_only(), "expired certificate": certs.expired(M7),
           "another CA's certificate": certs.foreign(M7), "plain MQTT": None,
           "no TLS verification but no certificate": ClientTls(insecure=True)}[case]
    intruder = probes(mosquitto_secure, "monitor-7", tls=tls)
    how = intruder.refusal()
    assert how, case
    # whatever it queued before the refusal never arrives: the next message is the marker
    device(probes, mosquitto_secure, certs, M8).publish("fc/v1/h1/monitor/monitor-8/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_a_client_refuses_a_broker_whose_certificate_another_ca_signed(mosquitto_secure, probes, certs):
    """Verification is on by default: trusting only the other CA, our broker looks like an impostor."""
    probe = probes(mosquitto_secure, "monitor-7", tls=ClientTls(str(certs.rogue.ca_file), *_pair(certs, M7)))
    assert "certificate verify failed" in probe.refusal()


def test_a_client_refuses_a_broker_whose_name_is_not_in_its_certificate(mosquitto_secure, certs):
    """The server certificate names localhost and 127.0.0.1; a client that meant another host
    refuses it (the context every product client uses checks the name)."""
    context = client_context(certs.client(M7))
    with (
        socket.create_connection((mosquitto_secure.host, mosquitto_secure.port), timeout=WAIT) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        context.wrap_socket(raw, server_hostname="broker.example")


def _pair(certs: Certs, identity: str) -> tuple[str, str]:
    tls = certs.client(identity)
    return tls.cert_file or "", tls.key_file or ""


# --------------------------------------------------------------------------
# a device writes only its own topics, whatever client id it picks
# --------------------------------------------------------------------------

DENIED_FOR_M7 = [
    "fc/v1/h1/monitor/monitor-8/vitals",   # another device
    "fc/v1/h1/monitor/monitor-8/status",
    "fc/v1/h2/monitor/monitor-7/vitals",   # its own id in another hospital
    "fc/v1/h1/oximeter/monitor-7/vitals",  # its own id as another device type
    "fc/v1/h1/monitor/monitor-7/other",    # not a contract topic
    "fc/edge/h1/gw-test/status",
    "elsewhere",
]


def test_device_cannot_publish_as_another_device_or_into_another_hospital(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    dev = device(probes, mosquitto_secure, certs)
    for topic in DENIED_FOR_M7:
        # MQTT 3.1.1 cannot say no: Mosquitto acks a denied publish and drops it.
        assert not dev.publish(topic, b"denied").is_failure
    dev.publish(M7_TOPIC, b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_mqtt5_device_is_told_its_publish_was_not_authorized(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    dev = device(probes, mosquitto_secure, certs, protocol=mqtt.MQTTv5)
    for topic in DENIED_FOR_M7[:3]:
        assert dev.publish(topic, b"denied").value == NOT_AUTHORIZED
    assert not dev.publish(M7_TOPIC, b"marker").is_failure
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_client_id_is_the_certificate_identity_so_no_device_can_take_over_another(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    victim = device(probes, mosquitto_secure, certs, M8)
    # monitor-7 claims monitor-8's client id (and the identity string as client id): the broker
    # replaces it with monitor-7's own identity, so monitor-8's session is untouched ...
    for claimed in ("monitor-8", M8, "bridge"):
        impostor = probes(mosquitto_secure, claimed, tls=certs.client(M7)).connect_ok()
        impostor.publish("fc/v1/h1/monitor/monitor-8/vitals", b"denied")
        impostor.close()
    assert not victim.disconnected.is_set(), "monitor-8 was kicked off by another certificate"
    # ... and can still publish; the impostor's attempts never arrived
    victim.publish("fc/v1/h1/monitor/monitor-8/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_no_device_certificate_is_accepted_on_the_service_listener(mosquitto_secure, probes, certs):
    assert probes(Services(mosquitto_secure), "monitor-7", tls=certs.client(M7)).refusal()


def test_the_bridge_keeps_its_session_whatever_client_id_a_device_claims(mosquitto_secure, probes, certs):
    """On the service listener the bridge keeps its own client id (its lease needs a second
    connection); a device claiming that id on its listener is renamed to its identity."""
    bridge_probe = probes(Services(mosquitto_secure), "firstcare-bridge", tls=certs.client("bridge"),
                          clean_session=False, live_only=True).connect_ok()
    bridge_probe.subscribe("fc/#", 1)
    lease = probes(Services(mosquitto_secure), "firstcare-bridge.lease.1", tls=certs.client("bridge")).connect_ok()
    # a device, and even another bridge's certificate, on the devices' listener: renamed to their identity
    for identity in (M7, "bridge-2"):
        probes(mosquitto_secure, "firstcare-bridge", tls=certs.client(identity)).connect_ok().close()
    assert not bridge_probe.disconnected.is_set() and not lease.disconnected.is_set()
    device(probes, mosquitto_secure, certs, M8).publish("fc/v1/h1/monitor/monitor-8/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_device_cannot_read_anything(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    dev = device(probes, mosquitto_secure, certs)
    # Mosquitto 2.0.11 grants every SUBSCRIBE (MQTT 3.1.1 and 5, even "#") and
    # applies the read ACL to each message at delivery: only delivery counts.
    for topic in ("fc/#", "#", M7_TOPIC, "fc/v1/h1/monitor/monitor-8/vitals", "fc/v1/h2/#"):
        dev.subscribe(topic)
    other = device(probes, mosquitto_secure, certs, M8)
    other.publish("fc/v1/h1/monitor/monitor-8/vitals", b"reading")
    other.publish("fc/v1/h1/monitor/monitor-8/status", b'{"state": "online"}', retain=True)
    dev.publish(M7_TOPIC, b"own")
    assert received(bridge_probe, b"own") == [b"reading", b'{"state": "online"}', b"own"]
    # The device's PUBACK came after anything the broker sent it before:
    # had it been allowed to read, "reading" would already be queued here.
    assert dev.drain() == []


def test_device_last_will_marks_it_offline(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    dev = probes(mosquitto_secure, "monitor-7", tls=certs.client(M7),
                 will=("fc/v1/h1/monitor/monitor-7/status", b'{"state": "offline"}')).connect_ok()
    drop(dev)
    msg = bridge_probe.next_message()
    assert (msg.topic, msg.payload) == ("fc/v1/h1/monitor/monitor-7/status", b'{"state": "offline"}')


def test_device_cannot_set_a_will_for_another_device(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    dev = probes(mosquitto_secure, "monitor-7", tls=certs.client(M7),
                 will=("fc/v1/h1/monitor/monitor-8/status", b"denied")).connect_ok()
    drop(dev)
    device(probes, mosquitto_secure, certs).publish(M7_TOPIC, b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


# --------------------------------------------------------------------------
# bridge and gateways
# --------------------------------------------------------------------------

def test_bridge_only_reads(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    other = probes(Services(mosquitto_secure), unique("bridge"), tls=certs.client("bridge-2")).connect_ok()
    other.publish("fc/v1/h1/monitor/monitor-7/vitals", b"denied")
    other.publish("fc/edge/h1/gw-test/status", b"denied")
    device(probes, mosquitto_secure, certs).publish(M7_TOPIC, b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


def test_bridge_shared_subscription_mqtt5(mosquitto_secure, probes, certs):
    """Scaled-out bridges share one subscription; the ACL must allow it."""
    bridge_probe = bridge(probes, mosquitto_secure, certs, f"$share/{unique('ingest')}/fc/v1/#",
                          protocol=mqtt.MQTTv5)
    device(probes, mosquitto_secure, certs, "h2/bp/bp-1").publish("fc/v1/h2/bp/bp-1/vitals", b"shared")
    assert bridge_probe.next_message().payload == b"shared"


def test_gateway_forwards_only_its_hospital_and_owns_only_its_status(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    gateway = probes(Services(mosquitto_secure), unique("gw"), tls=certs.client(TEST_GATEWAY)).connect_ok()
    assert not gateway.subscribe("fc/edge/h1/gw-test/status")[0].is_failure
    gateway.subscribe("fc/v1/#")  # granted or not, nothing may arrive
    gateway.publish("fc/v1/h1/monitor/m-1/vitals", b"forwarded")
    gateway.publish("fc/v1/h1/oximeter/ox-9/status", b"forwarded status")
    for denied in ("fc/v1/h2/monitor/m-1/vitals", "fc/edge/h1/other-gw/status", "fc/edge/h2/gw-test/status",
                   "fc/v1/h1/monitor/m-1/other",
                   "fc/v1/gateway/h1/gw-test/vitals"):  # what the device pattern would name for a gateway
        gateway.publish(denied, b"denied")
    gateway.publish("fc/edge/h1/gw-test/status", b'{"state": "online"}')
    assert received(bridge_probe, b'{"state": "online"}') == [b"forwarded", b"forwarded status",
                                                             b'{"state": "online"}']
    # Its own edge status comes back to it; the forwarded reading, published
    # first, would have come back first had the gateway been allowed to read it.
    assert gateway.next_message().payload == b'{"state": "online"}'


def test_a_gateway_without_its_acl_block_can_publish_nothing(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    stranger = probes(Services(mosquitto_secure), unique("gw"),
                      tls=certs.client("gateway/h1/unprovisioned")).connect_ok()
    stranger.publish("fc/v1/h1/monitor/m-1/vitals", b"denied")
    device(probes, mosquitto_secure, certs).publish(M7_TOPIC, b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


# --------------------------------------------------------------------------
# packet size
# --------------------------------------------------------------------------

def test_contract_sized_payload_passes(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    gateway = probes(Services(mosquitto_secure), unique("gw"), tls=certs.client(TEST_GATEWAY)).connect_ok()
    topic = f"fc/v1/h1/thermometer/{'d' * 64}/vitals"  # the longest id the contract allows
    for size in (60 * 1024, 64 * 1024):
        payload = bytes([size % 251]) * size
        gateway.publish(topic, payload)
        assert bridge_probe.next_message().payload == payload


def test_oversize_packet_disconnects_publisher_and_is_dropped(mosquitto_secure, probes, certs):
    bridge_probe = bridge(probes, mosquitto_secure, certs)
    publisher = device(probes, mosquitto_secure, certs)
    publisher.publish_nowait(M7_TOPIC, b"x" * (66 * 1024))
    assert publisher.disconnected.wait(WAIT), "broker kept a client that sent an oversize packet"
    device(probes, mosquitto_secure, certs, M8).publish("fc/v1/h1/monitor/monitor-8/vitals", b"marker")
    assert received(bridge_probe, b"marker") == [b"marker"]


# --------------------------------------------------------------------------
# persistent sessions: an offline bridge loses nothing
# --------------------------------------------------------------------------

def publish_many(probe: Probe, topic: str, count: int) -> None:
    infos = [probe.publish_nowait(topic, str(i).encode()) for i in range(count)]
    for info in infos:
        info.wait_for_publish(WAIT)
        assert info.is_published()


def queued_for_offline_bridge(broker: MosquittoInstance, make, certs: Certs, count: int, restart=None) -> list[int]:
    """Bridge subscribes (clean session off), goes away, ``count`` readings are
    published, the broker is optionally restarted, the bridge comes back."""
    first = make(Services(broker), "firstcare-bridge", tls=certs.client("bridge"), clean_session=False).connect_ok()
    first.subscribe("fc/#", 1)
    first.close()
    gateway = make(Services(broker), unique("gw"), tls=certs.client(TEST_GATEWAY))
    gateway.client.max_inflight_messages_set(1000)  # paho allows this only before connect
    gateway.connect_ok()
    publish_many(gateway, "fc/v1/h1/monitor/m-1/vitals", count)
    gateway.close()
    if restart is not None:
        restart()
    again = make(Services(broker), "firstcare-bridge", tls=certs.client("bridge"), clean_session=False).connect_ok()
    # A marker published now is queued behind everything the session holds.
    marker = make(Services(broker), unique("gw"), tls=certs.client(TEST_GATEWAY)).connect_ok()
    marker.publish("fc/v1/h1/monitor/m-1/vitals", b"-1")
    return [int(p) for p in received(again, b"-1")[:-1]]


def production_broker(tmp_path, certs: Certs, **kwargs) -> MosquittoInstance:
    require_mosquitto()
    return start_mosquitto(tmp_path, dev=False, certs=certs.dir, acl_lines=gateway_acl_lines(), **kwargs)


@pytest.fixture
def own_broker(tmp_path, certs):
    """A production broker of the test's own, free to restart or kill."""
    broker = production_broker(tmp_path, certs)
    yield broker
    broker.stop()


def test_offline_bridge_queue_outlives_mosquitto_default_limit(own_broker, probes, certs):
    # Mosquitto's default (max_queued_messages 1000) would drop the last 500.
    got = queued_for_offline_bridge(own_broker, probes, certs, 1500)
    assert got == list(range(1500))
    assert "dropped" not in own_broker.log_text()


def test_default_queue_limit_would_silently_drop(tmp_path, probes, certs):
    """The trap the production value avoids (proves the test above can fail)."""
    with production_broker(tmp_path, certs, overrides={"max_queued_messages": "1000"}) as broker:
        got = queued_for_offline_bridge(broker, probes, certs, 1500)
        assert got == list(range(1000))
        assert "Outgoing messages are being dropped" in broker.log_text()


def test_offline_bridge_queue_survives_broker_restart(own_broker, probes, certs):
    got = queued_for_offline_bridge(own_broker, probes, certs, 1500, restart=own_broker.restart)
    assert got == list(range(1500))


def test_broker_crash_loses_at_most_one_autosave_interval(own_broker, probes, certs):
    interval = int(dict(parse_config(PRODUCTION_CONF))["autosave_interval"])
    count = interval + 2000
    got = queued_for_offline_bridge(own_broker, probes, certs, count, restart=lambda: own_broker.restart(crash=True))
    # All were acked to the publisher; what survives a SIGKILL is what the last
    # change-counted snapshot held (without autosave_on_changes: nothing).
    assert count - interval <= len(got) <= count
    assert got == list(range(len(got)))


# --------------------------------------------------------------------------
# the shipped files
# --------------------------------------------------------------------------

def listener_blocks(conf: list[tuple[str, str]]) -> dict[str, dict[str, str]]:
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for key, value in conf:
        if key == "listener":
            current = blocks.setdefault(value, {})
        elif current is not None and key in LISTENER_AND_AUTH - {"allow_anonymous", "acl_file", "password_file"}:
            current[key] = value
    return blocks


def test_production_listens_only_with_tls_and_a_certificate_per_client():
    conf = parse_config(PRODUCTION_CONF)
    blocks = listener_blocks(conf)
    assert sorted(blocks) == ["8883", "8884"], "a plain-text listener would carry readings in clear"
    for block in blocks.values():
        assert block["require_certificate"] == "true" and block["use_identity_as_username"] == "true"
        assert block["tls_version"] in ("tlsv1.2", "tlsv1.3") and block["certfile"].endswith("server.pem")
    assert blocks["8883"]["use_username_as_clientid"] == "true"      # devices: client id = certificate
    assert blocks["8883"]["cafile"].endswith("/ca.pem")
    assert blocks["8884"]["cafile"].endswith("/service-ca.pem")        # services: no device certificate
    assert "use_username_as_clientid" not in blocks["8884"]
    options = dict(conf)
    assert options["allow_anonymous"] == "false" and "password_file" not in options


def test_dev_config_accepts_anonymous_publish_and_subscribe(mosquitto, probes):
    reader = probes(mosquitto).connect_ok()
    reader.subscribe("fc/#")
    writer = probes(mosquitto).connect_ok()
    writer.publish("fc/v1/h1/oximeter/any-id/vitals", b"anon")
    assert reader.next_message().payload == b"anon"
    # credentialed clients (old URLs) work too; passwords are not checked
    named = probes(mosquitto, unique("bridge"), "bridge", "whatever").connect_ok()
    named.publish("fc/edge/gw-1/status", b"named")
    assert reader.next_message().payload == b"named"


LISTENER_AND_AUTH = {"listener", "cafile", "certfile", "keyfile", "crlfile", "tls_version", "require_certificate",
                     "use_identity_as_username", "use_username_as_clientid", "allow_anonymous", "password_file",
                     "acl_file"}


def test_dev_config_differs_from_production_only_in_listener_and_auth():
    prod = [kv for kv in parse_config(PRODUCTION_CONF) if kv[0] not in LISTENER_AND_AUTH]
    dev = [kv for kv in parse_config(DEV_CONF) if kv[0] not in LISTENER_AND_AUTH]
    assert dev == prod
    assert ("allow_anonymous", "true") in parse_config(DEV_CONF)
    assert ("allow_anonymous", "false") in parse_config(PRODUCTION_CONF)


def test_handshake_alone_refuses_a_client_without_certificate_before_any_mqtt(mosquitto_secure, certs):
    """The refusal is TLS's, not MQTT's: a bare TLS client without a certificate gets no byte of MQTT."""
    context = ssl.create_default_context(cafile=certs.ca_file)
    with (
        socket.create_connection((mosquitto_secure.host, mosquitto_secure.port), timeout=WAIT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        tls.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))  # CONNECT, empty id
        if not tls.recv(4):
            raise ConnectionResetError("closed without CONNACK")
