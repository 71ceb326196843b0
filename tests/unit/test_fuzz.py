"""Property-based fuzzing of the whole bytes -> readings/rejections path (pure): vitals, gateway
batches, status, and the edge's stamp. Whatever the bytes, nothing escapes as an exception,
every message ends in readings or rejections with a documented reason, and what the edge
forwards is exactly what the bridge accepts. Bounded here; see tests/support/fuzz.py for a
longer run."""

from __future__ import annotations

import json
import math

from hypothesis import example, given
from hypothesis import strategies as st

from edge.stamp import stamp
from firstcare.metrics import METRICS
from firstcare.payloads import (
    EARLIEST_TS_MS,
    MAX_DEPTH,
    MAX_FUTURE_MS,
    MAX_SEQ,
    Inbound,
    Reading,
    Rejection,
    StatusReport,
    decode_status,
    decode_vitals,
    nesting_depth,
)
from firstcare.topics import is_valid_id, parse_topic
from tests.support.fuzz import KNOWN_REASONS, NOW_MS, fuzz_settings, messages, status_payloads, vitals_payloads

VITALS = parse_topic("fc/v1/h1/monitor/m-1/vitals")
STATUS = parse_topic("fc/v1/h1/monitor/m-1/status")
NESTED = b'{"a":' * 1000 + b"1" + b"}" * 1000


def check_reading(r: Reading) -> None:
    assert 0 <= r.seq <= MAX_SEQ
    assert EARLIEST_TS_MS <= r.ts_ms <= NOW_MS + MAX_FUTURE_MS
    assert r.patient_id is None or is_valid_id(r.patient_id)
    assert r.boot is None or is_valid_id(r.boot)
    assert r.metrics
    for name, value in r.metrics.items():
        assert math.isfinite(value) and METRICS[name].low <= value <= METRICS[name].high


@fuzz_settings(600)
@given(vitals_payloads())
@example(NESTED)
@example(b'{"readings": [' + b"[" * 5000 + b"]" * 5000 + b"]}")
def test_vitals_bytes_end_in_readings_or_documented_rejections(payload: bytes) -> None:
    decoded = decode_vitals(VITALS, payload, received_ms=NOW_MS)
    assert decoded.readings or decoded.rejections, "every message is accounted for"
    for r in decoded.readings:
        check_reading(r)
    for rejection in decoded.rejections:
        assert rejection.reason in KNOWN_REASONS, rejection
    if nesting_depth(payload) > MAX_DEPTH:
        assert [r.reason for r in decoded.rejections] == ["payload_too_deep"]


@fuzz_settings(400)
@given(status_payloads())
@example(b'{"state":"online","x":' + b"{\"a\":" * 2000 + b"1" + b"}" * 2001)
def test_status_bytes_end_in_a_report_or_a_documented_rejection(payload: bytes) -> None:
    result = decode_status(STATUS, payload, received_ms=NOW_MS)
    if isinstance(result, Rejection):
        assert result.reason in KNOWN_REASONS, result
    else:
        assert isinstance(result, StatusReport) and result.state in ("online", "offline")
        assert result.battery is None or 0 <= result.battery <= 100
        assert result.boot is None or is_valid_id(result.boot)


def same(a: Reading, b: Reading) -> bool:
    return (a.seq, a.ts_ms, a.boot, a.metrics) == (b.seq, b.ts_ms, b.boot, b.metrics)


@fuzz_settings(400)
@given(messages())
def test_the_edge_forwards_exactly_what_the_bridge_accepts(message: tuple[str, bytes]) -> None:
    topic, payload = message
    inbound = Inbound(topic, payload, NOW_MS)
    outbound, refused = stamp(inbound, "h1", lambda t, i: "p-bed" if i == "m-2" else None)
    for r in refused:
        assert r.rejection.reason in KNOWN_REASONS, r.rejection
    assert outbound or refused, "every message is accounted for"
    forwarded: list[Reading] = []
    for out in outbound:
        parsed = parse_topic(out.topic)
        assert parsed.hospital_id == "h1"
        if parsed.kind == "status":
            assert isinstance(decode_status(parsed, out.payload, received_ms=NOW_MS), StatusReport)
            continue
        decoded = decode_vitals(parsed, out.payload, received_ms=NOW_MS)
        assert decoded.rejections == [], "the edge forwarded something the bridge refuses"
        forwarded += decoded.readings
    if outbound and parse_topic(outbound[0].topic).kind == "vitals":
        original = decode_vitals(parse_topic(topic), payload, received_ms=NOW_MS).readings
        assert len(original) == len(forwarded)
        assert all(same(a, b) for a, b in zip(original, forwarded, strict=True)), \
            "seq, time, boot and values travel untouched"


def true_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((true_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((true_depth(v) for v in value), default=0)
    return 0


TRICKY_TEXT = st.text(alphabet=st.sampled_from('[]{}"\\\\/ ab\u00e9\u2028'), max_size=12)
NESTED_JSON = st.recursive(st.one_of(st.none(), st.integers(), TRICKY_TEXT), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TRICKY_TEXT, inner, max_size=3)), max_leaves=40)


@fuzz_settings(600)
@given(NESTED_JSON, st.booleans())
def test_the_depth_scan_agrees_with_the_parsed_structure(value: object, ascii_only: bool) -> None:
    """Strings full of brackets, quotes and backslashes never fool the byte scan."""
    payload = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(payload, limit=10_000) == true_depth(value)
