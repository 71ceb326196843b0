"""What the gateway does to a device message (pure) and the bed map format."""

from __future__ import annotations

import json

import pytest

from edge.bedmap import parse_bed_map
from edge.stamp import PRIORITY_STATUS, PRIORITY_VITALS, sign_within, stamp
from firstcare.payloads import MAX_PAYLOAD_BYTES, Inbound, vitals_body
from firstcare.signing import KeyRecord, Opened, new_signing_key, open_message, public_raw, sign
from firstcare.topics import parse_topic

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


# --- signed readings ------------------------------------------------------------------------

DEVICE_KEY, GATEWAY_KEY = new_signing_key(), new_signing_key()
M1 = "fc/v1/h1/monitor/m1/vitals"


def gateway_signer(topic: str, payload: bytes) -> bytes:
    return sign(GATEWAY_KEY, "gateway/h1/gw", topic, payload)


def verified(topic: str, payload: bytes, keys: dict[str, KeyRecord]) -> Opened:
    opened = open_message(parse_topic(topic), topic, payload, keys, True)
    assert isinstance(opened, Opened), opened
    return opened


def test_a_device_signed_reading_is_forwarded_byte_for_byte_without_stamping() -> None:
    body = json.dumps({"seq": 1, "ts": T, "metrics": {"heart_rate": 70}}).encode()
    signed = sign(DEVICE_KEY, "h1/monitor/m1", M1, body)
    (out,), refused = stamp(Inbound(M1, signed, T + 500), "h1", beds, signer=gateway_signer)
    assert refused == [] and (out.topic, out.payload, out.priority) == (M1, signed, PRIORITY_VITALS)
    key = {"h1/monitor/m1": KeyRecord("h1/monitor/m1", public_raw(DEVICE_KEY), "device", "h1", "monitor", "m1")}
    assert verified(M1, out.payload, key).signed_by == "h1/monitor/m1"


@pytest.mark.parametrize(("topic", "inner", "reason"), [
    (M1, {"seq": 1, "ts": T, "metrics": {"heart_rate": 900}}, "value_out_of_range"),  # checked, then refused here
    ("fc/v1/h2/monitor/m1/vitals", {"seq": 1, "ts": T, "metrics": {"heart_rate": 70}}, "hospital_mismatch"),
])
def test_a_bad_signed_message_is_dead_lettered_at_the_gateway(topic: str, inner: dict, reason: str) -> None:
    signed = sign(DEVICE_KEY, "h1/monitor/m1", topic, json.dumps(inner).encode())
    out, (refused,) = stamp(Inbound(topic, signed, T + 500), "h1", beds)
    assert out == [] and refused.rejection.reason == reason and refused.payload == signed


def test_a_malformed_wrapper_is_dead_lettered_at_the_gateway() -> None:
    out, (refused,) = stamp(Inbound(M1, b'{"sig": "x", "kid": "k"}', T), "h1", beds)
    assert out == [] and refused.rejection.reason == "signature_invalid"


def test_the_gateway_signs_what_it_stamps_for_the_topic_it_forwards_to() -> None:
    body = {"seq": 1, "ts": T, "metrics": {"heart_rate": 70}}
    (out,), _ = stamp(message("fc/v1/elsewhere/monitor/m1/vitals", body), "h1", beds, signer=gateway_signer)
    key = {"gateway/h1/gw": KeyRecord("gateway/h1/gw", public_raw(GATEWAY_KEY), "gateway", "h1", gateway_id="gw")}
    opened = verified(out.topic, out.payload, key)
    assert opened.signed_by == "gateway/h1/gw"
    assert json.loads(opened.payload)["patient_id"] == "p-bed"  # stamped, then signed


def test_signed_batches_are_split_to_fit_once_escaped() -> None:
    bodies = [vitals_body(i, T, {"heart_rate": 70, "spo2": 97, "respiratory_rate": 16}, "p-1") for i in range(3000)]
    messages = sign_within(bodies, M1, gateway_signer)
    assert all(len(m) <= MAX_PAYLOAD_BYTES for m in messages) and len(messages) > 2
    key = {"gateway/h1/gw": KeyRecord("gateway/h1/gw", public_raw(GATEWAY_KEY), "gateway", "h1", gateway_id="gw")}
    seqs = [r["seq"] for m in messages for r in json.loads(verified(M1, m, key).payload)["readings"]]
    assert seqs == list(range(3000))
