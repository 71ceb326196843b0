"""The MQTT URL grammar (firstcare.mqtt.MqttTarget), TLS client contexts and the security settings."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from edge.config import EdgeSettings
from firstcare.errors import ConfigError
from firstcare.mqtt import MqttTarget
from firstcare.settings import Settings
from firstcare.tls import ClientTls, client_context

EXISTING = str(Path(__file__))  # any file that exists


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://broker", MqttTarget("broker", 1883)),
    ("tcp://u:p%40ss@broker:1999", MqttTarget("broker", 1999, "u", "p@ss")),
    ("mqtts://broker", MqttTarget("broker", 8883, tls=ClientTls())),
    ("ssl://broker:9000", MqttTarget("broker", 9000, tls=ClientTls())),
    ("mqtts://[::1]", MqttTarget("::1", 8883, tls=ClientTls())),
])
def test_one_url_grammar_for_plain_and_tls(url: str, expected: MqttTarget) -> None:
    assert MqttTarget.parse(url) == expected


def test_tls_settings_apply_only_to_mqtts() -> None:
    tls = ClientTls("ca.pem", "c.pem", "k.pem")
    assert MqttTarget.parse("mqtts://b", tls=tls).tls == tls
    assert MqttTarget.parse("mqtt://b", tls=tls).tls is None


@pytest.mark.parametrize("url", ["http://b", "mqtts://", "mqtt://b:99999", "embedded", "b:1883"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="mqtts://"):
        MqttTarget.parse(url)


def test_urls_are_shown_without_passwords() -> None:
    assert str(MqttTarget.parse("mqtts://u:secret@b")) == "mqtts://u:***@b:8883"


def test_client_contexts_verify_by_default_and_only_the_switch_turns_it_off() -> None:
    secure = client_context(ClientTls())
    assert (secure.verify_mode, secure.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert secure.minimum_version >= ssl.TLSVersion.TLSv1_2
    insecure = client_context(ClientTls(insecure=True))
    assert (insecure.verify_mode, insecure.check_hostname) == (ssl.CERT_NONE, False)


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="needs its key"):
        ClientTls(cert_file="c.pem")
    with pytest.raises(ConfigError, match="does not exist"):
        client_context(ClientTls(ca_file="/nonexistent/ca.pem"))


def settings(**values: object) -> Settings:
    return Settings.from_env({}, **values)


@pytest.mark.parametrize(("values", "message"), [
    ({"mqtt_url": "mqtt://b", "mqtt_ca_file": EXISTING}, "only applies to mqtts://"),
    ({"mqtt_url": "mqtts://b", "mqtt_cert_file": EXISTING}, "set both FC_MQTT_CERT_FILE and FC_MQTT_KEY_FILE"),
    ({"mqtt_url": "mqtts://b", "mqtt_ca_file": "/nonexistent"}, "no such file"),
    ({"mqtt_url": "mqtts://b", "broker_cert_file": EXISTING, "broker_key_file": EXISTING}, "must be 'embedded'"),
    ({"broker_cert_file": EXISTING, "broker_key_file": EXISTING}, "FC_MQTT_CA_FILE"),
    ({"mqtt_ca_file": EXISTING}, "plain MQTT unless FC_BROKER_CERT_FILE"),
    ({"http_cert_file": EXISTING}, "FC_HTTP_KEY_FILE"),
    ({"signature_max_age_seconds": 0}, "greater than 0"),
    ({"signature_max_age_seconds": 40 * 86400.0}, "below FC_RETENTION_DAYS"),
    ({"require_signatures": ("h 1",)}, "hospital ids"),
])
def test_security_settings_are_checked_with_the_key_named(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(**values)


def test_the_bridge_needs_its_own_certificate_for_the_embedded_tls_broker() -> None:
    broker_only = settings(broker_cert_file=EXISTING, broker_key_file=EXISTING, mqtt_ca_file=EXISTING)
    with pytest.raises(ConfigError, match="FC_MQTT_CERT_FILE"):
        broker_only.check_bridge_client()  # `firstcare broker` alone does not call it


def test_valid_security_settings() -> None:
    s = settings(mqtt_url="mqtts://b:8883", mqtt_ca_file=EXISTING, mqtt_cert_file=EXISTING, mqtt_key_file=EXISTING,
                 http_cert_file=EXISTING, http_key_file=EXISTING, require_signatures=("h1", "*"))
    assert s.mqtt_tls and not s.tls_insecure
    embedded = settings(broker_cert_file=EXISTING, broker_key_file=EXISTING, mqtt_ca_file=EXISTING,
                        mqtt_cert_file=EXISTING, mqtt_key_file=EXISTING)
    assert embedded.mqtt_tls
    assert settings(retention_days=0, signature_max_age_seconds=1e9).signature_max_age_seconds == 1e9


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("on", True), ("false", False), ("0", False)])
def test_boolean_variables(raw: str, value: bool) -> None:
    assert Settings.from_env({"FC_TLS_INSECURE": raw}).tls_insecure is value


def test_a_bad_boolean_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FC_TLS_INSECURE='maybe'"):
        Settings.from_env({"FC_TLS_INSECURE": "maybe"})


@pytest.mark.parametrize(("values", "message"), [
    ({"ca_file": EXISTING}, "only applies to mqtts://"),
    ({"upstream_url": "mqtts://u", "cert_file": EXISTING}, "FC_EDGE_KEY_FILE"),
    ({"local_cert_file": EXISTING, "local_key_file": EXISTING}, "FC_EDGE_CA_FILE"),
    ({"local_url": "mqtt://w", "local_cert_file": EXISTING, "local_key_file": EXISTING}, "must be 'embedded'"),
    ({"signing_kid": "k"}, "needs FC_EDGE_SIGNING_KEY"),
    ({"signing_key": "/nonexistent"}, "no such file"),
])
def test_edge_security_settings(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EdgeSettings.from_env({}, **values)


def test_edge_tls_on_either_side_uses_the_gateway_certificate() -> None:
    ward_only = EdgeSettings.from_env({}, local_cert_file=EXISTING, local_key_file=EXISTING, ca_file=EXISTING,
                                      cert_file=EXISTING, key_file=EXISTING)
    assert ward_only.ward_tls and ward_only.identity == "gateway/h1/gw1"
    upstream = EdgeSettings.from_env({}, upstream_url="mqtts://up", ca_file=EXISTING)
    assert not upstream.ward_tls


@pytest.mark.parametrize(("host", "level"), [("127.0.0.1", "INFO"), ("localhost", "INFO"), ("::1", "INFO"),
                                             ("0.0.0.0", "WARNING"), ("10.1.2.3", "WARNING"),
                                             ("mqtt.hospital.example", "WARNING")])
def test_a_plain_link_is_loud_once_it_leaves_the_machine(host: str, level: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from firstcare.tls import note_plaintext

    with caplog.at_level("INFO", logger="firstcare.tls"):
        note_plaintext("the link", host)
    assert [r.levelname for r in caplog.records] == [level]
