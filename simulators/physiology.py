"""Deterministic patient physiology for the simulators: plausible vitals, not uniform noise.

Each vital sign is a *target* plus an Ornstein–Uhlenbeck deviation: the target is where the
patient's physiology is heading (their baseline, moved by a clinical scenario), the deviation
is autocorrelated noise that wanders and always returns. A shared "arousal" factor moves heart
rate, breathing and blood pressure together, and compensations couple the signs the way a body
does (fever and hypoxia speed the heart, falling pressure triggers the baroreflex), so alert
rules and dashboards see the correlated patterns they will meet on a ward.

Everything is a pure function of the seed and the elapsed time: the model advances on a fixed
time grid, so the same seed gives the same value at the same second however often it is sampled.

>>> patient = Patient("demo", scenario="tachycardia", ramp_seconds=30)
>>> patient.vitals(0.0)["heart_rate"] < 100 < patient.vitals(90.0)["heart_rate"]
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from firstcare.metrics import METRICS

DEVICE_METRICS: Mapping[str, tuple[str, ...]] = {
    "monitor": ("heart_rate", "spo2", "respiratory_rate", "systolic_bp", "diastolic_bp", "temperature"),
    "oximeter": ("spo2", "heart_rate"),
    "bp": ("systolic_bp", "diastolic_bp", "heart_rate"),
    "thermometer": ("temperature",),
    "glucometer": ("glucose",),
    "scale": ("weight",),
}
"""What each device type measures: the one place the simulators decide it."""

STEP_SECONDS = 0.1

_DECIMALS = {"temperature": 1, "weight": 1}
_PLAUSIBLE = {
    "heart_rate": (25, 220),
    "spo2": (50, 100),
    "systolic_bp": (50, 250),
    "diastolic_bp": (25, 150),
    "respiratory_rate": (4, 60),
    "temperature": (33.0, 42.5),
    "glucose": (30, 600),
    "weight": (2.0, 300.0),
}
"""Clamps that keep a noisy sample a believable patient, well inside the contract's bounds."""


@dataclass(frozen=True, slots=True)
class Wander:
    """How one deviation wanders: ``theta`` is the pull back per second, ``sd`` its spread."""

    theta: float
    sd: float


_WANDER = {
    "heart_rate": Wander(0.05, 2.5),
    "spo2": Wander(0.3, 0.7),
    "systolic_bp": Wander(0.05, 2.5),
    "diastolic_bp": Wander(0.05, 2.0),
    "respiratory_rate": Wander(0.1, 1.0),
    "temperature": Wander(0.01, 0.08),
    "glucose": Wander(0.005, 5.0),
    "weight": Wander(0.001, 0.15),
}
_AROUSAL = Wander(0.02, 1.0)
_AROUSAL_GAIN = {"heart_rate": 2.0, "respiratory_rate": 0.7, "systolic_bp": 2.0, "diastolic_bp": 1.0}


@dataclass(frozen=True, slots=True)
class Baseline:
    """A patient's resting vitals, in canonical units."""

    heart_rate: float
    spo2: float
    systolic_bp: float
    diastolic_bp: float
    respiratory_rate: float
    temperature: float
    glucose: float
    weight: float

    @classmethod
    def draw(cls, rng: random.Random) -> Baseline:
        systolic = rng.uniform(105, 135)
        return cls(
            heart_rate=rng.uniform(60, 90),
            spo2=rng.uniform(95, 99),
            systolic_bp=systolic,
            diastolic_bp=max(65.0, min(rng.uniform(65, 85), systolic - 35)),
            respiratory_rate=rng.uniform(12, 18),
            temperature=rng.uniform(36.5, 37.2),
            glucose=rng.uniform(80, 140),
            weight=rng.uniform(50, 110),
        )


Scenario = Callable[[Baseline, float, float], dict[str, float]]
"""``(baseline, progress 0..1, severity 0..1) -> {metric: target}`` for the signs it drives."""


def _lerp(start: float, end: float, progress: float) -> float:
    return start + (end - start) * progress


def _stable(b: Baseline, p: float, s: float) -> dict[str, float]:
    return {}


def _tachycardia(b: Baseline, p: float, s: float) -> dict[str, float]:
    return {"heart_rate": _lerp(b.heart_rate, 130 + 30 * s, p)}


def _desaturation(b: Baseline, p: float, s: float) -> dict[str, float]:
    return {"spo2": _lerp(b.spo2, 87 - 4 * s, p)}


def _hypotension(b: Baseline, p: float, s: float) -> dict[str, float]:
    return {"systolic_bp": _lerp(b.systolic_bp, 82 - 12 * s, p)}


def _sepsis(b: Baseline, p: float, s: float) -> dict[str, float]:
    return {
        "heart_rate": _lerp(b.heart_rate, 120 + 12 * s, p),
        "respiratory_rate": _lerp(b.respiratory_rate, 25 + 5 * s, p),
        "temperature": _lerp(b.temperature, 38.8 + 0.7 * s, p),
        "systolic_bp": _lerp(b.systolic_bp, 92 - 10 * s, p),
        "glucose": _lerp(b.glucose, b.glucose + 40 * s, p),
    }


SCENARIOS: Mapping[str, Scenario] = {
    "stable": _stable,
    "tachycardia": _tachycardia,
    "desaturation": _desaturation,
    "hypotension": _hypotension,
    "sepsis": _sepsis,
}


def onset(elapsed: float, ramp_seconds: float) -> float:
    """Scenario progress 0..1: a smoothstep, so deterioration starts gently and settles."""
    if ramp_seconds <= 0:
        return 1.0
    x = min(max(elapsed / ramp_seconds, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def targets(baseline: Baseline, scenario: str, progress: float, severity: float) -> dict[str, float]:
    """Where each sign is heading: the scenario's drivers, then the body's compensations on
    every sign the scenario does not drive itself.

    >>> b = Baseline(70, 97, 120, 80, 14, 36.8, 100, 70)
    >>> round(targets(b, "hypotension", 1.0, 0.0)["heart_rate"])
    89
    """
    driven = SCENARIOS[scenario](baseline, progress, severity)
    t = asdict(baseline) | driven
    fever = max(0.0, t["temperature"] - baseline.temperature)
    hypoxia = max(0.0, baseline.spo2 - t["spo2"])
    shock = max(0.0, baseline.systolic_bp - t["systolic_bp"])
    coupled = {
        "heart_rate": 10 * fever + 1.5 * hypoxia + 0.5 * shock,
        "respiratory_rate": 2 * fever + 0.6 * hypoxia,
        "diastolic_bp": 0.4 * (t["systolic_bp"] - baseline.systolic_bp),
    }
    for name, delta in coupled.items():
        if name not in driven:
            t[name] += delta
    return t


def _settle(name: str, value: float) -> float:
    low, high = _PLAUSIBLE[name]
    metric = METRICS[name]
    value = min(max(value, low, metric.low), high, metric.high)
    decimals = _DECIMALS.get(name)
    return round(value, decimals) if decimals else round(value)


class Patient:
    """One simulated patient: deterministic for a seed, advanced on a fixed time grid.

    ``vitals(elapsed)`` never goes back in time: asking for an earlier moment than the last
    one returns the current state, so devices sharing a patient see consistent values.
    """

    def __init__(self, seed: int | str, scenario: str = "stable", ramp_seconds: float = 30.0) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
        self.scenario = scenario
        self.ramp_seconds = ramp_seconds
        self._rng = random.Random(f"physiology:{seed}")
        self.baseline = Baseline.draw(self._rng)
        self.severity = self._rng.random()
        self._deviation = {name: w.sd * self._rng.gauss() for name, w in _WANDER.items()}
        self._arousal = _AROUSAL.sd * self._rng.gauss()
        self._step = 0

    @property
    def elapsed(self) -> float:
        return self._step * STEP_SECONDS

    def vitals(self, elapsed: float) -> dict[str, float]:
        """Every sign at ``elapsed`` seconds, rounded like a device shows it."""
        while (self._step + 1) * STEP_SECONDS <= elapsed + 1e-9:
            self._advance()
        aim = targets(self.baseline, self.scenario, onset(self.elapsed, self.ramp_seconds), self.severity)
        raw = {
            name: aim[name] + self._deviation[name] + _AROUSAL_GAIN.get(name, 0.0) * self._arousal
            for name in _WANDER
        }
        raw["diastolic_bp"] = min(raw["diastolic_bp"], raw["systolic_bp"] - 15)
        return {name: _settle(name, value) for name, value in raw.items()}

    def _advance(self) -> None:
        for name, wander in _WANDER.items():
            self._deviation[name] = self._wander(self._deviation[name], wander)
        self._arousal = self._wander(self._arousal, _AROUSAL)
        self._step += 1

    def _wander(self, x: float, w: Wander) -> float:
        """Exact OU transition over one step, so the spread is ``sd`` whatever the step."""
        decay = math.exp(-w.theta * STEP_SECONDS)
        return x * decay + w.sd * math.sqrt(1 - decay * decay) * self._rng.gauss()


def measure(vitals: Mapping[str, float], device_type: str) -> dict[str, float]:
    """The part of a patient's vitals that a device of ``device_type`` reports."""
    return {name: vitals[name] for name in DEVICE_METRICS[device_type]}
