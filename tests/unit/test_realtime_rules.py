"""Small pure rules of the real-time layer: byte-counted limits, own origins, the `up` banner."""

from __future__ import annotations

import pytest

from bridge.realtime import _ip_origin_of_host, utf8_size
from firstcare.cli import up_banner
from firstcare.errors import ConfigError
from firstcare.settings import Settings, own_origins


@pytest.mark.parametrize(("text", "expected"), [
    ("ab", 2), ("é" * 3000, 6000), ("😀" * 3000, 12000), ("x" * 5000, 5000), ("", 0),
])
def test_message_size_counts_utf8_bytes_not_characters(text: str, expected: int) -> None:
    size = utf8_size(text, 4096)
    assert size == expected or (size == len(text) and len(text) * 4 <= 4096)
    assert (size > 4096) == (len(text.encode()) > 4096)


@pytest.mark.parametrize(("settings", "expected_in", "expected_out"), [
    (Settings(http_port=8000), ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"],
     ["http://0.0.0.0:8000", "http://127.0.0.1:9000"]),
    (Settings(http_host="0.0.0.0", http_port=80), ["http://localhost", "https://localhost:80"], ["http://0.0.0.0"]),
    (Settings(http_host="ward-pc.local", http_port=8000), ["http://ward-pc.local:8000"], []),
    (Settings(public_origins=("https://monitor.example.org",)), ["https://monitor.example.org"],
     ["http://127.0.0.1:8000"]),
])
def test_own_origins(settings: Settings, expected_in: list[str], expected_out: list[str]) -> None:
    origins = own_origins(settings)
    assert [o for o in expected_in if o not in origins] == []
    assert [o for o in expected_out if o in origins] == []


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://10.0.0.5:8000", "10.0.0.5:8000", True),     # an address cannot be rebound
    ("http://[::1]:8000", "[::1]:8000", True),
    ("http://10.0.0.5:8000", "10.0.0.6:8000", False),
    ("http://evil.example:8000", "evil.example:8000", False),  # a name can: DNS rebinding
    ("http://10.0.0.5:8000", "", False),
    ("ftp://10.0.0.5:8000", "10.0.0.5:8000", False),
])
def test_only_an_ip_origin_may_be_compared_with_host(origin: str, host: str, same: bool) -> None:
    assert _ip_origin_of_host(origin, host) is same


@pytest.mark.parametrize("value", ["https://a.example/", "a.example", "*", "https://a.example/path"])
def test_origin_settings_must_be_origins(value: str) -> None:
    for key in ("FC_ALLOWED_ORIGINS", "FC_PUBLIC_ORIGINS"):
        with pytest.raises(ConfigError, match=key):
            Settings.from_env({key: value})


def test_up_mints_an_admin_token_only_with_the_hs256_secret() -> None:
    with_secret = up_banner(Settings(jwt_secret="s" * 32), "h1")
    assert "admin token   eyJ" in with_secret and "#token=eyJ" in with_secret
    public_key_only = up_banner(Settings(jwt_public_key="-----BEGIN PUBLIC KEY-----"), "h1")
    assert "none minted" in public_key_only and "FC_JWT_PUBLIC_KEY" in public_key_only
    assert "eyJ" not in public_key_only
    assert "FC_JWKS_URL" in up_banner(Settings(jwks_url="https://idp.example/jwks"), "h1")
