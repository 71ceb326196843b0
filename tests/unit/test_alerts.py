"""The alert engine, driven by tables of readings and expected transitions (pure, no I/O)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from bridge.alerts import (
    ACTIONS,
    BATTERY_CLEAR_AT,
    BATTERY_LOW_BELOW,
    PRIORITIES,
    STATES,
    Alert,
    AlertAction,
    AlertBook,
    AlertError,
    AlertState,
    RuleOverride,
    Transition,
    apply_overrides,
    default_rules,
    load_rules,
)
from firstcare.metrics import DERIVED, METRICS, MetricRejected, to_canonical
from firstcare.payloads import Reading

T0 = 1_800_000_000_000
SECOND = 1000

# A small rule set of our own, so changing the shipped defaults never breaks these tests.
RULES_YAML = """
rules:
  - {id: heart_rate.high, metric: heart_rate, op: above, threshold: 120, clear: 115,
     priority: medium, delay_readings: 3, message: "HR high"}
  - {id: heart_rate.high.critical, metric: heart_rate, op: above, threshold: 150, clear: 145,
     priority: high, message: "HR critical"}
  - {id: spo2.low, metric: spo2, op: below, threshold: 92, clear: 94, priority: medium,
     delay_readings: 2, delay_seconds: 10, message: "SpO2 low"}
  - {id: glucose.low, metric: glucose, op: below, threshold: 70, clear: 80, priority: medium}
"""
RULES = load_rules(RULES_YAML)


def new_ids():
    counter = itertools.count(1)
    return lambda: f"a{next(counter)}"


def make_book(*rule_ids: str, overrides=None) -> AlertBook:
    rules = [r for r in RULES if not rule_ids or r.id in rule_ids]
    return AlertBook(rules, new_ids(), overrides)


def reading(metric: str, value: float, ts: int = T0, patient_id: str | None = "p1", device_id: str = "m1") -> Reading:
    return Reading("h1", "monitor", device_id, 1, ts, ts, patient_id, {metric: value})


def feed(book: AlertBook, metric: str, values, step_ms: int = SECOND, start: int = T0, patient_id="p1"):
    """Evaluate one reading per value; the actions each reading caused (``[]`` for none)."""
    return [
        [t.action for t in book.evaluate(reading(metric, v, start + i * step_ms, patient_id), start + i * step_ms)]
        for i, v in enumerate(values)
    ]


def only(transitions: list[Transition]) -> Alert:
    assert len(transitions) == 1, transitions
    return transitions[0].alert


# ------------------------------------------------------------------------ condition delay


R, U, X = ["raised"], ["updated"], ["resolved"]
N: list[str] = []


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([125, 125], [N, N], id="below-delay-nothing"),
        pytest.param([125, 125, 125], [N, N, R], id="raises-on-third"),
        pytest.param([125, 125, 125, 130, 140], [N, N, R, U, U], id="retrigger-updates"),
        pytest.param([125, 125, 100, 125, 125, 125], [N, N, N, N, N, R], id="normal-resets-delay"),
        pytest.param([125, 125, 118, 125, 125, 125], [N, N, N, N, N, R], id="band-value-resets-delay"),
        pytest.param([125, 125, 120, 125], [N, N, N, N], id="threshold-itself-is-not-abnormal"),
        pytest.param([125, 125, 125, 118, 116, 115.5], [N, N, R, N, N, N], id="band-neither-clears-nor-raises"),
        pytest.param([125, 125, 125, 118, 115], [N, N, R, N, X], id="clears-at-clear-point"),
        pytest.param([125, 125, 125, 100, 125], [N, N, R, X, N], id="after-resolve-delay-starts-again"),
        pytest.param([125, 125, 125, 100, 125, 125, 125], [N, N, R, X, N, N, R], id="second-episode-new-alert"),
    ],
)
def test_condition_delay_and_hysteresis(values, expected):
    book = make_book("heart_rate.high")
    assert feed(book, "heart_rate", values) == expected
    assert len(book.active()) <= 1


@pytest.mark.parametrize(
    ("step_ms", "raise_at"),
    [
        pytest.param(1 * SECOND, 10, id="1s-cadence-waits-10s"),
        pytest.param(5 * SECOND, 2, id="5s-cadence-third-reading"),
        pytest.param(10 * SECOND, 1, id="10s-cadence-second-reading"),
        pytest.param(60 * SECOND, 1, id="slow-cadence-readings-dominate"),
    ],
)
def test_delay_seconds_and_readings_both_required(step_ms, raise_at):
    book = make_book("spo2.low")
    actions = feed(book, "spo2", [85] * 12, step_ms)
    assert actions.index(R) == raise_at
    assert actions[:raise_at] == [N] * raise_at


def test_delay_is_measured_on_reading_time_so_a_backlog_burst_raises():
    book = make_book("spo2.low")
    now = T0 + 3600 * SECOND  # a gateway's backlog, all processed at the same instant
    actions = [[t.action for t in book.evaluate(reading("spo2", 85, T0 + i * 5 * SECOND), now)] for i in range(3)]
    assert actions == [N, N, R]
    assert book.active()[0].raised_ms == now


def test_raised_alert_carries_the_reading_context():
    book = make_book("heart_rate.high.critical")
    alert = only(book.evaluate(reading("heart_rate", 160, device_id="m7"), T0 + 5))
    assert alert == Alert(
        id="a1", rule_id="heart_rate.high.critical", kind="clinical", priority="high", state=AlertState.RAISED,
        subject="patient:p1", patient_id="p1", hospital_id="h1", device_type="monitor", device_id="m7",
        metric="heart_rate", value=160.0, threshold=150.0, message="HR critical", latching=True,
        condition_active=True, raised_ms=T0 + 5, updated_ms=T0 + 5,
    )


def test_now_defaults_to_receive_time():
    book = make_book("heart_rate.high.critical")
    r = replace(reading("heart_rate", 160), received_ms=T0 + 42)
    assert only(book.evaluate(r)).raised_ms == T0 + 42


def test_retrigger_updates_value_and_count_but_keeps_identity():
    book = make_book("heart_rate.high.critical")
    first = only(book.evaluate(reading("heart_rate", 160), T0))
    again = book.evaluate(reading("heart_rate", 170, T0 + SECOND), T0 + SECOND)
    assert [t.action for t in again] == ["updated"]
    assert again[0].alert == replace(first, value=170.0, count=2, updated_ms=T0 + SECOND)
    assert book.active() == [again[0].alert]


def test_rules_for_one_metric_are_independent():
    book = make_book("heart_rate.high", "heart_rate.high.critical")
    transitions = [book.evaluate(reading("heart_rate", 160, T0 + i * SECOND), T0 + i * SECOND) for i in range(3)]
    flat = [(t.action, t.alert.rule_id) for ts in transitions for t in ts]
    assert flat == [
        ("raised", "heart_rate.high.critical"),
        ("updated", "heart_rate.high.critical"),
        ("raised", "heart_rate.high"),
        ("updated", "heart_rate.high.critical"),
    ]


@pytest.mark.parametrize(
    "metrics",
    [pytest.param({"heart_rate": 200.0}, id="critical"), pytest.param({"glucose": 40.0, "spo2": 70.0}, id="several")],
)
def test_readings_without_patient_raise_no_clinical_alerts(metrics):
    book = make_book()
    for i in range(20):
        assert book.evaluate(Reading("h1", "monitor", "m1", i, T0 + i * SECOND, T0 + i * SECOND, None, metrics)) == []
    assert book.active() == []


def test_metrics_without_rules_are_ignored():
    book = make_book()
    assert book.evaluate(reading("weight", 300.0)) == []


# ------------------------------------------------------------------ latching and acknowledge


def _raise(book: AlertBook, rule_id: str) -> Alert:
    values = {"heart_rate.high": 125, "heart_rate.high.critical": 160, "glucose.low": 50}
    metric = rule_id.split(".")[0]
    for i in range(5):
        book.evaluate(reading(metric, values[rule_id], T0 + i), T0 + i)
    (alert,) = [a for a in book.active() if a.rule_id == rule_id]
    return alert


CLEAR_VALUE = {"heart_rate.high": 100, "heart_rate.high.critical": 100, "glucose.low": 100}
ABNORMAL_VALUE = {"heart_rate.high": 125, "heart_rate.high.critical": 160, "glucose.low": 50}


@pytest.mark.parametrize(
    ("rule_id", "steps", "expected", "final_state"),
    [
        # non-latching (medium): clears by itself, acknowledged or not
        pytest.param("glucose.low", ["clear"], [X], None, id="nonlatching-clear-resolves"),
        pytest.param("glucose.low", ["ack", "clear"], [["acknowledged"], X], None, id="nonlatching-ack-then-clear"),
        pytest.param("glucose.low", ["ack", "abnormal"], [["acknowledged"], U], "acknowledged",
                     id="nonlatching-ack-keeps-while-abnormal"),
        # latching (high): stays until acknowledged
        pytest.param("heart_rate.high.critical", ["clear"], [U], "raised", id="latching-clear-stays"),
        pytest.param("heart_rate.high.critical", ["clear", "clear"], [U, N], "raised", id="latching-clear-once"),
        pytest.param("heart_rate.high.critical", ["clear", "ack"], [U, ["acknowledged", "resolved"]], None,
                     id="latching-ack-after-clear-resolves"),
        pytest.param("heart_rate.high.critical", ["ack", "clear"], [["acknowledged"], X], None,
                     id="latching-ack-before-clear"),
        pytest.param("heart_rate.high.critical", ["clear", "abnormal", "ack"], [U, U, ["acknowledged"]],
                     "acknowledged", id="latching-rearmed-then-ack-stays"),
        pytest.param("heart_rate.high.critical", ["clear", "escalate", "ack"],
                     [U, ["escalated"], ["acknowledged", "resolved"]], None, id="latching-escalated-then-ack"),
    ],
)
def test_latching_and_acknowledge(rule_id, steps, expected, final_state):
    book = make_book(rule_id)
    alert = _raise(book, rule_id)
    metric = rule_id.split(".")[0]
    now = T0 + 10 * SECOND
    got = []
    for step in steps:
        now += SECOND
        if step == "ack":
            transitions = book.acknowledge(alert.id, "nurse-1", now)
        elif step == "escalate":
            transitions = book.escalate_due(now, 0)
        else:
            value = CLEAR_VALUE[rule_id] if step == "clear" else ABNORMAL_VALUE[rule_id]
            transitions = book.evaluate(reading(metric, value, now), now)
        got.append([t.action for t in transitions])
    assert got == expected
    current = book.get(alert.id)
    assert current is not None and current.id == alert.id
    assert current.state == (final_state or "resolved")
    assert (current in book.active()) == (final_state is not None)


def test_latched_alert_remembers_its_condition_state():
    book = make_book("heart_rate.high.critical")
    alert = _raise(book, "heart_rate.high.critical")
    cleared = only(book.evaluate(reading("heart_rate", 100, T0 + SECOND), T0 + SECOND))
    assert (cleared.state, cleared.condition_active, cleared.value) == ("raised", False, alert.value)
    rearmed = only(book.evaluate(reading("heart_rate", 155, T0 + 2 * SECOND), T0 + 2 * SECOND))
    assert (rearmed.condition_active, rearmed.value) == (True, 155.0)


def test_acknowledge_records_who_and_when():
    book = make_book("glucose.low")
    alert = _raise(book, "glucose.low")
    (t,) = book.acknowledge(alert.id, "dr-house", T0 + 99)
    assert t == Transition(AlertAction.ACKNOWLEDGED, replace(
        alert, state=AlertState.ACKNOWLEDGED, acknowledged_by="dr-house", acknowledged_ms=T0 + 99, updated_ms=T0 + 99,
    ), T0 + 99)


@pytest.mark.parametrize(
    ("setup", "alert_id", "by", "reason"),
    [
        pytest.param("none", "nope", "nurse", "alert_not_found", id="unknown"),
        pytest.param("resolved", "a1", "nurse", "alert_not_active", id="resolved"),
        pytest.param("acked", "a1", "nurse", "alert_already_acknowledged", id="twice"),
        pytest.param("raised", "a1", "", "acknowledged_by_missing", id="anonymous"),
    ],
)
def test_acknowledge_refusals_carry_a_reason(setup, alert_id, by, reason):
    book = make_book("glucose.low")
    if setup != "none":
        _raise(book, "glucose.low")
    if setup == "resolved":
        book.evaluate(reading("glucose", 100, T0 + SECOND), T0 + SECOND)
    if setup == "acked":
        book.acknowledge("a1", "nurse", T0 + SECOND)
    with pytest.raises(AlertError) as info:
        book.acknowledge(alert_id, by, T0 + 2 * SECOND)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------- escalation


@pytest.mark.parametrize(
    ("timeout", "checks", "expected"),
    [
        pytest.param(60 * SECOND, [59 * SECOND], [N], id="not-yet"),
        pytest.param(60 * SECOND, [60 * SECOND], [["escalated"]], id="at-timeout"),
        pytest.param(60 * SECOND, [59 * SECOND, 61 * SECOND, 120 * SECOND], [N, ["escalated"], N], id="once"),
        pytest.param({"medium": 30 * SECOND}, [30 * SECOND], [["escalated"]], id="per-priority"),
        pytest.param({"high": 30 * SECOND}, [3600 * SECOND], [N], id="priority-not-listed"),
        pytest.param({"medium": None}, [3600 * SECOND], [N], id="priority-never"),
    ],
)
def test_escalation(timeout, checks, expected):
    book = make_book("glucose.low")
    alert = only(book.evaluate(reading("glucose", 50), T0))
    got = [[t.action for t in book.escalate_due(T0 + after, timeout)] for after in checks]
    assert got == expected
    if ["escalated"] in expected:
        escalated = book.get(alert.id)
        assert escalated is not None and escalated.state == "escalated"
        assert escalated.escalated_ms == T0 + checks[expected.index(["escalated"])]


def test_acknowledged_alerts_do_not_escalate_and_escalated_ones_can_be_acknowledged():
    book = make_book("glucose.low", "heart_rate.high.critical")
    glucose = only(book.evaluate(reading("glucose", 50), T0))
    heart = only(book.evaluate(reading("heart_rate", 160), T0))
    book.acknowledge(glucose.id, "nurse", T0 + 1)
    (t,) = book.escalate_due(T0 + 120 * SECOND, 60 * SECOND)
    assert t.alert.id == heart.id
    (ack,) = book.acknowledge(heart.id, "nurse", T0 + 121 * SECOND)
    assert (ack.alert.state, ack.alert.escalated_ms) == ("acknowledged", T0 + 120 * SECOND)
    assert book.escalate_due(T0 + 999 * SECOND, 60 * SECOND) == []


def test_escalated_nonlatching_alert_still_resolves_on_clear():
    book = make_book("glucose.low")
    only(book.evaluate(reading("glucose", 50), T0))
    book.escalate_due(T0 + 60 * SECOND, 60 * SECOND)
    assert [t.action for t in book.evaluate(reading("glucose", 90, T0 + 61 * SECOND))] == ["resolved"]


# -------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param(RuleOverride(threshold=100), (100.0, 95.0), id="threshold-keeps-hysteresis"),
        pytest.param(RuleOverride(threshold=130, clear=120), (130.0, 120.0), id="both"),
        pytest.param(RuleOverride(clear=110), (120.0, 110.0), id="clear-only"),
        pytest.param(RuleOverride(), (120.0, 115.0), id="empty-is-noop"),
        pytest.param(RuleOverride(threshold=130, enabled=False), None, id="disabled"),
    ],
)
def test_apply_overrides(override, expected):
    rules = apply_overrides(RULES, {"heart_rate.high": override})
    found = [(r.threshold, r.clear) for r in rules if r.id == "heart_rate.high"]
    assert found == ([] if expected is None else [expected])
    assert [r for r in rules if r.id != "heart_rate.high"] == [r for r in RULES if r.id != "heart_rate.high"]


@pytest.mark.parametrize(
    ("overrides", "rule_id", "field"),
    [
        pytest.param({"nope.rule": RuleOverride(threshold=1)}, "nope.rule", "id", id="unknown-rule"),
        pytest.param({"heart_rate.high": RuleOverride(threshold=100, clear=110)}, "heart_rate.high", "clear",
                     id="clear-wrong-side"),
        pytest.param({"spo2.low": RuleOverride(threshold=120)}, "spo2.low", "threshold", id="out-of-range"),
        pytest.param({"spo2.low": RuleOverride(threshold=float("nan"))}, "spo2.low", "threshold", id="nan"),
    ],
)
def test_bad_overrides_are_rejected_naming_rule_and_field(overrides, rule_id, field):
    with pytest.raises(ValueError, match=rf"{rule_id}.*'{field}'"):
        apply_overrides(RULES, overrides)
    book = make_book()
    with pytest.raises(ValueError, match=rule_id):
        book.set_overrides("p1", overrides)
    assert book.rules_for("p1") == RULES


def test_override_applies_to_its_patient_only():
    book = make_book("heart_rate.high", overrides={"p1": {"heart_rate.high": RuleOverride(threshold=100)}})
    assert feed(book, "heart_rate", [105] * 3, patient_id="p1") == [N, N, R]
    assert feed(book, "heart_rate", [105] * 3, patient_id="p2") == [N, N, N]
    assert feed(book, "heart_rate", [96, 95], start=T0 + 10 * SECOND, patient_id="p1") == [N, X]


def test_disabled_rule_raises_nothing_and_can_be_reenabled():
    book = make_book("heart_rate.high")
    book.set_overrides("p1", {"heart_rate.high": RuleOverride(enabled=False)})
    assert [r.id for r in book.rules_for("p1")] == []
    assert feed(book, "heart_rate", [130] * 5) == [N] * 5
    book.set_overrides("p1", {})
    assert book.rules_for("p1") == book.rules_for(None)
    assert feed(book, "heart_rate", [130] * 3, start=T0 + 10 * SECOND) == [N, N, R]


def test_overrides_restart_pending_delay():
    book = make_book("heart_rate.high")
    assert feed(book, "heart_rate", [130, 130]) == [N, N]
    book.set_overrides("p1", {"heart_rate.high": RuleOverride(threshold=125)})
    assert feed(book, "heart_rate", [130, 130, 130], start=T0 + 5 * SECOND) == [N, N, R]


@pytest.mark.parametrize("with_now", [True, False], ids=["resolved-when-disabled", "resolved-on-ack"])
def test_disabling_a_rule_with_an_active_alert(with_now):
    book = make_book("glucose.low")
    alert = only(book.evaluate(reading("glucose", 50), T0))
    transitions = book.set_overrides("p1", {"glucose.low": RuleOverride(enabled=False)}, T0 + 1 if with_now else None)
    if with_now:
        assert [t.action for t in transitions] == ["resolved"]
    else:
        assert transitions == []
        assert [t.action for t in book.acknowledge(alert.id, "nurse", T0 + 2)] == ["acknowledged", "resolved"]
    assert book.active() == []


# ------------------------------------------------------------------------------ rule loading


def _one_rule(**fields) -> str:
    base = {"id": "hr.bad", "metric": "heart_rate", "op": "above", "threshold": 120, "clear": 115,
            "priority": "medium"}
    base.update(fields)
    body = ", ".join(f"{k}: {v}" for k, v in base.items() if v is not ...)
    return f"rules:\n  - {{{body}}}\n"


GOOD = "  - {id: hr.ok, metric: heart_rate, op: above, threshold: 120, clear: 115, priority: low}\n"


@pytest.mark.parametrize(
    ("text", "rule_id", "field"),
    [
        pytest.param(_one_rule(metric="pulse"), "hr.bad", "metric", id="unknown-metric"),
        pytest.param(_one_rule(op="over"), "hr.bad", "op", id="bad-op"),
        pytest.param(_one_rule(priority="urgent"), "hr.bad", "priority", id="bad-priority"),
        pytest.param(_one_rule(clear=125), "hr.bad", "clear", id="above-clear-over-threshold"),
        pytest.param(_one_rule(op="below", threshold=50, clear=45), "hr.bad", "clear", id="below-clear-under"),
        pytest.param(_one_rule(threshold=...), "hr.bad", "threshold", id="missing-threshold"),
        pytest.param(_one_rule(threshold="high"), "hr.bad", "threshold", id="threshold-not-number"),
        pytest.param(_one_rule(threshold="true"), "hr.bad", "threshold", id="threshold-bool"),
        pytest.param(_one_rule(threshold=400, clear=390), "hr.bad", "threshold", id="threshold-impossible"),
        pytest.param(_one_rule(treshold=120), "hr.bad", "treshold", id="typo-field"),
        pytest.param(_one_rule(delay_readings=0), "hr.bad", "delay_readings", id="delay-readings-zero"),
        pytest.param(_one_rule(delay_readings=1.5), "hr.bad", "delay_readings", id="delay-readings-float"),
        pytest.param(_one_rule(delay_seconds=-1), "hr.bad", "delay_seconds", id="delay-seconds-negative"),
        pytest.param(_one_rule(latching="sometimes"), "hr.bad", "latching", id="latching-not-bool"),
        pytest.param(_one_rule(message=[1]), "hr.bad", "message", id="message-not-text"),
        pytest.param(_one_rule(id="HR Bad"), "HR Bad", "id", id="id-malformed"),
        pytest.param(_one_rule(id="device.offline"), "device.offline", "id", id="id-reserved"),
        pytest.param(_one_rule(id=...), "#0", "id", id="id-missing"),
        pytest.param(_one_rule(id="hr.ok") + GOOD, "hr.ok", "id", id="duplicate-id"),
        pytest.param("rules:\n" + GOOD + "  - 42\n", "#1", "-", id="rule-not-mapping"),
    ],
)
def test_load_rules_rejects_bad_rules_naming_rule_and_field(text, rule_id, field):
    with pytest.raises(ValueError) as info:
        load_rules(text)
    message = str(info.value)
    assert f"alert rule {rule_id}:" in message
    assert f"field '{field}'" in message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("rules: [", id="not-yaml"),
        pytest.param("- {id: a}", id="top-level-list"),
        pytest.param("rules: {id: a}", id="rules-not-list"),
        pytest.param("rules: []\nextra: 1", id="unknown-top-level-key"),
        pytest.param("", id="empty"),
    ],
)
def test_load_rules_rejects_bad_documents(text):
    with pytest.raises(ValueError, match="alert rules:"):
        load_rules(text)


def test_load_rules_fills_defaults():
    (rule,) = load_rules(_one_rule(priority="high", message=...))
    assert (rule.delay_readings, rule.delay_seconds, rule.latching) == (1, 0.0, True)
    assert rule.message == "Heart rate above 120 /min"
    (rule,) = load_rules(_one_rule(priority="high", latching="false"))
    assert rule.latching is False


def test_default_rules_load_and_are_sane():
    rules = default_rules()
    by_id = {r.id: r for r in rules}
    assert len(by_id) == len(rules) >= 19
    for rule in rules:
        assert (rule.metric in METRICS or rule.metric in DERIVED) and rule.priority in PRIORITIES and rule.message
        assert rule.latching is (rule.priority == "high")
    expected = {
        "heart_rate.high": ("above", 120, "medium"), "heart_rate.high.critical": ("above", 150, "high"),
        "heart_rate.low": ("below", 50, "medium"), "heart_rate.low.critical": ("below", 40, "high"),
        "spo2.low": ("below", 92, "medium"), "spo2.low.critical": ("below", 88, "high"),
        "systolic_bp.low.critical": ("below", 80, "high"), "systolic_bp.high": ("above", 180, "medium"),
        "diastolic_bp.high": ("above", 110, "medium"), "respiratory_rate.low.critical": ("below", 8, "high"),
        "temperature.high": ("above", 38.3, "low"), "glucose.low.critical": ("below", 54, "high"),
    }
    for rid, (op, threshold, priority) in expected.items():
        assert (by_id[rid].op, by_id[rid].threshold, by_id[rid].priority) == (op, threshold, priority)
    assert default_rules() == rules and default_rules() is not rules


def test_default_rules_drive_a_book():
    book = AlertBook(default_rules(), new_ids())
    actions = feed(book, "spo2", [86, 86])
    assert actions == [N, R]  # spo2.low.critical: two readings; spo2.low waits for 3 and 10 s
    assert book.active()[0].rule_id == "spo2.low.critical"


def test_book_refuses_invalid_rules():
    with pytest.raises(ValueError, match="duplicate"):
        AlertBook([RULES[0], RULES[0]], new_ids())
    with pytest.raises(ValueError, match="'metric'"):
        AlertBook([replace(RULES[0], metric="nope")], new_ids())


# -------------------------------------------------------------------------- technical alarms


DEVICE = ("h1", "oximeter", "ox-7", "p1")


def _technical(book: AlertBook, step: str, now: int) -> list[str]:
    kind, _, arg = step.partition(":")
    if kind == "battery":
        transitions = book.battery(*DEVICE, float(arg), now)
    elif kind == "gap":
        transitions = book.seq_gap(*DEVICE, int(arg), now)
    elif kind == "ack":
        transitions = book.acknowledge(arg, "tech", now)
    else:
        transitions = getattr(book, f"device_{kind}")(*DEVICE, now)
    return [f"{t.action} {t.alert.rule_id}" for t in transitions]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(["offline", "offline", "online"],
                     [["raised device.offline"], [], ["resolved device.offline"]], id="offline-online"),
        pytest.param(["online"], [[]], id="online-without-alarm"),
        pytest.param(["silent", "silent", "data"],
                     [["raised device.silent"], [], ["resolved device.silent"]], id="silent-data"),
        pytest.param(["offline", "silent"], [["raised device.offline"], []], id="silent-suppressed-while-offline"),
        pytest.param(["silent", "offline", "data", "online"],
                     [["raised device.silent"], ["raised device.offline"], ["resolved device.silent"],
                      ["resolved device.offline"]], id="data-does-not-clear-offline"),
        pytest.param(["silent", "offline", "online"],
                     [["raised device.silent"], ["raised device.offline"],
                      ["resolved device.offline", "resolved device.silent"]], id="online-clears-both"),
        pytest.param(["offline", "ack:a1", "online"],
                     [["raised device.offline"], ["acknowledged device.offline"], ["resolved device.offline"]],
                     id="offline-ack-stays-until-online"),
        pytest.param(["battery:50", "battery:19", "battery:22", "battery:18", "battery:24", "battery:25"],
                     [[], ["raised device.battery_low"], [], ["updated device.battery_low"], [],
                      ["resolved device.battery_low"]], id="battery-hysteresis"),
        pytest.param(["battery:20", "battery:19.9"], [[], ["raised device.battery_low"]], id="battery-edge"),
        pytest.param(["gap:3", "gap:2", "ack:a1", "gap:1"],
                     [["raised device.seq_gap"], ["updated device.seq_gap"],
                      ["acknowledged device.seq_gap", "resolved device.seq_gap"], ["raised device.seq_gap"]],
                     id="seq-gap-latches-until-ack"),
    ],
)
def test_technical_alarms(steps, expected):
    book = AlertBook([], new_ids())
    assert [_technical(book, step, T0 + i * SECOND) for i, step in enumerate(steps)] == expected


def test_technical_alert_shape():
    book = AlertBook([], new_ids())
    offline = only(book.device_offline(*DEVICE, T0))
    assert (offline.kind, offline.subject, offline.patient_id, offline.priority, offline.latching) == (
        "technical", "device:oximeter:ox-7", "p1", "medium", False)
    assert (offline.metric, offline.value, offline.threshold, offline.condition_active) == (None, None, None, True)
    battery = only(book.battery(*DEVICE, 10, T0))
    assert (battery.priority, battery.metric, battery.value, battery.threshold) == (
        "low", "battery", 10.0, float(BATTERY_LOW_BELOW))
    assert BATTERY_CLEAR_AT > BATTERY_LOW_BELOW
    gap = only(book.seq_gap(*DEVICE, 3, T0))
    assert (gap.priority, gap.latching, gap.condition_active, gap.count) == ("low", True, False, 3)
    gap = only(book.seq_gap(*DEVICE, 4, T0 + 1))
    assert (gap.count, gap.value) == (7, 4.0)
    unbound = only(AlertBook([], new_ids()).device_offline("h1", "bp", "b1", None, T0))
    assert unbound.patient_id is None


@pytest.mark.parametrize("missing", [0, -1, True])
def test_seq_gap_needs_a_positive_count(missing):
    with pytest.raises(ValueError, match="missing"):
        AlertBook([], new_ids()).seq_gap(*DEVICE, missing, T0)


def test_technical_and_clinical_alerts_do_not_collide():
    book = make_book("spo2.low")
    book.device_silent(*DEVICE, T0)
    feed(book, "spo2", [85] * 3, 10 * SECOND)
    assert sorted((a.kind, a.subject) for a in book.active()) == [
        ("clinical", "patient:p1"), ("technical", "device:oximeter:ox-7")]


# ------------------------------------------------------------------------- restore and misc


def test_load_active_restores_so_a_retrigger_updates_it():
    before = make_book("heart_rate.high.critical")
    alert = only(before.evaluate(reading("heart_rate", 160), T0))
    stored = [alert, replace(alert, id="old", state=AlertState.RESOLVED, resolved_ms=T0 - 1)]

    after = AlertBook(RULES, new_ids())
    assert after.load_active(stored) == [stored[1]]
    assert after.active() == [alert]
    updated = only(after.evaluate(reading("heart_rate", 170, T0 + SECOND), T0 + SECOND))
    assert (updated.id, updated.count, updated.value) == (alert.id, 2, 170.0)
    assert [t.action for t in after.acknowledge(alert.id, "nurse", T0 + 2 * SECOND)] == ["acknowledged"]


def test_load_active_keeps_the_newest_of_duplicates():
    alert = only(make_book("glucose.low").evaluate(reading("glucose", 50), T0))
    older = replace(alert, id="old", updated_ms=T0 - 5)
    book = make_book("glucose.low")
    assert book.load_active([older, alert]) == [older]
    assert book.load_active([older]) == [older]
    assert [a.id for a in book.active()] == [alert.id]
    assert book.get("old") is None


def test_restored_technical_alarm_resolves():
    alert = only(AlertBook([], new_ids()).device_offline(*DEVICE, T0))
    book = AlertBook([], new_ids())
    book.load_active([alert])
    assert [t.alert.id for t in book.device_online(*DEVICE, T0 + 1)] == [alert.id]


def test_same_inputs_same_transitions():
    def run():
        book = make_book()
        out = []
        for i, value in enumerate([125, 160, 160, 100, 125, 125, 125]):
            out += book.evaluate(reading("heart_rate", value, T0 + i * SECOND), T0 + i * SECOND)
        out += book.escalate_due(T0 + 600 * SECOND, 60 * SECOND)
        out += book.device_offline(*DEVICE, T0)
        return out

    assert run() == run()


def test_transitions_use_known_actions_and_states():
    book = AlertBook(default_rules(), new_ids())
    transitions: list[Transition] = []
    for i, hr in enumerate([160, 160, 160, 30, 30, 30, 80, 80]):
        now = T0 + i * 20 * SECOND
        transitions += book.evaluate(reading("heart_rate", hr, now), now)
        transitions += book.escalate_due(now, 30 * SECOND)
    for alert in book.active():
        transitions += book.acknowledge(alert.id, "nurse", T0 + 999 * SECOND)
    assert {t.action for t in transitions} == set(ACTIONS)
    assert all(t.alert.state in STATES for t in transitions)
    assert book.active() == []


# ------------------------------------------------------------------- derived values (NEWS2)

NEWS2_RULES = [r for r in default_rules() if r.metric in DERIVED]


def test_news2_rules_are_defaults_over_derived_values():
    assert {r.id: (r.metric, r.priority) for r in NEWS2_RULES} == {
        "news2.high": ("news2", "high"), "news2.medium": ("news2", "medium"),
        "news2.low_medium": ("news2_max", "low")}


def test_a_device_can_never_send_a_derived_value():
    with pytest.raises(MetricRejected) as caught:
        to_canonical("news2", 9)
    assert caught.value.reason == "metric_unknown"


def test_derived_values_raise_with_the_rule_delay_and_no_device():
    book = AlertBook(NEWS2_RULES, new_ids())
    assert book.evaluate_derived("p1", "h1", {"news2": 8, "news2_max": 3}, T0, T0) == []
    transitions = book.evaluate_derived("p1", "h1", {"news2": 8, "news2_max": 3}, T0 + 1000, T0 + 1000)
    raised = [t.alert for t in transitions if t.action == "raised"]
    assert [a.rule_id for a in raised] == ["news2.high"]
    assert raised[0].metric == "news2" and raised[0].value == 8 and raised[0].device_type is None
    assert raised[0].subject == "patient:p1" and raised[0].kind == "clinical"


def test_a_lower_bound_raises_but_never_clears_or_resets():
    book = AlertBook([r for r in NEWS2_RULES if r.id == "news2.medium"], new_ids())
    for i in range(3):
        transitions = book.evaluate_derived("p1", "h1", {"news2": 6}, T0 + i * 5000, T0 + i * 5000, lower_bound=True)
    assert [t.action for t in transitions] == ["raised"]
    # inputs went missing: the partial score falls to 2, which proves nothing
    assert book.evaluate_derived("p1", "h1", {"news2": 2}, T0 + 20_000, T0 + 20_000, lower_bound=True) == []
    assert book.active()[0].condition_active
    # a complete score of 2 does clear it (medium: not latching)
    cleared = book.evaluate_derived("p1", "h1", {"news2": 2}, T0 + 30_000, T0 + 30_000)
    assert [t.action for t in cleared] == ["resolved"]


def test_a_lower_bound_below_threshold_does_not_break_a_pending_run():
    book = AlertBook([r for r in NEWS2_RULES if r.id == "news2.high"], new_ids())
    book.evaluate_derived("p1", "h1", {"news2": 7}, T0, T0, lower_bound=True)
    book.evaluate_derived("p1", "h1", {"news2": 3}, T0 + 1, T0 + 1, lower_bound=True)
    transitions = book.evaluate_derived("p1", "h1", {"news2": 7}, T0 + 2, T0 + 2, lower_bound=True)
    assert [t.action for t in transitions] == ["raised"]
