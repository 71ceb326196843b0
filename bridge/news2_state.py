"""NEWS2 per patient, kept current on the writer thread (:mod:`bridge.core`).

Owned by the writer thread alone, like the alert book: no locks. Inputs come from stored
readings (respiratory rate, SpO2, systolic pressure, pulse, temperature: the newest by the
device's own time) and clinician observations (air or oxygen, ACVPU, the SpO2 scale). Whenever
one changes, or an input passes its freshness limit (checked every tick), the score is computed
again (:func:`firstcare.news2.score`) and

* fed to the alarm rules over ``news2`` / ``news2_max`` (``AlertBook.evaluate_derived``), with
  ``lower_bound`` set when inputs are missing or stale, so an incomplete score can raise an alarm
  but never clear one;
* stored and published as ``patient.news2.update`` when what a clinician sees changed (the
  scores, the band, completeness, which inputs are missing or stale), not at every new value.

Everything happens inside the caller's transaction, so a score and the alarms it raises commit
with the reading or observation that caused them, before anything is published.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from bridge.alerts import AlertBook, Transition
from bridge.store_clinical import ObservationRecord, PatientInputs
from firstcare import news2
from firstcare.events import Event, make_event
from firstcare.payloads import Reading


def news2_event(patient_id: str, hospital_id: str, score_id: int, s: news2.Score) -> Event:
    data = {"patient_id": patient_id, "hospital_id": hospital_id, "id": score_id, **news2.score_json(s)}
    return make_event("patient.news2.update", data, s.computed_ms)


def _json(signature: tuple[Any, ...]) -> str:
    return json.dumps(signature, separators=(",", ":"))


class News2State:
    def __init__(self, patients: dict[str, PatientInputs], signatures: dict[str, str]) -> None:
        self._inputs: dict[str, dict[str, news2.Input]] = {p: dict(v.inputs) for p, v in patients.items()}
        self._scales: dict[str, int] = {p: v.spo2_scale for p, v in patients.items()}
        self._hospitals: dict[str, str] = {p: v.hospital_id for p, v in patients.items() if v.hospital_id}
        self._stored = dict(signatures)  # JSON signature of each patient's last stored score (from the store)
        self._signatures: dict[str, tuple[Any, ...]] = {}  # ... and as computed since start (cheaper to compare)
        self._expiry: dict[str, int] = {}
        self._initial_expiry = True

    @classmethod
    def load(cls, store: Any) -> News2State:
        patients, signatures = store.load_news2()
        return cls(patients, signatures)

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
            return []
        s = news2.score(inputs, now_ms, self._scales.get(patient_id, 1))
        transitions = book.evaluate_derived(patient_id, hospital_id, {"news2": s.total, "news2_max": s.max_part},
                                            ts_ms, now_ms, lower_bound=not s.complete)
        signature = s.signature()
        known = self._signatures.get(patient_id)
        if known is None:
            changed = _json(signature) != self._stored.get(patient_id)
        else:
            changed = signature != known
        self._signatures[patient_id] = signature
        if changed:
            score_id = tx.insert_news2(patient_id, hospital_id, s, _json(signature))
            events.append(news2_event(patient_id, hospital_id, score_id, s))
        expiry = news2.next_expiry(inputs, now_ms)
        if expiry is None:
            self._expiry.pop(patient_id, None)
        else:
            self._expiry[patient_id] = expiry
        return transitions

    def expire(self, tx: Any, book: AlertBook, now_ms: int, events: list[Event]) -> list[Transition]:
        """Score again every patient one of whose inputs has just gone stale (tick)."""
        if self._initial_expiry:
            # after a restart: inputs may have gone stale while the bridge was down
            self._initial_expiry = False
            due = list(self._inputs)
        else:
            due = [pid for pid, at in self._expiry.items() if at <= now_ms]
        transitions: list[Transition] = []
        for pid in due:
            transitions += self.evaluate(tx, book, pid, now_ms, now_ms, events)
        return transitions
