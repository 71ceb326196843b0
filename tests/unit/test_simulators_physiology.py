"""Physiology models: deterministic, plausible, and each scenario shows its clinical signature."""

from __future__ import annotations

import random
import statistics

import pytest

from firstcare.metrics import METRICS, to_canonical
from firstcare.topics import DEVICE_TYPES
from simulators.physiology import DEVICE_METRICS, SCENARIOS, Baseline, Patient, measure, onset

SEEDS = range(20)
RAMP = 30.0


def series(patient: Patient, start: float, stop: float, step: float = 1.0) -> list[dict[str, float]]:
    return [patient.vitals(start + i * step) for i in range(int((stop - start) / step))]


def settled(scenario: str, seed: int, ramp: float = RAMP) -> dict[str, float]:
    """Median of each sign over the minute after the ramp: the scenario's steady picture."""
    samples = series(Patient(seed, scenario, ramp), ramp + 5, ramp + 65)
    return {name: statistics.median(s[name] for s in samples) for name in samples[0]}


def test_same_seed_same_patient() -> None:
    a, b = Patient(7, "sepsis"), Patient(7, "sepsis")
    assert series(a, 0, 120, 0.5) == series(b, 0, 120, 0.5)
    assert series(Patient(8, "sepsis"), 0, 120, 0.5) != series(Patient(7, "sepsis"), 0, 120, 0.5)


def test_values_depend_on_time_not_on_how_often_it_is_sampled() -> None:
    often, once = Patient("x", "tachycardia"), Patient("x", "tachycardia")
    series(often, 0, 60, 0.1)
    assert often.vitals(60.0) == once.vitals(60.0)


def test_time_never_goes_back() -> None:
    patient = Patient(1)
    later = patient.vitals(10.0)
    assert patient.vitals(5.0) == later


@pytest.mark.parametrize("seed", SEEDS)
def test_baselines_are_in_resting_ranges(seed: int) -> None:
    b = Baseline.draw(random.Random(seed))
    assert 60 <= b.heart_rate <= 90 and 95 <= b.spo2 <= 99
    assert 105 <= b.systolic_bp <= 135 and 65 <= b.diastolic_bp <= 85 and b.diastolic_bp < b.systolic_bp - 20
    assert 12 <= b.respiratory_rate <= 18 and 36.5 <= b.temperature <= 37.2
    assert 80 <= b.glucose <= 140 and 50 <= b.weight <= 110


@pytest.mark.parametrize("seed", SEEDS)
def test_stable_patient_stays_within_normal_ranges(seed: int) -> None:
    normal = {
        "heart_rate": (45, 110), "spo2": (92, 100), "systolic_bp": (90, 150), "diastolic_bp": (45, 100),
        "respiratory_rate": (8, 22), "temperature": (36.0, 37.7), "glucose": (60, 180), "weight": (45, 115),
    }
    for sample in series(Patient(seed, "stable"), 0, 600):
        for name, (low, high) in normal.items():
            assert low <= sample[name] <= high, (name, sample)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("seed", range(5))
def test_every_value_is_accepted_by_the_contract(scenario: str, seed: int) -> None:
    for sample in series(Patient(seed, scenario, ramp_seconds=20), 0, 300, 0.5):
        assert set(sample) == set(METRICS)
        for name, value in sample.items():
            assert to_canonical(name, value) == value
        assert sample["diastolic_bp"] < sample["systolic_bp"]


@pytest.mark.parametrize("seed", SEEDS)
def test_tachycardia(seed: int) -> None:
    assert Patient(seed, "tachycardia").vitals(0)["heart_rate"] < 110
    assert settled("tachycardia", seed)["heart_rate"] > 120


@pytest.mark.parametrize("seed", SEEDS)
def test_desaturation_with_compensation(seed: int) -> None:
    calm, sick = settled("stable", seed), settled("desaturation", seed)
    assert sick["spo2"] < 90
    assert sick["heart_rate"] > calm["heart_rate"] and sick["respiratory_rate"] > calm["respiratory_rate"]


@pytest.mark.parametrize("seed", SEEDS)
def test_hypotension_with_compensatory_heart_rate(seed: int) -> None:
    calm, sick = settled("stable", seed), settled("hypotension", seed)
    assert sick["systolic_bp"] < 90
    assert sick["diastolic_bp"] < calm["diastolic_bp"]
    assert sick["heart_rate"] > calm["heart_rate"] + 5


@pytest.mark.parametrize("seed", SEEDS)
def test_sepsis_moves_the_signs_together(seed: int) -> None:
    calm, sick = settled("stable", seed), settled("sepsis", seed)
    assert sick["temperature"] > 38.3 and sick["heart_rate"] > 110 and sick["respiratory_rate"] > 22
    assert sick["systolic_bp"] < calm["systolic_bp"] - 10


def test_ramp_is_configurable() -> None:
    assert onset(0, 30) == 0 and onset(15, 30) == 0.5 and onset(30, 30) == onset(99, 30) == 1
    assert onset(0, 0) == 1
    assert settled("tachycardia", 3, ramp=5)["heart_rate"] > 120
    assert Patient(3, "tachycardia", ramp_seconds=300).vitals(40)["heart_rate"] < 110


def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'zombie'"):
        Patient(1, "zombie")


def test_every_device_type_measures_known_metrics() -> None:
    assert set(DEVICE_METRICS) == DEVICE_TYPES
    vitals = Patient(1).vitals(0)
    for device_type, names in DEVICE_METRICS.items():
        assert names and set(names) <= set(METRICS)
        assert list(measure(vitals, device_type)) == list(names)
