"""What the gateway does to a device message (pure) and the bed map format."""

from __future__ import annotations

import json

import pytest

from edge.bedmap import parse_bed_map
from edge.stamp import PRIORITY_STATUS, PRIORITY_VITALS, stamp
from firstcare.mqtt import Inbound

T = 1_790_000_000_000


def message(topic: str, body: object) -> Inbound:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Inbound(topic, payload, T + 500)


def beds(device_type: str, device_id: str) -> str | None:
    return {("monitor", "m1"): "p-bed"}.get((device_type, device_id))


@pytest.mark.parametrize(("body", "patient"), [
    ({"seq": 1, "ts": T, "metrics": {"heart_rate": 70}}, "p-bed"),
    ({"seq": 1, "ts": T, "metrics": {"heart_rate": 70}, "patient_id": "p-own"}, "p-own"),
])
def test_vitals_get_the_gateways_hospital_and_a_patient(body: dict, patient: str) -> None:
    (out,), refused = stamp(message("fc/v1/elsewhere/monitor/m1/vitals", body), "h1", beds)
    assert refused == []
    assert (out.topic, out.priority, out.device) == ("fc/v1/h1/monitor/m1/vitals", PRIORITY_VITALS, "monitor/m1")
    assert json.loads(out.payload)["patient_id"] == patient


def test_a_device_without_binding_or_patient_is_forwarded_without_one() -> None:
    (out,), _ = stamp(message("fc/v1/h1/oximeter/o9/vitals", {"seq": 1, "ts": T, "metrics": {"spo2": 97}}), "h1", beds)
    assert "patient_id" not in json.loads(out.payload)


def test_a_batch_keeps_its_good_readings_and_refuses_the_bad_one() -> None:
    body = {"readings": [{"seq": 1, "ts": T, "metrics": {"spo2": 97}}, {"seq": 2, "ts": T, "metrics": {"spo2": 190}},
                         {"seq": 3, "ts": T, "metrics": {"temperature": {"value": 98.6, "unit": "[degF]"}}}]}
    (out,), (bad,) = stamp(message("fc/v1/h1/monitor/m1/vitals", body), "h1", beds)
    readings = json.loads(out.payload)["readings"]
    assert [r["seq"] for r in readings] == [1, 3]
    assert readings[1]["metrics"] == {"temperature": 37.0} and readings[0]["patient_id"] == "p-bed"
    assert (bad.rejection.reason, bad.rejection.index) == ("value_out_of_range", 1)


@pytest.mark.parametrize(("topic", "body", "reason"), [
    ("fc/v1/h1/toaster/t1/vitals", {}, "device_type_unknown"),
    ("fc/v2/h1/monitor/m1/vitals", {}, "topic_unknown"),
    ("fc/v1/h1/monitor/m1/vitals", b"{", "payload_not_json"),
    ("fc/v1/h1/monitor/m1/status", {"state": "asleep"}, "schema_invalid"),
])
def test_bad_messages_are_refused_with_their_reason(topic: str, body: object, reason: str) -> None:
    out, (bad,) = stamp(message(topic, body), "h1", beds)
    assert out == [] and bad.rejection.reason == reason


def test_status_goes_first_and_carries_the_time_it_was_received() -> None:
    (out,), _ = stamp(message("fc/v1/h9/monitor/m1/status", {"state": "offline"}), "h1", beds)
    assert (out.topic, out.priority) == ("fc/v1/h1/monitor/m1/status", PRIORITY_STATUS)
    assert json.loads(out.payload) == {"state": "offline", "ts": "2026-09-21T14:13:20.500Z"}


@pytest.mark.parametrize(("text", "expected"), [
    ("monitor/m1: p-1\noximeter/o-2: p_2\n", {("monitor", "m1"): "p-1", ("oximeter", "o-2"): "p_2"}),
    ("", {}),
    ("# nobody yet\n", {}),
])
def test_bed_map_parses(text: str, expected: dict) -> None:
    assert parse_bed_map(text) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("- a list", "mapping"),
    ("toaster/t1: p-1", "toaster/t1"),
    ("monitor: p-1", "monitor"),
    ("monitor/m1: 'p 1'", "patient id"),
])
def test_bed_map_errors_name_the_entry(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_bed_map(text)


def test_a_batch_that_grows_past_64_kib_when_stamped_is_split_into_messages_the_bridge_accepts() -> None:
    from firstcare.payloads import MAX_PAYLOAD_BYTES, decode_vitals
    from firstcare.topics import parse_topic

    readings = [{"seq": n, "ts": T, "metrics": {"heart_rate": 70, "spo2": 97}} for n in range(900)]
    payload = json.dumps({"readings": readings}, separators=(",", ":")).encode()
    assert len(payload) <= MAX_PAYLOAD_BYTES
    outs, refused = stamp(Inbound("fc/v1/h1/monitor/m1/vitals", payload, T + 500), "h1", beds)
    assert refused == [] and len(outs) > 1
    seqs = []
    for out in outs:
        assert len(out.payload) <= MAX_PAYLOAD_BYTES
        decoded = decode_vitals(parse_topic(out.topic), out.payload, T + 500)
        assert decoded.rejections == []
        seqs += [r.seq for r in decoded.readings]
    assert seqs == list(range(900))


@pytest.mark.parametrize("boot", ["b-7", 7])
def test_boot_travels_untouched_on_readings_batches_and_status(boot: str | int) -> None:
    (out,), _ = stamp(message("fc/v1/h1/monitor/m1/vitals", {"seq": 1, "ts": T, "metrics": {"heart_rate": 70},
                                                             "boot": boot}), "h1", beds)
    assert json.loads(out.payload)["boot"] == str(boot)
    batch = {"readings": [{"seq": 1, "ts": T, "metrics": {"heart_rate": 70}, "boot": boot},
                          {"seq": 2, "ts": T + 1, "metrics": {"heart_rate": 71}}]}
    (out,), _ = stamp(message("fc/v1/h1/monitor/m1/vitals", batch), "h1", beds)
    assert [r.get("boot") for r in json.loads(out.payload)["readings"]] == [str(boot), None]
    (status,), _ = stamp(message("fc/v1/h1/monitor/m1/status", {"state": "online", "boot": boot}), "h1", beds)
    assert json.loads(status.payload)["boot"] == str(boot)


def test_a_nested_payload_is_refused_at_the_edge() -> None:
    out, (refused,) = stamp(message("fc/v1/h1/monitor/m1/vitals", b'{"a":' * 1000 + b"1" + b"}" * 1000), "h1", beds)
    assert out == [] and refused.rejection.reason == "payload_too_deep"
