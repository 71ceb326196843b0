"""httpx clients in tests share one default TLS context (tests/support/http.py), built as
httpx's own default: certificates required, hostnames checked; other ``verify`` values are
their own."""

from __future__ import annotations

import ssl

import httpx

from tests.support.http import share_default_tls_context


def context_of(client: httpx.Client) -> ssl.SSLContext:
    return client._transport._pool._ssl_context  # type: ignore[attr-defined]


def test_default_clients_share_a_verifying_context() -> None:
    assert share_default_tls_context()
    with httpx.Client() as a, httpx.Client() as b:
        shared = context_of(a)
        assert context_of(b) is shared
        assert (shared.verify_mode, shared.check_hostname) == (ssl.CERT_REQUIRED, True)
        assert shared.get_ca_certs(), "the CA bundle is loaded"


def test_a_context_of_ones_own_and_verify_false_are_kept() -> None:
    own = ssl.create_default_context()
    with httpx.Client(verify=own) as mine, httpx.Client(verify=False) as insecure, httpx.Client() as default:
        assert context_of(mine) is own
        assert context_of(insecure).verify_mode == ssl.CERT_NONE
        assert context_of(default).verify_mode == ssl.CERT_REQUIRED
