"""The alarm-fatigue report, pure: stored alarms in, figures a ward can tune its rules with out.

    alarms raised in [since, until)  ->  per (rule, priority): count, per patient-day,
                                         time to acknowledge (median, p90), escalation rate,
                                         nuisance candidates
    patient-days                         (patient, UTC day) pairs with at least one reading

Definitions (also in the README):

* **time to acknowledge**: ``acknowledged - raised`` of the alarms acknowledged at all; the
  median is the middle value (mean of the two middle ones), p90 the nearest-rank 90th percentile.
* **escalation rate**: alarms that were escalated / alarms raised.
* **nuisance candidate**: an alarm that resolved by itself (never acknowledged) within
  ``nuisance_ms`` of being raised (default 60 s): a condition that came and went before anyone
  could act, the classic cause of alarm fatigue. High-priority clinical alarms latch until
  acknowledged, so they are never candidates.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from firstcare.payloads import format_ts

NUISANCE_SECONDS = 60.0
DEFAULT_WINDOW_MS = 7 * 86_400_000
EXAMPLES = 50


def p90(values: Sequence[float]) -> float | None:
    """Nearest-rank 90th percentile: the smallest value with 90 % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)


def is_nuisance(alarm: Mapping[str, Any], nuisance_ms: int) -> bool:
    return (alarm.get("acknowledged_ms") is None and alarm.get("resolved_ms") is not None
            and alarm["resolved_ms"] - alarm["raised_ms"] <= nuisance_ms)


def _figures(alarms: Sequence[Mapping[str, Any]], patient_days: int, nuisance_ms: int) -> dict[str, Any]:
    acks = [a["acknowledged_ms"] - a["raised_ms"] for a in alarms if a.get("acknowledged_ms") is not None]
    escalated = sum(1 for a in alarms if a.get("escalated_ms") is not None)
    nuisance = sum(1 for a in alarms if is_nuisance(a, nuisance_ms))
    n = len(alarms)
    return {
        "alarms": n,
        "per_patient_day": round(n / patient_days, 3) if patient_days else None,
        "acknowledged": len(acks),
        "time_to_acknowledge_s": {"median": _seconds(median(acks)), "p90": _seconds(p90(acks))},
        "escalated": escalated,
        "escalation_rate": round(escalated / n, 4) if n else None,
        "nuisance_candidates": nuisance,
        "nuisance_rate": round(nuisance / n, 4) if n else None,
    }


def alarm_report(alarms: Iterable[Mapping[str, Any]], patient_days: int, since_ms: int, until_ms: int,
                 nuisance_ms: int = int(NUISANCE_SECONDS * 1000), hospital_id: str | None = None) -> dict[str, Any]:
    """The report over ``alarms`` (each a stored alert with ``*_ms`` times) raised in the window."""
    alarms = [a for a in alarms if since_ms <= a["raised_ms"] < until_ms]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
    priorities: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for a in alarms:
        groups[(a["rule_id"], a["priority"], a["kind"])].append(a)
        priorities[a["priority"]].append(a)
    by_rule = [
        {"rule_id": rule, "priority": priority, "kind": kind, **_figures(items, patient_days, nuisance_ms)}
        for (rule, priority, kind), items in groups.items()
    ]
    by_rule.sort(key=lambda r: (-r["alarms"], r["rule_id"]))
    nuisance = [a for a in alarms if is_nuisance(a, nuisance_ms)]
    nuisance.sort(key=lambda a: a["resolved_ms"] - a["raised_ms"])
    return {
        "hospital_id": hospital_id,
        "since": format_ts(since_ms), "until": format_ts(until_ms),
        "patient_days": patient_days,
        "nuisance_seconds": nuisance_ms / 1000,
        "total": _figures(alarms, patient_days, nuisance_ms),
        "by_priority": {p: _figures(priorities[p], patient_days, nuisance_ms)
                        for p in ("high", "medium", "low") if p in priorities},
        "by_rule": by_rule,
        "nuisance_examples": [
            {"id": a["id"], "rule_id": a["rule_id"], "priority": a["priority"], "patient_id": a.get("patient_id"),
             "device": f"{a['device_type']}/{a['device_id']}" if a.get("device_type") else None,
             "raised_at": format_ts(a["raised_ms"]), "lasted_s": _seconds(a["resolved_ms"] - a["raised_ms"])}
            for a in nuisance[:EXAMPLES]
        ],
    }
