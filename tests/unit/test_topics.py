"""The MQTT topic grammar (firstcare/topics.py), driven by tables of topics and reasons."""

from __future__ import annotations

import pytest

from firstcare.errors import TopicError
from firstcare.topics import (
    DEVICE_TYPES,
    Topic,
    make_topic,
    parse_topic,
    status_topic,
    subscription_filter,
    vitals_topic,
)

ID_64 = "a" * 64
ID_65 = "a" * 65


@pytest.mark.parametrize("device_type", sorted(DEVICE_TYPES))
@pytest.mark.parametrize("kind", ["vitals", "status"])
def test_every_device_type_and_kind_parses(device_type: str, kind: str) -> None:
    topic = parse_topic(f"fc/v1/h1/{device_type}/dev-1/{kind}")
    assert topic == Topic("fc", "h1", device_type, "dev-1", kind)
    assert topic.device_key == (device_type, "dev-1")


def test_documented_device_types_are_the_set() -> None:
    assert {"monitor", "oximeter", "bp", "thermometer", "glucometer", "scale"} == DEVICE_TYPES


@pytest.mark.parametrize(
    ("topic", "hospital_id", "device_id"),
    [
        ("fc/v1/h1/monitor/m1/vitals", "h1", "m1"),
        ("fc/v1/ward_3-east/oximeter/ox_7-b/vitals", "ward_3-east", "ox_7-b"),
        ("fc/v1/H-1/bp/BP_01/status", "H-1", "BP_01"),
        ("fc/v1/_/scale/-/vitals", "_", "-"),
        (f"fc/v1/{ID_64}/monitor/{ID_64}/vitals", ID_64, ID_64),
        ("fc/v1/0/glucometer/9/status", "0", "9"),
    ],
    ids=["simple", "underscore-dash", "mixed-case", "single-char-ids", "64-char-ids", "digits"],
)
def test_valid_ids(topic: str, hospital_id: str, device_id: str) -> None:
    parsed = parse_topic(topic)
    assert (parsed.hospital_id, parsed.device_id) == (hospital_id, device_id)
    assert str(parsed) == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        # not under the root / not our grammar
        ("xx/v1/h1/monitor/m1/vitals", "topic_unknown"),
        ("FC/v1/h1/monitor/m1/vitals", "topic_unknown"),
        ("/fc/v1/h1/monitor/m1/vitals", "topic_unknown"),
        ("fc/v2/h1/monitor/m1/vitals", "topic_unknown"),
        ("fc/V1/h1/monitor/m1/vitals", "topic_unknown"),
        ("fc/v1/h1/monitor/m1/vitals/extra", "topic_unknown"),
        ("fc/v1/h1/monitor/m1/vitals/", "topic_unknown"),
        ("fc/v1/h1/monitor/vitals", "topic_unknown"),
        ("fc/v1/h1/monitor/m1", "topic_unknown"),
        ("fc/v1", "topic_unknown"),
        ("fc", "topic_unknown"),
        ("", "topic_unknown"),
        ("fc/v1/h1/monitor/m1/telemetry", "topic_unknown"),
        ("fc/v1/h1/monitor/m1/Vitals", "topic_unknown"),
        # hospital id
        ("fc/v1//monitor/m1/vitals", "hospital_id_invalid"),
        ("fc/v1/h 1/monitor/m1/vitals", "hospital_id_invalid"),
        ("fc/v1/h+/monitor/m1/vitals", "hospital_id_invalid"),
        ("fc/v1/h#/monitor/m1/vitals", "hospital_id_invalid"),
        ("fc/v1/h.1/monitor/m1/vitals", "hospital_id_invalid"),
        (f"fc/v1/{ID_65}/monitor/m1/vitals", "hospital_id_invalid"),
        # device type
        ("fc/v1/h1/toaster/m1/vitals", "device_type_unknown"),
        ("fc/v1/h1/Monitor/m1/vitals", "device_type_unknown"),
        ("fc/v1/h1//m1/vitals", "device_type_unknown"),
        # device id
        ("fc/v1/h1/monitor//vitals", "device_id_invalid"),
        ("fc/v1/h1/monitor/m 1/vitals", "device_id_invalid"),
        ("fc/v1/h1/monitor/m+1/vitals", "device_id_invalid"),
        ("fc/v1/h1/monitor/+/vitals", "device_id_invalid"),
        ("fc/v1/h1/monitor/m:1/vitals", "device_id_invalid"),
        ("fc/v1/h1/monitor/m\u00e91/vitals", "device_id_invalid"),
        (f"fc/v1/h1/monitor/{ID_65}/vitals", "device_id_invalid"),
    ],
)
def test_invalid_topics_give_a_precise_reason(topic: str, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_topic(topic)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("org/fc/v1/h1/monitor/m1/vitals", Topic("org/fc", "h1", "monitor", "m1", "vitals")),
        ("org/fc/v1/h2/scale/s-9/status", Topic("org/fc", "h2", "scale", "s-9", "status")),
    ],
)
def test_custom_root_with_a_slash(topic: str, expected: Topic) -> None:
    parsed = parse_topic(topic, root="org/fc")
    assert parsed == expected
    assert str(parsed) == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("fc/v1/h1/monitor/m1/vitals", "topic_unknown"),  # default root is not under org/fc
        ("org/v1/h1/monitor/m1/vitals", "topic_unknown"),
        ("org/fc/v2/h1/monitor/m1/vitals", "topic_unknown"),
        ("org/fc/v1/h1/monitor/m1", "topic_unknown"),
        ("org/fc/v1/h 1/monitor/m1/vitals", "hospital_id_invalid"),
        ("org/fc/v1/h1/toaster/m1/vitals", "device_type_unknown"),
    ],
)
def test_custom_root_rejections(topic: str, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_topic(topic, root="org/fc")
    assert info.value.reason == reason


@pytest.mark.parametrize("root", ["fc", "org/fc", "a/b/c"])
@pytest.mark.parametrize(("builder", "kind"), [(vitals_topic, "vitals"), (status_topic, "status")])
def test_builders_round_trip(root: str, builder, kind: str) -> None:
    topic = builder("h-1", "oximeter", "ox_7", root=root)
    assert topic == f"{root}/v1/h-1/oximeter/ox_7/{kind}"
    assert parse_topic(topic, root=root) == Topic(root, "h-1", "oximeter", "ox_7", kind)
    assert make_topic("h-1", "oximeter", "ox_7", kind, root=root) == topic


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("h 1", "monitor", "m1", "vitals"), "hospital_id_invalid"),
        (("h1", "toaster", "m1", "vitals"), "device_type_unknown"),
        (("h1", "monitor", ID_65, "vitals"), "device_id_invalid"),
        (("h1", "monitor", "m1", "telemetry"), "topic_unknown"),
    ],
)
def test_make_topic_validates_like_parse(args: tuple[str, str, str, str], reason: str) -> None:
    with pytest.raises(TopicError) as info:
        make_topic(*args)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("root", "expected"),
    [("fc", "fc/v1/#"), ("org-fc", "org-fc/v1/#"), ("a-b_c", "a-b_c/v1/#")],
)
def test_subscription_filter(root: str, expected: str) -> None:
    assert subscription_filter(root) == expected


def test_subscription_filter_default_root() -> None:
    assert subscription_filter() == "fc/v1/#"


@pytest.mark.parametrize("root", ["", "fc/+", "fc/#", "+", "/fc", "fc/", "org/fc", "$SYS", "f$c", " fc"])
def test_subscription_filter_rejects_bad_roots(root: str) -> None:
    with pytest.raises(TopicError) as info:
        subscription_filter(root)
    assert info.value.reason == "topic_root_invalid"


# --- an edge gateway's own status -------------------------------------------------------------

from firstcare.topics import (  # noqa: E402 - grouped with the tests that use them
    GatewayTopic,
    gateway_status_filter,
    gateway_status_topic,
    is_gateway_topic,
    parse_gateway_topic,
    subscription_filters,
)


def test_a_gateway_status_topic_round_trips() -> None:
    topic = gateway_status_topic("h1", "ward-3")
    assert topic == "fc/edge/h1/ward-3/status"
    assert parse_gateway_topic(topic) == GatewayTopic("fc", "h1", "ward-3")
    assert is_gateway_topic(topic) and not is_gateway_topic("fc/v1/h1/monitor/m-1/status")
    assert gateway_status_topic("h1", "gw", "acme") == "acme/edge/h1/gw/status"


@pytest.mark.parametrize("topic, reason", [
    ("fc/edge/h1/ward-3", "topic_unknown"),
    ("fc/edge/h1/ward-3/vitals", "topic_unknown"),
    ("fc/edge/h1/ward-3/status/x", "topic_unknown"),
    ("fc/edge/h 1/ward-3/status", "hospital_id_invalid"),
    ("fc/edge/h1/" + ID_65 + "/status", "gateway_id_invalid"),
    ("other/edge/h1/ward-3/status", "topic_unknown"),
])
def test_invalid_gateway_topics(topic: str, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_gateway_topic(topic)
    assert info.value.reason == reason


def test_the_bridge_subscribes_to_devices_and_gateways() -> None:
    import paho.mqtt.client as mqtt

    filters = subscription_filters("fc")
    assert filters == (subscription_filter("fc"), gateway_status_filter("fc"))
    for topic in (vitals_topic("h1", "monitor", "m-1"), gateway_status_topic("h1", "ward-3")):
        assert any(mqtt.topic_matches_sub(f, topic) for f in filters)
