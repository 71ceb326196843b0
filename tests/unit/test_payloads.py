"""Vitals/status decoders (firstcare/payloads.py) and units (firstcare/metrics.py), table-driven.

Every decode gets an explicit ``received_ms`` so the time checks never depend on the clock.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from firstcare.metrics import METRICS, MetricRejected, to_canonical
from firstcare.payloads import (
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    Reading,
    Rejection,
    StatusReport,
    decode_status,
    decode_vitals,
    encode_batch,
    encode_status,
    encode_vitals,
    format_ts,
)
from firstcare.topics import parse_topic

TOPIC = parse_topic("fc/v1/h1/monitor/m-1/vitals")
STATUS_TOPIC = parse_topic("fc/v1/h1/monitor/m-1/status")
# 2026-11-26T10:15:30.120Z, the DESIGN.md example, is "now" for these tests.
NOW_MS = int(datetime(2026, 11, 26, 10, 15, 30, 120_000, tzinfo=UTC).timestamp() * 1000)
DAY_MS = 24 * 3600 * 1000
DESIGN_EXAMPLE = (
    b'{"seq": 1042, "ts": "2026-11-26T10:15:30.120Z", "patient_id": "p-001",\n'
    b' "metrics": {"heart_rate": 72, "spo2": 97, "systolic_bp": 121, "diastolic_bp": 79}}'
)


def body(**fields) -> bytes:
    base = {"seq": 1, "ts": NOW_MS, "metrics": {"heart_rate": 72}}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


_DROP = object()


def decode(payload: bytes):
    return decode_vitals(TOPIC, payload, received_ms=NOW_MS)


def only_rejection(payload: bytes) -> Rejection:
    result = decode(payload)
    assert result.readings == []
    assert len(result.rejections) == 1
    return result.rejections[0]


# ------------------------------------------------------------------------------- accepted


def test_design_example_is_accepted() -> None:
    result = decode(DESIGN_EXAMPLE)
    assert result.rejections == []
    assert result.readings == [
        Reading("h1", "monitor", "m-1", 1042, NOW_MS, NOW_MS, "p-001",
                {"heart_rate": 72.0, "spo2": 97.0, "systolic_bp": 121.0, "diastolic_bp": 79.0})
    ]


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        ("2026-11-26T10:15:30.120Z", NOW_MS),
        ("2026-11-26T12:15:30.120+02:00", NOW_MS),
        ("2026-11-26T05:15:30.120-05:00", NOW_MS),
        ("2026-11-26T10:15:30Z", NOW_MS - 120),
        (NOW_MS, NOW_MS),
        (NOW_MS - 3_600_000, NOW_MS - 3_600_000),
        (946_684_800_000, 946_684_800_000),  # 2000-01-01, the earliest accepted
        (NOW_MS + DAY_MS, NOW_MS + DAY_MS),  # exactly one day ahead is still plausible
    ],
    ids=["iso-Z", "iso-plus-2", "iso-minus-5", "iso-no-millis", "epoch-ms", "epoch-ms-hour-ago",
         "epoch-2000", "one-day-ahead"],
)
def test_ts_forms(ts, expected_ms: int) -> None:
    result = decode(body(ts=ts))
    assert result.rejections == []
    assert [r.ts_ms for r in result.readings] == [expected_ms]
    assert result.readings[0].received_ms == NOW_MS


def test_patient_id_is_optional() -> None:
    (reading,) = decode(body()).readings
    assert reading.patient_id is None


# ------------------------------------------------------------------------------- rejected


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # not JSON at all
        (b"not json", "payload_not_json"),
        (b"", "payload_not_json"),
        (b"{", "payload_not_json"),
        (b"\xff\xfe", "payload_not_json"),
        (b'{"seq": 1,}', "payload_not_json"),
        # JSON of the wrong shape
        (b"[1, 2, 3]", "schema_invalid"),
        (b"null", "schema_invalid"),
        (b"42", "schema_invalid"),
        (b'"text"', "schema_invalid"),
        (body(seq="1"), "schema_invalid"),
        (body(seq=1.5), "schema_invalid"),
        (body(seq=True), "schema_invalid"),
        (body(ts=1.8e12), "schema_invalid"),
        (body(ts=True), "schema_invalid"),
        (body(metrics=[72]), "schema_invalid"),
        (body(metrics={"heart_rate": "72"}), "schema_invalid"),
        (body(metrics={"heart_rate": True}), "schema_invalid"),
        (body(metrics={"heart_rate": None}), "schema_invalid"),
        (body(metrics={"heart_rate": {"value": True, "unit": "/min"}}), "schema_invalid"),
        (body(metrics={"heart_rate": {"value": 72}}), "schema_invalid"),
        (body(metrics={"heart_rate": {"value": 72, "unit": "/min", "extra": 1}}), "schema_invalid"),
        (body(patient_id=7), "schema_invalid"),
        (body(seq=_DROP), "schema_invalid"),
        (body(ts=_DROP), "schema_invalid"),
        (body(metrics=_DROP), "schema_invalid"),
        (b"{}", "schema_invalid"),
        # timestamps
        (body(ts="2026-11-26T10:15:30.120"), "ts_invalid"),  # no zone
        (body(ts="2026-11-26"), "ts_invalid"),
        (body(ts="yesterday"), "ts_invalid"),
        (body(ts=""), "ts_invalid"),
        (body(ts="1999-12-31T23:59:59Z"), "ts_invalid"),  # before 2000: unset device clock
        (body(ts=946_684_799_999), "ts_invalid"),
        (body(ts=0), "ts_invalid"),
        (body(ts=-1), "ts_invalid"),
        (body(ts=NOW_MS + DAY_MS + 1), "ts_invalid"),  # more than a day ahead
        (body(ts="2026-11-28T10:15:30Z"), "ts_invalid"),
        # seq
        (body(seq=-1), "seq_invalid"),
        (body(seq=2**63), "seq_invalid"),
        # patient id
        (body(patient_id=""), "patient_id_invalid"),
        (body(patient_id="p 1"), "patient_id_invalid"),
        (body(patient_id="p:1"), "patient_id_invalid"),
        (body(patient_id="p" * 65), "patient_id_invalid"),
        # metrics
        (body(metrics={}), "metrics_empty"),
        (body(metrics={"pulse": 72}), "metric_unknown"),
        (body(metrics={"heart_rate": 72, "HEART_RATE": 72}), "metric_unknown"),
        (body(metrics={"temperature": {"value": 37, "unit": "degC"}}), "unit_unknown"),
        (body(metrics={"heart_rate": {"value": 72, "unit": "bpm"}}), "unit_unknown"),
        (body(metrics={"weight": {"value": 70, "unit": "[degF]"}}), "unit_unknown"),
        (body(metrics={"spo2": 101}), "value_out_of_range"),
        (body(metrics={"spo2": -0.1}), "value_out_of_range"),
        (body(metrics={"heart_rate": -1}), "value_out_of_range"),
        (body(metrics={"heart_rate": 351}), "value_out_of_range"),
        (body(metrics={"temperature": 60}), "value_out_of_range"),
        (body(metrics={"temperature": {"value": 60, "unit": "Cel"}}), "value_out_of_range"),
        (body(metrics={"temperature": {"value": 200, "unit": "[degF]"}}), "value_out_of_range"),
        (body(metrics={"weight": 0.1}), "value_out_of_range"),
        (body(metrics={"heart_rate": 72, "spo2": 150}), "value_out_of_range"),
    ],
)
def test_rejections_have_a_reason(payload: bytes, reason: str) -> None:
    rejection = only_rejection(payload)
    assert rejection.reason == reason
    assert rejection.detail
    assert rejection.index is None


@pytest.mark.parametrize(
    "payload",
    [
        b'{"seq": 1, "ts": 1795688130120, "metrics": {"heart_rate": 1e999}}',
        b'{"seq": 1, "ts": 1795688130120, "metrics": {"heart_rate": -1e999}}',
        b'{"seq": 1, "ts": 1795688130120, "metrics": {"heart_rate": {"value": 1e999, "unit": "/min"}}}',
        b'{"seq": 1, "ts": 1795688130120, "metrics": {"heart_rate": NaN}}',
        b'{"seq": 1, "ts": 1795688130120, "metrics": {"heart_rate": Infinity}}',
    ],
    ids=["1e999", "-1e999", "quantity-1e999", "NaN-literal", "Infinity-literal"],
)
def test_non_finite_values_are_rejected_not_stored(payload: bytes) -> None:
    rejection = only_rejection(payload)
    # msgspec refuses an out-of-range number literal before our finite check sees it, so the
    # reason is a schema/JSON one; what matters is that it is a rejection with a reason.
    assert rejection.reason in {"schema_invalid", "payload_not_json", "value_not_finite"}
    assert rejection.detail


@pytest.mark.parametrize(
    ("value", "unit"),
    [(float("inf"), None), (float("-inf"), None), (float("nan"), None), (float("nan"), "[degF]")],
)
def test_to_canonical_rejects_non_finite(value: float, unit: str | None) -> None:
    name = "temperature" if unit else "heart_rate"
    with pytest.raises(MetricRejected) as info:
        to_canonical(name, value, unit)
    assert info.value.reason == "value_not_finite"


def test_payload_over_64_kib_is_rejected_before_parsing() -> None:
    filler = "x" * MAX_PAYLOAD_BYTES
    payload = body(patient_id="p1", note=filler)
    assert len(payload) > MAX_PAYLOAD_BYTES
    assert only_rejection(payload).reason == "payload_too_large"
    # even garbage is "too large" first: the size check runs before the parser
    assert only_rejection(b"{" * (MAX_PAYLOAD_BYTES + 1)).reason == "payload_too_large"


def test_payload_of_exactly_64_kib_is_parsed() -> None:
    base = body(note="")
    payload = body(note="x" * (MAX_PAYLOAD_BYTES - len(base)))
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert decode(payload).rejections == []


# ------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("metric", "value", "unit", "expected"),
    [
        ("temperature", 98.6, "[degF]", 37.0),
        ("temperature", 32.0 + 1.8 * 38.5, "[degF]", 38.5),
        ("temperature", 310.15, "K", 37.0),
        ("temperature", 36.6, "Cel", 36.6),
        ("temperature", 36.6, None, 36.6),
        ("glucose", 5.5, "mmol/L", 99.088),
        ("glucose", 100.0, "mg/dL", 100.0),
        ("systolic_bp", 16.0, "kPa", 120.0099),
        ("diastolic_bp", 10.0, "kPa", 75.0062),
        ("weight", 70_000.0, "g", 70.0),
        ("weight", 154.0, "[lb_av]", 69.8532),
        ("weight", 70.0, "kg", 70.0),
    ],
)
def test_unit_conversion_table(metric: str, value: float, unit: str | None, expected: float) -> None:
    assert to_canonical(metric, value, unit) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"temperature": {"value": 98.6, "unit": "[degF]"}}, {"temperature": 37.0}),
        ({"temperature": {"value": 310.15, "unit": "K"}}, {"temperature": 37.0}),
        ({"glucose": {"value": 5.5, "unit": "mmol/L"}}, {"glucose": 99.088}),
        ({"systolic_bp": {"value": 16, "unit": "kPa"}, "diastolic_bp": 80},
         {"systolic_bp": 120.0099, "diastolic_bp": 80.0}),
        ({"weight": {"value": 70000, "unit": "g"}}, {"weight": 70.0}),
        ({"weight": {"value": 154, "unit": "[lb_av]"}}, {"weight": 69.8532}),
        ({"spo2": {"value": 97, "unit": "%"}}, {"spo2": 97.0}),
    ],
)
def test_decoded_metrics_are_in_canonical_units(metrics: dict, expected: dict) -> None:
    (reading,) = decode(body(metrics=metrics)).readings
    assert reading.metrics == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_accepts_its_canonical_unit_and_bounds(name: str) -> None:
    metric = METRICS[name]
    assert to_canonical(name, metric.low, metric.unit) == metric.low
    assert to_canonical(name, metric.high) == metric.high
    with pytest.raises(MetricRejected) as info:
        to_canonical(name, metric.high + 1)
    assert info.value.reason == "value_out_of_range"


# ------------------------------------------------------------------------------- batches


def item(seq: int, **fields) -> dict:
    return {"seq": seq, "ts": NOW_MS - 1000 * (10 - seq), "metrics": {"heart_rate": 60 + seq}, **fields}


def test_batch_of_several_readings() -> None:
    payload = encode_batch([item(1, patient_id="p1"), item(2, patient_id="p1"), item(3)])
    result = decode(payload)
    assert result.rejections == []
    assert [(r.seq, r.patient_id, r.metrics["heart_rate"]) for r in result.readings] == [
        (1, "p1", 61.0), (2, "p1", 62.0), (3, None, 63.0)
    ]
    assert all(r.device_key == ("monitor", "m-1") and r.hospital_id == "h1" for r in result.readings)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"seq": -5, "ts": NOW_MS, "metrics": {"heart_rate": 70}}, "seq_invalid"),
        ({"seq": 5, "ts": "2026-11-26T10:15:30", "metrics": {"heart_rate": 70}}, "ts_invalid"),
        ({"seq": 5, "ts": NOW_MS, "metrics": {"spo2": 101}}, "value_out_of_range"),
        ({"seq": 5, "ts": NOW_MS, "metrics": {"pulse": 70}}, "metric_unknown"),
        ({"seq": 5, "ts": NOW_MS, "metrics": {}}, "metrics_empty"),
        ({"seq": 5, "ts": NOW_MS, "metrics": {"heart_rate": 70}, "patient_id": "bad id"}, "patient_id_invalid"),
    ],
)
def test_batch_keeps_good_readings_and_rejects_the_bad_one_with_its_index(bad: dict, reason: str) -> None:
    result = decode(encode_batch([item(1), item(2), bad, item(4)]))
    assert [r.seq for r in result.readings] == [1, 2, 4]
    assert [(x.reason, x.index) for x in result.rejections] == [(reason, 2)]


def test_a_schema_error_in_one_item_costs_only_that_item() -> None:
    result = decode(encode_batch([item(1), {"seq": "two", "ts": NOW_MS, "metrics": {"heart_rate": 1}}, item(3)]))
    assert [r.seq for r in result.readings] == [1, 3]
    assert [(x.reason, x.index) for x in result.rejections] == [("schema_invalid", 1)]
    assert "$.readings[1].seq" in result.rejections[0].detail


def test_items_that_are_not_objects_are_each_refused() -> None:
    result = decode(b'{"readings": [1, 2]}')
    assert result.readings == []
    assert [(x.reason, x.index) for x in result.rejections] == [("schema_invalid", 0), ("schema_invalid", 1)]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"readings": []}', "batch_empty"),
        (encode_batch([{"seq": 1, "ts": 0, "metrics": {}}] * (MAX_BATCH + 1)), "batch_too_large"),
        (json.dumps({"readings": [item(1)], "seq": 1}).encode(), "schema_invalid"),
        (json.dumps({"readings": [item(1)], "metrics": {"heart_rate": 70}}).encode(), "schema_invalid"),
        # a top-level field next to "readings" would be silently ignored (e.g. a gateway that
        # thinks it stamps patient_id on the whole batch): the batch must be refused instead
        (json.dumps({"readings": [item(1)], "ts": NOW_MS}).encode(), "schema_invalid"),
        (json.dumps({"readings": [item(1)], "patient_id": "p1"}).encode(), "schema_invalid"),
        (b'{"readings": {"seq": 1}}', "schema_invalid"),
    ],
    ids=["empty", "over-max", "with-seq", "with-metrics", "with-ts", "with-patient_id", "not-a-list"],
)
def test_bad_batches(payload: bytes, reason: str) -> None:
    assert len(payload) <= MAX_PAYLOAD_BYTES  # the size check must not mask the batch checks
    assert only_rejection(payload).reason == reason


def test_batch_of_exactly_max_batch_is_accepted() -> None:
    readings = [{"seq": i, "ts": NOW_MS, "metrics": {"spo2": 97}} for i in range(MAX_BATCH)]
    payload = encode_batch(readings)
    assert len(payload) <= MAX_PAYLOAD_BYTES
    result = decode(payload)
    assert result.rejections == []
    assert len(result.readings) == MAX_BATCH


# ------------------------------------------------------------------------------- status


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"state": "online"}', ("online", None, None, NOW_MS)),
        (b'{"state": "offline"}', ("offline", None, None, NOW_MS)),
        (b'{"state": "online", "battery": 87, "firmware": "1.4.2"}', ("online", 87, "1.4.2", NOW_MS)),
        (b'{"state": "online", "battery": 0}', ("online", 0, None, NOW_MS)),
        (b'{"state": "online", "battery": 100}', ("online", 100, None, NOW_MS)),
        (b'{"state": "online", "ts": "2026-11-26T10:15:00.120Z"}', ("online", None, None, NOW_MS - 30_000)),
        (b'{"state": "offline", "ts": 1795688100120}', ("offline", None, None, 1795688100120)),
    ],
)
def test_decode_status_accepts(payload: bytes, expected: tuple) -> None:
    status = decode_status(STATUS_TOPIC, payload, received_ms=NOW_MS)
    assert isinstance(status, StatusReport)
    assert (status.state, status.battery, status.firmware, status.ts_ms) == expected
    assert (status.hospital_id, status.device_type, status.device_id, status.received_ms) == (
        "h1", "monitor", "m-1", NOW_MS)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"state": "sleeping"}', "schema_invalid"),
        (b'{"state": "ONLINE"}', "schema_invalid"),
        (b'{"state": null}', "schema_invalid"),
        (b"{}", "schema_invalid"),
        (b'{"battery": 50}', "schema_invalid"),
        (b"[]", "schema_invalid"),
        (b'{"state": "online", "battery": true}', "schema_invalid"),
        (b'{"state": "online", "battery": 50.5}', "schema_invalid"),
        (b'{"state": "online", "firmware": 142}', "schema_invalid"),
        (b'{"state": "online", "battery": 101}', "battery_invalid"),
        (b'{"state": "online", "battery": -1}', "battery_invalid"),
        (b'{"state": "online", "ts": "2026-11-26T10:15:00"}', "ts_invalid"),
        (b'{"state": "online", "ts": 5}', "ts_invalid"),
        (b"offline", "payload_not_json"),
        (b"", "payload_not_json"),
        (b'{"state": "online", "firmware": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}', "payload_too_large"),
    ],
)
def test_decode_status_rejects(payload: bytes, reason: str) -> None:
    result = decode_status(STATUS_TOPIC, payload, received_ms=NOW_MS)
    assert isinstance(result, Rejection)
    assert result.reason == reason


# ------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(
    ("seq", "ts_ms", "metrics", "patient_id", "expected"),
    [
        (7, NOW_MS, {"heart_rate": 72, "spo2": 97}, "p-001", {"heart_rate": 72.0, "spo2": 97.0}),
        (0, NOW_MS - 1, {"temperature": {"value": 98.6, "unit": "[degF]"}}, None, {"temperature": 37.0}),
        (2**63 - 1, NOW_MS - DAY_MS, {"weight": 80.5}, "p_2", {"weight": 80.5}),
    ],
)
def test_encode_vitals_round_trips(seq, ts_ms, metrics, patient_id, expected) -> None:
    (reading,) = decode(encode_vitals(seq, ts_ms, metrics, patient_id)).readings
    assert (reading.seq, reading.ts_ms, reading.patient_id, reading.metrics) == (seq, ts_ms, patient_id, expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("online",), ("online", None, None, NOW_MS)),
        (("offline", 12, "2.0.1"), ("offline", 12, "2.0.1", NOW_MS)),
        (("online", 87, "1.4.2", NOW_MS - 5000), ("online", 87, "1.4.2", NOW_MS - 5000)),
    ],
)
def test_encode_status_round_trips(args: tuple, expected: tuple) -> None:
    status = decode_status(STATUS_TOPIC, encode_status(*args), received_ms=NOW_MS)
    assert isinstance(status, StatusReport)
    assert (status.state, status.battery, status.firmware, status.ts_ms) == expected


@pytest.mark.parametrize(
    ("ms", "text"),
    [(NOW_MS, "2026-11-26T10:15:30.120Z"), (946_684_800_000, "2000-01-01T00:00:00.000Z")],
)
def test_format_ts(ms: int, text: str) -> None:
    assert format_ts(ms) == text


# ------------------------------------------------------------------------------- nesting depth

from firstcare.payloads import MAX_DEPTH, nesting_depth  # noqa: E402


@pytest.mark.parametrize(("payload", "depth"), [
    (b"", 0),
    (b"1", 0),
    (b"{}", 1),
    (b"[[[]]]", 3),
    (b'{"a": [1, {"b": 2}]}', 3),
    (b'{"s": "[[[[{{{{"}', 1),  # brackets inside a string do not count
    (b'{"s": "\\"[[[["}', 1),  # an escaped quote does not end the string
    (b'{"s": "\\\\"}', 1),  # an escaped backslash does not escape the quote after it
    (b'["\\\\", [[]]]', 3),
    (b'{"s": "\\u005b"}', 1),
    (b"]]]]{", 1),  # malformed: counts never go below zero
    (b'"unterminated [[[[', 0),
    (DESIGN_EXAMPLE, 2),
    (b'{"readings": [{"metrics": {"temperature": {"value": 37, "unit": "Cel"}}}]}', 5),
])
def test_nesting_depth(payload: bytes, depth: int) -> None:
    assert nesting_depth(payload) == depth


def test_nesting_depth_stops_once_past_the_limit() -> None:
    assert nesting_depth(b"[" * 10_000, limit=5) == 6


@pytest.mark.parametrize("opener", [b'{"a":', b"[", b'{"metrics":{"x":'])
def test_deep_nesting_is_refused_before_the_decoder_runs(opener: bytes) -> None:
    closer = b"}" if opener.startswith(b"{") else b"]"
    payload = opener * 1000 + b"1" + closer * 1000
    assert only_rejection(payload).reason == "payload_too_deep"
    status = decode_status(STATUS_TOPIC, payload, received_ms=NOW_MS)
    assert isinstance(status, Rejection) and status.reason == "payload_too_deep"


def test_the_depth_limit_is_exact() -> None:
    inside = b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)
    at_limit = b'{"seq": 1, "ts": %d, "metrics": {"heart_rate": 72}, "x": %s}' % (NOW_MS, inside)
    assert nesting_depth(at_limit) == MAX_DEPTH
    assert [r.seq for r in decode(at_limit).readings] == [1]  # unknown fields are ignored
    beyond = b'{"seq": 1, "ts": %d, "metrics": {"heart_rate": 72}, "x": {"b": %s}}' % (NOW_MS, inside)
    assert only_rejection(beyond).reason == "payload_too_deep"


def test_deep_nesting_inside_a_batch_item_is_refused_whole() -> None:
    deep = b'{"a":' * 40 + b"1" + b"}" * 40
    payload = b'{"readings": [{"seq": 1, "ts": %d, "metrics": {"spo2": 97}}, %s]}' % (NOW_MS, deep)
    assert only_rejection(payload).reason == "payload_too_deep"


# ------------------------------------------------------------------------------- boot

@pytest.mark.parametrize(("boot", "expected"), [
    ("b-2026_11", "b-2026_11"), (7, "7"), (0, "0"), (2**63 - 1, str(2**63 - 1)), ("x" * 64, "x" * 64),
])
def test_boot_is_kept_on_readings_and_status(boot, expected: str) -> None:
    (r,) = decode(body(boot=boot)).readings
    assert r.boot == expected
    status = decode_status(STATUS_TOPIC, json.dumps({"state": "online", "boot": boot}).encode(), received_ms=NOW_MS)
    assert isinstance(status, StatusReport) and status.boot == expected


@pytest.mark.parametrize(("boot", "reason"), [
    ("", "boot_invalid"), ("a b", "boot_invalid"), ("x" * 65, "boot_invalid"), ("~1", "boot_invalid"),
    (-1, "boot_invalid"), (2**63, "boot_invalid"), (1.5, "schema_invalid"), ([1], "schema_invalid"),
])
def test_a_bad_boot_is_refused(boot, reason: str) -> None:
    assert only_rejection(body(boot=boot)).reason == reason


def test_a_reading_without_boot_has_none_and_encoding_round_trips_it() -> None:
    (r,) = decode(body()).readings
    assert r.boot is None
    (again,) = decode(encode_vitals(3, NOW_MS, {"spo2": 97}, boot="b1")).readings
    assert (again.seq, again.boot) == (3, "b1")
    status = decode_status(STATUS_TOPIC, encode_status("online", boot="b1"), received_ms=NOW_MS)
    assert isinstance(status, StatusReport) and status.boot == "b1"


@pytest.mark.parametrize("iso", ["2026-11-26T10:15:30.119Z", "2026-11-26T10:15:30.120Z",
                                 "2026-11-26T10:15:30.001+01:00", "2026-11-26T10:15:30.999999Z"])
def test_iso_times_convert_to_exact_milliseconds(iso: str) -> None:
    parsed = datetime.fromisoformat(iso)
    expected = (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // __import__("datetime").timedelta(milliseconds=1)
    (r,) = decode(body(ts=iso)).readings
    assert r.ts_ms == expected
    assert decode(body(ts=format_ts(r.ts_ms))).readings[0].ts_ms == r.ts_ms, "format and parse round-trip exactly"


def test_a_batch_item_that_is_not_valid_utf8_costs_only_itself() -> None:
    """The outer pass keeps batch items raw, so a lone surrogate inside one item is only found
    when that item is decoded: it is that item's rejection, never an internal error."""
    good = json.dumps({"seq": 1, "ts": NOW_MS, "metrics": {"spo2": 97}}).encode()
    bad = b'{"seq": 2, "ts": "\xed\xa0\x80", "metrics": {"spo2": 97}}'
    result = decode_vitals(TOPIC, b'{"readings": [' + good + b", " + bad + b"]}", received_ms=NOW_MS)
    assert [r.seq for r in result.readings] == [1]
    assert [(r.reason, r.index) for r in result.rejections] == [("payload_not_json", 1)]
