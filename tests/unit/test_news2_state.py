"""NEWS2 of a transaction's patients, without a database: which readings count, when a score
is stored and published, what going stale does, and what is written back."""

from __future__ import annotations

import itertools

from bridge.alerts import AlertBook, default_rules
from bridge.news2_state import News2State
from bridge.records import News2Record, ObservationRecord, PatientInputs
from firstcare.payloads import Reading

T0 = 1_800_000_000_000
H = 3_600_000


class FakeTx:
    def __init__(self) -> None:
        self.scores: list[tuple[str, int]] = []
        self.saved: dict[str, tuple[str, int | None]] = {}
        self.ids = itertools.count(1)

    def insert_news2(self, patient_id, hospital_id, s, signature, body):
        self.scores.append((patient_id, s.total))
        return next(self.ids)

    def insert_observations(self, records):
        return [next(self.ids) for _ in records]

    def save_news2_state(self, patient_id, signature, expiry_ms):
        self.saved[patient_id] = (signature, expiry_ms)


def reading(ts: int, **metrics: float) -> Reading:
    return Reading("h1", "monitor", "m1", ts, ts, ts, "p1", metrics)


def setup() -> tuple[News2State, AlertBook, FakeTx]:
    counter = itertools.count(1)
    return News2State({}), AlertBook(default_rules(), lambda: f"a{next(counter)}"), FakeTx()


def test_only_news2_inputs_count_and_an_older_reading_never_replaces_a_newer_one() -> None:
    state, _, _ = setup()
    assert not state.on_reading(reading(T0, glucose=100))
    assert state.on_reading(reading(T0, heart_rate=80))
    assert not state.on_reading(reading(T0 - 1000, heart_rate=140))  # a late backlog item
    assert state._inputs["p1"]["heart_rate"].value == 80


def test_a_score_is_stored_and_published_only_when_it_changes() -> None:
    state, book, tx = setup()
    events: list = []
    for i, hr in enumerate((80, 82, 84, 95)):  # 0, 0, 0, then 1 for the pulse
        state.on_reading(reading(T0 + i, heart_rate=hr))
        state.evaluate(tx, book, "p1", T0 + i, T0 + i, events)
    assert [e.data["total"] for e in events] == [0, 1]
    assert tx.scores == [("p1", 0), ("p1", 1)]
    assert events[0].name == "patient.news2.update" and events[0].data["id"] == 1


def test_an_input_going_stale_is_scored_again_when_its_expiry_is_due() -> None:
    state, book, tx = setup()
    events: list = []
    state.on_reading(reading(T0, heart_rate=140, temperature=36.8))
    state.evaluate(tx, book, "p1", T0, T0, events)
    expiry = state.expiry("p1")
    assert expiry is not None and T0 + H <= expiry <= T0 + H + 1  # the pulse goes stale first
    state.save(tx)
    assert tx.saved["p1"][1] == expiry  # written back: the timers of any bridge find it due
    state.evaluate(tx, book, "p1", expiry, expiry, events)
    assert events[-1].data["stale"] == ["heart_rate"] and events[-1].data["total"] == 0


def test_observations_feed_the_score_with_who_recorded_them() -> None:
    state, book, tx = setup()
    events: list = []
    records = [ObservationRecord("p1", "h1", "consciousness", "V", T0, T0, "nurse-1"),
               ObservationRecord("p1", "h1", "spo2_scale", 2, T0, T0, "nurse-1")]
    ids, _ = state.observe(tx, book, records, T0, events)
    assert ids == [1, 2]
    data = events[-1].data
    assert data["parameters"]["consciousness"] == {"value": "V", "score": 3, "ts": data["computed_at"],
                                                    "source": "observation:nurse-1"}
    assert data["spo2_scale"] == 2 and data["band"] == "low-medium"


def test_a_stored_signature_is_not_stored_again_by_the_next_transaction() -> None:
    state, book, tx = setup()
    events: list = []
    state.on_reading(reading(T0, heart_rate=80))
    state.evaluate(tx, book, "p1", T0, T0, events)
    state.save(tx)
    signature, expiry = tx.saved["p1"]
    # the next transaction on p1, in this bridge or another, loads what was written back
    following = News2State({"p1": News2Record(PatientInputs("h1", dict(state._inputs["p1"]), 1), signature, expiry)})
    following.evaluate(tx, book, "p1", T0, T0 + 1, events)
    assert len(tx.scores) == 1
