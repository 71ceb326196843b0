"""The bridge's state machine: everything between a received MQTT message and an event.

All of it runs on one writer thread (:class:`Writer`), so the store's single writer, the alert
book and the device registry never need locks, and an API acknowledgement is ordered with the
readings around it. One batch is one transaction::

    decode (pure; a message that breaks the decoder is dead-lettered ``internal_error``)
      -> per message, in arrival order: identity (bridge.sequence: new, duplicate, reboot,
         conflict) -> insert reading -> device status, gaps -> alert rules
      -> dead letters -> COMMIT -> events (returned to the caller to publish)

If the transaction fails, the in-memory state (alert book, devices, patients) may be ahead of
the database, so it is reloaded from the database before the error propagates; the consumer
then retries the batch (store unavailable) or splits it until the failing message is alone and
hands it to :meth:`BridgeCore.quarantine`. The writer thread owns every attribute here; other
threads read ``stats()`` only.

Only after the commit does the caller acknowledge the batch to the broker, so a crash at any
point leaves the broker holding whatever was not stored. Alert transitions commit in the same
transaction as the readings that caused them: an alarm is persisted before it is fanned out.

Threads: the writer thread owns everything here (the book, ``devices``, ``patients``,
``counters``). Other threads (the stats and metrics endpoints) read only :attr:`snapshot`, a
frozen :class:`CoreSnapshot` the writer builds after each operation and swaps in by one
assignment, so a reader never iterates a dictionary the writer is changing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from bridge import devices as dev
from bridge import sequence
from bridge.alerts import INGEST_SESSION_LOST, TECHNICAL_MESSAGES, TECHNICAL_PRIORITY, AlertBook, Rule, RuleOverride, Transition, apply_overrides
from bridge.news2_state import News2State
from bridge.store_clinical import ObservationRecord
from bridge.store import DeadLetter, DeviceRecord, SeqGap, Store, alert_json, device_json
from firstcare.errors import FirstCareError, StoreUnavailable, TopicError
from firstcare.events import Event, make_event
from firstcare.payloads import (
    MAX_PAYLOAD_BYTES,
    Reading,
    Rejection,
    StatusReport,
    decode_status,
    decode_vitals,
    encode_vitals,
    format_ts,
    now_ms,
)
from firstcare.metrics import METRICS
from firstcare.mqtt import Inbound, describe_error
from firstcare.signing import KeyRecord, expired, open_message
from firstcare.topics import Topic, parse_topic, vitals_topic

log = logging.getLogger("firstcare.bridge")
T = TypeVar("T")

class PatientConflict(FirstCareError):
    reason = "patient_conflict"


class KeyConflict(FirstCareError):
    reason = "key_conflict"


PUBLISHED_ALERT_ACTIONS = frozenset({"raised", "acknowledged", "escalated", "resolved"})


@dataclass(frozen=True, slots=True)
class CoreSettings:
    topic_root: str = "fc"
    silent_ms: int = 60_000
    offline_ms: int = 180_000
    escalation_ms: int = 120_000
    dead_letter_bytes: int = 4096
    require_signatures: frozenset[str] = frozenset()  # hospital ids, or "*" for all (FC_REQUIRE_SIGNATURES)
    signature_max_age_ms: int = 7 * 86_400_000


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CoreSnapshot:
    """What the writer publishes for other threads: immutable, replaced whole."""

    counters: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    dead_letter_reasons: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    devices: int = 0
    devices_online: int = 0
    alerts_active: int = 0
    ingest_lag_ms: int = 0


class DeviceTable(dict[tuple[str, str], DeviceRecord]):
    """The writer's device registry; keeps the number online as devices are put, so a
    snapshot after every batch costs nothing per device."""

    def __init__(self, devices: Sequence[DeviceRecord] = ()) -> None:
        super().__init__((d.key, d) for d in devices)
        self.online = sum(1 for d in devices if d.state == "online")

    def __setitem__(self, key: tuple[str, str], device: DeviceRecord) -> None:
        before = self.get(key)
        self.online += (device.state == "online") - (before is not None and before.state == "online")
        super().__setitem__(key, device)


def vitals_event(r: Reading) -> Event:
    data = {
        "patient_id": r.patient_id, "hospital_id": r.hospital_id, "device_type": r.device_type,
        "device_id": r.device_id, "seq": r.seq, "ts": format_ts(r.ts_ms), "received_ts": format_ts(r.received_ms),
        "metrics": r.metrics, "units": {m: METRICS[m].unit for m in r.metrics}, "verified": r.verified,
    }
    return make_event("patient.vitals.update" if r.patient_id else "device.data.update", data, r.received_ms,
                      device_ms=r.ts_ms)


def alert_event(t: Transition) -> Event:
    return make_event(f"patient.alert.{t.action}", alert_json(t.alert), t.at_ms, device_ms=t.device_ms)


def device_event(d: DeviceRecord, at_ms: int) -> Event:
    return make_event("device.status.change", device_json(d), at_ms)


class BridgeCore:
    def __init__(self, store: Store, rules: list[Rule], settings: CoreSettings,
                 clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self.rules = rules
        self.settings = settings
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.dead_letter_reasons: Counter[str] = Counter()
        self.last_ingest_lag_ms = 0
        self.snapshot = CoreSnapshot()
        self._stale = False
        self._load()

    def _reload(self) -> None:
        """Reload the state from the database; if even that fails the store is down: say so
        (so the batch is retried, not blamed) and reload before the next piece of work."""
        try:
            self._load()
        except Exception as exc:
            self._stale = True
            raise StoreUnavailable(f"cannot reload state from the database: {exc}") from exc
        self._stale = False

    def _load(self) -> None:
        self.book = AlertBook(self.rules, new_id=lambda: uuid.uuid4().hex, overrides=self.store.load_overrides())
        self.book.load_active(self.store.load_active_alerts())
        self.devices: DeviceTable = DeviceTable(self.store.load_devices())
        self.patients: dict[str, str] = self.store.load_patients()
        self.news2 = News2State.load(self.store)  # NEWS2 inputs and scores (bridge/news2_state.py)
        self.keys: dict[str, KeyRecord] = {k.kid: k for k in self.store.load_signing_keys()}
        self.signature_policies: dict[str, bool] = self.store.load_signature_policies()
        self._publish_snapshot()

    def _publish_snapshot(self) -> None:
        self.snapshot = CoreSnapshot(
            MappingProxyType(dict(self.counters)), MappingProxyType(dict(self.dead_letter_reasons)),
            len(self.devices), self.devices.online, self.book.active_count(), self.last_ingest_lag_ms)

    def _committed(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(tx)`` in a transaction. If it fails, in-memory state may be ahead of the
        database, so it is reloaded from the database before the error propagates. Either
        way a fresh snapshot is published."""
        if self._stale:
            self._reload()
        try:
            with self.store.transaction() as tx:
                return fn(tx)
        except BaseException:
            self._reload()
            raise
        finally:
            self._publish_snapshot()

    def _device(self, device_type: str, device_id: str, hospital_id: str | None) -> DeviceRecord:
        return self.devices.get((device_type, device_id)) or dev.new_device(device_type, device_id, hospital_id)

    # --- ingest -------------------------------------------------------------------------

    def _decode(self, messages: Sequence[Inbound]) -> tuple[list[Reading | StatusReport], list[DeadLetter]]:
        """Decode each message on its own; one that makes the decoder raise costs only itself."""
        items: list[Reading | StatusReport] = []
        dead: list[DeadLetter] = []

        def reject(m: Inbound, r: Rejection, keep: int = self.settings.dead_letter_bytes) -> None:
            dead.append(DeadLetter(m.received_ms, m.topic, r.reason, r.detail, m.payload[:keep], len(m.payload),
                                   r.index))

        for m in messages:
            try:
                topic = parse_topic(m.topic, self.settings.topic_root)
            except TopicError as exc:
                reject(m, Rejection(exc.reason, str(exc)))
                continue
            try:
                if topic.kind == "vitals":
                    good, rejections = self._open_vitals(topic, m)
                else:
                    status = decode_status(topic, m.payload, m.received_ms)
                    good, rejections = ([], [status]) if isinstance(status, Rejection) else ([status], [])
            except Exception as exc:  # noqa: BLE001 - a bug in decoding; the message is kept for replay
                log.error("decoding a message on %s failed: %s", m.topic, describe_error(exc), exc_info=exc)
                reject(m, Rejection("internal_error", describe_error(exc)), self._kept_whole)
                continue
            items.extend(good)
            for rejection in rejections:
                reject(m, rejection)
        return items, dead

    def _open_vitals(self, topic: Topic, m: Inbound) -> tuple[list[Reading | StatusReport], list[Rejection]]:
        """Verify a signed message (firstcare.signing) and decode what it carries; readings
        under a verified signature are marked with its key id, and refused when older than the
        freshness window (a replay that retention could no longer recognise as a duplicate)."""
        opened = open_message(topic, m.topic, m.payload, self.keys, self.requires_signatures(topic.hospital_id))
        if isinstance(opened, Rejection):
            return [], [opened]
        decoded = decode_vitals(topic, opened.payload, m.received_ms)
        if not opened.verified:
            return list(decoded.readings), list(decoded.rejections)
        good: list[Reading | StatusReport] = []
        refused: list[Rejection] = []
        for r in decoded.readings:
            if expired(r.ts_ms, m.received_ms, self.settings.signature_max_age_ms):
                refused.append(Rejection("signature_expired", f"signed reading seq {r.seq} is older than the "
                                         "freshness window (FC_SIGNATURE_MAX_AGE_SECONDS): refused as a replay"))
            else:
                good.append(dataclasses.replace(r, signed_by=opened.signed_by))
        return good, refused + list(decoded.rejections)

    @property
    def _kept_whole(self) -> int:
        """Dead letters our own failures cause keep the whole payload (up to the 64 KiB a valid
        message may have), so the message can be published again once the bug is fixed."""
        return max(self.settings.dead_letter_bytes, MAX_PAYLOAD_BYTES)

    def process(self, messages: Sequence[Inbound]) -> list[Event]:
        """Validate, store and evaluate one batch; return the events to publish after commit."""
        items, dead = self._decode(messages)

        def work(tx: Any) -> tuple[list[Event], Counter[str], list[Transition], list[DeadLetter]]:
            events: list[Event] = []
            transitions: list[Transition] = []
            changed: dict[tuple[str, str], DeviceRecord] = {}
            gaps: list[SeqGap] = []
            tally: Counter[str] = Counter()
            letters = list(dead)
            for item in items:
                if isinstance(item, StatusReport):
                    tally["status_messages"] += 1
                    events += self._status(item, changed, transitions, tally)
                    continue
                tally["readings_valid"] += 1
                r = self._owned(self._with_patient(item), letters)
                if r is None:
                    continue
                before = self._device(r.device_type, r.device_id, r.hospital_id)
                verdict = sequence.classify(dev.seq_state(before), r.boot, r.seq,
                                            sequence.Content.of(r.ts_ms, r.metrics),
                                            tx.reading_versions(r.device_type, r.device_id, r.seq))
                if verdict.kind == "duplicate":
                    tally["duplicates"] += 1
                    continue
                if verdict.kind == "conflict":
                    tally["seq_conflicts"] += 1
                    letters.append(self._conflict_letter(r, verdict.boot))
                    continue
                tx.insert_reading(r, verdict.boot)
                tally["readings_stored"] += 1
                tally["readings_verified"] += r.verified
                tally["reboots"] += verdict.reboot
                after, gap = dev.on_reading(before, r, verdict)
                self.devices[after.key] = changed[after.key] = after
                transitions += self._device_alerts(before, after, r.received_ms)
                if gap is not None:
                    gaps.append(gap)
                    transitions += self.book.seq_gap(r.hospital_id, r.device_type, r.device_id, after.patient_id,
                                                     gap.last_missing - gap.first_missing + 1, r.received_ms)
                transitions += self.book.evaluate(r)
                if before.state != after.state:
                    events.append(device_event(after, r.received_ms))
                events.append(vitals_event(r))
                if self.news2.on_reading(r):  # NEWS2: a new input, score again (bridge/news2_state.py)
                    transitions += self.news2.evaluate(tx, self.book, r.patient_id or "", r.ts_ms, self.clock(), events)
            tx.upsert_devices(changed.values())
            tx.insert_gaps(gaps)
            tx.save_transitions(transitions)
            tx.insert_dead_letters(letters)
            tally["seq_gaps"] += len(gaps)
            return events, tally, transitions, letters

        events, tally, transitions, letters = self._committed(work)
        tally["messages"] += len(messages)
        self._count(tally, letters, transitions)
        if messages:
            self.last_ingest_lag_ms = max(0, self.clock() - min(m.received_ms for m in messages))
        self._publish_snapshot()
        return events + [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS]

    def _status(self, s: StatusReport, changed: dict[tuple[str, str], DeviceRecord],
                transitions: list[Transition], tally: Counter[str]) -> list[Event]:
        before = self._device(s.device_type, s.device_id, s.hospital_id)
        after = dev.on_status(before, s)
        tally["reboots"] += after.boot != before.boot  # an online status announcing a new boot
        self.devices[after.key] = changed[after.key] = after
        transitions += self._device_alerts(before, after, s.received_ms)
        if s.battery is not None:
            transitions += self.book.battery(s.hospital_id, s.device_type, s.device_id, after.patient_id,
                                             s.battery, s.received_ms)
        if (before.state, before.battery, before.firmware) != (after.state, after.battery, after.firmware):
            return [device_event(after, s.received_ms)]
        return []

    def _conflict_letter(self, r: Reading, boot: str) -> DeadLetter:
        """Other content under a stored identity: kept as a dead letter, never dropped."""
        payload = encode_vitals(r.seq, r.ts_ms, r.metrics, r.patient_id, r.boot)
        shown = f"boot {boot!r}" if boot else "the default boot"
        return DeadLetter(r.received_ms, vitals_topic(r.hospital_id, r.device_type, r.device_id, self.settings.topic_root),
                          "seq_conflict", f"seq {r.seq} of {shown} is stored with other content", payload,
                          len(payload))

    def quarantine(self, message: Inbound, error: BaseException) -> None:
        """Dead-letter one message that could not be processed (``internal_error``), durably,
        so it can be acknowledged and the stream goes on."""
        letter = DeadLetter(message.received_ms, message.topic, "internal_error", describe_error(error),
                            message.payload[: self._kept_whole], len(message.payload))

        def work(tx: Any) -> None:
            tx.insert_dead_letters([letter])

        self._committed(work)
        self._count(Counter(quarantined=1), [letter], [])
        self._publish_snapshot()

    def requires_signatures(self, hospital_id: str) -> bool:
        """The API's per-hospital policy wins; else FC_REQUIRE_SIGNATURES."""
        policy = self.signature_policies.get(hospital_id)
        if policy is not None:
            return policy
        return "*" in self.settings.require_signatures or hospital_id in self.settings.require_signatures

    def _owned(self, r: Reading, dead: list[DeadLetter]) -> Reading | None:
        """Patient ids are global and belong to the first hospital that reports them; a reading
        for that patient from another hospital is dead-lettered, never mixed into its record."""
        if r.patient_id is not None:
            owner = self.patients.setdefault(r.patient_id, r.hospital_id)
            if owner != r.hospital_id:
                payload = encode_vitals(r.seq, r.ts_ms, r.metrics, r.patient_id, r.boot)
                dead.append(DeadLetter(r.received_ms, vitals_topic(r.hospital_id, r.device_type, r.device_id,
                                                                   self.settings.topic_root),
                                       "patient_hospital_mismatch",
                                       f"patient {r.patient_id!r} belongs to another hospital", payload,
                                       len(payload)))
                return None
        return r

    def _with_patient(self, r: Reading) -> Reading:
        if r.patient_id is not None:
            return r
        device = self.devices.get(r.device_key)
        if device is None or device.patient_id is None:
            return r
        return dataclasses.replace(r, patient_id=device.patient_id)

    def _device_alerts(self, before: DeviceRecord, after: DeviceRecord, at_ms: int) -> list[Transition]:
        """Technical alarms for a change of device state (continuous monitors only)."""
        if not dev.is_continuous(after.device_type):
            return []
        args = (after.hospital_id or "", after.device_type, after.device_id, after.patient_id)
        out: list[Transition] = []
        if after.state == "offline" and before.state != "offline":
            out += self.book.device_offline(*args, at_ms)
        elif after.state == "online" and before.state != "online":
            out += self.book.device_online(*args, at_ms)
        if after.silent and not before.silent:
            out += self.book.device_silent(*args, at_ms)
        elif before.silent and not after.silent and after.state == "online":
            out += self.book.device_data(*args, at_ms)
        return out

    def _count(self, tally: Counter[str], dead: list[DeadLetter], transitions: list[Transition]) -> None:
        """Counters move only once the work they count has committed."""
        c = self.counters
        c.update(tally)
        c["dead_letters"] += len(dead)
        for d in dead:
            self.dead_letter_reasons[d.reason] += 1
            c["internal_errors"] += d.reason == "internal_error"
        for t in transitions:
            c[f"alerts_{t.action}"] += 1

    # --- timers -------------------------------------------------------------------------

    def tick(self) -> list[Event]:
        """Heartbeat and silence timeouts, alert escalation."""
        now = self.clock()

        def work(tx: Any) -> list[Event]:
            events: list[Event] = []
            transitions: list[Transition] = []
            changed = []
            for before in list(self.devices.values()):
                after = dev.sweep(before, now, self.settings.silent_ms, self.settings.offline_ms)
                if after is None:
                    continue
                self.devices[after.key] = after
                changed.append(after)
                transitions += self._device_alerts(before, after, now)
                if after.state != before.state:
                    events.append(device_event(after, now))
            escalation = self.settings.escalation_ms
            transitions += self.news2.expire(tx, self.book, now, events)  # NEWS2 inputs gone stale
            transitions += self.book.escalate_due(now, {"high": escalation, "medium": escalation})
            tx.upsert_devices(changed)
            tx.save_transitions(transitions)
            for t in transitions:
                self.counters[f"alerts_{t.action}"] += 1
            return events + [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS]

        return self._committed(work)

    def purge(self, older_than_ms: int) -> int:
        return self.store.purge(older_than_ms)

    # --- API operations -----------------------------------------------------------------

    def acknowledge(self, alert_id: str, by: str) -> tuple[dict[str, Any], list[Event]]:
        now = self.clock()

        def work(tx: Any) -> list[Transition]:
            transitions = self.book.acknowledge(alert_id, by, now)
            tx.save_transitions(transitions)
            return transitions

        transitions = self._committed(work)
        for t in transitions:
            self.counters[f"alerts_{t.action}"] += 1
        self._publish_snapshot()
        return alert_json(transitions[-1].alert), [alert_event(t) for t in transitions]

    def set_binding(self, device_type: str, device_id: str, patient_id: str | None,
                    hospital_id: str | None) -> tuple[DeviceRecord, list[Event]]:
        """Raises PatientConflict when the patient id belongs to another hospital."""
        before = self._device(device_type, device_id, hospital_id)
        after = dev.on_binding(before, patient_id, hospital_id)
        if patient_id is not None and self.patients.get(patient_id, after.hospital_id) != after.hospital_id:
            raise PatientConflict(f"patient id {patient_id!r} is in use by another hospital")

        def work(tx: Any) -> None:
            tx.upsert_devices([after])
            if patient_id is not None and after.hospital_id is not None:
                tx.claim_patient(patient_id, after.hospital_id, self.clock())
                self.patients.setdefault(patient_id, after.hospital_id)

        self._committed(work)
        self.devices[after.key] = after
        self._publish_snapshot()
        return after, [device_event(after, self.clock())]

    def register_key(self, key: KeyRecord) -> None:
        """Add (or replace) a public key. Raises KeyConflict when the key id belongs to another
        device or gateway, or was revoked (a revoked id is never reused, so audits stay exact)."""
        existing = self.store.signing_key(key.kid)
        if existing is not None:
            old, revoked_ms = existing
            if revoked_ms is not None:
                raise KeyConflict(f"key id {key.kid!r} was revoked; register the new key under a new id")
            if (old.scope, old.hospital_id, old.device_type, old.device_id, old.gateway_id) != (
                    key.scope, key.hospital_id, key.device_type, key.device_id, key.gateway_id):
                raise KeyConflict(f"key id {key.kid!r} belongs to another device or gateway")
        self._committed(lambda tx: tx.put_signing_key(key, self.clock()))
        self.keys[key.kid] = key

    def revoke_keys(self, kids: list[str]) -> None:
        self._committed(lambda tx: tx.revoke_signing_keys(kids, self.clock()))
        for kid in kids:
            self.keys.pop(kid, None)

    def set_signature_policy(self, hospital_id: str, require: bool) -> None:
        self._committed(lambda tx: tx.set_signature_policy(hospital_id, require, self.clock()))
        self.signature_policies[hospital_id] = require

    def set_overrides(self, patient_id: str, overrides: dict[str, RuleOverride]) -> list[Rule]:
        rules = apply_overrides(self.rules, overrides)  # validates before anything is stored

        def work(tx: Any) -> None:
            tx.set_overrides(patient_id, overrides)

        self._committed(work)
        self.book.set_overrides(patient_id, overrides)
        return rules

    def observe(self, records: Sequence[ObservationRecord]) -> tuple[list[int], list[Event]]:
        """Clinician observations (NEWS2 inputs): stored, scored, alarms evaluated, one commit."""
        now = self.clock()

        def work(tx: Any) -> tuple[list[int], list[Event]]:
            events: list[Event] = []
            ids, transitions = self.news2.observe(tx, self.book, records, now, events)
            tx.save_transitions(transitions)
            for t in transitions:
                self.counters[f"alerts_{t.action}"] += 1
            return ids, events + [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS]

        return self._committed(work)

    # --- MQTT session --------------------------------------------------------------------

    def remember_session(self, client_id: str, broker: str) -> None:
        """The broker granted this bridge a session: after a restart, one is expected there."""
        self._committed(lambda tx: tx.remember_session(client_id, broker, self.clock()))

    def session_lost(self, client_id: str, broker: str) -> list[Event]:
        """The broker had no session where one was expected: readings it queued for the bridge
        may be gone. A technical alarm for every hospital the bridge knows (one with an empty
        hospital id when it knows none), stored like any alarm, plus a ``system.alert``."""
        now = self.clock()
        hospitals = sorted({d.hospital_id for d in self.devices.values() if d.hospital_id}
                           | set(self.patients.values())) or [""]
        detail = (f"the MQTT broker {broker} had no session for client id {client_id!r}; readings it held for the"
                  " bridge may be lost (missing ones show as sequence gaps)")

        def work(tx: Any) -> list[Transition]:
            transitions = [t for h in hospitals for t in self.book.session_lost(h, detail, now)]
            tx.save_transitions(transitions)
            return transitions

        transitions = self._committed(work)
        for t in transitions:
            self.counters[f"alerts_{t.action}"] += 1
        self._publish_snapshot()
        system = make_event("system.alert", {
            "kind": "technical", "rule_id": INGEST_SESSION_LOST, "priority": TECHNICAL_PRIORITY[INGEST_SESSION_LOST],
            "message": TECHNICAL_MESSAGES[INGEST_SESSION_LOST], "detail": detail, "client_id": client_id,
            "broker": broker, "hospitals": [h for h in hospitals if h], "alert_ids": [t.alert.id for t in transitions],
            "raised_at": format_ts(now)}, now)
        return [alert_event(t) for t in transitions] + [system]

    def stats(self) -> dict[str, Any]:
        """From the snapshot: safe to call from any thread."""
        snap = self.snapshot
        return {
            **snap.counters,
            "dead_letter_reasons": dict(snap.dead_letter_reasons),
            "devices": snap.devices,
            "devices_online": snap.devices_online,
            "alerts_active": snap.alerts_active,
            "ingest_lag_ms": snap.ingest_lag_ms,
        }


class Writer:
    """Runs the core on its single thread and hands results back to the event loop."""

    def __init__(self, core: BridgeCore) -> None:
        self.core = core
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fc-writer")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
