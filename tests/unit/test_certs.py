"""Certificates made by firstcare.certs, checked in memory: names, usages, chains, validity."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from firstcare.certs import common_name, issue, make_ca

CA, CA_KEY = make_ca()
OTHER_CA, OTHER_KEY = make_ca("another CA")


def usages(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_the_ca_can_sign_certificates_and_nothing_else() -> None:
    constraints = CA.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert CA.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_a_server_certificate_names_its_hosts() -> None:
    cert, _ = issue(CA, CA_KEY, "broker.example", server_names=("localhost", "127.0.0.1", "::1", "broker.example"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    cert.verify_directly_issued_by(CA)


def test_a_device_certificate_carries_its_identity_and_is_for_clients_only() -> None:
    cert, _ = issue(CA, CA_KEY, "h1/monitor/monitor-7", client=True)
    assert common_name(cert) == "h1/monitor/monitor-7"
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(CA)
    with pytest.raises(ValueError):
        cert.verify_directly_issued_by(OTHER_CA)


def test_validity_and_an_expired_certificate_for_tests() -> None:
    now = dt.datetime.now(dt.UTC)
    fresh, _ = issue(CA, CA_KEY, "bridge", client=True)
    assert fresh.not_valid_before_utc <= now < fresh.not_valid_after_utc
    assert (fresh.not_valid_after_utc - now).days >= 824
    old, _ = issue(CA, CA_KEY, "bridge", client=True, days=1, not_before=now - dt.timedelta(days=3))
    assert old.not_valid_after_utc < now


def test_a_certificate_is_for_something() -> None:
    with pytest.raises(ValueError):
        issue(CA, CA_KEY, "nothing")
