"""NEWS2 scoring against the RCP 2017 chart: every band edge of every parameter, the bands,
freshness and the lower-bound property of an incomplete score."""

from __future__ import annotations

import itertools

import pytest

from firstcare import news2
from firstcare.news2 import Input, score

H = 3_600_000


@pytest.mark.parametrize(("value", "points"), [
    (0, 3), (8, 3), (8.4, 3), (8.5, 1), (9, 1), (11, 1), (12, 0), (20, 0), (20.49, 0), (20.5, 2), (21, 2), (24, 2),
    (25, 3), (60, 3),
])
def test_respiration_rate(value: float, points: int) -> None:
    assert news2.score_respiratory_rate(value) == points


@pytest.mark.parametrize(("value", "points"), [
    (50, 3), (91, 3), (91.4, 3), (91.5, 2), (92, 2), (93, 2), (94, 1), (95, 1), (95.5, 0), (96, 0), (100, 0),
])
def test_spo2_scale_1(value: float, points: int) -> None:
    assert news2.score_spo2_scale1(value) == points


@pytest.mark.parametrize(("value", "on_oxygen", "points"), [
    (70, False, 3), (83, True, 3), (84, False, 2), (85, True, 2), (86, False, 1), (87, True, 1),
    (88, True, 0), (92, True, 0), (88, False, 0), (92, False, 0),
    # 93 % or more: only oxygen scores; on air it is the target range met
    (93, False, 0), (97, False, 0), (100, False, 0),
    (93, True, 1), (94, True, 1), (95, True, 2), (96, True, 2), (97, True, 3), (100, True, 3),
    # air or oxygen unknown: the air score is the lower bound
    (93, None, 0), (99, None, 0), (87, None, 1),
])
def test_spo2_scale_2(value: float, on_oxygen: bool | None, points: int) -> None:
    assert news2.score_spo2_scale2(value, on_oxygen) == points


@pytest.mark.parametrize(("on_oxygen", "points"), [(False, 0), (True, 2)])
def test_air_or_oxygen(on_oxygen: bool, points: int) -> None:
    assert news2.score_supplemental_oxygen(on_oxygen) == points


@pytest.mark.parametrize(("value", "points"), [
    (60, 3), (90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (219.4, 0), (219.5, 3), (220, 3),
    (300, 3),
])
def test_systolic_bp(value: float, points: int) -> None:
    assert news2.score_systolic_bp(value) == points


@pytest.mark.parametrize(("value", "points"), [
    (20, 3), (40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (130.5, 3),
    (131, 3), (200, 3),
])
def test_pulse(value: float, points: int) -> None:
    assert news2.score_heart_rate(value) == points


@pytest.mark.parametrize(("level", "points"), [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)])
def test_consciousness_acvpu_with_new_confusion(level: str, points: int) -> None:
    assert news2.score_consciousness(level) == points


def test_consciousness_outside_acvpu_is_refused() -> None:
    with pytest.raises(ValueError, match="one of A, C, V, P, U"):
        news2.score_consciousness("alert")


@pytest.mark.parametrize(("value", "points"), [
    (33.0, 3), (35.0, 3), (35.04, 3), (35.05, 1), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.04, 0),
    (38.05, 1), (38.1, 1), (39.0, 1), (39.1, 2), (41.0, 2),
])
def test_temperature(value: float, points: int) -> None:
    assert news2.score_temperature(value) == points


@pytest.mark.parametrize(("total", "max_part", "expected"), [
    (0, 0, "low"), (4, 2, "low"), (3, 3, "low-medium"), (4, 3, "low-medium"), (5, 2, "medium"),
    (5, 3, "medium"), (6, 3, "medium"), (7, 2, "high"), (7, 3, "high"), (20, 3, "high"),
])
def test_bands(total: int, max_part: int, expected: str) -> None:
    assert news2.band(total, max_part) == expected


def complete_inputs(ts: int = 0, **values: object) -> dict[str, Input]:
    base: dict[str, object] = {"respiratory_rate": 16, "spo2": 97, "supplemental_oxygen": False, "systolic_bp": 125,
                               "heart_rate": 72, "consciousness": "A", "temperature": 36.8}
    base.update(values)
    return {name: Input(value, ts, "test") for name, value in base.items()}  # type: ignore[arg-type]


def test_a_healthy_complete_set_scores_zero_and_is_complete() -> None:
    s = score(complete_inputs(), now_ms=0)
    assert (s.total, s.band, s.complete, s.missing, s.stale) == (0, "low", True, (), ())
    assert set(s.parts) == set(news2.PARAMETERS)


def test_a_worked_example_adds_every_parameter() -> None:
    # RR 22 (2), SpO2 93 scale 1 (2), oxygen (2), SBP 105 (1), pulse 115 (2), confusion (3), 38.5 (1)
    s = score(complete_inputs(respiratory_rate=22, spo2=93, supplemental_oxygen=True, systolic_bp=105,
                              heart_rate=115, consciousness="C", temperature=38.5), now_ms=0)
    assert s.total == 13 and s.band == "high" and s.complete
    assert {n: p.score for n, p in s.parts.items()} == {
        "respiratory_rate": 2, "spo2": 2, "supplemental_oxygen": 2, "systolic_bp": 1, "heart_rate": 2,
        "consciousness": 3, "temperature": 1}


def test_a_single_three_is_low_medium() -> None:
    s = score(complete_inputs(consciousness="V"), now_ms=0)
    assert (s.total, s.band, s.max_part) == (3, "low-medium", 3)


def test_scale_2_uses_the_oxygen_input() -> None:
    on_air = score(complete_inputs(spo2=97), now_ms=0, spo2_scale=2)
    on_oxygen = score(complete_inputs(spo2=97, supplemental_oxygen=True), now_ms=0, spo2_scale=2)
    assert on_air.parts["spo2"].score == 0 and on_air.total == 0
    assert on_oxygen.parts["spo2"].score == 3 and on_oxygen.total == 5


def test_missing_inputs_are_named_and_the_score_is_incomplete() -> None:
    inputs = complete_inputs()
    del inputs["consciousness"], inputs["supplemental_oxygen"]
    s = score(inputs, now_ms=0)
    assert not s.complete
    assert s.missing == ("supplemental_oxygen", "consciousness")
    assert "consciousness" not in s.parts


@pytest.mark.parametrize("name", news2.PARAMETERS)
def test_each_input_goes_stale_just_after_its_limit(name: str) -> None:
    limit = news2.MAX_AGE_MS[name]
    inputs = complete_inputs(ts=limit + 1)  # everything else measured just now
    inputs[name] = Input(inputs[name].value, 0)
    assert score(inputs, now_ms=limit).complete
    past = score(inputs, now_ms=limit + 1)
    assert past.stale == (name,) and not past.complete and past.missing == ()
    assert name not in past.parts  # a stale value never counts


def test_limits_are_documented_in_hours() -> None:
    assert news2.MAX_AGE_MS["respiratory_rate"] == 1 * H
    assert news2.MAX_AGE_MS["systolic_bp"] == 4 * H
    assert news2.MAX_AGE_MS["consciousness"] == 12 * H


def test_next_expiry_is_the_first_input_to_go_stale() -> None:
    inputs = complete_inputs(ts=0)
    assert news2.next_expiry(inputs, 0) == H + 1
    assert news2.next_expiry(inputs, 13 * H) is None


PARTIAL_CASES = [
    dict(respiratory_rate=26, spo2=90, heart_rate=135, systolic_bp=85, temperature=39.5),
    dict(respiratory_rate=22, spo2=94, heart_rate=100, systolic_bp=105, temperature=38.5),
    dict(respiratory_rate=16, spo2=97, heart_rate=72, systolic_bp=125, temperature=36.8),
    dict(respiratory_rate=7, spo2=99, heart_rate=60, systolic_bp=230, temperature=35.0),
]


@pytest.mark.parametrize("values", PARTIAL_CASES)
@pytest.mark.parametrize("scale", [1, 2])
def test_an_incomplete_score_is_a_lower_bound_of_every_completion(values: dict, scale: int) -> None:
    """Whatever the missing inputs turn out to be, the complete total and band are never below
    the partial ones: why a partial score may raise an alarm but never clear one."""
    partial = score({n: Input(v, 0) for n, v in values.items()}, now_ms=0, spo2_scale=scale)
    assert not partial.complete
    for oxygen, level in itertools.product((False, True), news2.ACVPU):
        full = score(complete_inputs(**values, supplemental_oxygen=oxygen, consciousness=level), now_ms=0,
                     spo2_scale=scale)
        assert full.total >= partial.total
        assert full.band_rank >= partial.band_rank


def test_score_json_never_calls_an_incomplete_score_complete() -> None:
    s = score({"heart_rate": Input(140, 0, "monitor/m1")}, now_ms=0)
    body = news2.score_json(s)
    assert body["complete"] is False and body["lower_bound"] is True
    assert body["parameters"]["heart_rate"] == {"value": 140.0, "score": 3, "ts": "1970-01-01T00:00:00.000Z",
                                                "source": "monitor/m1"}
    assert "consciousness" in body["missing"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="spo2_scale"):
        score({}, now_ms=0, spo2_scale=3)
    with pytest.raises(ValueError, match="unknown NEWS2 input"):
        score({"glucose": Input(100, 0)}, now_ms=0)
