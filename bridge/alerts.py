"""Clinical and technical alarms: rules as data, evaluated by a pure, deterministic engine.

Nothing here does I/O or reads a clock: every method takes ``now_ms`` (epoch milliseconds) and
alert ids come from an injected factory, so the same inputs always give the same transitions and
the whole lifecycle is testable without sleeping. The caller stores every :class:`Transition`
before publishing it (an alarm is persisted before it is fanned out) and restores the active
alerts with :meth:`AlertBook.load_active` after a restart.

Lifecycle of one alert, keyed by (subject, rule_id), at most one active per key::

                      timeout, unacknowledged (once)
                   +-----------------------------> ESCALATED ---------------+
                   |                                   | acknowledge        | clears (*)
                   |                                   v                    v
    pending --> RAISED ------- acknowledge ------> ACKNOWLEDGED -- clears --> RESOLVED
      ^  |         |                                                        ^
      +--+         +-------------------- clears (*) ------------------------+
  abnormal x delay_readings, over >= delay_seconds (a normal reading restarts the count)

    (*) non-latching only. A latching alert (high priority by default) whose condition clears
        while unacknowledged stays RAISED/ESCALATED with ``condition_active=False``;
        acknowledging it then resolves it at once (two transitions).

    * Another abnormal value on an active alert is an "updated" transition (value, count + 1),
      never a second alert; it also re-arms a cleared latching alert (``condition_active=True``).
    * Clearing uses hysteresis: the value must pass ``clear``, not merely the threshold; a value
      in between neither raises, nor clears, nor counts towards the condition delay.

Technical alarms use the same book with subject ``device:{type}:{id}``: device offline, device
silent, low battery (a threshold rule with hysteresis) and sequence gaps (an event: latched until
acknowledged). An edge gateway's status (``gateway:{hospital}:{gateway}``) turns into conditions
by :func:`gateway_conditions` (pure): a spool discarding readings, a spool near its bound, and
messages held in its quarantine; each alarm is raised while its condition holds and resolved
when the gateway reports it gone.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path

import yaml

from firstcare.errors import FirstCareError
from firstcare.metrics import DERIVED, METRICS, rule_metric
from firstcare.payloads import GatewayStatus, Reading

PRIORITIES = ("high", "medium", "low")  # IEC 60601-1-8
OPS = ("above", "below")
KINDS = ("clinical", "technical")


class AlertState(StrEnum):
    """Where an alarm is in its lifecycle; the value is what the database, the API and the
    events spell."""

    RAISED = "raised"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    RESOLVED = "resolved"


class AlertAction(StrEnum):
    """What one transition did to an alarm (``patient.alert.<action>`` events; stored in its
    history). ``updated`` (a re-trigger, a new value) is stored but not published."""

    RAISED = "raised"
    UPDATED = "updated"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    RESOLVED = "resolved"


STATES = tuple(AlertState)
ACTIONS = tuple(AlertAction)
ACTIVE_STATES = (AlertState.RAISED, AlertState.ACKNOWLEDGED, AlertState.ESCALATED)

RULES_FILE = Path(__file__).with_name("alert_rules.yaml")
RULE_ID_PATTERN = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")

# Technical alarms describe the platform, not the patient, so they are constants, not YAML.
DEVICE_OFFLINE = "device.offline"
DEVICE_SILENT = "device.silent"
DEVICE_BATTERY_LOW = "device.battery_low"
DEVICE_SEQ_GAP = "device.seq_gap"
INGEST_SESSION_LOST = "ingest.session_lost"
GATEWAY_SPOOL_EVICTING = "gateway.spool_evicting"
GATEWAY_SPOOL_NEAR_FULL = "gateway.spool_near_full"
GATEWAY_QUARANTINE = "gateway.quarantine"
TECHNICAL_PRIORITY = {
    GATEWAY_SPOOL_EVICTING: "medium",  # readings are being thrown away at the ward: someone must look
    GATEWAY_QUARANTINE: "medium",  # readings held back from the record until someone acts
    GATEWAY_SPOOL_NEAR_FULL: "low",  # nothing lost yet
    INGEST_SESSION_LOST: "medium",  # readings of a whole hospital may be gone: someone must look
    DEVICE_OFFLINE: "medium",  # no data at all: someone must look, but it is not a clinical emergency
    DEVICE_SILENT: "medium",
    DEVICE_BATTERY_LOW: "low",  # minutes to hours left: a task, not an emergency
    DEVICE_SEQ_GAP: "low",  # data already lost: worth knowing, nothing to rush for
}
TECHNICAL_MESSAGES = {
    GATEWAY_SPOOL_EVICTING: "Readings discarded at an edge gateway: its spool is full (uplink down or too slow)",
    GATEWAY_SPOOL_NEAR_FULL: "Edge gateway spool nearly full: readings will be discarded if the uplink stays down",
    GATEWAY_QUARANTINE: "Readings held at an edge gateway: the upstream broker refused them"
                        " (`firstcare edge quarantine list` on the gateway)",
    INGEST_SESSION_LOST: "Readings may be lost: the MQTT broker lost the bridge's session and its queue",
    DEVICE_OFFLINE: "Device offline: no connection to the device",
    DEVICE_SILENT: "Device silent: no data within its expected interval",
    DEVICE_BATTERY_LOW: "Device battery low",
    DEVICE_SEQ_GAP: "Readings missing: gap in the device's sequence numbers",
}
BATTERY_LOW_BELOW = 20  # percent: raised when level < this
BATTERY_CLEAR_AT = 25  # percent: cleared when level >= this (hysteresis: a level hovering at 20 does not flap)

# How many resolved alerts the book remembers, so acknowledging one late says "not active"
# rather than "not found". Bounded because the book lives as long as the process.
RESOLVED_MEMORY = 10_000


class AlertError(FirstCareError, ValueError):
    """An alert operation that cannot be done; ``reason`` is machine-readable.

    ``alert_not_found``, ``alert_not_active``, ``alert_already_acknowledged``,
    ``acknowledged_by_missing``.
    """

    reason = "alert_error"


# --------------------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rule:
    """One threshold rule over one metric, in the metric's canonical unit."""

    id: str
    metric: str
    op: str  # "above" | "below"
    threshold: float  # condition: value > threshold (above) / value < threshold (below)
    clear: float  # hysteresis: clears only when value <= clear (above) / >= clear (below)
    priority: str
    delay_readings: int = 1
    delay_seconds: float = 0
    latching: bool | None = None  # None: True for high priority (IEC: high alarms latch)
    message: str = ""

    def __post_init__(self) -> None:
        # Resolve the default once so every reader of ``latching`` sees a bool.
        if self.latching is None:
            object.__setattr__(self, "latching", self.priority == "high")

    def classify(self, value: float) -> str:
        """``abnormal`` past the threshold, ``clear`` past the clear point, else ``band``."""
        if self.op == "above":
            return "abnormal" if value > self.threshold else "clear" if value <= self.clear else "band"
        return "abnormal" if value < self.threshold else "clear" if value >= self.clear else "band"


_RULE_FIELDS = tuple(f.name for f in fields(Rule))
_REQUIRED = ("id", "metric", "op", "threshold", "clear", "priority")


def _fail(rule_id: object, field: str, problem: str) -> ValueError:
    return ValueError(f"alert rule {rule_id!s}: field {field!r}: {problem}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_rule(rule: Rule) -> Rule:
    """Refuse a rule that can never fire, never clear, or fires on nonsense (ValueError)."""
    rid = rule.id
    if not isinstance(rid, str) or not RULE_ID_PATTERN.fullmatch(rid):
        raise _fail(rid, "id", "must be dotted lower-case words, e.g. 'spo2.low'")
    if rid.startswith(("device.", "gateway.")):
        raise _fail(rid, "id", "'device.' and 'gateway.' are reserved for technical alarms")
    metric = rule_metric(rule.metric) if isinstance(rule.metric, str) else None
    if metric is None:
        raise _fail(rid, "metric", f"unknown metric {rule.metric!r} (one of {', '.join([*METRICS, *DERIVED])})")
    if rule.op not in OPS:
        raise _fail(rid, "op", f"{rule.op!r} is not one of {', '.join(OPS)}")
    if rule.priority not in PRIORITIES:
        raise _fail(rid, "priority", f"{rule.priority!r} is not one of {', '.join(PRIORITIES)}")
    for name in ("threshold", "clear"):
        value = getattr(rule, name)
        if not _is_number(value):
            raise _fail(rid, name, f"{value!r} is not a finite number")
        if not metric.low <= value <= metric.high:
            raise _fail(
                rid, name, f"{value:g} is outside the possible range {metric.low:g}..{metric.high:g} {metric.unit}"
            )
    if rule.op == "above" and rule.clear > rule.threshold:
        raise _fail(rid, "clear", f"{rule.clear:g} must be <= threshold {rule.threshold:g} for 'above'")
    if rule.op == "below" and rule.clear < rule.threshold:
        raise _fail(rid, "clear", f"{rule.clear:g} must be >= threshold {rule.threshold:g} for 'below'")
    if not isinstance(rule.delay_readings, int) or isinstance(rule.delay_readings, bool) or rule.delay_readings < 1:
        raise _fail(rid, "delay_readings", f"{rule.delay_readings!r} must be an integer >= 1")
    if not _is_number(rule.delay_seconds) or rule.delay_seconds < 0:
        raise _fail(rid, "delay_seconds", f"{rule.delay_seconds!r} must be a number >= 0")
    if not isinstance(rule.latching, bool):
        raise _fail(rid, "latching", f"{rule.latching!r} must be true, false or omitted")
    if not isinstance(rule.message, str):
        raise _fail(rid, "message", f"{rule.message!r} must be a string")
    return rule


def _check_unique(rules: Iterable[Rule]) -> None:
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise _fail(rule.id, "id", "duplicate rule id")
        seen.add(rule.id)


def _rule_from_mapping(index: int, raw: object) -> Rule:
    if not isinstance(raw, dict):
        raise _fail(f"#{index}", "-", f"each rule must be a mapping, got {type(raw).__name__}")
    rid = raw.get("id", f"#{index}")
    unknown = sorted(str(k) for k in raw if k not in _RULE_FIELDS)
    if unknown:
        raise _fail(rid, unknown[0], f"unknown field (known: {', '.join(_RULE_FIELDS)})")
    for name in _REQUIRED:
        if name not in raw:
            raise _fail(rid, name, "missing")
    values = dict(raw)
    for name in ("threshold", "clear", "delay_seconds"):
        if name in values and _is_number(values[name]):
            values[name] = float(values[name])
    if values.get("message") is None:
        values["message"] = ""
    rule = validate_rule(Rule(**values))
    if not rule.message:
        rule = replace(rule, message=_default_message(rule))
    return rule


def _default_message(rule: Rule) -> str:
    metric = rule_metric(rule.metric)
    assert metric is not None  # validated
    return f"{metric.label} {rule.op} {rule.threshold:g} {metric.unit}"


def load_rules(text: str) -> list[Rule]:
    """Parse rules YAML (``rules:`` list) and validate it; ValueError names the rule and field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"alert rules: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"rules"} or not isinstance(doc["rules"], list):
        raise ValueError("alert rules: the document must be a mapping with one key, 'rules', holding a list")
    rules = [_rule_from_mapping(i, raw) for i, raw in enumerate(doc["rules"])]
    _check_unique(rules)
    return rules


def default_rules() -> list[Rule]:
    """The adult defaults shipped next to this module (a fresh list each call)."""
    return load_rules(RULES_FILE.read_text(encoding="utf-8"))


@dataclass(frozen=True, slots=True)
class RuleOverride:
    """A per-patient change to one rule, set by a clinician through the API."""

    threshold: float | None = None
    clear: float | None = None  # None with a new threshold: keep the rule's hysteresis width
    enabled: bool = True


def apply_overrides(rules: Iterable[Rule], overrides: Mapping[str, RuleOverride]) -> list[Rule]:
    """The rules with ``overrides`` applied (disabled ones dropped), validated like load_rules.

    Overriding only the threshold moves the clear point with it, so the hysteresis the rule
    was designed with is kept instead of ending up on the wrong side of the new threshold.
    """
    rules = list(rules)
    known = {rule.id for rule in rules}
    for rid, override in overrides.items():
        if rid not in known:
            raise _fail(rid, "id", "no such rule to override")
        if not isinstance(override, RuleOverride):
            raise _fail(rid, "-", f"override must be a RuleOverride, got {type(override).__name__}")
        for name in ("threshold", "clear"):
            value = getattr(override, name)
            if value is not None and not _is_number(value):
                raise _fail(rid, name, f"{value!r} is not a finite number")
        if not isinstance(override.enabled, bool):
            raise _fail(rid, "enabled", f"{override.enabled!r} must be true or false")
    result: list[Rule] = []
    for rule in rules:
        found = overrides.get(rule.id)
        if found is None:
            result.append(rule)
            continue
        override = found
        if not override.enabled:
            continue
        threshold = rule.threshold if override.threshold is None else float(override.threshold)
        clear = float(override.clear) if override.clear is not None else rule.clear + (threshold - rule.threshold)
        result.append(validate_rule(replace(rule, threshold=threshold, clear=clear)))
    return result


# -------------------------------------------------------------------------------------- alerts


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    rule_id: str
    kind: str  # "clinical" | "technical"
    priority: str
    state: AlertState
    subject: str  # "patient:{pid}" for clinical, "device:{type}:{id}" for technical
    patient_id: str | None
    hospital_id: str
    device_type: str | None
    device_id: str | None
    metric: str | None
    value: float | None  # latest triggering value
    threshold: float | None
    message: str
    latching: bool
    condition_active: bool  # is the condition still present?
    raised_ms: int
    updated_ms: int
    acknowledged_by: str | None = None
    acknowledged_ms: int | None = None
    escalated_ms: int | None = None
    resolved_ms: int | None = None
    count: int = 1  # re-triggers / occurrences (for a seq gap: readings missing in total)

    def __post_init__(self) -> None:
        if type(self.state) is not AlertState:  # a row read back from a store holds the plain string
            object.__setattr__(self, "state", AlertState(self.state))

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.rule_id)

    @property
    def active(self) -> bool:
        return self.state != AlertState.RESOLVED


@dataclass(frozen=True, slots=True)
class Transition:
    action: AlertAction
    alert: Alert  # the alert AFTER the transition
    at_ms: int
    device_ms: int | None = None  # the device's own time of the reading behind it (latency metrics)


@dataclass(frozen=True, slots=True)
class Pending:
    """An abnormal run not yet long enough to raise: how many readings, from the earliest
    to the latest device time counted (persisted, so another bridge continues the count)."""

    count: int
    first_ms: int
    last_ms: int

    def add(self, ts_ms: int) -> Pending:
        return Pending(self.count + 1, min(self.first_ms, ts_ms), max(self.last_ms, ts_ms))


def patient_subject(patient_id: str) -> str:
    return f"patient:{patient_id}"


def device_subject(device_type: str, device_id: str) -> str:
    return f"device:{device_type}:{device_id}"


def gateway_subject(hospital_id: str, gateway_id: str) -> str:
    return f"gateway:{hospital_id}:{gateway_id}"


@dataclass(frozen=True, slots=True)
class GatewayCondition:
    """One technical condition an edge gateway reports: holds or not, with a value to show."""

    rule_id: str
    active: bool
    value: float
    detail: str


def gateway_conditions(gateway_id: str, status: GatewayStatus) -> list[GatewayCondition]:
    """What a gateway's status says about its spool and quarantine; a status without those
    parts (its will, an older gateway) says nothing, so nothing is raised or cleared by it.

    >>> from firstcare.payloads import GatewayQuarantine
    >>> [c.rule_id for c in gateway_conditions("ward-3", GatewayStatus("online", quarantine=GatewayQuarantine(2, 2)))
    ...  if c.active]
    ['gateway.quarantine']
    """
    out: list[GatewayCondition] = []
    spool = status.spool
    if spool is not None:
        discarded = spool.discarded_full + spool.discarded_too_old
        waiting = f"{spool.depth} messages waiting, the oldest {spool.oldest_age_s:.0f} s old"
        out.append(GatewayCondition(GATEWAY_SPOOL_EVICTING, spool.evicting, float(discarded),
                                    f"gateway {gateway_id}: {discarded} readings discarded so far ({waiting})"))
        used = round(100 * spool.bytes / spool.max_bytes, 1) if spool.max_bytes > 0 else 0.0
        out.append(GatewayCondition(GATEWAY_SPOOL_NEAR_FULL, spool.near_full, used,
                                    f"gateway {gateway_id}: spool {used:g}% of its bound ({waiting})"))
    quarantine = status.quarantine
    if quarantine is not None:
        out.append(GatewayCondition(GATEWAY_QUARANTINE, quarantine.depth > 0, float(quarantine.depth),
                                    f"gateway {gateway_id}: {quarantine.depth} message(s) quarantined, the oldest"
                                    f" received {quarantine.oldest_age_s:.0f} s ago"))
    return out


def ingest_subject(hospital_id: str) -> str:
    """System alarms about ingest are raised once per hospital, so each hospital's staff see
    (and acknowledge) their own."""
    return f"ingest:{hospital_id}"


# A threshold rule for the battery, so low battery gets the same delay/hysteresis logic as
# vitals. It is built directly (not validated) because "battery" is not a vitals metric.
BATTERY_RULE = Rule(
    DEVICE_BATTERY_LOW, "battery", "below", float(BATTERY_LOW_BELOW), float(BATTERY_CLEAR_AT),
    TECHNICAL_PRIORITY[DEVICE_BATTERY_LOW], latching=False, message=TECHNICAL_MESSAGES[DEVICE_BATTERY_LOW],
)


@dataclass(frozen=True, slots=True)
class _Context:
    """Who an alert is about, for building it: the parts that differ between kinds."""

    kind: str
    subject: str
    patient_id: str | None
    hospital_id: str
    device_type: str | None
    device_id: str | None


class AlertBook:
    """Active alerts and pending condition delays. Mutable, but deterministic and I/O free.

    The bridge builds one per transaction from the state of the subjects that transaction
    locked (:mod:`bridge.state`), so several bridge processes can share one database; a test
    may keep one for a whole lifecycle. Every change comes back as a list of transitions in a
    stable order (rule order for a reading), for the caller to store and then publish.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        new_id: Callable[[], str],
        overrides: Mapping[str, Mapping[str, RuleOverride]] | None = None,
    ) -> None:
        self._rules = [validate_rule(rule) for rule in rules]
        _check_unique(self._rules)
        self._new_id = new_id
        self._overrides: dict[str, dict[str, RuleOverride]] = {}
        self._patient_rules: dict[str, list[Rule]] = {}
        self._active: dict[tuple[str, str], Alert] = {}
        self._by_id: dict[str, tuple[str, str]] = {}
        self._pending: dict[tuple[str, str], Pending] = {}
        self._resolved: OrderedDict[str, Alert] = OrderedDict()
        for patient_id, patient_overrides in (overrides or {}).items():
            self.set_overrides(patient_id, patient_overrides)

    # ------------------------------------------------------------------ rules and overrides

    def rules_for(self, patient_id: str | None) -> list[Rule]:
        """The rules in force for this patient: the defaults with their overrides applied."""
        if patient_id is None:
            return list(self._rules)
        return list(self._patient_rules.get(patient_id, self._rules))

    def set_overrides(
        self, patient_id: str, overrides: Mapping[str, RuleOverride], now_ms: int | None = None
    ) -> list[Transition]:
        """Replace this patient's overrides (an empty mapping removes them).

        Validated before anything changes. The patient's pending delays restart, since they
        were counted against the old thresholds. With ``now_ms``, an active alert whose rule
        was just disabled is resolved (its condition can no longer be evaluated); without it,
        such an alert is resolved when acknowledged.
        """
        effective = apply_overrides(self._rules, overrides)
        if overrides:
            self._overrides[patient_id] = dict(overrides)
            self._patient_rules[patient_id] = effective
        else:
            self._overrides.pop(patient_id, None)
            self._patient_rules.pop(patient_id, None)
        subject = patient_subject(patient_id)
        for key in [k for k in self._pending if k[0] == subject]:
            del self._pending[key]
        if now_ms is None:
            return []
        in_force = {rule.id for rule in effective}
        return [
            self._resolve(alert, now_ms)
            for alert in list(self._active.values())
            if alert.kind == "clinical" and alert.subject == subject and alert.rule_id not in in_force
        ]

    # ------------------------------------------------------------------------- state access

    def load_pending(self, pending: Mapping[tuple[str, str], Pending]) -> None:
        """Restore pending condition delays (keyed by (subject, rule id)) from the store."""
        self._pending.update(pending)

    def pending(self) -> dict[tuple[str, str], Pending]:
        """The pending condition delays, for the caller to store with the transitions."""
        return dict(self._pending)

    def load_active(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Restore active alerts after a restart; returns the ones it did not take.

        Resolved alerts are skipped. If the store holds two active alerts for one key (which
        should not happen), the most recently updated wins and the other is returned so the
        caller can log or resolve it, rather than crashing the bridge on start.
        """
        skipped: list[Alert] = []
        for alert in alerts:
            if not alert.active:
                skipped.append(alert)
                continue
            current = self._active.get(alert.key)
            if current is not None:
                if (current.updated_ms, current.raised_ms) >= (alert.updated_ms, alert.raised_ms):
                    skipped.append(alert)
                    continue
                skipped.append(current)
                del self._by_id[current.id]
            self._store(alert)
        return skipped

    def active(self) -> list[Alert]:
        return list(self._active.values())

    def active_count(self) -> int:
        return len(self._active)

    def get(self, alert_id: str) -> Alert | None:
        """An active alert, or a recently resolved one."""
        key = self._by_id.get(alert_id)
        if key is not None:
            return self._active[key]
        return self._resolved.get(alert_id)

    # -------------------------------------------------------------------------- clinical

    def evaluate(self, reading: Reading, now_ms: int | None = None, *, late: bool = False) -> list[Transition]:
        """Run the patient's rules over one reading.

        ``now_ms`` (default: the reading's receive time) stamps the transitions and starts the
        escalation clock. The condition delay is measured on the readings' own ``ts_ms``, so a
        gateway backlog replayed in one burst raises (and clears) as it did at the bedside.

        ``late``: the reading is older than one of its device already evaluated (it arrived
        out of order, e.g. through another bridge). It may prove a condition (an abnormal value
        counts towards the delay, raises or re-triggers) but never its absence: a normal or
        in-between value neither breaks a pending run nor clears an alarm, because the newer
        reading already decided that (docs/cluster-state.md).
        """
        if reading.patient_id is None:
            return []
        now = reading.received_ms if now_ms is None else now_ms
        ctx = _Context(
            "clinical", patient_subject(reading.patient_id), reading.patient_id, reading.hospital_id,
            reading.device_type, reading.device_id,
        )
        transitions: list[Transition] = []
        for rule in self.rules_for(reading.patient_id):
            value = reading.metrics.get(rule.metric)
            if value is not None:
                transitions += self._step(rule, ctx, float(value), reading.ts_ms, now, late)
        return [replace(t, device_ms=reading.ts_ms) for t in transitions]

    def evaluate_derived(self, patient_id: str, hospital_id: str, values: Mapping[str, float], ts_ms: int,
                         now_ms: int, *, lower_bound: bool = False) -> list[Transition]:
        """Run the patient's rules over values derived from several readings (NEWS2), exactly
        like a reading's metrics: same delay, hysteresis, latching and escalation.

        ``lower_bound`` says the values may grow once missing inputs are known (an incomplete
        NEWS2). Such a value can prove an ``above`` condition but never its absence: it may
        raise or re-trigger an alarm, and is ignored otherwise, so a score that drops because
        an input went missing never clears or resets an alarm.
        """
        ctx = _Context("clinical", patient_subject(patient_id), patient_id, hospital_id, None, None)
        transitions: list[Transition] = []
        for rule in self.rules_for(patient_id):
            value = values.get(rule.metric)
            if value is None:
                continue
            if lower_bound and (rule.op != "above" or rule.classify(float(value)) != "abnormal"):
                continue
            transitions += self._step(rule, ctx, float(value), ts_ms, now_ms)
        return transitions

    def _step(self, rule: Rule, ctx: _Context, value: float, ts_ms: int, now_ms: int, late: bool = False
              ) -> list[Transition]:
        """One value against one threshold rule: the heart of the state machine."""
        key = (ctx.subject, rule.id)
        verdict = rule.classify(value)
        if late and verdict != "abnormal":
            return []  # a late value proves a condition, never its absence (see evaluate)
        alert = self._active.get(key)
        if alert is None:
            if verdict != "abnormal":
                self._pending.pop(key, None)  # the run of abnormal readings is broken
                return []
            pending = self._pending.get(key)
            pending = Pending(1, ts_ms, ts_ms) if pending is None else pending.add(ts_ms)
            if pending.count < rule.delay_readings or pending.last_ms - pending.first_ms < rule.delay_seconds * 1000:
                self._pending[key] = pending
                return []
            self._pending.pop(key, None)
            return [self._raise(rule, ctx, value, now_ms, condition_active=True, count=1)]
        if verdict == "abnormal":
            updated = replace(
                alert, value=value, threshold=rule.threshold, condition_active=True, updated_ms=now_ms,
                count=alert.count + 1, hospital_id=ctx.hospital_id, device_type=ctx.device_type,
                device_id=ctx.device_id,
            )
            return [self._put(AlertAction.UPDATED, updated, now_ms)]
        if verdict == "clear" and alert.condition_active:
            if not alert.latching or alert.state == AlertState.ACKNOWLEDGED:
                return [self._resolve(alert, now_ms)]
            return [self._put(AlertAction.UPDATED, replace(alert, condition_active=False, updated_ms=now_ms), now_ms)]
        return []  # in the hysteresis band, or already cleared and waiting for acknowledgement

    # -------------------------------------------------------------------------- operator

    def acknowledge(self, alert_id: str, by: str, now_ms: int) -> list[Transition]:
        """A clinician acknowledges: recorded with who and when; resolves it if nothing is left.

        "Nothing is left" means the condition has cleared (a latched alarm, a sequence gap),
        or the rule is no longer in force for the patient so it could never clear by itself.
        """
        if not isinstance(by, str) or not by:
            raise AlertError("acknowledge needs who acknowledged ('by')", "acknowledged_by_missing")
        key = self._by_id.get(alert_id)
        if key is None:
            if alert_id in self._resolved:
                raise AlertError(f"alert {alert_id!r} is already resolved", "alert_not_active")
            raise AlertError(f"no alert {alert_id!r}", "alert_not_found")
        alert = self._active[key]
        if alert.state == AlertState.ACKNOWLEDGED:
            raise AlertError(
                f"alert {alert_id!r} was already acknowledged by {alert.acknowledged_by}", "alert_already_acknowledged"
            )
        acked = replace(alert, state=AlertState.ACKNOWLEDGED, acknowledged_by=by, acknowledged_ms=now_ms,
                        updated_ms=now_ms)
        transitions = [self._put(AlertAction.ACKNOWLEDGED, acked, now_ms)]
        if not acked.condition_active or self._orphaned(acked):
            transitions.append(self._resolve(acked, now_ms))
        return transitions

    def escalate_due(self, now_ms: int, timeout_ms: int | Mapping[str, int | None]) -> list[Transition]:
        """Escalate alerts raised and still unacknowledged after the timeout (once each).

        ``timeout_ms`` is one timeout for all, or one per priority (a missing or None entry
        never escalates), because a low-priority alarm may not deserve the hospital room.
        """
        transitions: list[Transition] = []
        for alert in list(self._active.values()):
            if alert.state != AlertState.RAISED:
                continue
            timeout = timeout_ms.get(alert.priority) if isinstance(timeout_ms, Mapping) else timeout_ms
            if timeout is None or alert.raised_ms + timeout > now_ms:
                continue
            escalated = replace(alert, state=AlertState.ESCALATED, escalated_ms=now_ms, updated_ms=now_ms)
            transitions.append(self._put(AlertAction.ESCALATED, escalated, now_ms))
        return transitions

    # ------------------------------------------------------------------------- technical

    def device_offline(
        self, hospital_id: str, device_type: str, device_id: str, patient_id: str | None, now_ms: int
    ) -> list[Transition]:
        """The device's status (or last will) says offline; repeated reports change nothing."""
        ctx = _device_context(hospital_id, device_type, device_id, patient_id)
        return self._raise_technical(DEVICE_OFFLINE, ctx, now_ms)

    def device_online(
        self, hospital_id: str, device_type: str, device_id: str, patient_id: str | None, now_ms: int
    ) -> list[Transition]:
        """Back online: clears offline, and silent too (a reconnect restarts the data timer)."""
        subject = device_subject(device_type, device_id)
        return self._resolve_keys([(subject, DEVICE_OFFLINE), (subject, DEVICE_SILENT)], now_ms)

    def device_silent(
        self, hospital_id: str, device_type: str, device_id: str, patient_id: str | None, now_ms: int
    ) -> list[Transition]:
        """No data within the device's timeout. Not raised on top of "offline", which says more."""
        subject = device_subject(device_type, device_id)
        if (subject, DEVICE_OFFLINE) in self._active:
            return []
        ctx = _device_context(hospital_id, device_type, device_id, patient_id)
        return self._raise_technical(DEVICE_SILENT, ctx, now_ms)

    def device_data(
        self, hospital_id: str, device_type: str, device_id: str, patient_id: str | None, now_ms: int
    ) -> list[Transition]:
        """Data arrived: the device is no longer silent."""
        return self._resolve_keys([(device_subject(device_type, device_id), DEVICE_SILENT)], now_ms)

    def battery(
        self, hospital_id: str, device_type: str, device_id: str, patient_id: str | None, level: float, now_ms: int
    ) -> list[Transition]:
        """Battery level in percent: raised below 20, cleared at 25 or more."""
        ctx = _device_context(hospital_id, device_type, device_id, patient_id)
        return self._step(BATTERY_RULE, ctx, float(level), now_ms, now_ms)

    def seq_gap(
        self, hospital_id: str, device_type: str, device_id: str, patient_id: str | None, missing: int, now_ms: int
    ) -> list[Transition]:
        """Readings were lost. An event, not a state: it latches until someone acknowledges it.

        Raised with ``condition_active=False`` so that acknowledging resolves it; further gaps
        while active add to ``count`` (total readings missing) instead of stacking alerts.
        """
        if not isinstance(missing, int) or isinstance(missing, bool) or missing < 1:
            raise ValueError(f"seq_gap: missing must be a positive integer, got {missing!r}")
        ctx = _device_context(hospital_id, device_type, device_id, patient_id)
        alert = self._active.get((ctx.subject, DEVICE_SEQ_GAP))
        if alert is None:
            return [self._raise(_technical_rule(DEVICE_SEQ_GAP, latching=True), ctx, float(missing), now_ms,
                                condition_active=False, count=missing)]
        updated = replace(alert, value=float(missing), count=alert.count + missing, updated_ms=now_ms)
        return [self._put(AlertAction.UPDATED, updated, now_ms)]

    def session_lost(self, hospital_id: str, detail: str, now_ms: int) -> list[Transition]:
        """The broker lost the bridge's session: an event like a sequence gap, latched until
        acknowledged; another loss while it is active adds to ``count``."""
        ctx = _Context("technical", ingest_subject(hospital_id), None, hospital_id, None, None)
        alert = self._active.get((ctx.subject, INGEST_SESSION_LOST))
        if alert is None:
            rule = replace(_technical_rule(INGEST_SESSION_LOST, latching=True),
                           message=f"{TECHNICAL_MESSAGES[INGEST_SESSION_LOST]}: {detail}")
            return [self._raise(rule, ctx, None, now_ms, condition_active=False, count=1)]
        return [self._put(AlertAction.UPDATED, replace(alert, count=alert.count + 1, updated_ms=now_ms), now_ms)]

    def gateway_status(self, hospital_id: str, gateway_id: str, conditions: Iterable[GatewayCondition],
                       now_ms: int) -> list[Transition]:
        """An edge gateway's conditions (:func:`gateway_conditions`): raised while they hold, updated
        when their value changes, resolved when the gateway reports them gone. One alert per
        (gateway, condition), in the hospital's alerts room."""
        ctx = _Context("technical", gateway_subject(hospital_id, gateway_id), None, hospital_id, None, None)
        transitions: list[Transition] = []
        for c in conditions:
            alert = self._active.get((ctx.subject, c.rule_id))
            message = f"{TECHNICAL_MESSAGES[c.rule_id]}: {c.detail}"
            if c.active and alert is None:
                rule = replace(_technical_rule(c.rule_id), message=message)
                transitions.append(self._raise(rule, ctx, c.value, now_ms, condition_active=True, count=1))
            elif c.active and alert is not None and (alert.value != c.value or not alert.condition_active):
                transitions.append(self._put(AlertAction.UPDATED, replace(alert, value=c.value, message=message,
                                                                condition_active=True, updated_ms=now_ms), now_ms))
            elif not c.active and alert is not None:
                transitions.append(self._resolve(alert, now_ms))
        return transitions

    def _raise_technical(self, rule_id: str, ctx: _Context, now_ms: int) -> list[Transition]:
        if (ctx.subject, rule_id) in self._active:
            return []
        return [self._raise(_technical_rule(rule_id), ctx, None, now_ms, condition_active=True, count=1)]

    # --------------------------------------------------------------------------- helpers

    def _raise(
        self, rule: Rule, ctx: _Context, value: float | None, now_ms: int, *, condition_active: bool, count: int
    ) -> Transition:
        alert = Alert(
            id=self._new_id(), rule_id=rule.id, kind=ctx.kind, priority=rule.priority, state=AlertState.RAISED,
            subject=ctx.subject, patient_id=ctx.patient_id, hospital_id=ctx.hospital_id,
            device_type=ctx.device_type, device_id=ctx.device_id,
            metric=rule.metric if rule.metric else None, value=value,
            threshold=rule.threshold if rule.metric else None,
            message=rule.message or (_default_message(rule) if rule_metric(rule.metric) else rule.id),
            latching=bool(rule.latching), condition_active=condition_active, raised_ms=now_ms,
            updated_ms=now_ms, count=count,
        )
        return self._put(AlertAction.RAISED, alert, now_ms)

    def _resolve(self, alert: Alert, now_ms: int) -> Transition:
        resolved = replace(alert, state=AlertState.RESOLVED, condition_active=False, resolved_ms=now_ms,
                           updated_ms=now_ms)
        return self._put(AlertAction.RESOLVED, resolved, now_ms)

    def _resolve_keys(self, keys: Iterable[tuple[str, str]], now_ms: int) -> list[Transition]:
        return [self._resolve(self._active[key], now_ms) for key in keys if key in self._active]

    def _put(self, action: AlertAction, alert: Alert, now_ms: int) -> Transition:
        """Record the alert's new version in the book and describe the change."""
        if alert.active:
            self._store(alert)
        else:
            self._active.pop(alert.key, None)
            self._by_id.pop(alert.id, None)
            self._pending.pop(alert.key, None)
            self._resolved[alert.id] = alert
            while len(self._resolved) > RESOLVED_MEMORY:
                self._resolved.popitem(last=False)
        return Transition(action, alert, now_ms)

    def _store(self, alert: Alert) -> None:
        self._active[alert.key] = alert
        self._by_id[alert.id] = alert.key

    def _orphaned(self, alert: Alert) -> bool:
        """A clinical alert whose rule is no longer in force for its patient can never clear."""
        if alert.kind != "clinical":
            return False
        return all(rule.id != alert.rule_id for rule in self.rules_for(alert.patient_id))


def _device_context(hospital_id: str, device_type: str, device_id: str, patient_id: str | None) -> _Context:
    subject = device_subject(device_type, device_id)
    return _Context("technical", subject, patient_id, hospital_id, device_type, device_id)


def _technical_rule(rule_id: str, latching: bool = False) -> Rule:
    """A rule-shaped description of a technical alarm (no metric, no threshold)."""
    return Rule(rule_id, "", "above", 0.0, 0.0, TECHNICAL_PRIORITY[rule_id], latching=latching,
                message=TECHNICAL_MESSAGES[rule_id])


__all__ = [
    "ACTIONS", "AlertAction", "AlertBook", "AlertError", "Alert", "AlertState", "Pending", "BATTERY_CLEAR_AT",
    "BATTERY_LOW_BELOW", "DEVICE_BATTERY_LOW", "DEVICE_OFFLINE", "DEVICE_SEQ_GAP", "DEVICE_SILENT",
    "GATEWAY_QUARANTINE", "GATEWAY_SPOOL_EVICTING", "GATEWAY_SPOOL_NEAR_FULL", "GatewayCondition",
    "INGEST_SESSION_LOST", "PRIORITIES", "Rule", "RuleOverride", "STATES", "Transition", "apply_overrides",
    "default_rules", "gateway_conditions", "load_rules", "validate_rule",
]
