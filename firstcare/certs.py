"""Certificates for TLS on every hop: a development CA, server certificates, and client
certificates whose common name is the broker identity (see :mod:`firstcare.identity`).

``firstcare certs`` writes them into one directory (``data/certs`` by default)::

    ca.pem                             the trust bundle: both CAs below. Every client and embedded broker
    site-ca.pem  site-ca-key.pem       the CA of servers and devices (keep its key offline)
    service-ca.pem  service-ca-key.pem the CA of bridges and gateways only (keep its key offline)
    server.pem  server-key.pem         brokers and HTTPS, SANs localhost, 127.0.0.1, ::1 and --host names
    bridge.pem  bridge-key.pem         the bridge's client certificate (CN bridge)
    clients/{stem}.pem  {stem}-key.pem devices (CN h1/monitor/monitor-7) and gateways (CN gateway/h1/ward-3)
    clients/{stem}.sign-key.pem        Ed25519 signing key of a device or gateway (never leaves it)
    clients/{stem}.sign.pub            its public half, to register with the bridge

Two CAs, because Mosquitto can pin a client id to the certificate only per listener: devices
connect to the device listener (client id = certificate name, so no device can take over the
bridge's session), bridges and gateways to the service listener, which trusts ``service-ca.pem``
only, so no device certificate is accepted there (see broker-config/README.md).

The directory is 0700, private keys 0600, certificates 0644. Everything here is pure except the
``write_*`` and ``Pki`` methods, which touch only that directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firstcare.errors import ConfigError
from firstcare.identity import file_stem, parse_identity

DEFAULT_DIR = "data/certs"
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers accept for a server certificate
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def new_key() -> ec.EllipticCurvePrivateKey:
    """ECDSA P-256: small, fast, and supported by Mosquitto, OpenSSL and embedded TLS stacks."""
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(common_name: str = "FirstCare development CA", days: int = CA_DAYS,
            key: ec.EllipticCurvePrivateKey | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = key or new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FirstCare Realtime"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san(names: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, *,
          server_names: tuple[str, ...] = (), client: bool = False, days: int = LEAF_DAYS,
          not_before: dt.datetime | None = None, key: ec.EllipticCurvePrivateKey | None = None,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA: a server certificate when ``server_names`` is given
    (subject alternative names, what TLS clients check), a client certificate when ``client``.
    ``not_before`` in the past with a short ``days`` makes an expired one (tests)."""
    if not server_names and not client:
        raise ValueError("a certificate is for a server, a client, or both")
    key = key or new_key()
    start = not_before or _now() - dt.timedelta(minutes=5)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FirstCare Realtime"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(server_names)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def write_private(path: Path, data: bytes) -> None:
    """Create (or replace) a file readable by its owner only, never readable for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


@dataclass(frozen=True, slots=True)
class Pair:
    cert: Path
    key: Path


class Pki:
    """A certificate directory as ``firstcare certs`` lays it out."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    @property
    def ca_file(self) -> Path:
        """The trust bundle (both CAs): what clients verify servers with, and embedded brokers clients."""
        return self.dir / "ca.pem"

    def ca_pair(self, kind: str) -> Pair:
        """``site`` (servers, devices) or ``service`` (bridges, gateways)."""
        return Pair(self.dir / f"{kind}-ca.pem", self.dir / f"{kind}-ca-key.pem")

    @property
    def service_ca_file(self) -> Path:
        return self.ca_pair("service").cert

    @property
    def server(self) -> Pair:
        return Pair(self.dir / "server.pem", self.dir / "server-key.pem")

    @property
    def bridge(self) -> Pair:
        return Pair(self.dir / "bridge.pem", self.dir / "bridge-key.pem")

    def client(self, identity: str) -> Pair:
        stem = file_stem(identity)
        return Pair(self.dir / "clients" / f"{stem}.pem", self.dir / "clients" / f"{stem}-key.pem")

    def signing_key(self, identity: str) -> Path:
        return self.dir / "clients" / f"{file_stem(identity)}.sign-key.pem"

    def signing_pub(self, identity: str) -> Path:
        return self.dir / "clients" / f"{file_stem(identity)}.sign.pub"

    def _mkdir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        (self.dir / "clients").mkdir(exist_ok=True)
        (self.dir / "clients").chmod(0o700)

    def has_ca(self) -> bool:
        return self.ca_file.exists() and all(p.cert.exists() and p.key.exists()
                                             for p in (self.ca_pair("site"), self.ca_pair("service")))

    def init_ca(self, common_name: str = "FirstCare development CA", days: int = CA_DAYS) -> None:
        if self.has_ca():
            raise ConfigError(f"{self.ca_file} exists already; remove the directory to start over", "ca_exists")
        self._mkdir()
        bundle = b""
        for kind, name in (("site", common_name), ("service", f"{common_name} for services")):
            cert, key = make_ca(name, days)
            pair = self.ca_pair(kind)
            write_private(pair.key, key_pem(key))
            write_public(pair.cert, cert_pem(cert))
            bundle += cert_pem(cert)
        write_public(self.ca_file, bundle)

    def load_ca(self, kind: str = "site") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.has_ca():
            raise ConfigError(f"no CA in {self.dir}: run `firstcare certs init --dir {self.dir}` first", "ca_missing")
        pair = self.ca_pair(kind)
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{pair.key} is not an EC key", "ca_invalid")
        return cert, key

    def _issue(self, pair: Pair, name: str, ca: str = "site", **kwargs: object) -> Pair:
        ca_cert, ca_key = self.load_ca(ca)
        self._mkdir()
        cert, key = issue(ca_cert, ca_key, name, **kwargs)  # type: ignore[arg-type]
        write_private(pair.key, key_pem(key))
        write_public(pair.cert, cert_pem(cert))
        return pair

    def issue_server(self, names: tuple[str, ...] = (), days: int = LEAF_DAYS) -> Pair:
        all_names = tuple(dict.fromkeys((*DEFAULT_SERVER_NAMES, *names)))
        return self._issue(self.server, all_names[0] if not names else names[0], server_names=all_names, days=days)

    def issue_client(self, identity: str, days: int = LEAF_DAYS) -> Pair:
        """A client certificate for a device, gateway or bridge identity (validated)."""
        parsed = parse_identity(identity)
        pair = self.bridge if parsed.kind == "bridge" and identity == "bridge" else self.client(identity)
        return self._issue(pair, identity, ca="site" if parsed.kind == "device" else "service", client=True,
                           days=days)

    def ensure_dev(self, names: tuple[str, ...] = ()) -> None:
        """What ``firstcare up --tls`` needs: a CA, a server certificate and the bridge's."""
        if not self.has_ca():
            self.init_ca()
        if not (self.server.cert.exists() and self.server.key.exists()):
            self.issue_server(names)
        if not (self.bridge.cert.exists() and self.bridge.key.exists()):
            self.issue_client("bridge")

    def ensure_client(self, identity: str) -> Pair:
        pair = self.bridge if identity == "bridge" else self.client(identity)
        if not (pair.cert.exists() and pair.key.exists()):
            self.issue_client(identity)
        return pair
