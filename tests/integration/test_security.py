"""The bridge with TLS everywhere, on its embedded broker: a certificate per device (the same
identity rule as the production Mosquitto), HTTPS and WSS for browsers, and signed readings
verified end to end. Real handshakes, real sockets, a real database."""

from __future__ import annotations

import json
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from firstcare.signing import b64url, new_signing_key, public_raw, sign
from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.devices import Device
from tests.support.pki import Certs
from tests.support.probe import Probe

M7, M8 = "h1/monitor/monitor-7", "h1/monitor/monitor-8"


def tls_settings(tmp_path: Path, certs: Certs, **overrides: Any) -> Any:
    return bridge_settings(
        tmp_path, broker_cert_file=str(certs.pki.server.cert), broker_key_file=str(certs.pki.server.key),
        mqtt_ca_file=certs.ca_file, mqtt_cert_file=str(certs.pki.bridge.cert),
        mqtt_key_file=str(certs.pki.bridge.key), http_cert_file=str(certs.pki.server.cert),
        http_key_file=str(certs.pki.server.key), **overrides)


@pytest.fixture
def bridge(tmp_path: Path, certs: Certs) -> Iterator[BridgeThread]:
    with BridgeThread(tls_settings(tmp_path, certs, signature_max_age_seconds=3600)) as b:
        yield b


class Broker:
    def __init__(self, bridge: BridgeThread) -> None:
        self.host, self.port = "127.0.0.1", bridge.mqtt_port


def device(bridge: BridgeThread, certs: Certs, identity: str = M7, **kwargs: Any) -> Device:
    hospital, device_type, device_id = identity.split("/")
    return Device(bridge.mqtt_port, device_id, device_type, hospital, tls=certs.client(identity), **kwargs)


def rows(bridge: BridgeThread, device_id: str) -> list[tuple[int, int, str | None]]:
    """(seq, verified, signed_by) of a device's stored readings."""
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        return db.execute("SELECT seq, verified, signed_by FROM readings WHERE device_id=? ORDER BY id",
                          (device_id,)).fetchall()


def dead(bridge: BridgeThread, reason: str) -> list[dict[str, Any]]:
    with bridge.http() as client:
        return client.get("/api/dead-letters", params={"reason": reason}).json()["items"]


# --------------------------------------------------------------------------
# the embedded broker: TLS only, a certificate per device, the identity rule
# --------------------------------------------------------------------------

def test_device_with_its_certificate_is_stored_and_shown_unverified(bridge: BridgeThread, certs: Certs) -> None:
    dev = device(bridge, certs)
    try:
        dev.vitals({"heart_rate": 71})
        wait_until(lambda: rows(bridge, "monitor-7") == [(1, 0, None)], what="reading stored")
        with bridge.http() as client:
            (item,) = client.get("/api/patients/p-001/readings").json()["items"]
        assert (item["verified"], item["signed_by"]) == (False, None)
    finally:
        dev.close()


@pytest.mark.parametrize("case", ["no certificate", "expired certificate", "another CA's certificate",
                                  "plain MQTT"])
def test_refused_clients_store_nothing(bridge: BridgeThread, certs: Certs, probes: Any, case: str) -> None:
    tls = {"no certificate": certs.server_only(), "expired certificate": certs.expired(M7),
           "another CA's certificate": certs.foreign(M7), "plain MQTT": None}[case]
    intruder = probes(Broker(bridge), "monitor-7", tls=tls)
    assert intruder.refusal()
    marker = device(bridge, certs, M8)
    try:
        marker.vitals({"heart_rate": 60})
        wait_until(lambda: rows(bridge, "monitor-8"), what="the marker stored")
    finally:
        marker.close()
    assert rows(bridge, "monitor-7") == [] and bridge.runtime.core.counters["dead_letters"] == 0


def test_device_cannot_publish_as_another_device_or_hospital_nor_read(bridge: BridgeThread, certs: Certs,
                                                                     probes: Any) -> None:
    dev = probes(Broker(bridge), "monitor-7", tls=certs.client(M7)).connect_ok()
    for topic in ("fc/v1/h1/monitor/monitor-8/vitals", "fc/v1/h2/monitor/monitor-7/vitals",
                  "fc/v1/h1/oximeter/monitor-7/vitals", "fc/v1/h1/monitor/monitor-8/status"):
        dev.publish(topic, json.dumps({"seq": 1, "ts": int(time.time() * 1000), "metrics": {"heart_rate": 1}}))
    assert dev.subscribe("fc/#")[0].is_failure  # amqtt answers a refused SUBSCRIBE with 0x80
    assert dev.subscribe("fc/v1/h1/monitor/monitor-7/vitals")[0].is_failure
    dev.publish("fc/v1/h1/monitor/monitor-7/vitals", json.dumps(
        {"seq": 9, "ts": int(time.time() * 1000), "metrics": {"heart_rate": 70}, "patient_id": "p-7"}))
    wait_until(lambda: rows(bridge, "monitor-7"), what="own reading stored")
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        assert db.execute("SELECT device_type, device_id, hospital_id, seq FROM readings").fetchall() == [
            ("monitor", "monitor-7", "h1", 9)]
    assert dev.drain() == []


def test_a_will_on_another_devices_topic_refuses_the_connection(bridge: BridgeThread, certs: Certs,
                                                               probes: Any) -> None:
    liar = probes(Broker(bridge), "monitor-7", tls=certs.client(M7), will=("fc/v1/h1/monitor/monitor-8/status",
                                                                          b'{"state": "offline"}'))
    assert "Not authorized" in liar.refusal()


def test_no_device_reads_other_devices_retained_status(bridge: BridgeThread, certs: Certs, probes: Any) -> None:
    """amqtt would send a newly connected client every retained message matching anyone's
    subscription (the bridge's fc/v1/# matches all); ours sends only what the client may read."""
    other = probes(Broker(bridge), "monitor-8", tls=certs.client(M8)).connect_ok()
    other.publish("fc/v1/h1/monitor/monitor-8/status", b'{"state": "online", "battery": 50}', retain=True)
    wait_until(lambda: bridge.runtime.core.counters["status_messages"] >= 1, what="status stored")
    dev = probes(Broker(bridge), "monitor-7", tls=certs.client(M7)).connect_ok()
    dev.publish("fc/v1/h1/monitor/monitor-7/status", b'{"state": "online"}', retain=True)
    assert dev.drain() == []


def test_a_certificate_cannot_take_over_or_delete_another_clients_session(bridge: BridgeThread, certs: Certs,
                                                                          probes: Any) -> None:
    """The client id becomes the certificate identity before amqtt looks sessions up: a device
    claiming the bridge's client id with clean session on touches only its own session."""
    victim = probes(Broker(bridge), "monitor-8", tls=certs.client(M8)).connect_ok()
    for claimed in (bridge.settings.mqtt_client_id, "bridge", "monitor-8", M8):
        probes(Broker(bridge), claimed, tls=certs.client(M7)).connect_ok().close()
    assert bridge.runtime.ingest.connected and not victim.disconnected.is_set()
    victim.publish("fc/v1/h1/monitor/monitor-8/vitals", json.dumps(
        {"seq": 1, "ts": int(time.time() * 1000), "metrics": {"heart_rate": 70}}))
    wait_until(lambda: rows(bridge, "monitor-8"), what="the bridge still receives")


# --------------------------------------------------------------------------
# HTTPS and WSS for browsers
# --------------------------------------------------------------------------

def test_https_with_the_ca_works_and_sends_hsts_and_no_cookie(bridge: BridgeThread) -> None:
    with bridge.http() as client:
        response = client.get("/api/devices")
        assert response.status_code == 200
        assert response.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        assert "set-cookie" not in response.headers
        assert client.get("/healthz").headers["strict-transport-security"]


def test_a_client_without_the_ca_is_refused(bridge: BridgeThread) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(bridge.url + "/healthz", timeout=10)


def test_plain_http_to_the_https_port_gets_nothing(bridge: BridgeThread) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(bridge.url.replace("https://", "http://") + "/healthz", timeout=10)


def test_cookies_are_not_credentials(bridge: BridgeThread) -> None:
    context = ssl.create_default_context(cafile=bridge.settings.mqtt_ca_file)
    with httpx.Client(base_url=bridge.url, verify=context, timeout=10,
                      cookies={"token": token("admin"), "access_token": token("admin")}) as client:
        assert client.get("/api/devices").status_code == 401


def test_wss_with_the_ca_streams_events_and_the_origin_check_stays(bridge: BridgeThread, certs: Certs) -> None:
    context = ssl.create_default_context(cafile=certs.ca_file)
    url = bridge.url.replace("https://", "wss://") + f"/realtime/ws?token={token('admin')}"
    origin = bridge.url  # the page's own origin, https://127.0.0.1:PORT
    with ws_connect(url, ssl=context, origin=origin, open_timeout=10) as ws:  # type: ignore[arg-type]
        assert json.loads(ws.recv(10))["type"] == "welcome"
        ws.send(json.dumps({"type": "subscribe", "room": "device:monitor:monitor-7"}))
        assert json.loads(ws.recv(10))["type"] == "subscribed"
        dev = device(bridge, certs)
        try:
            dev.vitals({"heart_rate": 66}, patient_id=None)
            event = json.loads(ws.recv(15))
            while event.get("event") != "device.data.update":
                event = json.loads(ws.recv(15))
        finally:
            dev.close()
        assert (event["event"], event["data"]["verified"]) == ("device.data.update", False)
    with ws_connect(url, ssl=context, origin="https://evil.example", open_timeout=10) as ws:  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4405


def test_wss_without_the_ca_is_refused(bridge: BridgeThread) -> None:
    url = bridge.url.replace("https://", "wss://") + f"/realtime/ws?token={token('admin')}"
    with pytest.raises(ssl.SSLCertVerificationError):
        ws_connect(url, ssl=ssl.create_default_context(), open_timeout=10)


# --------------------------------------------------------------------------
# signed readings
# --------------------------------------------------------------------------

def register(bridge: BridgeThread, key: Any, device_type: str = "monitor", device_id: str = "monitor-7",
             hospital_id: str = "h1", **body: Any) -> httpx.Response:
    with bridge.http() as client:
        return client.put(f"/api/devices/{device_type}/{device_id}/key",
                          json={"public_key": b64url(public_raw(key)), "hospital_id": hospital_id, **body})


@pytest.fixture
def signer(bridge: BridgeThread, certs: Certs) -> Iterator[Device]:
    key = new_signing_key()
    assert register(bridge, key).status_code == 200
    dev = device(bridge, certs, signing_key=key)
    yield dev
    dev.close()


@pytest.fixture
def gateway(bridge: BridgeThread, certs: Certs) -> Iterator[Probe]:
    """A path that may publish on any device topic of h1: the attacker who moves messages."""
    probe = Probe("127.0.0.1", bridge.mqtt_port, "gw", tls=certs.client("gateway/h1/gw-test")).connect_ok()
    yield probe
    probe.close()


def test_a_signed_reading_is_stored_verified_and_shown(bridge: BridgeThread, signer: Device) -> None:
    sub = bridge.subscribe("patient:p-001:vitals")
    signer.vitals({"heart_rate": 72})
    event = bridge.receive_until(sub, lambda e: e["event"] == "patient.vitals.update")
    assert event["data"]["verified"] is True
    assert rows(bridge, "monitor-7") == [(1, 1, M7)]
    with bridge.http() as client:
        (item,) = client.get("/api/patients/p-001/readings").json()["items"]
        keys = client.get("/api/devices/monitor/monitor-7/keys").json()["items"]
    assert (item["verified"], item["signed_by"]) == (True, M7)
    assert [(k["kid"], k["scope"], k["revoked_at"]) for k in keys] == [(M7, "device", None)]
    assert bridge.stats()["ingest"]["readings_verified"] == 1


def test_tampered_moved_and_unknown_signatures_are_dead_lettered(bridge: BridgeThread, signer: Device,
                                                               gateway: Probe) -> None:
    good = signer.reading({"heart_rate": 72}, seq=1)
    tampered = good.replace(b"\\\"heart_rate\\\": 72", b"\\\"heart_rate\\\": 35")
    assert tampered != good
    gateway.publish(signer.vitals_topic, tampered)
    # the same bytes, moved onto another device's topic and into another hospital's
    gateway.publish("fc/v1/h1/monitor/monitor-8/vitals", good)
    unknown = sign(new_signing_key(), "h1/monitor/monitor-7#unregistered", signer.vitals_topic,
                   json.dumps({"seq": 5, "ts": int(time.time() * 1000), "metrics": {"heart_rate": 1}}).encode())
    gateway.publish(signer.vitals_topic, unknown)
    wait_until(lambda: bridge.runtime.core.counters["dead_letters"] == 3, what="three dead letters")
    invalid = dead(bridge, "signature_invalid")
    assert sorted(d["topic"] for d in invalid) == ["fc/v1/h1/monitor/monitor-7/vitals",
                                                   "fc/v1/h1/monitor/monitor-8/vitals"]
    assert "tampered or moved" in invalid[0]["detail"]
    assert [d["topic"] for d in dead(bridge, "signature_key_unknown")] == [signer.vitals_topic]
    assert rows(bridge, "monitor-7") == [] and rows(bridge, "monitor-8") == []


def test_a_key_signs_only_for_its_own_device(bridge: BridgeThread, signer: Device, gateway: Probe) -> None:
    """monitor-7's key, signing honestly for monitor-8's topic: the key does not cover it."""
    forged = sign(signer.signing_key, M7, "fc/v1/h1/monitor/monitor-8/vitals",
                  json.dumps({"seq": 1, "ts": int(time.time() * 1000), "metrics": {"heart_rate": 1}}).encode())
    gateway.publish("fc/v1/h1/monitor/monitor-8/vitals", forged)
    wait_until(lambda: dead(bridge, "signature_key_scope"), what="scope refusal")
    assert rows(bridge, "monitor-8") == []


def test_replays_are_duplicates_and_old_ones_are_refused(bridge: BridgeThread, signer: Device,
                                                         gateway: Probe) -> None:
    reading = signer.reading({"heart_rate": 80}, seq=3)
    for _ in range(3):
        gateway.publish(signer.vitals_topic, reading)  # an exact redelivery, three times
    wait_until(lambda: bridge.runtime.core.counters["duplicates"] == 2, what="two duplicates")
    assert rows(bridge, "monitor-7") == [(3, 1, M7)]
    # older than the freshness window (an hour here): once retention has deleted the original,
    # only this refusal stands between a replay and a second copy
    stale = signer.reading({"heart_rate": 80}, seq=2, ts_ms=int(time.time() * 1000) - 2 * 3600 * 1000)
    gateway.publish(signer.vitals_topic, stale)
    (letter,) = wait_until(lambda: dead(bridge, "signature_expired"), what="expired refusal")
    assert "seq 2" in letter["detail"]
    assert rows(bridge, "monitor-7") == [(3, 1, M7)]


def test_a_hospital_that_requires_signatures_refuses_unsigned_readings(bridge: BridgeThread, signer: Device,
                                                                      certs: Certs) -> None:
    with bridge.http() as client:
        assert client.get("/api/hospitals/h1/signature-policy").json()["require_signatures"] is False
        put = client.put("/api/hospitals/h1/signature-policy", json={"require_signatures": True})
        assert put.json() == {"hospital_id": "h1", "require_signatures": True, "source": "api"}
    unsigned = device(bridge, certs, M8)
    try:
        unsigned.vitals({"heart_rate": 70})
        signer.vitals({"heart_rate": 71})
        wait_until(lambda: rows(bridge, "monitor-7"), what="the signed reading")
        (letter,) = wait_until(lambda: dead(bridge, "signature_required"), what="the unsigned one refused")
    finally:
        unsigned.close()
    assert letter["topic"] == "fc/v1/h1/monitor/monitor-8/vitals" and rows(bridge, "monitor-8") == []
    other_hospital = device(bridge, certs, "h2/monitor/monitor-9")
    try:
        other_hospital.vitals({"heart_rate": 70}, patient_id="p-h2")
        wait_until(lambda: rows(bridge, "monitor-9"), what="h2 does not require signatures")
    finally:
        other_hospital.close()


def test_a_revoked_key_verifies_nothing_and_its_id_is_never_reused(bridge: BridgeThread, signer: Device) -> None:
    signer.vitals({"heart_rate": 70})
    wait_until(lambda: rows(bridge, "monitor-7"), what="signed reading")
    with bridge.http() as client:
        assert client.delete("/api/devices/monitor/monitor-7/key", params={"kid": M7}).json() == {"revoked": [M7]}
    signer.vitals({"heart_rate": 71})
    wait_until(lambda: dead(bridge, "signature_key_unknown"), what="revoked key refused")
    again = register(bridge, new_signing_key())
    assert (again.status_code, again.json()["error"]) == (409, "key_conflict")
    assert register(bridge, new_signing_key(), kid=f"{M7}#2").status_code == 200


def test_key_api_is_for_admin_and_service_only_and_checks_the_key(bridge: BridgeThread) -> None:
    body = {"public_key": b64url(public_raw(new_signing_key())), "hospital_id": "h1"}
    with bridge.http("clinician", hospitals=("h1",)) as client:
        assert client.put("/api/devices/monitor/monitor-7/key", json=body).status_code == 403
        assert client.put("/api/hospitals/h1/signature-policy", json={"require_signatures": False}).status_code == 403
    with bridge.http("service") as client:
        assert client.put("/api/devices/monitor/monitor-7/key", json=body).status_code == 200
        bad = client.put("/api/devices/monitor/monitor-7/key", json={"public_key": "AAAA", "hospital_id": "h1"})
        assert (bad.status_code, bad.json()["error"]) == (422, "bad_request")
        taken = client.put("/api/devices/monitor/monitor-8/key", json={**body, "kid": M7})
        assert (taken.status_code, taken.json()["error"]) == (409, "key_conflict")


def test_keys_and_policies_outlive_a_restart_and_the_database_holds_no_private_key(
        tmp_path: Path, certs: Certs) -> None:
    key = new_signing_key()
    settings = tls_settings(tmp_path, certs)
    with BridgeThread(settings) as first:
        assert register(first, key).status_code == 200
        with first.http() as client:
            client.put("/api/hospitals/h1/signature-policy", json={"require_signatures": True})
    with BridgeThread(settings) as second:
        dev = device(second, certs, signing_key=key)
        try:
            dev.vitals({"heart_rate": 64})
            wait_until(lambda: rows(second, "monitor-7") == [(1, 1, M7)], what="verified after restart")
        finally:
            dev.close()
        assert second.runtime.core.requires_signatures("h1")
    with sqlite3.connect(settings.sqlite_path) as db:
        stored = db.execute("SELECT public_key FROM signing_keys").fetchall()
    assert stored == [(public_raw(key),)]  # 32 public bytes: nothing here can sign


def test_gateway_signatures_cover_their_hospital_only(bridge: BridgeThread, gateway: Probe) -> None:
    key = new_signing_key()
    with bridge.http() as client:
        put = client.put("/api/gateways/h1/gw-test/key", json={"public_key": b64url(public_raw(key))})
    assert put.status_code == 200 and put.json()["kid"] == "gateway/h1/gw-test"
    body = json.dumps({"seq": 1, "ts": int(time.time() * 1000), "metrics": {"spo2": 97}}).encode()
    for topic in ("fc/v1/h1/oximeter/ox-1/vitals", "fc/v1/h2/oximeter/ox-2/vitals"):
        gateway.publish(topic, sign(key, "gateway/h1/gw-test", topic, body))
    wait_until(lambda: rows(bridge, "ox-1") == [(1, 1, "gateway/h1/gw-test")], what="gateway-signed reading")
    assert rows(bridge, "ox-2") == []  # the gateway's own certificate may not even publish into h2


def test_require_signatures_setting_applies_without_the_api(tmp_path: Path, certs: Certs) -> None:
    with BridgeThread(tls_settings(tmp_path, certs, require_signatures=("*",))) as b:
        dev = device(b, certs)
        try:
            dev.vitals({"heart_rate": 70})
            wait_until(lambda: dead(b, "signature_required"), what="refused by FC_REQUIRE_SIGNATURES")
        finally:
            dev.close()
        with b.http() as client:
            assert client.get("/api/hospitals/h1/signature-policy").json() == {
                "hospital_id": "h1", "require_signatures": True, "source": "setting"}


def test_unencrypted_paths_log_a_warning_and_insecure_mode_is_loud(tmp_path: Path, certs: Certs,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"), BridgeThread(tls_settings(tmp_path, certs, tls_insecure=True)):
        pass
    assert any("verification is OFF" in r.getMessage() for r in caplog.records)

