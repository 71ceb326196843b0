"""The alarm-fatigue report, pure: counts per patient-day, acknowledgement times, escalation
rate and nuisance candidates over hand-made alarms."""

from __future__ import annotations

import pytest

from bridge.reports import alarm_report, is_nuisance, median, p90

T0 = 1_800_000_000_000
S = 1000


def alarm(i: int, rule: str = "spo2.low", priority: str = "medium", raised: int = 0, ack: int | None = None,
          escalated: int | None = None, resolved: int | None = None, kind: str = "clinical") -> dict:
    return {"id": f"a{i}", "rule_id": rule, "priority": priority, "kind": kind, "patient_id": "p1",
            "device_type": None, "device_id": None, "raised_ms": T0 + raised,
            "acknowledged_ms": None if ack is None else T0 + ack,
            "escalated_ms": None if escalated is None else T0 + escalated,
            "resolved_ms": None if resolved is None else T0 + resolved}


@pytest.mark.parametrize(("values", "expected_median", "expected_p90"), [
    ([], None, None), ([5], 5, 5), ([1, 2], 1.5, 2), ([3, 1, 2], 2, 3),
    (list(range(1, 11)), 5.5, 9), (list(range(1, 21)), 10.5, 18),
])
def test_median_and_nearest_rank_p90(values: list[int], expected_median: float | None,
                                     expected_p90: float | None) -> None:
    assert median(values) == expected_median and p90(values) == expected_p90


@pytest.mark.parametrize(("a", "nuisance"), [
    (alarm(1, resolved=30 * S), True),
    (alarm(1, resolved=60 * S), True),  # the limit itself counts
    (alarm(1, resolved=61 * S), False),
    (alarm(1, ack=10 * S, resolved=20 * S), False),  # someone acted on it
    (alarm(1), False),  # still active
])
def test_nuisance_candidates(a: dict, nuisance: bool) -> None:
    assert is_nuisance(a, 60 * S) is nuisance


def test_the_report_over_a_ward() -> None:
    alarms = [
        alarm(1, raised=0, ack=30 * S, resolved=40 * S),
        alarm(2, raised=1 * S, ack=90 * S, escalated=80 * S),
        alarm(3, raised=2 * S, resolved=12 * S),  # nuisance
        alarm(4, rule="heart_rate.high.critical", priority="high", raised=3 * S, ack=200 * S, escalated=123 * S),
        alarm(5, rule="device.offline", kind="technical", raised=4 * S, resolved=5 * S),  # nuisance
        alarm(6, raised=-1),  # before the window
    ]
    report = alarm_report(alarms, patient_days=4, since_ms=T0, until_ms=T0 + 86_400_000, nuisance_ms=60 * S,
                          hospital_id="h1")
    total = report["total"]
    assert total["alarms"] == 5 and total["per_patient_day"] == 1.25
    assert total["acknowledged"] == 3
    assert total["time_to_acknowledge_s"] == {"median": 89.0, "p90": 197.0}
    assert (total["escalated"], total["escalation_rate"]) == (2, 0.4)
    assert (total["nuisance_candidates"], total["nuisance_rate"]) == (2, 0.4)
    spo2 = next(r for r in report["by_rule"] if r["rule_id"] == "spo2.low")
    assert (spo2["alarms"], spo2["per_patient_day"], spo2["priority"], spo2["nuisance_candidates"]) == (
        3, 0.75, "medium", 1)
    assert report["by_priority"]["high"]["alarms"] == 1
    assert [e["id"] for e in report["nuisance_examples"]] == ["a5", "a3"]
    assert report["patient_days"] == 4 and report["hospital_id"] == "h1"


def test_an_empty_window_has_no_rates() -> None:
    report = alarm_report([], 0, T0, T0 + 1)
    assert report["total"]["per_patient_day"] is None and report["total"]["escalation_rate"] is None
    assert report["by_rule"] == [] and report["nuisance_examples"] == []
