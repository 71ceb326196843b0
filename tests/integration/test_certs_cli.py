"""`firstcare certs` as an operator runs it: files and permissions, ACL lines, key registration
with a real bridge over HTTPS."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from firstcare.certs import Pki
from firstcare.certs_cli import main
from tests.support.bridge import BridgeThread, bridge_settings, token


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_device_and_gateway_write_what_they_say_with_tight_permissions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert main(["init", "--dir", str(d), "--host", "broker.example"]) == 0
    assert main(["device", "--dir", str(d), "--hospital", "h1", "--type", "monitor", "--id", "monitor-7"]) == 0
    acl = tmp_path / "acl"
    acl.write_text("user bridge\ntopic read fc/#\n")
    assert main(["gateway", "--dir", str(d), "--hospital", "h1", "--id", "ward-3", "--acl", str(acl)]) == 0
    out = capsys.readouterr().out
    assert "PUT" in out and "/api/devices/monitor/monitor-7/key" in out
    assert mode(d) == 0o700 and mode(d / "clients") == 0o700
    for key in ("site-ca-key.pem", "service-ca-key.pem", "server-key.pem", "bridge-key.pem",
                "clients/h1.monitor.monitor-7-key.pem", "clients/h1.monitor.monitor-7.sign-key.pem",
                "clients/gateway.h1.ward-3-key.pem"):
        assert mode(d / key) == 0o600, key
    for cert in ("ca.pem", "site-ca.pem", "service-ca.pem", "server.pem", "bridge.pem",
                 "clients/h1.monitor.monitor-7.pem", "clients/h1.monitor.monitor-7.sign.pub"):
        assert mode(d / cert) == 0o644, cert
    # the gateway's and the bridge's certificates come from the service CA, the device's from the site CA
    site = x509.load_pem_x509_certificate((d / "site-ca.pem").read_bytes())
    service = x509.load_pem_x509_certificate((d / "service-ca.pem").read_bytes())
    for name, issuer in (("bridge.pem", service), ("clients/gateway.h1.ward-3.pem", service),
                         ("clients/h1.monitor.monitor-7.pem", site), ("server.pem", site)):
        x509.load_pem_x509_certificate((d / name).read_bytes()).verify_directly_issued_by(issuer)
    assert (d / "ca.pem").read_bytes() == (d / "site-ca.pem").read_bytes() + (d / "service-ca.pem").read_bytes()
    server = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.example" in names.get_values_for_type(x509.DNSName)
    assert acl.read_text().endswith("user gateway/h1/ward-3\ntopic write fc/v1/h1/+/+/vitals\n"
                                    "topic write fc/v1/h1/+/+/status\ntopic readwrite fc/edge/h1/ward-3/status\n")


def test_init_never_replaces_a_ca_unless_told_to_keep_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "certs")
    assert main(["init", "--dir", d]) == 0
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()  # the bundle of both CAs
    assert main(["init", "--dir", d]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["init", "--dir", d, "--exist-ok"]) == 0
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == ca


@pytest.mark.parametrize("args", [
    ["device", "--hospital", "gateway", "--type", "monitor", "--id", "m-1"],  # reserved hospital id
    ["device", "--hospital", "h 1", "--type", "monitor", "--id", "m-1"],
    ["bridge", "--name", "h1/monitor/m-1"],
])
def test_identities_outside_the_rule_are_refused(tmp_path: Path, args: list[str]) -> None:
    d = str(tmp_path / "certs")
    assert main(["init", "--dir", d]) == 0
    assert main([*args, "--dir", d]) == 2


def test_register_puts_every_public_key_to_the_bridge_over_https(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    pki = Pki(d)
    assert main(["init", "--dir", str(d)]) == 0
    for device_id in ("monitor-1", "monitor-2"):
        assert main(["device", "--dir", str(d), "--hospital", "h1", "--type", "monitor", "--id", device_id]) == 0
    assert main(["gateway", "--dir", str(d), "--hospital", "h1", "--id", "ward-3", "--signing-key"]) == 0
    settings = bridge_settings(tmp_path, http_cert_file=str(pki.server.cert), http_key_file=str(pki.server.key),
                               mqtt_ca_file=None)
    with BridgeThread(settings) as bridge:
        capsys.readouterr()
        assert main(["register", "--dir", str(d), "--bridge-url", bridge.url, "--token", token("service")]) == 0
        out = capsys.readouterr().out
        assert out.splitlines() == ["200  gateway/h1/ward-3", "200  h1/monitor/monitor-1", "200  h1/monitor/monitor-2"]
        assert set(bridge.runtime.core.keys) == {"gateway/h1/ward-3", "h1/monitor/monitor-1", "h1/monitor/monitor-2"}
        assert main(["register", "--dir", str(d), "--bridge-url", bridge.url, "--token", token("clinician")]) == 1
