"""The pure parts of cluster-correct state: lock keys and their order, device-time order in a
batch, provisional gaps, late readings in the alarm engine, pending delays that survive a
transaction, and the working set's guard against deadlock-prone lock order."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from bridge.alerts import AlertBook, Pending, load_rules
from bridge.cluster import DEVICE, INGEST, PATIENT, LockKey, device_key, lock_order, name_hash, patient_key, subject_key
from bridge.core import in_device_order, subject_keys
from bridge.devices import fill_gaps
from bridge.records import SeqGap
from bridge.state import LockOrderError, WorkingSet
from firstcare.payloads import Reading, StatusReport

T0 = 1_800_000_000_000
S = 1000

RULES = load_rules("""
rules:
  - {id: heart_rate.high, metric: heart_rate, op: above, threshold: 120, clear: 115, priority: medium,
     delay_readings: 3}
  - {id: spo2.low, metric: spo2, op: below, threshold: 92, clear: 94, priority: medium, delay_readings: 2,
     delay_seconds: 10}
""")


def r(seq: int, ts: int, device: str = "m1", patient: str | None = "p1", **metrics: float) -> Reading:
    return Reading("h1", "monitor", device, seq, ts, ts, patient, metrics or {"heart_rate": 70.0})


def book() -> AlertBook:
    counter = itertools.count(1)
    return AlertBook(RULES, lambda: f"a{next(counter)}")


# ------------------------------------------------------------------------------- lock keys


def test_lock_ids_are_stable_32_bit_and_classed() -> None:
    assert name_hash("p1") == name_hash("p1") and -2**31 <= name_hash("p1") < 2**31
    assert patient_key("p1").ids == (PATIENT, name_hash("p1"))
    assert device_key("monitor", "m1").ids == (DEVICE, name_hash("monitor/m1"))


@pytest.mark.parametrize(
    ("subject", "key"),
    [("patient:p-1", LockKey(PATIENT, "p-1")), ("device:monitor:m:1", LockKey(DEVICE, "monitor/m:1")),
     ("ingest:h1", LockKey(INGEST, "h1")), ("gateway:h1:ward-3", LockKey(INGEST, "h1"))],
)
def test_an_alert_subject_is_guarded_by_its_key(subject: str, key: LockKey) -> None:
    assert subject_key(subject) == key


def test_lock_order_is_by_class_then_hash_without_repeats() -> None:
    keys = [patient_key("b"), device_key("monitor", "z"), patient_key("a"), patient_key("b"), LockKey(INGEST, "h")]
    ordered = lock_order(keys)
    assert ordered == sorted(set(ordered)) and len(ordered) == 4
    assert [c for c, _ in ordered] == [DEVICE, PATIENT, PATIENT, INGEST]


def test_subject_keys_split_subjects_by_kind() -> None:
    assert subject_keys(["patient:p1", "device:monitor:m1", "ingest:h1", "patient:p2", "gateway:h1:ward-3"]) == {
        "devices": [("monitor", "m1")], "patients": ["p1", "p2"], "hospitals": ["h1"], "gateways": [("h1", "ward-3")]}


class RecordingTx:
    """Just enough of a transaction to see what a working set locks and loads."""

    def __init__(self) -> None:
        self.locked: list[list[LockKey]] = []

    def lock(self, keys):
        self.locked.append(list(keys))

    def devices_of(self, keys):
        return {}

    def open_gaps_of(self, keys):
        return []

    def owners_of(self, pids):
        return {}


def test_a_working_set_never_takes_a_lower_class_after_a_higher_one() -> None:
    tx = RecordingTx()
    ws = WorkingSet(tx, RULES, str)  # type: ignore[arg-type]
    ws.take(devices=[("monitor", "m2"), ("monitor", "m1")])
    ws.take(patients=["p1"])
    ws.take(patients=["p1"])  # already held: nothing more to lock
    assert tx.locked == [[device_key("monitor", "m1"), device_key("monitor", "m2")], [patient_key("p1")]]
    with pytest.raises(LockOrderError):
        ws.take(devices=[("monitor", "m3")])


def test_an_edge_gateways_alarms_are_loaded_under_its_hospitals_ingest_lock() -> None:
    tx = RecordingTx()
    ws = WorkingSet(tx, RULES, str)  # type: ignore[arg-type]
    ws.take(gateways=[("h1", "ward-3"), ("h1", "ward-4")])
    assert tx.locked == [[LockKey(INGEST, "h1"), LockKey(INGEST, "h1")]]
    assert ws.subjects == ["gateway:h1:ward-3", "gateway:h1:ward-4"]


# ----------------------------------------------------------------------- device-time order


def test_each_device_is_evaluated_in_device_time_whatever_the_arrival_order() -> None:
    s = StatusReport("h1", "monitor", "m1", "online", None, None, T0, T0)
    items: list[Reading | StatusReport] = [r(5, T0 + 5 * S), r(1, T0 + S, device="m2"), s, r(3, T0 + 3 * S),
                                           r(4, T0 + 4 * S), r(0, T0, device="m2")]
    assert [(i.device_id, getattr(i, "seq", "status")) for i in in_device_order(items)] == [
        ("m1", 3), ("m2", 0), ("m1", "status"), ("m1", 4), ("m1", 5), ("m2", 1)]


def test_equal_times_keep_their_arrival_order() -> None:
    items: list[Reading | StatusReport] = [r(2, T0), r(1, T0)]
    assert [i.seq for i in in_device_order(items) if isinstance(i, Reading)] == [2, 1]


# ----------------------------------------------------------------------- provisional gaps


def gap(first: int, last: int, boot: str = "b", confirmed: int | None = None) -> SeqGap:
    return SeqGap("monitor", "m1", first, last, T0, boot, confirmed)


@pytest.mark.parametrize(
    ("gaps", "boot", "seq", "expected"),
    [
        ([gap(5, 7)], "b", 6, [gap(5, 5), gap(7, 7)]),
        ([gap(5, 7)], "b", 5, [gap(6, 7)]),
        ([gap(5, 7)], "b", 7, [gap(5, 6)]),
        ([gap(5, 5)], "b", 5, []),  # filled entirely: no alarm will be raised
        ([gap(5, 7)], "b", 8, None),
        ([gap(5, 7)], "other", 6, None),  # another boot's seq 6 is another reading
        ([gap(5, 7, confirmed=T0)], "b", 6, None),  # raised already: history, not state
        ([gap(1, 2), gap(5, 7)], "b", 2, [gap(1, 1), gap(5, 7)]),
    ],
)
def test_a_late_reading_fills_a_provisional_gap(gaps, boot, seq, expected) -> None:
    assert fill_gaps(gaps, boot, seq) == expected


# ----------------------------------------------------------------------- late readings


def actions(transitions) -> list[str]:
    return [t.action for t in transitions]


def test_a_late_abnormal_reading_counts_towards_the_delay() -> None:
    b = book()
    assert b.evaluate(r(1, T0, heart_rate=130)) == []
    assert b.evaluate(r(3, T0 + 2 * S, heart_rate=130)) == []
    assert actions(b.evaluate(r(2, T0 + S, heart_rate=130), late=True)) == ["raised"]


@pytest.mark.parametrize("value", [100, 118], ids=["normal", "in-the-band"])
def test_a_late_normal_reading_neither_breaks_a_run_nor_clears(value: float) -> None:
    b = book()
    b.evaluate(r(1, T0, heart_rate=130))
    b.evaluate(r(3, T0 + 2 * S, heart_rate=130))
    assert b.evaluate(r(2, T0 + S, heart_rate=value), late=True) == []
    assert b.pending()[("patient:p1", "heart_rate.high")].count == 2
    assert actions(b.evaluate(r(4, T0 + 3 * S, heart_rate=130))) == ["raised"]
    assert b.evaluate(r(0, T0 - S, heart_rate=value), late=True) == []  # the newest reading decides clearing
    assert len(b.active()) == 1


def test_a_late_reading_stretches_the_run_it_joins_in_device_time() -> None:
    b = book()  # spo2.low: two readings over at least 10 s
    b.evaluate(r(2, T0 + 5 * S, spo2=85))
    assert actions(b.evaluate(r(1, T0 - 5 * S, spo2=85), late=True)) == ["raised"]  # 10 s from first to last


# ----------------------------------------------------------------------- pending delays persisted


def test_pending_delays_carry_over_to_the_next_transactions_book() -> None:
    first = book()
    first.evaluate(r(1, T0, heart_rate=130))
    first.evaluate(r(2, T0 + S, heart_rate=130))
    assert first.pending() == {("patient:p1", "heart_rate.high"): Pending(2, T0, T0 + S)}
    second = book()  # another transaction, maybe another bridge
    second.load_pending(first.pending())
    assert actions(second.evaluate(r(3, T0 + 2 * S, heart_rate=130))) == ["raised"]
    assert second.pending() == {}


def test_a_fresh_book_without_the_pending_state_would_raise_late() -> None:
    """Why pending delays are stored: without them a patient whose readings alternate
    between bridges would need three abnormal readings on one bridge."""
    first, second = book(), book()
    first.evaluate(r(1, T0, heart_rate=130))
    second.evaluate(r(2, T0 + S, heart_rate=130))
    assert first.evaluate(r(3, T0 + 2 * S, heart_rate=130)) == []


def test_pending_is_exported_as_stored_values() -> None:
    p = Pending(1, T0, T0)
    assert p.add(T0 - S) == Pending(2, T0 - S, T0) and p.add(T0 + S) == replace(p, count=2, last_ms=T0 + S)
