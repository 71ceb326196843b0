"""The pure pieces of the ingest path's batching: how a batch is cut from the consumer's inbox,
what a transaction's buffered readings add beside themselves, and the shortcuts that must give
exactly what the general code gives (timestamps, envelopes, NEWS2 charting)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import deque
from datetime import UTC, datetime

import pytest

from bridge.store import reading_side_rows
from firstcare import news2
from firstcare.events import EVENT_TYPES, Event, encode_envelope, envelope, envelope_parts, splice
from firstcare.mqtt import AckingConsumer, MqttTarget, _Received, take_batch
from firstcare.payloads import Inbound, Reading, format_ts


def inbox(*sizes: int) -> deque[_Received]:
    return deque(_Received(Inbound("fc/v1/h1/monitor/m1/vitals", b"x" * n, 0), 1, i + 1, 1)
                 for i, n in enumerate(sizes))


def test_a_batch_stops_at_the_message_count_or_the_byte_budget_whichever_comes_first() -> None:
    q = inbox(*[10] * 7)
    assert [r.mid for r in take_batch(q, 3, 1000)] == [1, 2, 3]
    assert [r.mid for r in take_batch(q, 500, 25)] == [4, 5]  # a third would make 30 bytes
    assert [r.mid for r in take_batch(q, 500, 1000)] == [6, 7]
    assert take_batch(q, 500, 1000) == []


def test_a_message_larger_than_the_budget_goes_alone_and_order_is_kept() -> None:
    q = inbox(5, 500, 5, 5)
    assert [r.mid for r in take_batch(q, 500, 100)] == [1]
    assert [r.mid for r in take_batch(q, 500, 100)] == [2]
    assert [r.mid for r in take_batch(q, 500, 100)] == [3, 4]


def test_the_consumer_recognises_its_topics_and_not_others() -> None:
    c = AckingConsumer(MqttTarget("127.0.0.1", 1, None, None), "t", ["$share/g/fc/v1/+/+/+/vitals", "fc/edge/#"],
                       lambda batch: None)  # type: ignore[arg-type, return-value]
    for _ in range(2):  # the second answer comes from the table
        assert c._is_ours("fc/v1/h1/monitor/m1/vitals")
        assert c._is_ours("fc/edge/h1/g1/status")
        assert not c._is_ours("fc/v1/h1/monitor/m1/status")
        assert not c._is_ours("$lease/other")


def reading(seq: int, ts: int, pid: str | None = "p1", hospital: str = "h1", **metrics: float) -> Reading:
    return Reading(hospital, "monitor", "m1", seq, ts, ts + 1, pid, metrics or {"heart_rate": float(seq)})


def apply_in_turn(pending: list[Reading]) -> tuple[dict[str, tuple[str, int]], dict[tuple[str, str], tuple]]:
    """What inserting each reading's claim and latest vitals in turn leaves (the SQL rules:
    a claim is kept; a value replaces the stored one when its ts is not older)."""
    claims: dict[str, tuple[str, int]] = {}
    latest: dict[tuple[str, str], tuple] = {}
    for r in pending:
        if r.patient_id is None:
            continue
        claims.setdefault(r.patient_id, (r.hospital_id, r.received_ms))
        for m, v in r.metrics.items():
            if (r.patient_id, m) not in latest or r.ts_ms >= latest[(r.patient_id, m)][1]:
                latest[(r.patient_id, m)] = (v, r.ts_ms, r.device_type, r.device_id, r.seq)
    return claims, latest


@pytest.mark.parametrize("seed", range(20))
def test_buffered_side_rows_equal_applying_each_reading_in_turn(seed: int) -> None:
    rng = random.Random(seed)
    pending = [reading(i, rng.randrange(5), rng.choice(["p1", "p2", None]), rng.choice(["h1", "h2"]),
                       **{m: float(rng.randrange(100)) for m in rng.sample(["heart_rate", "spo2", "temperature"], 2)})
               for i in range(rng.randrange(1, 30))]
    claims, latest = reading_side_rows([(r, "") for r in pending])
    want_claims, want_latest = apply_in_turn(pending)
    assert claims == sorted((p, h, at) for p, (h, at) in want_claims.items())
    assert latest == sorted((p, m, *rest) for (p, m), rest in want_latest.items())
    assert [(p, m) for p, m, *_ in latest] == sorted((p, m) for p, m, *_ in latest)  # lock order


def test_format_ts_matches_datetime_to_the_millisecond() -> None:
    rng = random.Random(1)
    values = [rng.randrange(946_684_800_000, 4_102_444_800_000) for _ in range(20_000)] + [0, 999, 1000, -1, -1001]
    for ms in values:
        want = datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert format_ts(ms) == f"{want}.{ms % 1000:03d}Z"


@pytest.mark.parametrize("name", sorted(EVENT_TYPES))
def test_an_envelope_spliced_per_room_is_the_envelope(name: str) -> None:
    event = Event(name, {"patient_id": "p1", "text": "é \"q\"", "n": [1, 2.5]}, 1_795_689_350_978)
    parts = envelope_parts(event)
    for room, id in (("patient:p1", "ab:1"), ("hospital:h1", "ab:22")):
        assert json.loads(splice(parts, room, id)) == envelope(event, room, id)
        assert splice(parts, room, id) == encode_envelope(event, room, id)


@pytest.mark.parametrize("value", [0.0, 72.0, 72.5, 73.5, 36.45, 36.449999, 37.95, -0.0, 1e9, 120.4999])
def test_whole_values_chart_as_themselves_and_the_rest_still_round_half_up(value: float) -> None:
    for parameter in ("heart_rate", "temperature"):
        quantum = "0.1" if parameter == "temperature" else "1"
        assert news2.charted(parameter, value) == float(news2._half_up(value, quantum))


def test_a_score_knows_its_highest_part() -> None:
    inputs = {"heart_rate": news2.Input(135.0, 0, "d"), "spo2": news2.Input(97.0, 0, "d")}
    s = news2.score(inputs, 0)
    assert s.max_part == max(p.score for p in s.parts.values()) == 3
    assert dataclasses.replace(s).max_part == 3
