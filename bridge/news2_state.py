"""NEWS2 of the patients one transaction has locked (:mod:`bridge.state`), pure over their
stored state.

Inputs come from stored readings (respiratory rate, SpO2, systolic pressure, pulse,
temperature: the newest by the device's own time) and clinician observations (air or oxygen,
ACVPU, the SpO2 scale). Whenever one changes, or an input passes its freshness limit (the
timers find those through the stored expiry), the score is computed again
(:func:`firstcare.news2.score`) and

* fed to the alarm rules over ``news2`` / ``news2_max`` (``AlertBook.evaluate_derived``), with
  ``lower_bound`` set when inputs are missing or stale, so an incomplete score can raise an alarm
  but never clear one;
* stored and published as ``patient.news2.update`` when what a clinician sees changed (the
  scores, the band, completeness, which inputs are missing or stale), not at every new value.

What was decided (the signature of the last stored score, when an input next goes stale) is
written back with :meth:`News2State.save`, so the next transaction on the patient, in this
bridge or another, starts from it. Everything happens inside the caller's transaction, so a
score and the alarms it raises commit with the reading or observation that caused them.

Threads: an instance lives inside one transaction on the writer thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from bridge.alerts import AlertBook, Transition
from bridge.records import News2Record, ObservationRecord, PatientInputs
from firstcare import news2
from firstcare.events import Event, make_event
from firstcare.payloads import Reading


def news2_event(patient_id: str, hospital_id: str, score_id: int, s: news2.Score, wire: dict[str, Any]) -> Event:
    """``wire`` is ``news2.score_json(s)``, made once for the stored body and the event."""
    data = {"patient_id": patient_id, "hospital_id": hospital_id, "id": score_id, **wire}
    return make_event("patient.news2.update", data, s.computed_ms)


_encode = msgspec.json.Encoder().encode


def _json(signature: tuple[Any, ...]) -> str:
    """Compact JSON, as ``json.dumps(signature, separators=(",", ":"))`` writes it (stored)."""
    return _encode(signature).decode()


class News2State:
    def __init__(self, records: Mapping[str, News2Record] | None = None) -> None:
        records = records or {}
        self._inputs: dict[str, dict[str, news2.Input]] = {p: dict(r.known.inputs) for p, r in records.items()}
        self._scales: dict[str, int] = {p: r.known.spo2_scale for p, r in records.items()}
        self._hospitals: dict[str, str] = {p: r.known.hospital_id for p, r in records.items() if r.known.hospital_id}
        self._stored: dict[str, str | None] = {p: r.signature for p, r in records.items()}
        self._expiry: dict[str, int | None] = {p: r.expiry_ms for p, r in records.items()}
        self._dirty: set[str] = set()

    def on_reading(self, r: Reading) -> bool:
        """Take the reading's NEWS2 inputs; True when one of them changed."""
        if r.patient_id is None:
            return False
        changed = False
        inputs = self._inputs.setdefault(r.patient_id, {})
        for name, value in r.metrics.items():
            if name not in news2.DEVICE_PARAMETERS:
                continue
            current = inputs.get(name)
            if current is None or r.ts_ms >= current.ts_ms:
                inputs[name] = news2.Input(value, r.ts_ms, f"{r.device_type}/{r.device_id}")
                changed = True
        if changed:
            self._hospitals[r.patient_id] = r.hospital_id
        return changed

    def observe(self, tx: Any, book: AlertBook, records: Iterable[ObservationRecord], now_ms: int,
                events: list[Event]) -> tuple[list[int], list[Transition]]:
        """Store clinician observations (one patient) and score again; returns their ids."""
        records = list(records)
        ids = tx.insert_observations(records)
        if not records:
            return ids, []
        patient_id, hospital_id = records[0].patient_id, records[0].hospital_id
        self._hospitals[patient_id] = hospital_id
        inputs = self._inputs.setdefault(patient_id, {})
        newest = 0
        for o in records:
            newest = max(newest, o.ts_ms)
            if o.kind == "spo2_scale":
                self._scales[patient_id] = int(o.value)
                continue
            current = inputs.get(o.kind)
            if current is None or o.ts_ms >= current.ts_ms:
                inputs[o.kind] = news2.Input(o.value, o.ts_ms, f"observation:{o.recorded_by}")
        return ids, self.evaluate(tx, book, patient_id, newest, now_ms, events)

    def evaluate(self, tx: Any, book: AlertBook, patient_id: str, ts_ms: int, now_ms: int,
                 events: list[Event]) -> list[Transition]:
        """Score the patient now: run the rules; store and publish the score if it changed."""
        hospital_id = self._hospitals.get(patient_id)
        inputs = self._inputs.get(patient_id)
        if hospital_id is None or not inputs:
            if patient_id in self._expiry and self._expiry[patient_id] is not None:
                self._expiry[patient_id] = None  # nothing left to go stale
                self._dirty.add(patient_id)
            return []
        s = news2.score(inputs, now_ms, self._scales.get(patient_id, 1))
        transitions = book.evaluate_derived(patient_id, hospital_id, {"news2": s.total, "news2_max": s.max_part},
                                            ts_ms, now_ms, lower_bound=not s.complete)
        signature = _json(s.signature())
        if signature != self._stored.get(patient_id):
            wire = news2.score_json(s)
            score_id = tx.insert_news2(patient_id, hospital_id, s, signature, _encode(wire).decode())
            events.append(news2_event(patient_id, hospital_id, score_id, s, wire))
            self._stored[patient_id] = signature
        self._expiry[patient_id] = news2.next_expiry(inputs, now_ms)
        self._dirty.add(patient_id)
        return transitions

    def save(self, tx: Any) -> None:
        """Write back what was decided for each patient scored in this transaction."""
        for patient_id in sorted(self._dirty):
            tx.save_news2_state(patient_id, self._stored.get(patient_id) or "", self._expiry.get(patient_id))
        self._dirty.clear()

    def expiry(self, patient_id: str) -> int | None:
        return self._expiry.get(patient_id)


def empty_record(hospital_id: str | None = None) -> News2Record:
    return News2Record(PatientInputs(hospital_id, {}, 1))
