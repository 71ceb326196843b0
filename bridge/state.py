"""The state repository seam: the working set of one transaction.

The bridge keeps no alarm, device, ownership or NEWS2 state in memory between transactions:
several bridge processes may share one database, and a device's readings may reach any of
them. Instead every piece of work (a batch of readings, a timer sweep, an acknowledgement)

    1. locks the keys it touches, in the cluster's order (:mod:`bridge.cluster`): the devices
       first, then the patients their readings name (a reading without a patient id takes the
       one its device is bound to, which is only known once the device is locked and loaded),
       then hospitals;
    2. loads those keys' state from the store: device records and their provisional sequence
       gaps, patient owners, active alerts and pending condition delays of every subject
       (``device:...``, ``patient:...``, ``ingest:...``, ``gateway:...``: an edge gateway's alarms
       are guarded by its hospital's ingest lock), per-patient rule overrides, NEWS2;
    3. evaluates with the pure engines (:mod:`bridge.alerts`, :mod:`bridge.devices`,
       :mod:`bridge.sequence`, :mod:`bridge.news2_state`);
    4. writes back what changed (:meth:`WorkingSet.save`) in the same transaction, and commits.

So the next holder of a key, in this process or another, starts from exactly where the last one
left, and evaluation per key is serialised across the cluster. SQLite runs the same code path
(its ``lock`` is a no-op: ``BEGIN IMMEDIATE`` already serialises the one writer).

Threads: a working set lives inside one transaction on the writer thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bridge import devices as dev
from bridge.alerts import (
    AlertBook,
    Pending,
    Rule,
    Transition,
    device_subject,
    gateway_subject,
    ingest_subject,
    patient_subject,
)
from bridge.cluster import LockKey, device_key, ingest_key, patient_key
from bridge.news2_state import News2State
from bridge.records import DeviceKey, DeviceRecord, SeqGap
from bridge.store import Transaction


class LockOrderError(RuntimeError):
    """Code took a lock of a lower class after a higher one: a deadlock waiting to happen."""


class WorkingSet:
    """The locked keys of one transaction and their state; see the module docstring.

        ws = WorkingSet(tx, rules, new_id)
        ws.take(devices=[("monitor", "m1")])
        ws.take(patients=["p1"])              # never a lower class after a higher one
        ws.open()                             # alerts, pending delays, overrides, NEWS2
        ... ws.book.evaluate(r) ...; ws.put_device(after)
        ws.save(transitions)
    """

    def __init__(self, tx: Transaction, rules: Sequence[Rule], new_id: Callable[[], str]) -> None:
        self.tx = tx
        self._rules = rules
        self._new_id = new_id
        self.devices: dict[DeviceKey, DeviceRecord] = {}
        self.owners: dict[str, str] = {}
        self.patients: list[str] = []
        self.hospitals: list[str] = []
        self.gateways: list[tuple[str, str]] = []  # (hospital, gateway): subjects under their hospital's lock
        self.gaps: dict[DeviceKey, list[SeqGap]] = {}
        self._gaps_changed: set[DeviceKey] = set()
        self._changed: dict[DeviceKey, DeviceRecord] = {}
        self._device_keys: list[DeviceKey] = []
        self._top_class = 0
        self._pending_before: dict[tuple[str, str], Pending] = {}
        self.book: AlertBook
        self.news2: News2State

    # --- 1 and 2: lock and load ----------------------------------------------------------

    def take(self, devices: Iterable[DeviceKey] = (), patients: Iterable[str] = (),
             hospitals: Iterable[str] = (), gateways: Iterable[tuple[str, str]] = ()) -> None:
        """Lock these keys (those not taken yet) and load their records."""
        new_devices = sorted(set(devices) - set(self._device_keys))
        new_patients = sorted(set(patients) - set(self.patients))
        new_hospitals = sorted(set(hospitals) - set(self.hospitals))
        new_gateways = sorted(set(gateways) - set(self.gateways))
        keys: list[LockKey] = ([device_key(*k) for k in new_devices] + [patient_key(p) for p in new_patients]
                               + [ingest_key(h) for h in new_hospitals] + [ingest_key(h) for h, _ in new_gateways])
        if not keys:
            return
        lowest = min(k.cls for k in keys)
        if lowest < self._top_class:
            raise LockOrderError(f"lock class {lowest} taken after class {self._top_class}")
        self._top_class = max(k.cls for k in keys)
        self.tx.lock(keys)
        if new_devices:
            self._device_keys += new_devices
            self.devices.update(self.tx.devices_of(new_devices))
            for gap in self.tx.open_gaps_of(new_devices):
                self.gaps.setdefault(gap.key, []).append(gap)
        if new_patients:
            self.patients += new_patients
            self.owners.update(self.tx.owners_of(new_patients))
        self.hospitals += new_hospitals
        self.gateways += new_gateways

    @property
    def subjects(self) -> list[str]:
        return ([device_subject(*k) for k in self._device_keys] + [patient_subject(p) for p in self.patients]
                + [ingest_subject(h) for h in self.hospitals] + [gateway_subject(h, g) for h, g in self.gateways])

    def open(self) -> None:
        """Build the alert book and NEWS2 over the state of everything taken."""
        alerts, pending = self.tx.alert_state_of(self.subjects)
        overrides = self.tx.overrides_of(self.patients) if self.patients else {}
        self.book = AlertBook(self._rules, self._new_id, overrides)
        self.book.load_active(alerts)
        self.book.load_pending(pending)
        self._pending_before = dict(pending)
        self.news2 = News2State(self.tx.news2_of(self.patients) if self.patients else {})

    # --- 3: what the evaluation changes ---------------------------------------------------

    def device(self, device_type: str, device_id: str, hospital_id: str | None) -> DeviceRecord:
        return self.devices.get((device_type, device_id)) or dev.new_device(device_type, device_id, hospital_id)

    def put_device(self, device: DeviceRecord) -> None:
        self.devices[device.key] = self._changed[device.key] = device

    def owner(self, patient_id: str, hospital_id: str, at_ms: int) -> str:
        """The patient's hospital; the first hospital to report a patient claims it."""
        owner = self.owners.get(patient_id)
        if owner is None:
            self.tx.claim_patient(patient_id, hospital_id, at_ms)
            owner = self.owners[patient_id] = hospital_id
        return owner

    def add_gap(self, gap: SeqGap) -> None:
        self.gaps.setdefault(gap.key, []).append(gap)
        self._gaps_changed.add(gap.key)

    def fill_gap(self, key: DeviceKey, boot: str, seq: int) -> bool:
        """A reading numbered ``seq`` of ``boot`` fills a provisional gap: True if it did."""
        filled = dev.fill_gaps(self.gaps.get(key, ()), boot, seq)
        if filled is None:
            return False
        self.gaps[key] = filled
        self._gaps_changed.add(key)
        return True

    def confirm_gaps(self, key: DeviceKey, detected_before_ms: int, now_ms: int) -> list[SeqGap]:
        """The device's provisional gaps older than the grace period become confirmed."""
        confirmed = []
        kept = []
        for g in self.gaps.get(key, ()):
            if g.confirmed_ms is None and g.detected_ms <= detected_before_ms:
                g = SeqGap(g.device_type, g.device_id, g.first_missing, g.last_missing, g.detected_ms, g.boot, now_ms)
                confirmed.append(g)
            kept.append(g)
        if confirmed:
            self.gaps[key] = kept
            self._gaps_changed.add(key)
        return confirmed

    # --- 4: write back ----------------------------------------------------------------------

    def save(self, transitions: Iterable[Transition]) -> None:
        tx = self.tx
        tx.upsert_devices(self._changed.values())
        if self._gaps_changed:
            keys = sorted(self._gaps_changed)
            tx.save_open_gaps(keys, [g for k in keys for g in self.gaps.get(k, ())])
        tx.save_transitions(transitions)
        pending = self.book.pending()
        if pending != self._pending_before:
            tx.save_pending(self.subjects, pending)
        self.news2.save(tx)
        self._changed.clear()
        self._gaps_changed.clear()
        self._pending_before = pending


def open_working_set(tx: Any, rules: Sequence[Rule], new_id: Callable[[], str], *,
                     devices: Iterable[DeviceKey] = (), patients: Iterable[str] = (),
                     hospitals: Iterable[str] = (), gateways: Iterable[tuple[str, str]] = ()) -> WorkingSet:
    """Lock and load in one step, for work whose keys are all known up front."""
    ws = WorkingSet(tx, rules, new_id)
    ws.take(devices, patients, hospitals, gateways)
    ws.open()
    return ws
