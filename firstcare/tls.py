"""TLS for every hop: client contexts (bridge, edge, simulator -> broker), server contexts
(embedded broker, HTTPS), and the identity a verified client certificate names.

Verification is on by default: a client checks the server's certificate chain against the
configured CA (or the system's trust store) and the host name against its SANs. The only way
to turn that off is the explicit development switch (``FC_TLS_INSECURE`` and its siblings),
and every process that uses it logs a WARNING at start, every start.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from firstcare.errors import ConfigError

log = logging.getLogger("firstcare.tls")

MIN_VERSION = ssl.TLSVersion.TLSv1_2
INSECURE_WARNING = ("TLS certificate verification is OFF for %s (development switch %s): anyone on the "
                    "network can impersonate the server. Never use this with patient data.")


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client speaks TLS: the CA it trusts (None: the system's trust store), and the
    certificate and key it proves its own identity with (both or neither)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs its key and a key its certificate "
                              f"(certificate {self.cert_file!r}, key {self.key_file!r})", "tls_config_invalid")


def _readable(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path!r} does not exist or is not a file", "tls_file_missing")
    return path


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails. paho wraps the socket and hands it back only
    after the handshake, so a refused certificate would otherwise leave it to the garbage
    collector, once per reconnect attempt."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def client_context(tls: ClientTls) -> ssl.SSLContext:
    """A context that verifies the server (chain and host name) unless ``insecure``."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=_readable(tls.ca_file, "CA file") if tls.ca_file else None)
        ctx.minimum_version = MIN_VERSION
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(_readable(tls.cert_file, "certificate file"), _readable(tls.key_file, "key file"))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load TLS files ({tls.ca_file}, {tls.cert_file}, {tls.key_file}): {exc}",
                          "tls_config_invalid") from exc
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.sslsocket_class = _ClosingSSLSocket
    return ctx


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context; with ``require_client_cert`` a client without a certificate from
    ``client_ca_file`` fails the handshake (expired, another CA's, or none at all)."""
    if require_client_cert and not client_ca_file:
        raise ConfigError("requiring client certificates needs the CA that issues them", "tls_config_invalid")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = MIN_VERSION
        ctx.load_cert_chain(_readable(cert_file, "certificate file"), _readable(key_file, "key file"))
        if client_ca_file:
            ctx.load_verify_locations(cafile=_readable(client_ca_file, "CA file"))
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load TLS files ({cert_file}, {key_file}, {client_ca_file}): {exc}",
                          "tls_config_invalid") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The common name of the verified client certificate, or None without one. Only
    meaningful on a context with CERT_REQUIRED (``getpeercert`` is empty otherwise)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    # ((("commonName", name),), ...): one tuple of pairs per RDN, deeper than typeshed's type says
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def warn_if_insecure(insecure: bool, what: str, switch: str) -> None:
    if insecure:
        log.warning(INSECURE_WARNING, what, switch)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def note_plaintext(what: str, host: str) -> None:
    """A plain MQTT link: a WARNING when it leaves this machine (readings cross a network in clear
    text), INFO on loopback (development: ``firstcare up``, tests)."""
    if is_loopback(host):
        log.info("%s is plain MQTT on loopback (%s): fine for development, use TLS on any network", what, host)
    else:
        log.warning("%s is not encrypted (%s): readings cross the network in clear text; use mqtts://", what, host)


def describe_tls_error(exc: BaseException) -> str:
    """A message a person can act on for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate was refused: {exc.verify_message} (check the CA file and the host name)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return str(exc)
