"""NEWS2, the National Early Warning Score 2 (Royal College of Physicians, 2017): pure scoring.

Implemented from the RCP chart. Each of seven parameters scores 0..3, the total 0..20::

    parameter              3        2        1        0          1         2         3
    respiration rate /min  <=8               9-11     12-20                21-24     >=25
    SpO2 scale 1 %         <=91     92-93    94-95    >=96
    SpO2 scale 2 %         <=83     84-85    86-87    88-92      93-94 O2  95-96 O2  >=97 O2
                                                      >=93 on air
    air or oxygen                   oxygen            air
    systolic BP mmHg       <=90     91-100   101-110  111-219                          >=220
    pulse /min             <=40              41-50    51-90      91-110    111-130   >=131
    consciousness (ACVPU)                             A                              C, V, P, U
    temperature Cel        <=35.0            35.1-36.0 36.1-38.0 38.1-39.0 >=39.1

Values are scored as the chart is filled in: respiration rate, SpO2, systolic pressure and pulse
in whole numbers, temperature to one decimal, both rounded half up (a device's 20.5 /min is
charted as 21). Clinical risk: **high** at a total of 7 or more, **medium** at 5-6,
**low-medium** when any single parameter scores 3 (total below 5), else **low**.

A score is built from the inputs known now. An input that is missing, or older than its
freshness limit (:data:`MAX_AGE_MS`), is left out and named; such a score is *incomplete*
and is a **lower bound** of the complete one: every parameter adds 0 or more, so the complete
total is at least the partial total, and its band at least the partial band. SpO2 on scale 2
at 93 % or more needs to know air or oxygen; without it, the air score (0) is the lower bound.

>>> s = score({"respiratory_rate": Input(26, 0), "heart_rate": Input(125, 0)}, now_ms=0)
>>> (s.total, s.band, s.complete, s.missing[:2])
(5, 'medium', False, ('spo2', 'supplemental_oxygen'))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from firstcare.payloads import format_ts

PARAMETERS: tuple[str, ...] = (
    "respiratory_rate", "spo2", "supplemental_oxygen", "systolic_bp", "heart_rate", "consciousness", "temperature",
)
"""The seven NEWS2 parameters, in chart order."""

DEVICE_PARAMETERS = frozenset({"respiratory_rate", "spo2", "systolic_bp", "heart_rate", "temperature"})
"""Parameters that devices measure (metric names of firstcare.metrics)."""

CLINICIAN_PARAMETERS = frozenset({"supplemental_oxygen", "consciousness"})
"""Parameters only a clinician records (POST /api/patients/{pid}/observations)."""

ACVPU = ("A", "C", "V", "P", "U")
"""Alert, new Confusion, responds to Voice, responds to Pain, Unresponsive."""

BANDS = ("low", "low-medium", "medium", "high")
"""Clinical risk bands, lowest first (the index is the band's rank)."""

SCALES = (1, 2)

_MINUTE = 60_000
MAX_AGE_MS: Mapping[str, int] = {
    # vital signs that monitors stream: hourly is the RCP minimum observation frequency from a
    # total of 5 or a single 3, exactly when the score matters most
    "respiratory_rate": 60 * _MINUTE,
    "spo2": 60 * _MINUTE,
    "heart_rate": 60 * _MINUTE,
    # usually spot checks: 4-hourly is the RCP minimum for a total of 1-4
    "systolic_bp": 4 * 60 * _MINUTE,
    "temperature": 4 * 60 * _MINUTE,
    # recorded by a nurse at each observation round: 12-hourly is the RCP minimum for a total of 0
    "supplemental_oxygen": 12 * 60 * _MINUTE,
    "consciousness": 12 * 60 * _MINUTE,
}
"""How long an input counts as describing the patient now (milliseconds)."""


@dataclass(frozen=True, slots=True)
class Input:
    """One input value: a number for vital signs, a bool for oxygen (True = on oxygen), an
    ACVPU letter for consciousness. ``ts_ms`` is when it was measured or observed."""

    value: float | bool | str
    ts_ms: int
    source: str = ""


@dataclass(frozen=True, slots=True)
class Part:
    """One parameter's contribution: the charted value and its score (0..3)."""

    value: float | bool | str
    score: int
    ts_ms: int
    source: str


@dataclass(frozen=True, slots=True)
class Score:
    total: int
    band: str
    complete: bool
    parts: Mapping[str, Part]  # the parameters that were scored (fresh inputs only)
    missing: tuple[str, ...]  # never recorded
    stale: tuple[str, ...]  # recorded, but older than MAX_AGE_MS
    spo2_scale: int
    computed_ms: int
    max_part: int  # the highest single-parameter score (3 makes a low score low-medium)

    @property
    def band_rank(self) -> int:
        return BANDS.index(self.band)

    def signature(self) -> tuple[Any, ...]:
        """What a clinician sees change: the scores, not every new value behind them."""
        return (self.total, self.band, self.complete, self.missing, self.stale, self.spo2_scale,
                tuple(sorted((name, p.score) for name, p in self.parts.items())))


# ------------------------------------------------------------------------------ per parameter


def _half_up(value: float, quantum: str) -> Decimal:
    return Decimal(repr(float(value))).quantize(Decimal(quantum), rounding=ROUND_HALF_UP)


def charted(parameter: str, value: float) -> float:
    """The value as written on the chart: whole numbers, temperature to 0.1 (half up)."""
    if isinstance(value, float) and value.is_integer():  # most device values: charted as they are
        return value
    if parameter == "temperature":
        return float(_half_up(value, "0.1"))
    return float(_half_up(value, "1"))


def score_respiratory_rate(value: float) -> int:
    v = charted("respiratory_rate", value)
    if v <= 8:
        return 3
    if v <= 11:
        return 1
    if v <= 20:
        return 0
    if v <= 24:
        return 2
    return 3


def score_spo2_scale1(value: float) -> int:
    v = charted("spo2", value)
    if v <= 91:
        return 3
    if v <= 93:
        return 2
    if v <= 95:
        return 1
    return 0


def score_spo2_scale2(value: float, on_oxygen: bool | None) -> int:
    """Scale 2, for hypercapnic respiratory failure (target 88-92 %). At 93 % or more only a
    patient on oxygen scores; ``on_oxygen=None`` (unknown) scores as air, the lower bound."""
    v = charted("spo2", value)
    if v <= 83:
        return 3
    if v <= 85:
        return 2
    if v <= 87:
        return 1
    if v <= 92 or not on_oxygen:
        return 0
    if v <= 94:
        return 1
    if v <= 96:
        return 2
    return 3


def score_supplemental_oxygen(on_oxygen: bool) -> int:
    return 2 if on_oxygen else 0


def score_systolic_bp(value: float) -> int:
    v = charted("systolic_bp", value)
    if v <= 90:
        return 3
    if v <= 100:
        return 2
    if v <= 110:
        return 1
    if v <= 219:
        return 0
    return 3


def score_heart_rate(value: float) -> int:
    v = charted("heart_rate", value)
    if v <= 40:
        return 3
    if v <= 50:
        return 1
    if v <= 90:
        return 0
    if v <= 110:
        return 1
    if v <= 130:
        return 2
    return 3


def score_consciousness(level: str) -> int:
    if level not in ACVPU:
        raise ValueError(f"consciousness must be one of {', '.join(ACVPU)}, got {level!r}")
    return 0 if level == "A" else 3


def score_temperature(value: float) -> int:
    v = charted("temperature", value)
    if v <= 35.0:
        return 3
    if v <= 36.0:
        return 1
    if v <= 38.0:
        return 0
    if v <= 39.0:
        return 1
    return 2


def band(total: int, max_part: int) -> str:
    """Clinical risk from the total and the highest single-parameter score."""
    if total >= 7:
        return "high"
    if total >= 5:
        return "medium"
    if max_part >= 3:
        return "low-medium"
    return "low"


# ----------------------------------------------------------------------------------- total


def score(inputs: Mapping[str, Input], now_ms: int, spo2_scale: int = 1,
          max_age_ms: Mapping[str, int] = MAX_AGE_MS) -> Score:
    """Score what is known at ``now_ms``; missing and stale inputs are named, never guessed."""
    if spo2_scale not in SCALES:
        raise ValueError(f"spo2_scale must be 1 or 2, got {spo2_scale!r}")
    unknown = set(inputs) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"unknown NEWS2 input(s): {', '.join(sorted(unknown))}")
    fresh: dict[str, Input] = {}
    missing: list[str] = []
    stale: list[str] = []
    for name in PARAMETERS:
        found = inputs.get(name)
        if found is None:
            missing.append(name)
        elif now_ms - found.ts_ms > max_age_ms[name]:
            stale.append(name)
        else:
            fresh[name] = found
    oxygen = fresh.get("supplemental_oxygen")
    on_oxygen = bool(oxygen.value) if oxygen is not None else None
    parts: dict[str, Part] = {}
    for name, found in fresh.items():
        value = found.value
        if name == "supplemental_oxygen":
            points = score_supplemental_oxygen(bool(value))
            shown: float | bool | str = bool(value)
        elif name == "consciousness":
            points = score_consciousness(str(value))
            shown = str(value)
        else:
            number = float(value)
            shown = charted(name, number)
            if name == "spo2":
                points = score_spo2_scale1(number) if spo2_scale == 1 else score_spo2_scale2(number, on_oxygen)
            else:
                points = _VITAL_SCORERS[name](number)
        parts[name] = Part(shown, points, found.ts_ms, found.source)
    total = sum(p.score for p in parts.values())
    max_part = max((p.score for p in parts.values()), default=0)
    return Score(total=total, band=band(total, max_part), complete=not missing and not stale, parts=parts,
                 missing=tuple(missing), stale=tuple(stale), spo2_scale=spo2_scale, computed_ms=now_ms,
                 max_part=max_part)


_VITAL_SCORERS = {
    "respiratory_rate": score_respiratory_rate,
    "systolic_bp": score_systolic_bp,
    "heart_rate": score_heart_rate,
    "temperature": score_temperature,
}


def next_expiry(inputs: Mapping[str, Input], now_ms: int, max_age_ms: Mapping[str, int] = MAX_AGE_MS) -> int | None:
    """When the next still-fresh input goes stale (epoch ms), or None if none will."""
    due = [i.ts_ms + max_age_ms[name] for name, i in inputs.items() if now_ms - i.ts_ms <= max_age_ms[name]]
    return min(due) + 1 if due else None


def score_json(s: Score) -> dict[str, Any]:
    """The wire form of a score (REST, events)."""
    return {
        "total": s.total, "band": s.band, "complete": s.complete,
        "lower_bound": not s.complete,
        "missing": list(s.missing), "stale": list(s.stale), "spo2_scale": s.spo2_scale,
        "max_parameter_score": s.max_part,
        "parameters": {
            name: {"value": p.value, "score": p.score, "ts": format_ts(p.ts_ms), "source": p.source}
            for name, p in s.parts.items()
        },
        "computed_at": format_ts(s.computed_ms),
    }


__all__ = [
    "ACVPU", "BANDS", "CLINICIAN_PARAMETERS", "DEVICE_PARAMETERS", "Input", "MAX_AGE_MS", "PARAMETERS", "Part",
    "SCALES", "Score", "band", "charted", "next_expiry", "score", "score_consciousness", "score_heart_rate",
    "score_json", "score_respiratory_rate", "score_spo2_scale1", "score_spo2_scale2",
    "score_supplemental_oxygen", "score_systolic_bp", "score_temperature",
]
