"""Metric names, canonical units (UCUM codes), unit conversion and physiological bounds.

A value outside its bounds is not a sick patient, it is a broken sensor or a bad payload:
it is rejected, never stored as a reading and never fed to the alert rules.

>>> to_canonical("temperature", 98.6, "[degF]")
37.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


def _linear(factor: float, offset: float = 0.0) -> Callable[[float], float]:
    return lambda v: v * factor + offset


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    low: float
    high: float
    label: str
    conversions: dict[str, Callable[[float], float]] = field(default_factory=dict)

    def units(self) -> tuple[str, ...]:
        return (self.unit, *self.conversions)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("heart_rate", "/min", 0, 350, "Heart rate"),
        Metric("spo2", "%", 0, 100, "SpO2"),
        Metric("systolic_bp", "mm[Hg]", 0, 350, "Systolic BP", {"kPa": _linear(7.50062)}),
        Metric("diastolic_bp", "mm[Hg]", 0, 250, "Diastolic BP", {"kPa": _linear(7.50062)}),
        Metric("respiratory_rate", "/min", 0, 120, "Respiratory rate"),
        Metric(
            "temperature", "Cel", 10, 47, "Temperature",
            {"[degF]": lambda f: (f - 32.0) * 5.0 / 9.0, "K": _linear(1.0, -273.15)},
        ),
        Metric("glucose", "mg/dL", 0, 3000, "Glucose", {"mmol/L": _linear(18.016)}),
        Metric("weight", "kg", 0.2, 700, "Weight", {"g": _linear(0.001), "[lb_av]": _linear(0.45359237)}),
    )
}


DERIVED: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("news2", "{score}", 0, 20, "NEWS2"),
        Metric("news2_max", "{score}", 0, 3, "NEWS2 highest single-parameter score"),
    )
}
"""Values the bridge derives from readings and observations (bridge.news2_state). Alarm rules
may use them like metrics; a device can never send them (they are not in METRICS)."""


def rule_metric(name: str) -> Metric | None:
    """A metric an alarm rule may watch: a measured one or a derived one."""
    return METRICS.get(name) or DERIVED.get(name)


class MetricRejected(ValueError):
    """A metric value that cannot be accepted; ``reason`` is machine-readable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def to_canonical(name: str, value: float, unit: str | None = None) -> float:
    """Convert ``value`` in ``unit`` (canonical when None) to the canonical unit and check it.

    Raises :class:`MetricRejected` with reason ``metric_unknown``, ``unit_unknown``,
    ``value_not_finite`` or ``value_out_of_range``.
    """
    metric = METRICS.get(name)
    if metric is None:
        raise MetricRejected("metric_unknown", f"unknown metric {name!r} (one of {', '.join(METRICS)})")
    if not math.isfinite(value):
        raise MetricRejected("value_not_finite", f"{name}: value {value!r} is not a finite number")
    if unit is not None and unit != metric.unit:
        convert = metric.conversions.get(unit)
        if convert is None:
            raise MetricRejected(
                "unit_unknown", f"{name}: unknown unit {unit!r} (accepted: {', '.join(metric.units())})"
            )
        value = round(convert(value), 4)
    if not metric.low <= value <= metric.high:
        raise MetricRejected(
            "value_out_of_range",
            f"{name}: {value:g} {metric.unit} is outside the possible range "
            f"{metric.low:g}..{metric.high:g} {metric.unit}",
        )
    return float(value)
