"""Pure parts of the simulated devices: bad messages and broker URLs."""

from __future__ import annotations

import pytest

from firstcare.errors import ConfigError, TopicError
from firstcare.payloads import MAX_PAYLOAD_BYTES, decode_vitals
from firstcare.tls import ClientTls
from firstcare.topics import parse_topic, vitals_topic
from simulators.devices import MALFORMED_KINDS, OVERSIZE_LIMIT_BYTES, MqttEndpoint, malformed_message, parse_endpoint
from simulators.physiology import DEVICE_METRICS, Patient, measure

TS_MS = 1_800_000_000_000
EXPECTED_REASON = {
    "not_json": "payload_not_json",
    "unknown_metric": "metric_unknown",
    "impossible_value": "value_out_of_range",
    "missing_seq": "schema_invalid",
    "wrong_unit": "unit_unknown",
    "string_value": "schema_invalid",
    "oversized": "payload_too_large",
}


def rejection_reason(topic: str, payload: bytes) -> str:
    try:
        parsed = parse_topic(topic)
    except TopicError as exc:
        return exc.reason
    decoded = decode_vitals(parsed, payload, received_ms=TS_MS)
    assert not decoded.readings
    return decoded.rejections[0].reason


@pytest.mark.parametrize("device_type", sorted(DEVICE_METRICS))
@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_each_malformed_kind_is_rejected_for_its_own_reason(kind: str, device_type: str) -> None:
    topic = vitals_topic("h1", device_type, f"{device_type}-001")
    metrics = measure(Patient(1).vitals(0), device_type)
    bad_topic, payload = malformed_message(kind, topic, 5, TS_MS, metrics, "p-001")
    expected = EXPECTED_REASON.get(kind, "device_type_unknown")
    assert rejection_reason(bad_topic, payload) == expected
    assert len(payload) <= (OVERSIZE_LIMIT_BYTES if kind == "oversized" else MAX_PAYLOAD_BYTES)


def test_oversized_is_exactly_one_byte_over_the_contract() -> None:
    _, payload = malformed_message("oversized", vitals_topic("h1", "scale", "s-1"), 1, TS_MS, {"weight": 70.5}, None)
    assert len(payload) == MAX_PAYLOAD_BYTES + 1


def test_unknown_malformed_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown malformed kind"):
        malformed_message("gremlins", vitals_topic("h1", "scale", "s-1"), 1, TS_MS, {"weight": 70.5}, None)


@pytest.mark.parametrize(
    ("url", "expected", "shown"),
    [
        ("mqtt://127.0.0.1:1884", MqttEndpoint("127.0.0.1", 1884), "mqtt://127.0.0.1:1884"),
        ("mqtt://broker", MqttEndpoint("broker", 1883), "mqtt://broker:1883"),
        ("tcp://qa:s%3Dcret@broker:1883", MqttEndpoint("broker", 1883, "qa", "s=cret"), "mqtt://qa:***@broker:1883"),
        ("mqtt://[::1]:1883", MqttEndpoint("::1", 1883), "mqtt://[::1]:1883"),
        ("mqtts://broker", MqttEndpoint("broker", 8883, tls=ClientTls()), "mqtts://broker:8883"),
        ("ssl://qa@broker:9883", MqttEndpoint("broker", 9883, "qa", tls=ClientTls()), "mqtts://qa@broker:9883"),
    ],
)
def test_mqtt_urls(url: str, expected: MqttEndpoint, shown: str) -> None:
    endpoint = parse_endpoint(url)
    assert endpoint == expected
    assert str(endpoint) == shown


@pytest.mark.parametrize("url", ["http://broker:1883", "mqtt://", "mqtt://broker:99999", "broker:1883", "embedded"])
def test_bad_mqtt_urls_name_the_url(url: str) -> None:
    with pytest.raises(ConfigError, match="invalid MQTT URL"):
        parse_endpoint(url)
