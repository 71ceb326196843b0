"""The bridge's state machine: everything between a received MQTT message and an event.

All of it runs on one writer thread (:class:`Writer`), so an API acknowledgement is ordered
with the readings around it. One batch is one transaction::

    decode (pure; a message that breaks the decoder is dead-lettered ``internal_error``)
      -> each device's readings in device-time order (the batch's other items keep their place)
      -> lock + load the working set (bridge.state): devices, then their patients
      -> per item: identity (bridge.sequence: new, duplicate, reboot, conflict) -> insert
         reading -> device status, provisional gaps -> alert rules -> NEWS2
      -> write the working set back, dead letters -> COMMIT -> events (for the caller to publish)

No alarm, device, ownership or NEWS2 state outlives a transaction here: it is loaded under the
keys' locks and written back before the commit, so several bridges can share one PostgreSQL
database and a device's readings may reach any of them (docs/cluster-state.md). A failed
transaction therefore leaves nothing to undo in memory: the consumer retries the batch (store
unavailable) or splits it until the failing message is alone and hands it to
:meth:`BridgeCore.quarantine`.

Late readings: a reading older than one of its device already stored is stored and published,
and fed to the alarm rules only as evidence of a condition (it may raise, never clear) and only
within ``reorder_ms`` of the device's newest reading. Sequence gaps are provisional: a late
reading fills them, and the timers raise ``device.seq_gap`` only for what is still missing
after ``seq_gap_grace_ms``.

Timers (:meth:`BridgeCore.tick`) run on the cluster's leader only (:mod:`bridge.cluster`), and
each sweep locks and re-reads what it acts on, so even two ticking bridges fire a timer once.

Only after the commit does the caller acknowledge the batch to the broker, so a crash at any
point leaves the broker holding whatever was not stored. Alert transitions commit in the same
transaction as the readings that caused them: an alarm is persisted before it is fanned out.

Threads: the writer thread owns everything here (``counters``, the gauges). Other threads (the
stats and metrics endpoints) read only :attr:`snapshot`, a frozen :class:`CoreSnapshot` the
writer builds after each operation and swaps in by one assignment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from bridge import devices as dev
from bridge import sequence
from bridge.alerts import (
    INGEST_SESSION_LOST,
    TECHNICAL_MESSAGES,
    TECHNICAL_PRIORITY,
    AlertAction,
    AlertBook,
    AlertError,
    Rule,
    RuleOverride,
    Transition,
    apply_overrides,
    gateway_conditions,
)
from bridge.records import DeadLetter, DeviceKey, DeviceRecord, DeviceState, ObservationRecord
from bridge.state import WorkingSet, open_working_set
from bridge.store import Gauges, Store, Transaction, alert_json, device_json
from firstcare.errors import FirstCareError, TopicError
from firstcare.events import Event, make_event
from firstcare.metrics import METRICS
from firstcare.mqtt import describe_error
from firstcare.payloads import (
    MAX_PAYLOAD_BYTES,
    Inbound,
    Reading,
    Rejection,
    StatusReport,
    decode_gateway_status,
    decode_status,
    decode_vitals,
    encode_vitals,
    format_ts,
    now_ms,
)
from firstcare.signing import KeyRecord, expired, open_message
from firstcare.topics import Topic, parse_gateway_topic, parse_topic, vitals_topic

log = logging.getLogger("firstcare.bridge")
T = TypeVar("T")

class PatientConflict(FirstCareError):
    reason = "patient_conflict"


class KeyConflict(FirstCareError):
    reason = "key_conflict"


PUBLISHED_ALERT_ACTIONS = frozenset(AlertAction) - {AlertAction.UPDATED}


@dataclass(frozen=True, slots=True)
class CoreSettings:
    topic_root: str = "fc"
    silent_ms: int = 60_000
    offline_ms: int = 180_000
    escalation_ms: int = 120_000
    dead_letter_bytes: int = 4096
    require_signatures: frozenset[str] = frozenset()  # hospital ids, or "*" for all (FC_REQUIRE_SIGNATURES)
    signature_max_age_ms: int = 7 * 86_400_000
    seq_gap_grace_ms: int = 30_000  # a gap still unfilled this long after it was seen raises device.seq_gap
    reorder_ms: int = 30_000  # a late reading this much older than its device's newest is not evaluated
    sweep_limit: int = 1000  # keys one timer transaction locks at most


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


def in_device_order(items: Sequence[Reading | StatusReport]) -> list[Reading | StatusReport]:
    """Each device's readings sorted by device time (stable), in the places its readings held;
    statuses and other devices' readings keep theirs. A batch thus evaluates every device in
    the order it measured, whatever order the network delivered.

        [r(m1, ts 5), s(m1), r(m1, ts 3)] -> [r(m1, ts 3), s(m1), r(m1, ts 5)]
    """
    places: dict[DeviceKey, list[int]] = {}
    for i, item in enumerate(items):
        if isinstance(item, Reading):
            places.setdefault(item.device_key, []).append(i)
    out = list(items)
    for indexes in places.values():
        if len(indexes) > 1:
            ordered = sorted((items[i] for i in indexes), key=lambda r: r.ts_ms)
            for i, r in zip(indexes, ordered, strict=True):
                out[i] = r
    return out


def subject_keys(subjects: Iterable[str]) -> dict[str, list[Any]]:
    """Alert subjects as the keys a working set takes (``devices``, ``patients``, ``hospitals``,
    ``gateways``)."""
    keys: dict[str, list[Any]] = {"devices": [], "patients": [], "hospitals": [], "gateways": []}
    for subject in subjects:
        kind, _, rest = subject.partition(":")
        if kind == "device":
            device_type, _, device_id = rest.partition(":")
            keys["devices"].append((device_type, device_id))
        elif kind == "patient":
            keys["patients"].append(rest)
        elif kind == "ingest":
            keys["hospitals"].append(rest)
        elif kind == "gateway":
            hospital_id, _, gateway_id = rest.partition(":")
            keys["gateways"].append((hospital_id, gateway_id))
    return keys


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
        self.rules = [*AlertBook(rules, str).rules_for(None)]  # validated once, here
        self.settings = settings
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.dead_letter_reasons: Counter[str] = Counter()
        self.last_ingest_lag_ms = 0
        self.gauges = Gauges()
        self.snapshot = CoreSnapshot()
        self.keys: dict[str, KeyRecord] = {}
        self.signature_policies: dict[str, bool] = {}
        self._load_keys()
        self._refresh_gauges()

    def _load_keys(self) -> None:
        """Public keys and signature policies, read again every tick: small tables, and a key
        registered or revoked through any bridge of a cluster applies on all within a second."""
        self.keys = {k.kid: k for k in self.store.load_signing_keys()}
        self.signature_policies = self.store.load_signature_policies()

    @staticmethod
    def _new_id() -> str:
        return uuid.uuid4().hex

    def _working_set(self, tx: Transaction, **keys: Iterable[Any]) -> WorkingSet:
        return open_working_set(tx, self.rules, self._new_id, **keys)

    def _refresh_keys(self) -> None:
        try:
            self._load_keys()
        except Exception as exc:  # noqa: BLE001 - keep the keys we have; the tick reports the store
            log.debug("signing keys not refreshed: %s", exc)

    def _refresh_gauges(self) -> None:
        try:
            self.gauges = self.store.gauges()
        except Exception as exc:  # noqa: BLE001 - figures for stats only; readiness reports the store
            log.debug("gauges not refreshed: %s", exc)
        self._publish_snapshot()

    def _publish_snapshot(self) -> None:
        g = self.gauges
        self.snapshot = CoreSnapshot(
            MappingProxyType(dict(self.counters)), MappingProxyType(dict(self.dead_letter_reasons)),
            g.devices, g.devices_online, g.alerts_active, self.last_ingest_lag_ms)

    def _committed(self, fn: Callable[[Transaction], T]) -> T:
        """Run ``fn(tx)`` in one transaction; a fresh snapshot is published either way."""
        try:
            with self.store.transaction() as tx:
                return fn(tx)
        finally:
            self._publish_snapshot()

    def rules_for(self, patient_id: str) -> list[Rule]:
        """The rules in force for a patient, as stored (any thread)."""
        return apply_overrides(self.rules, self.store.overrides(patient_id))

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
        decoded, dead = self._decode(messages)
        items = in_device_order(decoded)

        def work(tx: Transaction) -> tuple[list[Event], Counter[str], list[Transition], list[DeadLetter]]:
            ws = WorkingSet(tx, self.rules, self._new_id)
            ws.take(devices={(i.device_type, i.device_id) for i in items})
            # a reading without a patient id takes its device's binding, known once the device is loaded
            items_ = [self._with_patient(i, ws) if isinstance(i, Reading) else i for i in items]
            ws.take(patients={i.patient_id for i in items_ if isinstance(i, Reading) and i.patient_id})
            ws.open()
            versions = tx.versions_of({(i.device_type, i.device_id, i.seq) for i in items_ if isinstance(i, Reading)})
            events: list[Event] = []
            transitions: list[Transition] = []
            tally: Counter[str] = Counter()
            letters = list(dead)
            for item in items_:
                if isinstance(item, StatusReport):
                    tally["status_messages"] += 1
                    events += self._status(ws, item, transitions, tally)
                    continue
                tally["readings_valid"] += 1
                r = self._owned(ws, item, letters)
                if r is None:
                    continue
                before = ws.device(r.device_type, r.device_id, r.hospital_id)
                content = sequence.Content.of(r.ts_ms, r.metrics)
                stored = versions.setdefault((r.device_type, r.device_id, r.seq), {})
                verdict = sequence.classify(dev.seq_state(before), r.boot, r.seq, content, stored)
                if verdict.kind == "duplicate":
                    tally["duplicates"] += 1
                    continue
                if verdict.kind == "conflict":
                    tally["seq_conflicts"] += 1
                    letters.append(self._conflict_letter(r, verdict.boot))
                    continue
                tx.insert_reading(r, verdict.boot)
                stored[verdict.boot] = content
                tally["readings_stored"] += 1
                tally["readings_verified"] += r.verified
                tally["reboots"] += verdict.reboot
                after, gap = dev.on_reading(before, r, verdict)
                ws.put_device(after)
                transitions += self._device_alerts(ws.book, before, after, r.received_ms)
                if gap is not None:
                    ws.add_gap(gap)  # provisional: raised by the timers if still missing after the grace period
                    tally["seq_gaps_provisional"] += 1
                elif not verdict.reboot and ws.fill_gap(after.key, verdict.boot, r.seq):
                    tally["seq_gaps_filled"] += 1
                transitions += self._evaluate(ws, before, r, tally)
                if before.state != after.state:
                    events.append(device_event(after, r.received_ms))
                events.append(vitals_event(r))
                if ws.news2.on_reading(r):  # NEWS2: a new input, score again (bridge/news2_state.py)
                    transitions += ws.news2.evaluate(tx, ws.book, r.patient_id or "", r.ts_ms, self.clock(), events)
            ws.save(transitions)
            tx.insert_dead_letters(letters)
            return events, tally, transitions, letters

        events, tally, transitions, letters = self._committed(work)
        tally["messages"] += len(messages)
        self._count(tally, letters, transitions)
        if messages:
            self.last_ingest_lag_ms = max(0, self.clock() - min(m.received_ms for m in messages))
        self._publish_snapshot()
        return events + [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS]

    def _evaluate(self, ws: WorkingSet, before: DeviceRecord, r: Reading, tally: Counter[str]) -> list[Transition]:
        """The alarm rules over one stored reading, in device-time order per device: a reading
        older than one of its device already stored is late; within the reorder window it may
        raise but never clear (AlertBook.evaluate), beyond it it is not evaluated."""
        newest = before.last_ts_ms
        if newest is None or r.ts_ms >= newest:
            return ws.book.evaluate(r)
        if newest - r.ts_ms <= self.settings.reorder_ms:
            tally["readings_late"] += 1
            return ws.book.evaluate(r, late=True)
        tally["readings_late_unevaluated"] += 1
        return []

    def _status(self, ws: WorkingSet, s: StatusReport, transitions: list[Transition],
                tally: Counter[str]) -> list[Event]:
        before = ws.device(s.device_type, s.device_id, s.hospital_id)
        after = dev.on_status(before, s)
        tally["reboots"] += after.boot != before.boot  # an online status announcing a new boot
        ws.put_device(after)
        transitions += self._device_alerts(ws.book, before, after, s.received_ms)
        if s.battery is not None:
            transitions += ws.book.battery(s.hospital_id, s.device_type, s.device_id, after.patient_id,
                                           s.battery, s.received_ms)
        if (before.state, before.battery, before.firmware) != (after.state, after.battery, after.firmware):
            return [device_event(after, s.received_ms)]
        return []

    def _conflict_letter(self, r: Reading, boot: str) -> DeadLetter:
        """Other content under a stored identity: kept as a dead letter, never dropped."""
        payload = encode_vitals(r.seq, r.ts_ms, r.metrics, r.patient_id, r.boot)
        shown = f"boot {boot!r}" if boot else "the default boot"
        topic = vitals_topic(r.hospital_id, r.device_type, r.device_id, self.settings.topic_root)
        return DeadLetter(r.received_ms, topic,
                          "seq_conflict", f"seq {r.seq} of {shown} is stored with other content", payload,
                          len(payload))

    def quarantine(self, message: Inbound, error: BaseException) -> None:
        """Dead-letter one message that could not be processed (``internal_error``), durably,
        so it can be acknowledged and the stream goes on."""
        letter = DeadLetter(message.received_ms, message.topic, "internal_error", describe_error(error),
                            message.payload[: self._kept_whole], len(message.payload))

        def work(tx: Transaction) -> None:
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

    def _owned(self, ws: WorkingSet, r: Reading, dead: list[DeadLetter]) -> Reading | None:
        """Patient ids are global and belong to the first hospital that reports them (claimed
        under the patient's lock, so two bridges cannot both claim one); a reading for that
        patient from another hospital is dead-lettered, never mixed into its record."""
        if r.patient_id is not None:
            owner = ws.owner(r.patient_id, r.hospital_id, r.received_ms)
            if owner != r.hospital_id:
                payload = encode_vitals(r.seq, r.ts_ms, r.metrics, r.patient_id, r.boot)
                dead.append(DeadLetter(r.received_ms, vitals_topic(r.hospital_id, r.device_type, r.device_id,
                                                                   self.settings.topic_root),
                                       "patient_hospital_mismatch",
                                       f"patient {r.patient_id!r} belongs to another hospital", payload,
                                       len(payload)))
                return None
        return r

    @staticmethod
    def _with_patient(r: Reading, ws: WorkingSet) -> Reading:
        if r.patient_id is not None:
            return r
        device = ws.devices.get(r.device_key)
        if device is None or device.patient_id is None:
            return r
        return dataclasses.replace(r, patient_id=device.patient_id)

    @staticmethod
    def _device_alerts(book: AlertBook, before: DeviceRecord, after: DeviceRecord, at_ms: int) -> list[Transition]:
        """Technical alarms for a change of device state (continuous monitors only)."""
        if not dev.is_continuous(after.device_type):
            return []
        args = (after.hospital_id or "", after.device_type, after.device_id, after.patient_id)
        out: list[Transition] = []
        if after.state == DeviceState.OFFLINE and before.state != DeviceState.OFFLINE:
            out += book.device_offline(*args, at_ms)
        elif after.state == DeviceState.ONLINE and before.state != DeviceState.ONLINE:
            out += book.device_online(*args, at_ms)
        if after.silent and not before.silent:
            out += book.device_silent(*args, at_ms)
        elif before.silent and not after.silent and after.state == DeviceState.ONLINE:
            out += book.device_data(*args, at_ms)
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

    def tick(self, lead: bool = True) -> list[Event]:
        """Heartbeat and silence timeouts, sequence gaps past their grace period, NEWS2 inputs
        gone stale, alert escalation: on the cluster's leader (``lead``). Each sweep finds what
        is due, locks it, re-reads it and acts only if it is still due, so a timer fires once
        even if two bridges believed they led. Every bridge opens a transaction each tick, so a
        store that refuses writes shows in readiness even when no reading arrives."""
        now = self.clock()
        self._refresh_keys()
        if not lead:
            self._committed(lambda tx: tx.probe())
            self._refresh_gauges()
            return []
        events: list[Event] = []
        for sweep in (self._sweep_devices, self._confirm_gaps, self._expire_news2, self._escalate):
            for _ in range(20):  # a bounded number of chunks per tick; the rest waits for the next
                found, more = self._timer(sweep, now)
                events += found
                if not more:
                    break
        self._refresh_gauges()
        return events

    def _timer(self, sweep: Callable[[Transaction, int, list[Event], Counter[str]], tuple[list[Transition], bool]],
               now: int) -> tuple[list[Event], bool]:
        def work(tx: Transaction) -> tuple[list[Event], list[Transition], Counter[str], bool]:
            events: list[Event] = []
            tally: Counter[str] = Counter()
            transitions, more = sweep(tx, now, events, tally)
            return events, transitions, tally, more

        events, transitions, tally, more = self._committed(work)
        self._count(tally, [], transitions)
        return events + [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS], more

    def _sweep_devices(self, tx: Transaction, now: int, events: list[Event], tally: Counter[str]
                       ) -> tuple[list[Transition], bool]:
        s = self.settings
        due = tx.due_devices(now, s.silent_ms, s.offline_ms, dev.SPOT_CHECK_OFFLINE_MS, sorted(dev.CONTINUOUS_TYPES),
                             s.sweep_limit)
        if not due:
            return [], False
        ws = self._working_set(tx, devices=due)
        transitions: list[Transition] = []
        for key in sorted(due):
            before = ws.devices.get(key)
            after = None if before is None else dev.sweep(before, now, s.silent_ms, s.offline_ms)
            if before is None or after is None:
                continue  # no longer due: another transaction changed it in between
            ws.put_device(after)
            transitions += self._device_alerts(ws.book, before, after, now)
            if after.state != before.state:
                events.append(device_event(after, now))
        ws.save(transitions)
        return transitions, len(due) >= s.sweep_limit

    def _confirm_gaps(self, tx: Transaction, now: int, events: list[Event], tally: Counter[str]
                      ) -> tuple[list[Transition], bool]:
        cutoff = now - self.settings.seq_gap_grace_ms
        due = tx.due_gaps(cutoff, self.settings.sweep_limit)
        if not due:
            return [], False
        ws = self._working_set(tx, devices=due)
        transitions: list[Transition] = []
        for key in sorted(due):
            device = ws.devices.get(key)
            for gap in ws.confirm_gaps(key, cutoff, now):
                tally["seq_gaps"] += 1
                hospital = device.hospital_id if device is not None else None
                patient = device.patient_id if device is not None else None
                transitions += ws.book.seq_gap(hospital or "", gap.device_type, gap.device_id, patient, gap.missing,
                                               now)
        ws.save(transitions)
        return transitions, len(due) >= self.settings.sweep_limit

    def _expire_news2(self, tx: Transaction, now: int, events: list[Event], tally: Counter[str]
                      ) -> tuple[list[Transition], bool]:
        due = tx.due_news2(now, self.settings.sweep_limit)
        if not due:
            return [], False
        ws = self._working_set(tx, patients=due)
        transitions: list[Transition] = []
        for patient_id in sorted(due):
            expiry = ws.news2.expiry(patient_id)
            if expiry is not None and expiry <= now:  # still due once locked
                transitions += ws.news2.evaluate(tx, ws.book, patient_id, now, now, events)
        ws.save(transitions)
        return transitions, len(due) >= self.settings.sweep_limit

    def _escalate(self, tx: Transaction, now: int, events: list[Event], tally: Counter[str]
                  ) -> tuple[list[Transition], bool]:
        escalation = self.settings.escalation_ms
        timeouts = {"high": escalation, "medium": escalation}
        due = tx.due_escalations(now - escalation, sorted(timeouts), self.settings.sweep_limit)
        if not due:
            return [], False
        ws = self._working_set(tx, **subject_keys(due))
        transitions = ws.book.escalate_due(now, timeouts)
        ws.save(transitions)
        return transitions, len(due) >= self.settings.sweep_limit

    def purge(self, older_than_ms: int) -> int:
        return self.store.purge(older_than_ms)

    def maintain(self) -> None:
        """Housekeeping ahead of time (the PostgreSQL readings partitions of the coming days)."""
        self.store.maintain(self.clock())

    # --- API operations -----------------------------------------------------------------

    def acknowledge(self, alert_id: str, by: str) -> tuple[dict[str, Any], list[Event]]:
        now = self.clock()

        def work(tx: Transaction) -> list[Transition]:
            found = tx.alert_by_id(alert_id)
            if found is None:
                raise AlertError(f"no alert {alert_id!r}", "alert_not_found")
            ws = self._working_set(tx, **subject_keys([found.subject]))  # locked, then read again
            if ws.book.get(alert_id) is None:
                raise AlertError(f"alert {alert_id!r} is already resolved", "alert_not_active")
            transitions = ws.book.acknowledge(alert_id, by, now)
            ws.save(transitions)
            return transitions

        transitions = self._committed(work)
        self._count(Counter(), [], transitions)
        self._publish_snapshot()
        return alert_json(transitions[-1].alert), [alert_event(t) for t in transitions]

    def set_binding(self, device_type: str, device_id: str, patient_id: str | None,
                    hospital_id: str | None) -> tuple[DeviceRecord, list[Event]]:
        """Raises PatientConflict when the patient id belongs to another hospital."""

        def work(tx: Transaction) -> DeviceRecord:
            ws = WorkingSet(tx, self.rules, self._new_id)
            ws.take(devices=[(device_type, device_id)])
            after = dev.on_binding(ws.device(device_type, device_id, hospital_id), patient_id, hospital_id)
            if patient_id is not None:
                ws.take(patients=[patient_id])
                owner = ws.owners.get(patient_id)
                if owner is not None and owner != after.hospital_id:
                    raise PatientConflict(f"patient id {patient_id!r} is in use by another hospital")
                if after.hospital_id is not None:
                    ws.owner(patient_id, after.hospital_id, self.clock())
            ws.open()
            ws.put_device(after)
            ws.save([])
            return after

        after = self._committed(work)
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

        def work(tx: Transaction) -> None:
            ws = self._working_set(tx, patients=[patient_id])
            tx.set_overrides(patient_id, overrides)
            ws.book.set_overrides(patient_id, overrides)  # pending delays restart (other thresholds)
            ws.save([])

        self._committed(work)
        return rules

    def observe(self, records: Sequence[ObservationRecord]) -> tuple[list[int], list[Event]]:
        """Clinician observations (NEWS2 inputs): stored, scored, alarms evaluated, one commit."""
        now = self.clock()

        def work(tx: Transaction) -> tuple[list[int], list[Event], list[Transition]]:
            events: list[Event] = []
            ws = self._working_set(tx, patients={r.patient_id for r in records})
            ids, transitions = ws.news2.observe(tx, ws.book, records, now, events)
            ws.save(transitions)
            return ids, events, transitions

        ids, events, transitions = self._committed(work)
        self._count(Counter(), [], transitions)
        return ids, events + [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS]

    # --- MQTT session --------------------------------------------------------------------

    def remember_session(self, client_id: str, broker: str) -> None:
        """The broker granted this bridge a session: after a restart, one is expected there."""
        self._committed(lambda tx: tx.remember_session(client_id, broker, self.clock()))

    def session_lost(self, client_id: str, broker: str) -> list[Event]:
        """The broker had no session where one was expected: readings it queued for the bridge
        may be gone. A technical alarm for every hospital the store knows (one with an empty
        hospital id when it knows none), stored like any alarm, plus a ``system.alert``."""
        now = self.clock()
        detail = (f"the MQTT broker {broker} had no session for client id {client_id!r}; readings it held for the"
                  " bridge may be lost (missing ones show as sequence gaps)")

        def work(tx: Transaction) -> tuple[list[str], list[Transition]]:
            hospitals = sorted(tx.hospitals()) or [""]
            ws = self._working_set(tx, hospitals=hospitals)
            transitions = [t for h in hospitals for t in ws.book.session_lost(h, detail, now)]
            ws.save(transitions)
            return hospitals, transitions

        hospitals, transitions = self._committed(work)
        self._count(Counter(), [], transitions)
        self._publish_snapshot()
        system = make_event("system.alert", {
            "kind": "technical", "rule_id": INGEST_SESSION_LOST, "priority": TECHNICAL_PRIORITY[INGEST_SESSION_LOST],
            "message": TECHNICAL_MESSAGES[INGEST_SESSION_LOST], "detail": detail, "client_id": client_id,
            "broker": broker, "hospitals": [h for h in hospitals if h], "alert_ids": [t.alert.id for t in transitions],
            "raised_at": format_ts(now)}, now)
        return [alert_event(t) for t in transitions] + [system]

    # --- edge gateways ------------------------------------------------------------------------

    def gateway_status(self, messages: Sequence[Inbound]) -> list[Event]:
        """Edge gateways' own status (``{root}/edge/{hospital}/{gateway}/status``): their spool
        and quarantine become technical alarms in the hospital's alerts room
        (:func:`bridge.alerts.gateway_conditions`), stored like every alarm; a malformed one is
        dead-lettered."""

        reports = []
        letters: list[DeadLetter] = []
        for m in messages:
            try:
                topic = parse_gateway_topic(m.topic, self.settings.topic_root)
                status = decode_gateway_status(m.payload)
            except TopicError as exc:
                status = Rejection(exc.reason, str(exc))
            if isinstance(status, Rejection):
                letters.append(DeadLetter(m.received_ms, m.topic, status.reason, status.detail,
                                          m.payload[: self.settings.dead_letter_bytes], len(m.payload)))
            else:
                reports.append((topic, status, m.received_ms))

        def work(tx: Transaction) -> tuple[list[Transition], list[DeadLetter]]:
            ws = self._working_set(tx, gateways=[(t.hospital_id, t.gateway_id) for t, _, _ in reports])
            transitions: list[Transition] = []
            for topic, status, received_ms in reports:
                transitions += ws.book.gateway_status(topic.hospital_id, topic.gateway_id,
                                                      gateway_conditions(topic.gateway_id, status), received_ms)
            ws.save(transitions)
            tx.insert_dead_letters(letters)
            return transitions, letters

        transitions, letters = self._committed(work)
        self._count(Counter(gateway_status_messages=len(messages)), letters, transitions)
        self._publish_snapshot()
        return [alert_event(t) for t in transitions if t.action in PUBLISHED_ALERT_ACTIONS]

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
