"""JWT verification (firstcare/auth.py) and validated settings (firstcare/settings.py)."""

from __future__ import annotations

import dataclasses
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from firstcare.auth import TokenVerifier, claims_from_payload, mint_token
from firstcare.errors import AuthError, ConfigError
from firstcare.permissions import Claims
from firstcare.settings import Settings, settings_table

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"  # >= 32 bytes: no pyjwt key warning
OTHER_SECRET = "another-secret-0123456789-abcdefghijklmnopqrstuv"
NOW = int(time.time())  # at import: tokens built from it must outlive a long suite run
TTL = 7 * 86400


def hs(payload: dict, secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def good(**extra) -> dict:
    return {"sub": "u1", "exp": NOW + TTL, "role": "clinician", **extra}


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


# ------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("role", "hospitals", "patients"),
    [
        ("admin", (), ()),
        ("service", (), ()),
        ("clinician", ("h2", "h1"), ()),
        ("patient", (), ("p-001",)),
    ],
)
def test_mint_and_verify_round_trip(role: str, hospitals: tuple, patients: tuple) -> None:
    token = mint_token(SECRET, "user-7", role, hospitals=hospitals, patients=patients, ttl_seconds=TTL, now=NOW)
    claims = TokenVerifier(secret=SECRET).verify(token)
    assert claims == Claims("user-7", role, NOW + TTL, frozenset(hospitals), frozenset(patients))


def test_mint_rejects_unknown_role() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, "u", "root")


@pytest.mark.parametrize("ago", [3600, 11], ids=["an-hour-ago", "past-leeway"])
def test_expired_token(ago: int) -> None:
    token = mint_token(SECRET, "u", "admin", ttl_seconds=60, now=NOW - 60 - ago)
    with pytest.raises(AuthError) as info:
        TokenVerifier(secret=SECRET).verify(token)
    assert info.value.reason == "token_expired"


def test_expiry_within_leeway_is_accepted() -> None:
    token = mint_token(SECRET, "u", "admin", ttl_seconds=60, now=time.time() - 60 - 2)
    assert TokenVerifier(secret=SECRET).verify(token).sub == "u"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(hs(good(), OTHER_SECRET), id="wrong-secret"),
        pytest.param("garbage", id="garbage"),
        pytest.param("a.b.c", id="three-garbage-segments"),
        pytest.param(hs(good())[:-4] + "AAAA", id="tampered-signature"),
        pytest.param(jwt.encode(good(role="admin"), "", algorithm="none"), id="alg-none"),
        pytest.param(hs({"sub": "u1", "role": "admin"}), id="missing-exp"),
        pytest.param(hs({"exp": NOW + TTL, "role": "admin"}), id="missing-sub"),
        pytest.param(hs(good(sub="")), id="empty-sub"),
        pytest.param(hs(good(sub=42)), id="int-sub"),
        pytest.param(hs(good(exp="tomorrow")), id="exp-not-a-number"),
        pytest.param(hs(good(role="root")), id="unknown-role"),
        pytest.param(hs(good(role="")), id="empty-role"),
        pytest.param(hs(good(role=None)), id="null-role"),
        # IdPs (e.g. Keycloak) often put roles in a list: that must be token_invalid, not a crash
        pytest.param(hs(good(role=["admin"])), id="role-list"),
        pytest.param(hs(good(role={"name": "admin"})), id="role-object"),
        pytest.param(hs(good(hospitals="h1")), id="hospitals-string"),
        pytest.param(hs(good(hospitals=[1, 2])), id="hospitals-ints"),
        pytest.param(hs(good(patients={"p1": True})), id="patients-object"),
        pytest.param(jwt.encode(good(), SECRET + SECRET, algorithm="HS512"), id="hs512-not-allowed"),
    ],
)
def test_invalid_tokens(token: str) -> None:
    with pytest.raises(AuthError) as info:
        TokenVerifier(secret=SECRET).verify(token)
    assert info.value.reason == "token_invalid"


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: str | None) -> None:
    with pytest.raises(AuthError) as info:
        TokenVerifier(secret=SECRET).verify(token)
    assert info.value.reason == "token_missing"


def test_verifier_needs_a_key() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier()


def test_role_defaults_to_clinician_without_scope() -> None:
    claims = TokenVerifier(secret=SECRET).verify(hs({"sub": "u", "exp": int(time.time()) + 600}))
    assert (claims.role, claims.hospitals, claims.patients) == ("clinician", frozenset(), frozenset())


def test_claims_from_payload_unknown_role() -> None:
    with pytest.raises(AuthError) as info:
        claims_from_payload({"sub": "u", "exp": NOW, "role": "superuser"})
    assert info.value.reason == "token_invalid"


def test_rs256_verified_with_public_key(rsa_keys: tuple[str, str]) -> None:
    private, public = rsa_keys
    token = jwt.encode(good(role="service", hospitals=["h1"]), private, algorithm="RS256")
    claims = TokenVerifier(public_key=public).verify(token)
    assert claims == Claims("u1", "service", NOW + TTL, frozenset({"h1"}), frozenset())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda priv: hs(good()), id="hs256-with-only-public-key"),
        pytest.param(lambda priv: jwt.encode(good(), rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                             algorithm="RS256"), id="rs256-other-key"),
        pytest.param(lambda priv: jwt.encode(good(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
                     id="es256-wrong-key-type"),
        pytest.param(lambda priv: jwt.encode({"sub": "u1"}, priv, algorithm="RS256"), id="rs256-missing-exp"),
    ],
)
def test_public_key_verifier_rejects(rsa_keys: tuple[str, str], make) -> None:
    private, public = rsa_keys
    with pytest.raises(AuthError) as info:
        TokenVerifier(public_key=public).verify(make(private))
    assert info.value.reason == "token_invalid"


def test_rs256_expired_with_public_key(rsa_keys: tuple[str, str]) -> None:
    private, public = rsa_keys
    token = jwt.encode(good(exp=NOW - 3600), private, algorithm="RS256")
    with pytest.raises(AuthError) as info:
        TokenVerifier(public_key=public).verify(token)
    assert info.value.reason == "token_expired"


def test_rs256_rejected_when_only_a_secret_is_configured(rsa_keys: tuple[str, str]) -> None:
    private, _ = rsa_keys
    with pytest.raises(AuthError) as info:
        TokenVerifier(secret=SECRET).verify(jwt.encode(good(), private, algorithm="RS256"))
    assert info.value.reason == "token_invalid"


@pytest.mark.parametrize(
    ("kwargs", "payload", "ok"),
    [
        ({"audience": "fc"}, good(aud="fc"), True),
        ({"audience": "fc"}, good(aud="other"), False),
        ({"audience": "fc"}, good(), False),
        ({"issuer": "https://idp"}, good(iss="https://idp"), True),
        ({"issuer": "https://idp"}, good(iss="https://evil"), False),
    ],
)
def test_audience_and_issuer(kwargs: dict, payload: dict, ok: bool) -> None:
    verifier = TokenVerifier(secret=SECRET, **kwargs)
    if ok:
        assert verifier.verify(hs(payload)).sub == "u1"
    else:
        with pytest.raises(AuthError) as info:
            verifier.verify(hs(payload))
        assert info.value.reason == "token_invalid"


# ------------------------------------------------------------------------------- settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.mqtt_url, s.store_url, s.hub_url, s.http_port, s.mqtt_port, s.topic_root) == (
        "embedded", "sqlite:///data/firstcare.db", "memory://", 8000, 1884, "fc")
    assert s.allowed_origins == ()
    assert s.jwt_secret is None
    assert s == Settings()


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"FC_HTTP_PORT": "9000"}, "http_port", 9000),
        ({"FC_HTTP_PORT": " 9001 "}, "http_port", 9001),
        ({"FC_HTTP_PORT": "0"}, "http_port", 0),
        ({"FC_MQTT_PORT": "65535"}, "mqtt_port", 65535),
        ({"FC_BATCH_MAX": "1"}, "batch_max", 1),
        ({"FC_RETENTION_DAYS": "7.5"}, "retention_days", 7.5),
        ({"FC_RETENTION_DAYS": "0"}, "retention_days", 0.0),
        ({"FC_DEVICE_SILENT_SECONDS": "30"}, "device_silent_seconds", 30.0),
        ({"FC_ALLOWED_ORIGINS": "https://a.example, https://b.example,,"}, "allowed_origins",
         ("https://a.example", "https://b.example")),
        ({"FC_ALLOWED_ORIGINS": "https://a.example"}, "allowed_origins", ("https://a.example",)),
        ({"FC_JWT_SECRET": SECRET}, "jwt_secret", SECRET),
        ({"FC_MQTT_URL": "mqtt://user:pw@broker:1883"}, "mqtt_url", "mqtt://user:pw@broker:1883"),
        ({"FC_MQTT_URL": "tcp://bridge@broker"}, "mqtt_url", "tcp://bridge@broker"),
        ({"FC_MQTT_URL": "mqtt://broker", "FC_MQTT_ALLOW_ANONYMOUS": "true"}, "mqtt_url", "mqtt://broker"),
        ({"FC_MQTT_ALLOW_ANONYMOUS": "yes"}, "mqtt_allow_anonymous", True),
        ({"FC_MQTT_ALLOW_ANONYMOUS": "0"}, "mqtt_allow_anonymous", False),
        ({"FC_MQTT_URL": "mqtt://u@b", "FC_MQTT_PROTOCOL": "5"}, "mqtt_protocol", "5"),
        ({"FC_MQTT_URL": "mqtt://u@b", "FC_MQTT_PROTOCOL": "5", "FC_MQTT_SESSION_EXPIRY_SECONDS": "3600"},
         "mqtt_session_expiry_seconds", 3600),
        ({"FC_STORE_BUSY_TIMEOUT_SECONDS": "0.5"}, "store_busy_timeout_seconds", 0.5),
        ({"FC_MQTT_CLIENT_ID": "bridge.ward-3_a"}, "mqtt_client_id", "bridge.ward-3_a"),
        ({"FC_STORE_URL": "sqlite:////var/lib/fc.db"}, "store_url", "sqlite:////var/lib/fc.db"),
        ({"FC_STORE_URL": "postgresql://db/fc"}, "store_url", "postgresql://db/fc"),
        ({"FC_STORE_URL": "postgres://fc:secret@db:5433/fc?sslmode=require"}, "store_url",
         "postgres://fc:secret@db:5433/fc?sslmode=require"),
        ({"FC_SEQ_GAP_GRACE_SECONDS": "5"}, "seq_gap_grace_seconds", 5.0),
        ({"FC_ALARM_REORDER_SECONDS": "0"}, "alarm_reorder_seconds", 0.0),
        ({"FC_STORE_STATEMENT_TIMEOUT_SECONDS": "10"}, "store_statement_timeout_seconds", 10.0),
        ({"FC_TOPIC_ROOT": "org-fc_2"}, "topic_root", "org-fc_2"),
        ({"FC_LOG_LEVEL": "debug"}, "log_level", "debug"),
        ({"FC_HTTP_PORT": ""}, "http_port", 8000),  # empty means unset
        ({"HTTP_PORT": "1", "fc_http_port": "2"}, "http_port", 8000),  # only the exact FC_ prefix
    ],
)
def test_env_conversion(env: dict, field: str, expected) -> None:
    value = getattr(Settings.from_env(env), field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"FC_HTTP_PORT": "x"}, "FC_HTTP_PORT='x'"),
        ({"FC_HTTP_PORT": "80.5"}, "FC_HTTP_PORT='80.5'"),
        ({"FC_MQTT_PORT": "eighty"}, "FC_MQTT_PORT='eighty'"),
        ({"FC_BATCH_MAX": "many"}, "FC_BATCH_MAX='many'"),
        ({"FC_RETENTION_DAYS": "a week"}, "FC_RETENTION_DAYS='a week'"),
    ],
)
def test_bad_numbers_name_the_key(env: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"FC_MQTT_URL": "http://broker"}, "FC_MQTT_URL"),
        ({"FC_MQTT_URL": "broker:1883"}, "FC_MQTT_URL"),
        # the validator's own message says mqtt://[user:pass@]host[:port]: a missing host or a
        # port that is not a number must fail here, not later as a bare ValueError in ingest
        ({"FC_MQTT_URL": "mqtt://"}, "FC_MQTT_URL"),
        ({"FC_MQTT_URL": "mqtt://broker:notaport"}, "FC_MQTT_URL"),
        ({"FC_MQTT_URL": "mqtt://broker:99999"}, "FC_MQTT_URL"),
        ({"FC_STORE_URL": "postgresql://db"}, "FC_STORE_URL"),  # no database named
        ({"FC_STORE_URL": "postgresql://db:port/fc"}, "FC_STORE_URL"),
        ({"FC_STORE_URL": "mysql://db/fc"}, "FC_STORE_URL"),
        ({"FC_SEQ_GAP_GRACE_SECONDS": "-1"}, "FC_SEQ_GAP_GRACE_SECONDS"),
        ({"FC_STORE_STATEMENT_TIMEOUT_SECONDS": "0"}, "FC_STORE_STATEMENT_TIMEOUT_SECONDS"),
        ({"FC_STORE_URL": "data/fc.db"}, "FC_STORE_URL"),
        # an empty path makes sqlite3 open a temporary database: every reading would be lost
        ({"FC_STORE_URL": "sqlite:///"}, "FC_STORE_URL"),
        ({"FC_HUB_URL": "kafka://localhost"}, "FC_HUB_URL"),
        ({"FC_HUB_URL": "nothing"}, "FC_HUB_URL"),
        ({"FC_HTTP_PORT": "65536"}, "FC_HTTP_PORT"),
        ({"FC_HTTP_PORT": "-1"}, "FC_HTTP_PORT"),
        ({"FC_MQTT_PORT": "70000"}, "FC_MQTT_PORT"),
        ({"FC_DEVICE_SILENT_SECONDS": "-1"}, "FC_DEVICE_SILENT_SECONDS"),
        ({"FC_DEVICE_OFFLINE_SECONDS": "-0.5"}, "FC_DEVICE_OFFLINE_SECONDS"),
        ({"FC_ESCALATION_SECONDS": "-60"}, "FC_ESCALATION_SECONDS"),
        ({"FC_RETENTION_DAYS": "-1"}, "FC_RETENTION_DAYS"),
        ({"FC_BATCH_LINGER_MS": "-5"}, "FC_BATCH_LINGER_MS"),
        # NaN passes "< 0": an escalation timeout of NaN would silently never escalate
        ({"FC_ESCALATION_SECONDS": "nan"}, "FC_ESCALATION_SECONDS"),
        ({"FC_DEVICE_OFFLINE_SECONDS": "nan"}, "FC_DEVICE_OFFLINE_SECONDS"),
        ({"FC_BATCH_MAX": "0"}, "FC_BATCH_MAX"),
        ({"FC_INGEST_QUEUE_SIZE": "-1"}, "FC_INGEST_QUEUE_SIZE"),
        ({"FC_DEAD_LETTER_BYTES": "0"}, "FC_DEAD_LETTER_BYTES"),
        ({"FC_LOG_LEVEL": "LOUD"}, "FC_LOG_LEVEL"),
        ({"FC_TOPIC_ROOT": "fc/#"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "/fc"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "org/fc"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "+"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "fc+"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "#"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "$SYS"}, "FC_TOPIC_ROOT"),
        ({"FC_TOPIC_ROOT": "f$c"}, "FC_TOPIC_ROOT"),
        # a session that cannot be persistent is refused, with what to change
        ({"FC_MQTT_URL": "mqtt://broker:1883"}, "FC_MQTT_ALLOW_ANONYMOUS=true"),
        ({"FC_MQTT_URL": "mqtt://b", "FC_MQTT_PROTOCOL": "5", "FC_MQTT_SESSION_EXPIRY_SECONDS": "0"},
         "FC_MQTT_SESSION_EXPIRY_SECONDS"),
        ({"FC_MQTT_URL": "embedded", "FC_MQTT_PROTOCOL": "5"}, "FC_MQTT_PROTOCOL"),
        ({"FC_MQTT_PROTOCOL": "4"}, "FC_MQTT_PROTOCOL"),
        ({"FC_MQTT_ALLOW_ANONYMOUS": "maybe"}, "FC_MQTT_ALLOW_ANONYMOUS"),
        ({"FC_MQTT_CLIENT_ID": "fc/bridge"}, "FC_MQTT_CLIENT_ID"),
        ({"FC_MQTT_CLIENT_ID": "bridge#1"}, "FC_MQTT_CLIENT_ID"),
        ({"FC_STORE_BUSY_TIMEOUT_SECONDS": "0"}, "FC_STORE_BUSY_TIMEOUT_SECONDS"),
        ({"FC_STORE_BUSY_TIMEOUT_SECONDS": "nan"}, "FC_STORE_BUSY_TIMEOUT_SECONDS"),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else "key",
)
def test_bad_values_raise_config_error_naming_the_key(env: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert key in str(info.value)


def test_an_anonymous_session_is_refused_with_what_to_change() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"FC_MQTT_URL": "mqtt://127.0.0.1:1884"})
    message = str(info.value)
    assert message.startswith("FC_MQTT_URL=") and "anonymous" in message
    assert "mqtt://bridge:password@host:port" in message and "FC_MQTT_ALLOW_ANONYMOUS=true" in message


@pytest.mark.parametrize(
    ("env", "overrides", "field", "expected"),
    [
        ({"FC_HTTP_PORT": "9000"}, {"http_port": 9100}, "http_port", 9100),
        ({"FC_LOG_LEVEL": "DEBUG"}, {"log_level": "ERROR"}, "log_level", "ERROR"),
        ({"FC_HTTP_PORT": "9000"}, {"http_port": None}, "http_port", 9000),  # None = flag not given
        ({}, {"store_url": "sqlite:////tmp/x.db"}, "store_url", "sqlite:////tmp/x.db"),
    ],
)
def test_overrides_beat_env(env: dict, overrides: dict, field: str, expected) -> None:
    assert getattr(Settings.from_env(env, **overrides), field) == expected


def test_bad_override_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({}, http_port=70000)
    assert "FC_HTTP_PORT" in str(info.value)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({}, htp_port=1)
    assert "htp_port" in str(info.value)


def test_replace_validates() -> None:
    s = Settings.from_env({})
    assert s.replace(http_port=1234).http_port == 1234
    with pytest.raises(ConfigError):
        s.replace(hub_url="kafka://x")


@pytest.mark.parametrize(
    ("store_url", "path"),
    [("sqlite:///data/fc.db", "data/fc.db"), ("sqlite:////abs/fc.db", "/abs/fc.db"),
     ("postgresql://db/fc", "data/firstcare.db")],  # a PostgreSQL store: where local files are kept
)
def test_sqlite_path(store_url: str, path: str) -> None:
    assert Settings.from_env({"FC_STORE_URL": store_url}).sqlite_path == path


def test_settings_table_has_a_row_per_field() -> None:
    rows = settings_table()
    names = [f.name for f in dataclasses.fields(Settings)]
    assert [r[0] for r in rows] == ["FC_" + n.upper() for n in names]
    table = {r[0]: r for r in rows}
    assert table["FC_HTTP_PORT"][1] == "8000"
    assert table["FC_MQTT_URL"][1] == "embedded"
    assert table["FC_JWT_SECRET"][1] == ""
    assert table["FC_ALLOWED_ORIGINS"][1] == ""
    for variable, _default, doc in rows:
        assert doc, f"{variable} has no description"


@pytest.mark.parametrize(
    "key", ["FC_MQTT_URL", "FC_STORE_URL", "FC_HUB_URL", "FC_JWT_SECRET", "FC_JWT_PUBLIC_KEY", "FC_JWKS_URL",
            "FC_HTTP_PORT", "FC_MQTT_PORT", "FC_ALLOWED_ORIGINS"],
)
def test_design_settings_exist(key: str) -> None:
    assert key in {r[0] for r in settings_table()}
