"""Vitals and status payload schemas (contract v1) and their pure decoders.

Decoding never raises for bad input: :func:`decode_vitals` returns the valid readings and a
rejection for each part that is not, so a gateway batch with one bad reading still delivers
the rest, and every rejection can be dead-lettered with its reason.

Vitals (at most 64 KiB)::

    {"seq": 1042, "ts": "2026-11-26T10:15:30.120Z", "patient_id": "p-001",
     "metrics": {"heart_rate": 72, "temperature": {"value": 98.6, "unit": "[degF]"}}}

or a gateway batch ``{"readings": [<vitals>, ...]}`` of at most ``MAX_BATCH`` readings for the
topic's device. Status: ``{"state": "online"|"offline", "battery": 87, "firmware": "1.4.2"}``.

Both may carry ``boot``, the id of the device's current power cycle (``[A-Za-z0-9_-]{1,64}`` or
a non-negative integer, taken as its decimal string): a reading's identity is
(device, boot, seq), see :mod:`bridge.sequence`.

Before the JSON decoder runs, :func:`nesting_depth` scans the bytes: a payload nested deeper
than ``MAX_DEPTH`` containers is refused (``payload_too_deep``) without being parsed, so no
payload can make a decoder recurse without bound.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from firstcare.metrics import MetricRejected, to_canonical
from firstcare.topics import Topic, is_valid_id

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_BATCH = 1000
MAX_METRICS = 32
MAX_SEQ = 2**63 - 1
EARLIEST_TS_MS = 946_684_800_000  # 2000-01-01: anything earlier is an unset device clock
MAX_FUTURE_MS = 24 * 3600 * 1000
MAX_DEPTH = 16
"""Most JSON containers nested in one payload. A gateway batch with a unit-tagged value needs
five (``{"readings": [{"metrics": {"temperature": {...}}}]}``); sixteen leaves room and stays
far from any decoder's recursion limit."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message as received from MQTT, before any validation: what the bridge's consumer and
    the edge's intake hand to the pure decoders (``firstcare.mqtt`` makes them, but importing
    this record needs no MQTT client)."""

    topic: str
    payload: bytes
    received_ms: int
    retained: bool = False


class Quantity(msgspec.Struct, forbid_unknown_fields=True):
    value: float
    unit: str


class VitalsIn(msgspec.Struct):
    seq: int
    ts: int | str
    metrics: dict[str, float | Quantity]
    patient_id: str | None = None
    boot: int | str | None = None


class VitalsMessage(msgspec.Struct):
    """Either one reading (its fields at top level) or a batch (``readings``)."""

    readings: list[msgspec.Raw] | None = None  # each item validated on its own
    seq: int | None = None
    ts: int | str | None = None
    metrics: dict[str, float | Quantity] | None = None
    patient_id: str | None = None
    boot: int | str | None = None


class StatusIn(msgspec.Struct):
    state: Literal["online", "offline"]
    battery: int | None = None
    firmware: str | None = None
    ts: int | str | None = None
    boot: int | str | None = None


_vitals_decoder = msgspec.json.Decoder(VitalsMessage)
_item_decoder = msgspec.json.Decoder(VitalsIn)
_status_decoder = msgspec.json.Decoder(StatusIn)


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated reading, metrics in canonical units. Times are epoch milliseconds."""

    hospital_id: str
    device_type: str
    device_id: str
    seq: int
    ts_ms: int
    received_ms: int
    patient_id: str | None
    metrics: dict[str, float]
    boot: str | None = None  # the device's power cycle, when it says; see bridge.sequence
    signed_by: str | None = None  # the key id whose signature the bridge verified (firstcare.signing)

    @property
    def device_key(self) -> tuple[str, str]:
        return (self.device_type, self.device_id)

    @property
    def verified(self) -> bool:
        return self.signed_by is not None


@dataclass(frozen=True, slots=True)
class StatusReport:
    hospital_id: str
    device_type: str
    device_id: str
    state: str
    battery: int | None
    firmware: str | None
    ts_ms: int
    received_ms: int
    boot: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why (part of) a message was refused. ``index`` locates a reading inside a batch."""

    reason: str
    detail: str
    index: int | None = None


@dataclass(frozen=True, slots=True)
class DecodedVitals:
    readings: list[Reading]
    rejections: list[Rejection]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_ts(value: int | str, received_ms: int) -> int:
    """ISO-8601 with a zone, or epoch milliseconds, to epoch milliseconds (ValueError if bad)."""
    if isinstance(value, int):
        ts_ms = value
    else:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"ts {value!r} is not ISO-8601") from exc
        if parsed.tzinfo is None:
            raise ValueError(f"ts {value!r} has no time zone (add 'Z' or an offset)")
        ts_ms = (parsed - _EPOCH) // timedelta(milliseconds=1)  # exact: no float rounding
    if ts_ms < EARLIEST_TS_MS or ts_ms > received_ms + MAX_FUTURE_MS:
        raise ValueError(f"ts {value!r} is implausible (before 2000 or more than a day ahead)")
    return ts_ms


_SECONDS: dict[int, str] = {}  # epoch second -> "YYYY-MM-DDTHH:MM:SS"; any thread (one dict op each)


def format_ts(ms: int) -> str:
    """Epoch milliseconds to ISO-8601 UTC with millisecond precision and a ``Z``.

    Every event carries two of these, so the second's text is cached (a few thousand at most).

    >>> format_ts(1795689350978)
    '2026-11-26T10:35:50.978Z'
    """
    second, milli = divmod(ms, 1000)
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        text = _SECONDS[second] = (_EPOCH + timedelta(seconds=second)).isoformat(timespec="seconds")[:-6]
    return f"{text}.{milli:03d}Z"


def nesting_depth(payload: bytes, limit: int = MAX_DEPTH) -> int:
    """How deeply JSON containers nest in ``payload``, counted without parsing it: brackets
    inside strings (escapes included) do not count. Exact for JSON; malformed input gets a
    number too (the decoder refuses it afterwards, at its first bad byte). The count stops as
    soon as ``limit`` is exceeded, returning ``limit + 1``.

    Linear, and mostly in C: escaped quotes go, then every byte but quotes and brackets, then
    every two adjacent quotes (an empty string, or nothing between two strings); only what is
    left is walked in Python, usually brackets alone.

    >>> nesting_depth(b'{"a": [1, {"b": "[[[{"}]}')
    3
    >>> nesting_depth(b'{"a":' * 1000 + b'1' + b'}' * 1000)
    17
    """
    if b"\\" in payload:  # escaped backslashes first, then what is left escapes a quote or nothing structural
        payload = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = payload.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    depth = deepest = 0
    in_string = False
    for c in structure:
        if c == 0x22:
            in_string = not in_string
        elif in_string:
            continue
        elif c == 0x7B or c == 0x5B:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif depth:
            depth -= 1
    return deepest


def _too_deep(payload: bytes) -> Rejection | None:
    if payload.count(b"{") + payload.count(b"[") <= MAX_DEPTH:
        return None  # the common case: too few brackets to nest too deep, no scan needed
    if nesting_depth(payload) > MAX_DEPTH:
        return Rejection("payload_too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
    return None


def parse_boot(value: int | str | None) -> str | None:
    """A device's boot id as the bridge keys it (ValueError if it breaks the grammar)."""
    if value is None:
        return None
    if isinstance(value, int):
        if not 0 <= value <= MAX_SEQ:
            raise ValueError(f"boot {value} must be a non-negative 64-bit integer or an id")
        return str(value)
    if not is_valid_id(value):
        raise ValueError(f"boot {value!r} must match [A-Za-z0-9_-]{{1,64}} or be a non-negative integer")
    return value


def _schema_detail(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    return str(exc).replace("`", "")


def _reading(topic: Topic, item: VitalsIn, received_ms: int, index: int | None) -> Reading | Rejection:
    if not 0 <= item.seq <= MAX_SEQ:
        return Rejection("seq_invalid", f"seq {item.seq} must be a non-negative 64-bit integer", index)
    try:
        ts_ms = parse_ts(item.ts, received_ms)
    except ValueError as exc:
        return Rejection("ts_invalid", str(exc), index)
    if item.patient_id is not None and not is_valid_id(item.patient_id):
        return Rejection("patient_id_invalid", f"patient_id {item.patient_id!r} must match [A-Za-z0-9_-]{{1,64}}",
                         index)
    try:
        boot = parse_boot(item.boot)
    except ValueError as exc:
        return Rejection("boot_invalid", str(exc), index)
    if not item.metrics:
        return Rejection("metrics_empty", "metrics must hold at least one value", index)
    if len(item.metrics) > MAX_METRICS:
        return Rejection("metrics_too_many", f"at most {MAX_METRICS} metrics per reading", index)
    metrics: dict[str, float] = {}
    for name, raw in item.metrics.items():
        try:
            if isinstance(raw, Quantity):
                metrics[name] = to_canonical(name, raw.value, raw.unit)
            else:
                metrics[name] = to_canonical(name, raw)
        except MetricRejected as exc:
            return Rejection(exc.reason, exc.detail, index)
    return Reading(
        topic.hospital_id, topic.device_type, topic.device_id, item.seq, ts_ms, received_ms,
        item.patient_id, metrics, boot,
    )


def decode_vitals(topic: Topic, payload: bytes, received_ms: int | None = None) -> DecodedVitals:
    """Decode a vitals payload published on ``topic`` (already parsed)."""
    received_ms = now_ms() if received_ms is None else received_ms
    if len(payload) > MAX_PAYLOAD_BYTES:
        return DecodedVitals([], [Rejection("payload_too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")])
    if (deep := _too_deep(payload)) is not None:
        return DecodedVitals([], [deep])
    try:
        message = _vitals_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        return DecodedVitals([], [Rejection("schema_invalid", _schema_detail(exc))])
    except msgspec.DecodeError as exc:
        return DecodedVitals([], [Rejection("payload_not_json", _schema_detail(exc))])
    if message.readings is not None:
        if any(v is not None for v in (message.seq, message.ts, message.metrics, message.patient_id, message.boot)):
            return DecodedVitals([], [Rejection("schema_invalid", "a batch carries only 'readings'")])
        if not message.readings:
            return DecodedVitals([], [Rejection("batch_empty", "'readings' is empty")])
        if len(message.readings) > MAX_BATCH:
            return DecodedVitals([], [Rejection("batch_too_large", f"{len(message.readings)} readings > {MAX_BATCH}")])
        items: list[tuple[int | None, VitalsIn]] = []
        early: list[Rejection] = []
        for i, raw in enumerate(message.readings):
            try:
                items.append((i, _item_decoder.decode(raw)))
            except msgspec.ValidationError as exc:
                early.append(Rejection("schema_invalid", _schema_detail(exc).replace("$", f"$.readings[{i}]", 1), i))
            except msgspec.DecodeError as exc:  # the outer pass keeps items raw: e.g. a lone surrogate in a string
                early.append(Rejection("payload_not_json", f"$.readings[{i}]: {_schema_detail(exc)}", i))
    else:
        early = []
        if message.seq is None or message.ts is None or message.metrics is None:
            missing = [f for f in ("seq", "ts", "metrics") if getattr(message, f) is None]
            return DecodedVitals([], [Rejection("schema_invalid", f"missing required field(s): {', '.join(missing)}")])
        items = [(None, VitalsIn(message.seq, message.ts, message.metrics, message.patient_id, message.boot))]
    readings: list[Reading] = []
    rejections: list[Rejection] = list(early)
    for index, item in items:
        result = _reading(topic, item, received_ms, index)
        if isinstance(result, Reading):
            readings.append(result)
        else:
            rejections.append(result)
    rejections.sort(key=lambda r: -1 if r.index is None else r.index)
    return DecodedVitals(readings, rejections)


def decode_status(topic: Topic, payload: bytes, received_ms: int | None = None) -> StatusReport | Rejection:
    received_ms = now_ms() if received_ms is None else received_ms
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejection("payload_too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    if (deep := _too_deep(payload)) is not None:
        return deep
    try:
        status = _status_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        return Rejection("schema_invalid", _schema_detail(exc))
    except msgspec.DecodeError as exc:
        return Rejection("payload_not_json", _schema_detail(exc))
    if status.battery is not None and not 0 <= status.battery <= 100:
        return Rejection("battery_invalid", f"battery {status.battery} must be 0..100")
    try:
        boot = parse_boot(status.boot)
    except ValueError as exc:
        return Rejection("boot_invalid", str(exc))
    ts_ms = received_ms
    if status.ts is not None:
        try:
            ts_ms = parse_ts(status.ts, received_ms)
        except ValueError as exc:
            return Rejection("ts_invalid", str(exc))
    return StatusReport(
        topic.hospital_id, topic.device_type, topic.device_id, status.state, status.battery,
        status.firmware, ts_ms, received_ms, boot,
    )


def vitals_body(seq: int, ts_ms: int, metrics: Mapping[str, float | Mapping[str, Any]], patient_id: str | None = None,
                boot: str | None = None) -> dict[str, Any]:
    """One reading as the contract spells it (a message of its own, or an item of a batch)."""
    body: dict[str, Any] = {"seq": seq, "ts": format_ts(ts_ms), "metrics": metrics}
    if patient_id is not None:
        body["patient_id"] = patient_id
    if boot is not None:
        body["boot"] = boot
    return body


def encode_vitals(seq: int, ts_ms: int, metrics: Mapping[str, float | Mapping[str, Any]], patient_id: str | None = None,
                  boot: str | None = None) -> bytes:
    return msgspec.json.encode(vitals_body(seq, ts_ms, metrics, patient_id, boot))


def encode_batch(readings: list[dict[str, Any]]) -> bytes:
    return msgspec.json.encode({"readings": readings})


def encode_readings(bodies: list[dict[str, Any]], limit: int = MAX_PAYLOAD_BYTES) -> list[bytes]:
    """Readings (``vitals_body`` dicts) as few messages as fit ``limit`` each: one reading is a
    plain vitals message, several a batch. Used where re-encoding can grow a payload (the edge
    gateway stamps ``patient_id`` and ISO times) so nothing is forwarded that the bridge refuses."""
    encoded = [msgspec.json.encode(b) for b in bodies]
    messages: list[bytes] = []
    chunk: list[bytes] = []
    size = len(b'{"readings":[]}')
    for item in encoded:
        if chunk and (size + len(item) + 1 > limit or len(chunk) >= MAX_BATCH):
            messages.append(chunk[0] if len(chunk) == 1 else b'{"readings":[' + b",".join(chunk) + b"]}")
            chunk, size = [], len(b'{"readings":[]}')
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        messages.append(chunk[0] if len(chunk) == 1 else b'{"readings":[' + b",".join(chunk) + b"]}")
    return messages


def encode_status(state: str, battery: int | None = None, firmware: str | None = None, ts_ms: int | None = None,
                  boot: str | None = None) -> bytes:
    body: dict[str, Any] = {"state": state}
    if boot is not None:
        body["boot"] = boot
    if battery is not None:
        body["battery"] = battery
    if firmware is not None:
        body["firmware"] = firmware
    if ts_ms is not None:
        body["ts"] = format_ts(ts_ms)
    return msgspec.json.encode(body)


# --- an edge gateway's own status (firstcare.topics.gateway_status_topic) ---------------------


class GatewaySpool(msgspec.Struct, frozen=True):
    """The gateway's spool: what waits for the uplink, and what its bounds discarded."""

    depth: int = 0
    bytes: int = 0
    max_bytes: int = 0  # 0: unbounded
    oldest_age_s: float = 0.0
    discarded_full: int = 0  # since the spool was created
    discarded_too_old: int = 0
    evicting: bool = False  # discards within the last few status intervals
    near_full: bool = False  # at or above the gateway's warning level of max_bytes


class GatewayQuarantine(msgspec.Struct, frozen=True):
    """Messages the upstream refused for good, held at the gateway until an operator acts."""

    depth: int = 0
    total: int = 0  # quarantined since the spool was created
    oldest_age_s: float = 0.0


class GatewayStatus(msgspec.Struct, frozen=True):
    """``{"state": "online", "ts": ..., "spool": {...}, "quarantine": {...}, "forwarded_per_s": ...}``
    every few seconds and at once when something changes; the will is ``{"state": "offline"}``.
    A status without ``spool`` or ``quarantine`` (a will, an older gateway) says nothing about them."""

    state: Literal["online", "offline"]
    ts: int | str | None = None
    spool: GatewaySpool | None = None
    quarantine: GatewayQuarantine | None = None
    forwarded_per_s: float = 0.0


_gateway_status_decoder = msgspec.json.Decoder(GatewayStatus)


def decode_gateway_status(payload: bytes) -> GatewayStatus | Rejection:
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejection("payload_too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    if (deep := _too_deep(payload)) is not None:
        return deep
    try:
        return _gateway_status_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        return Rejection("schema_invalid", _schema_detail(exc))
    except msgspec.DecodeError as exc:
        return Rejection("payload_not_json", _schema_detail(exc))


def encode_gateway_status(status: GatewayStatus) -> bytes:
    return msgspec.json.encode(status)
