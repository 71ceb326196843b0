"""The edge gateway with TLS on both sides: devices with a certificate each on the ward broker,
the gateway's own certificate upstream to a production Mosquitto, a refused impostor upstream,
and signatures kept intact (device-signed) or added (gateway-signed) on the way to the bridge."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from firstcare.certs import write_private
from firstcare.signing import b64url, new_signing_key, private_pem, public_raw
from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import MosquittoInstance, require_mosquitto, start_mosquitto
from tests.support.devices import Device
from tests.support.edge import EdgeProcess
from tests.support.pki import TEST_GATEWAY, Certs, gateway_acl_lines
from tests.support.probe import Probe

M7 = "h1/monitor/monitor-7"


@pytest.fixture
def upstream(tmp_path: Path, certs: Certs) -> Iterator[MosquittoInstance]:
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "upstream", dev=False, certs=certs.dir, acl_lines=gateway_acl_lines())
    yield broker
    broker.stop()


@pytest.fixture
def bridge(upstream: MosquittoInstance, tmp_path: Path, certs: Certs) -> Iterator[BridgeThread]:
    settings = bridge_settings(tmp_path, mqtt_url=upstream.service_url(), mqtt_ca_file=certs.ca_file,
                               mqtt_cert_file=str(certs.pki.bridge.cert), mqtt_key_file=str(certs.pki.bridge.key))
    with BridgeThread(settings) as b:
        yield b


def gateway_tls(certs: Certs, ward: bool = True) -> dict[str, Any]:
    tls = certs.client(TEST_GATEWAY)
    settings: dict[str, Any] = {"gateway_id": "gw-test", "hospital_id": "h1", "ca_file": certs.ca_file,
                                "cert_file": tls.cert_file, "key_file": tls.key_file}
    if ward:
        settings.update(local_cert_file=str(certs.pki.server.cert), local_key_file=str(certs.pki.server.key))
    return settings


def rows(bridge: BridgeThread, device_id: str) -> list[tuple[int, str | None, int, str | None]]:
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        return db.execute("SELECT seq, patient_id, verified, signed_by FROM readings WHERE device_id=? ORDER BY id",
                          (device_id,)).fetchall()


def ward_device(edge: EdgeProcess, certs: Certs, identity: str = M7, **kwargs: Any) -> Device:
    hospital, device_type, device_id = identity.split("/")
    return Device(edge.local_port, device_id, device_type, hospital, tls=certs.client(identity), **kwargs)


class WardBroker:
    def __init__(self, edge: EdgeProcess) -> None:
        self.host, self.port = "127.0.0.1", edge.local_port


def test_devices_reach_the_bridge_through_a_gateway_with_tls_on_both_sides(
        upstream: MosquittoInstance, bridge: BridgeThread, certs: Certs, tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path, upstream.service_url(), **gateway_tls(certs)).start()
    try:
        wait_until(lambda: edge.stats()["upstream"]["state"] == "connected", what="edge upstream over TLS")
        device = ward_device(edge, certs)
        try:
            device.vitals({"heart_rate": 70}, seq=1)
            device.vitals({"heart_rate": 71}, seq=2)
            wait_until(lambda: len(rows(bridge, "monitor-7")) == 2, what="readings through the gateway")
        finally:
            device.close()
        # a device without a certificate cannot even reach the ward broker
        intruder = Probe("127.0.0.1", edge.local_port, "monitor-8", tls=certs.server_only())
        try:
            assert intruder.refusal()
        finally:
            intruder.close()
        assert "u'gateway/h1/gw-test'" in upstream.log_text()  # the gateway's own certificate, upstream
    finally:
        edge.stop()


def test_the_gateway_refuses_an_upstream_whose_certificate_it_cannot_verify(
        certs: Certs, tmp_path: Path) -> None:
    """An impostor broker (another CA's certificate for 127.0.0.1): the gateway keeps spooling and
    never sends it a byte of MQTT."""
    require_mosquitto()
    with start_mosquitto(tmp_path / "rogue", dev=False, certs=certs.rogue.dir) as rogue:
        edge = EdgeProcess(tmp_path, rogue.service_url(), **gateway_tls(certs, ward=False)).start()
        try:
            device = Device(edge.local_port, "monitor-7", "monitor", "h1")
            try:
                device.vitals({"heart_rate": 70}, seq=1)
            finally:
                device.close()
            stats = wait_until(lambda: (s := edge.stats())["upstream"]["last_error"] and s["spool"]["depth"] == 1
                               and s, what="a refused upstream and a spooled reading")
            assert "certificate" in stats["upstream"]["last_error"], stats["upstream"]
            assert stats["upstream"]["state"] != "connected"
            assert stats["upstream"]["connects"] == 0 and stats["upstream"]["published"] == 0
            assert httpx.get(edge.url + "/readyz", timeout=5).status_code == 503
        finally:
            edge.stop()
        assert "New client connected" not in rogue.log_text()


def test_device_signatures_pass_the_gateway_untouched_and_the_gateway_signs_for_the_others(
        upstream: MosquittoInstance, bridge: BridgeThread, certs: Certs, tmp_path: Path) -> None:
    device_key, gateway_key = new_signing_key(), new_signing_key()
    key_file = tmp_path / "gateway.sign-key.pem"
    write_private(key_file, private_pem(gateway_key))
    with bridge.http() as client:
        assert client.put("/api/devices/monitor/monitor-7/key", json={
            "public_key": b64url(public_raw(device_key)), "hospital_id": "h1"}).status_code == 200
        assert client.put("/api/gateways/h1/gw-test/key", json={
            "public_key": b64url(public_raw(gateway_key))}).status_code == 200
    bed_map = tmp_path / "beds.yaml"
    bed_map.write_text("monitor/monitor-7: p-bed-7\nmonitor/monitor-8: p-bed-8\n")
    edge = EdgeProcess(tmp_path, upstream.service_url(), signing_key=str(key_file), bed_map=str(bed_map),
                       **gateway_tls(certs)).start()
    signer = ward_device(edge, certs, signing_key=device_key)
    plain = ward_device(edge, certs, "h1/monitor/monitor-8")
    try:
        signer.vitals({"heart_rate": 70}, seq=1, patient_id="p-own")
        plain.vitals({"heart_rate": 60}, seq=1, patient_id=None)
        wait_until(lambda: rows(bridge, "monitor-7") and rows(bridge, "monitor-8"), what="both through the gateway")
    finally:
        signer.close()
        plain.close()
        edge.stop()
    # the device's own signature survived the gateway (which therefore could not stamp it) ...
    assert rows(bridge, "monitor-7") == [(1, "p-own", 1, M7)]
    # ... and the gateway stamped and signed the unsigned device's reading for it
    assert rows(bridge, "monitor-8") == [(1, "p-bed-8", 1, "gateway/h1/gw-test")]


def test_nothing_refused_by_mosquitto_reaches_a_real_bridge(upstream: MosquittoInstance, bridge: BridgeThread,
                                                            certs: Certs) -> None:
    """The production broker in front of the real bridge: refused handshakes and denied topics
    leave no trace in the database, not even a dead letter."""
    for tls in (certs.server_only(), certs.expired(M7), certs.foreign(M7)):
        intruder = Probe(upstream.host, upstream.port, "monitor-7", tls=tls)
        try:
            assert intruder.refusal()
        finally:
            intruder.close()
    device = Device(upstream.port, "monitor-7", "monitor", "h1", tls=certs.client(M7))
    try:
        for topic in ("fc/v1/h1/monitor/monitor-8/vitals", "fc/v1/h2/monitor/monitor-7/vitals",
                      "fc/v1/h1/oximeter/monitor-7/vitals"):
            device.publish(topic, device.reading({"heart_rate": 99}, seq=1))
        device.vitals({"heart_rate": 70}, seq=2)
        wait_until(lambda: rows(bridge, "monitor-7"), what="the device's own reading")
    finally:
        device.close()
    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        assert db.execute("SELECT hospital_id, device_type, device_id, seq FROM readings").fetchall() == [
            ("h1", "monitor", "monitor-7", 2)]
    assert bridge.runtime.core.counters["dead_letters"] == 0
