"""Hypothesis strategies for the wire contract: valid vitals and status payloads, and the ways
real payloads go wrong (deep nesting, huge numbers, NaN, unicode, wrong types, cut or corrupted
bytes, batches mixing good and bad readings, redeliveries, reboots).

The suite runs them for a bounded number of examples with a fixed seed; ``FC_FUZZ_EXAMPLES``
raises the count and ``FC_FUZZ_SEED=random`` draws fresh inputs, for a longer run:

    FC_FUZZ_EXAMPLES=20000 FC_FUZZ_SEED=random \\
        .venv/bin/pytest tests/unit/test_fuzz.py tests/integration/test_fuzz_core.py
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from firstcare.metrics import METRICS
from firstcare.payloads import format_ts

NOW_MS = 1_790_000_000_000
EXAMPLES_SCALE = int(os.environ.get("FC_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(examples: int) -> settings:
    """``examples`` in the suite (fixed seed), or ``FC_FUZZ_EXAMPLES`` for a longer run."""
    return settings(
        max_examples=EXAMPLES_SCALE or examples,
        derandomize=os.environ.get("FC_FUZZ_SEED", "") != "random",
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


KNOWN_REASONS = frozenset({
    "topic_unknown", "hospital_id_invalid", "device_id_invalid", "device_type_unknown", "payload_too_large",
    "payload_too_deep", "payload_not_json", "schema_invalid", "seq_invalid", "ts_invalid", "patient_id_invalid",
    "boot_invalid", "metrics_empty", "metrics_too_many", "metric_unknown", "unit_unknown", "value_out_of_range",
    "batch_empty", "batch_too_large", "battery_invalid",
})
"""Every reason the pure decoders may give (the README's dead-letter table, less the bridge's own)."""

IDS = st.sampled_from(["p-1", "p-2", "m-1", "x_Y-9", "a" * 64])
BOOTS = st.one_of(st.none(), st.sampled_from(["b1", "b2", "0", 7, 2**63 - 1]))
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=20), st.sampled_from(["", "\u0000", "\ud800", "é", "😀" * 10, "[[{{", '\\"']),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@st.composite
def metric_values(draw: Any) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(METRICS)), min_size=1, max_size=4, unique=True))
    out: dict[str, Any] = {}
    for name in names:
        spec = METRICS[name]
        value = draw(st.floats(min_value=spec.low, max_value=spec.high, allow_nan=False))
        if name == "temperature" and draw(st.booleans()):
            out[name] = {"value": value * 9 / 5 + 32, "unit": "[degF]"}
        else:
            out[name] = round(value, draw(st.integers(0, 3)))
    return out


@st.composite
def readings(draw: Any, seq: Any = None) -> dict[str, Any]:
    """One valid reading as a device writes it."""
    ts = NOW_MS - draw(st.integers(0, 3_600_000))
    body: dict[str, Any] = {
        "seq": draw(seq if seq is not None else st.integers(0, 20)),
        "ts": draw(st.sampled_from([ts, format_ts(ts)])),
        "metrics": draw(metric_values()),
    }
    if draw(st.booleans()):
        body["patient_id"] = draw(IDS)
    boot = draw(BOOTS)
    if boot is not None:
        body["boot"] = boot
    return body


@st.composite
def mutated(draw: Any, body: dict[str, Any]) -> Any:
    """A valid body broken in one of the ways payloads break in the field."""
    body = json.loads(json.dumps(body))
    how = draw(st.sampled_from(["field", "drop", "extra", "deep", "huge", "metric", "whole"]))
    keys = sorted(body)
    if how == "field":
        body[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
    elif how == "drop":
        del body[draw(st.sampled_from(keys))]
    elif how == "extra":
        body[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    elif how == "deep":
        depth = draw(st.integers(1, 60))
        inner: Any = draw(JSON_SCALARS)
        for _ in range(depth):
            inner = {"a": inner} if draw(st.booleans()) else [inner]
        body[draw(st.sampled_from([*keys, "nested"]))] = inner
    elif how == "huge":
        body[draw(st.sampled_from(["seq", "ts"]))] = draw(st.sampled_from([2**63, 2**64 + 1, -1, 10**30, 1e308, -0.0]))
    elif how == "metric":
        name = draw(st.sampled_from([*sorted(METRICS), "mood", ""]))
        body.setdefault("metrics", {})[name] = draw(st.one_of(
            JSON_VALUES, st.fixed_dictionaries({"value": JSON_SCALARS, "unit": st.text(max_size=8)})))
    else:
        return draw(JSON_VALUES)
    return body


def dumps(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def byte_mutation(draw: Any, payload: bytes) -> bytes:
    how = draw(st.sampled_from(["cut", "insert", "flip", "token"]))
    if not payload:
        return payload
    at = draw(st.integers(0, len(payload)))
    if how == "cut":
        return payload[:at]
    if how == "insert":
        return payload[:at] + draw(st.binary(max_size=8)) + payload[at:]
    if how == "flip":
        at = min(at, len(payload) - 1)
        return payload[:at] + bytes([payload[at] ^ draw(st.integers(1, 255))]) + payload[at + 1:]
    token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"1" * 400, b'"\\ud800"',
                                  b"\xff\xfe", b"null"]))
    return payload[:at] + token + payload[at:]


@st.composite
def vitals_payloads(draw: Any) -> bytes:
    """The bytes of a vitals message: valid, mutated, batches, broken bytes or deep nesting."""
    kind = draw(st.sampled_from(["valid", "mutated", "batch", "bytes", "deep", "raw"]))
    ascii_only = draw(st.booleans())
    if kind == "valid":
        return dumps(draw(readings()), ascii_only)
    if kind == "mutated":
        return dumps(draw(mutated(draw(readings()))), ascii_only)
    if kind == "batch":
        items = draw(st.lists(st.one_of(readings(), readings().flatmap(mutated)), min_size=0, max_size=8))
        body: dict[str, Any] = {"readings": items}
        if draw(st.integers(0, 9)) == 0:
            body["seq"] = 1  # a batch may carry nothing but readings
        return dumps(body, ascii_only)
    if kind == "bytes":
        return draw(byte_mutation(dumps(draw(readings()), ascii_only)))
    if kind == "deep":
        depth = draw(st.integers(10, 3000))
        opener, closer = draw(st.sampled_from([(b'{"a":', b"}"), (b"[", b"]"), (b'{"metrics":{"x":', b"}}")]))
        return opener * depth + b"1" + closer * depth
    return draw(st.binary(max_size=200))


@st.composite
def status_payloads(draw: Any) -> bytes:
    body: dict[str, Any] = {"state": draw(st.sampled_from(["online", "offline"]))}
    if draw(st.booleans()):
        body["battery"] = draw(st.integers(0, 100))
    if draw(st.booleans()):
        body["firmware"] = draw(st.text(max_size=10))
    if draw(st.booleans()):
        body["ts"] = NOW_MS - draw(st.integers(0, 3_600_000))
    boot = draw(BOOTS)
    if boot is not None:
        body["boot"] = boot
    kind = draw(st.sampled_from(["valid", "mutated", "bytes", "deep"]))
    if kind == "valid":
        return dumps(body, True)
    if kind == "mutated":
        return dumps(draw(mutated(body)), draw(st.booleans()))
    if kind == "bytes":
        return draw(byte_mutation(dumps(body, True)))
    return b'{"state":"online","x":' + b"[" * draw(st.integers(10, 2000)) + b"]" * 5


DEVICES = [("h1", "monitor", "m-1"), ("h1", "monitor", "m-2"), ("h1", "oximeter", "ox-1"), ("h2", "monitor", "m-9")]
BAD_TOPICS = ["fc/v1/h1/toaster/t-1/vitals", "fc/v1/h 1/monitor/m-1/vitals", "fc/v1/h1/monitor/m-1/telemetry",
              "fc/v2/h1/monitor/m-1/vitals", "fc/v1/h1/monitor/" + "x" * 65 + "/status", "fc/v1/é/monitor/m-1/vitals"]


@st.composite
def messages(draw: Any) -> tuple[str, bytes]:
    """(topic, payload): mostly the small fleet above, so duplicates, reboots and conflicts meet."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.sampled_from(BAD_TOPICS)), draw(vitals_payloads())
    hospital, device_type, device_id = draw(st.sampled_from(DEVICES))
    if draw(st.integers(0, 4)) == 0:
        return f"fc/v1/{hospital}/{device_type}/{device_id}/status", draw(status_payloads())
    return f"fc/v1/{hospital}/{device_type}/{device_id}/vitals", draw(vitals_payloads())


@st.composite
def batches(draw: Any) -> list[tuple[str, bytes]]:
    """A batch as the consumer hands it over, with some messages delivered again."""
    batch = draw(st.lists(messages(), min_size=1, max_size=12))
    again = draw(st.lists(st.sampled_from(batch), max_size=3))
    return batch + again
