"""The storage interface: small parts a backend implements, and the URL-selected factory.

Two backends, side by side: ``bridge.store_sqlite`` (+ ``store_sqlite_clinical``; one bridge
per database file) and ``bridge.store_postgres`` (several bridges on one database). Every
write happens inside :meth:`Lifecycle.transaction`, on the writer thread (:mod:`bridge.core`),
so a batch of readings, the alert transitions and device changes it causes commit together
or not at all. Reads may come from any thread.

The parts (each a small Protocol; :class:`Store` and :class:`Transaction` are their union):

    transaction                       store
    ----------------------------      -----------------------------------------------
    ReadingWrites   readings,         Lifecycle         transaction, ping, close,
                    dead letters,                       sessions, gauges
                    MQTT sessions     DashboardQueries  readings, alerts, devices,
    StateRepository locks + keyed                       patients (REST, WebSocket, SSE)
                    state: devices,   ClinicalQueries   NEWS2, FHIR, alarm report
                    owners, alerts,   DeadLetterQueries the dead-letter list
                    pending delays,   SigningKeys       public keys, signature policy
                    overrides, gaps   Retention         purge, partitions ahead
    ClinicalWrites  NEWS2 state
    KeyWrites       keys, policies
    TimerQueries    what is due

    store = open_store("sqlite:///data/firstcare.db")      # or postgresql://user@host/db
    with store.transaction() as tx:
        tx.lock([device_key("monitor", "m-1")])            # bridge.cluster; a no-op on SQLite
        device = tx.devices_of([("monitor", "m-1")])
        versions = tx.reading_versions("monitor", "m-1", 42)   # {boot: Content} stored under seq 42
        tx.insert_reading(reading, boot)                         # identity (device, boot, seq)

The records it reads and writes (devices, gaps, dead letters, NEWS2 inputs) are the domain's,
defined in :mod:`bridge.records`; only query shapes (``Page``, ``Gauges``) are defined here.

Errors: a backend raises :class:`~firstcare.errors.StoreUnavailable` when the database itself
cannot take the work now (locked, unreachable, restarting, a deadlock or serialisation failure:
retry the whole batch later) and plain :class:`~firstcare.errors.StoreError` when it refuses
this work (a constraint, a value out of range: blamed on the batch and isolated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from bridge.alerts import Alert, AlertState, Pending, RuleOverride, Transition
from bridge.cluster import LockKey
from bridge.records import DeadLetter, DeviceKey, DeviceRecord, News2Record, ObservationRecord, PatientInputs, SeqGap
from bridge.sequence import Content
from firstcare import news2
from firstcare.payloads import Reading, format_ts
from firstcare.signing import KeyRecord, b64url

MAX_PAGE = 5000

ReadingKey = tuple[str, str, int]  # (device type, device id, seq)


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None


_json_encode = msgspec.json.Encoder().encode


def metrics_json(metrics: Mapping[str, float]) -> str:
    """A reading's metrics as stored (compact JSON)."""
    return _json_encode(metrics).decode()


def reading_side_rows(pending: Sequence[tuple[Reading, str]]
                      ) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, float, int, str, str, int]]]:
    """What a transaction's buffered readings add beside themselves, pure: the patient claims
    (the first reading of each patient; the store keeps an existing claim) and the newest value
    of each (patient, metric), the later reading winning a tie, as (patient, hospital, at) and
    (patient, metric, value, ts, device type, device id, seq) rows in key order (the order
    rows are locked in). Applying these rows equals applying every reading's in turn.

    >>> r = Reading("h1", "monitor", "m1", 1, 10, 11, "p1", {"heart_rate": 70.0})
    >>> reading_side_rows([(r, ""), (dataclasses.replace(r, seq=2, metrics={"heart_rate": 71.0}), "")])
    ([('p1', 'h1', 11)], [('p1', 'heart_rate', 71.0, 10, 'monitor', 'm1', 2)])
    """
    newest: dict[tuple[str, str], tuple[int, float, Reading]] = {}
    claims: dict[str, tuple[str, int]] = {}
    for r, _ in pending:
        if r.patient_id is None:
            continue
        claims.setdefault(r.patient_id, (r.hospital_id, r.received_ms))
        for metric, value in r.metrics.items():
            key = (r.patient_id, metric)
            if key not in newest or r.ts_ms >= newest[key][0]:
                newest[key] = (r.ts_ms, value, r)
    return ([(p, h, at) for p, (h, at) in sorted(claims.items())],
            [(p, m, v, ts, r.device_type, r.device_id, r.seq) for (p, m), (ts, v, r) in sorted(newest.items())])


@dataclass(frozen=True, slots=True)
class Gauges:
    """Cluster-wide figures for stats and metrics (counted in the database)."""

    devices: int = 0
    devices_online: int = 0
    alerts_active: int = 0


# ------------------------------------------------------------------- inside a transaction


class ReadingWrites(Protocol):
    """What the ingest transaction stores. Inserts may be buffered until the commit."""

    def reading_versions(self, device_type: str, device_id: str, seq: int) -> dict[str, Content]: ...
    def versions_of(self, keys: Iterable[ReadingKey]) -> dict[ReadingKey, dict[str, Content]]: ...
    def insert_reading(self, reading: Reading, boot: str) -> None: ...
    def insert_readings(self, readings: Sequence[Reading]) -> list[bool]: ...
    def insert_dead_letters(self, letters: Iterable[DeadLetter]) -> None: ...
    def remember_session(self, client_id: str, broker: str, at_ms: int) -> None: ...
    def probe(self) -> None:
        """Prove this transaction reaches the database (the timer's write check on a bridge
        that is not the leader)."""
        ...


class KeyWrites(Protocol):
    """Devices' and gateways' public keys and the per-hospital signature policy."""

    def put_signing_key(self, key: KeyRecord, at_ms: int) -> None: ...
    def revoke_signing_keys(self, kids: Iterable[str], at_ms: int) -> None: ...
    def set_signature_policy(self, hospital_id: str, require: bool, at_ms: int) -> None: ...


class StateRepository(Protocol):
    """Per-key state, read after :meth:`lock` and written back before the commit."""

    def lock(self, keys: Iterable[LockKey]) -> None: ...
    def devices_of(self, keys: Iterable[DeviceKey]) -> dict[DeviceKey, DeviceRecord]: ...
    def upsert_devices(self, devices: Iterable[DeviceRecord]) -> None: ...
    def owners_of(self, patient_ids: Iterable[str]) -> dict[str, str]: ...
    def claim_patient(self, patient_id: str, hospital_id: str, at_ms: int) -> None: ...
    def alert_state_of(self, subjects: Iterable[str]) -> tuple[list[Alert], dict[tuple[str, str], Pending]]: ...
    def alert_by_id(self, alert_id: str) -> Alert | None: ...
    def save_transitions(self, transitions: Iterable[Transition]) -> None: ...
    def save_pending(self, subjects: Iterable[str], pending: Mapping[tuple[str, str], Pending]) -> None: ...
    def overrides_of(self, patient_ids: Iterable[str]) -> dict[str, dict[str, RuleOverride]]: ...
    def set_overrides(self, patient_id: str, overrides: dict[str, RuleOverride]) -> None: ...
    def open_gaps_of(self, keys: Iterable[DeviceKey]) -> list[SeqGap]: ...
    def save_open_gaps(self, keys: Iterable[DeviceKey], gaps: Iterable[SeqGap]) -> None: ...
    def insert_gaps(self, gaps: Iterable[SeqGap]) -> None: ...
    def hospitals(self) -> list[str]: ...


class ClinicalWrites(Protocol):
    def news2_of(self, patient_ids: Iterable[str]) -> dict[str, News2Record]: ...
    def save_news2_state(self, patient_id: str, signature: str, expiry_ms: int | None) -> None: ...
    def insert_observations(self, records: Iterable[ObservationRecord]) -> list[int]: ...
    def insert_news2(self, patient_id: str, hospital_id: str, s: news2.Score, signature: str, body: str) -> int:
        """Store a score; ``body`` is its wire form (:func:`firstcare.news2.score_json`) as JSON."""


class TimerQueries(Protocol):
    """Candidates for the timers, read without locks (the caller locks and re-checks)."""

    def due_devices(self, now_ms: int, silent_ms: int, offline_ms: int, spot_offline_ms: int,
                    continuous: Sequence[str], limit: int) -> list[DeviceKey]: ...
    def due_gaps(self, detected_before_ms: int, limit: int) -> list[DeviceKey]: ...
    def due_news2(self, now_ms: int, limit: int) -> list[str]: ...
    def due_escalations(self, raised_before_ms: int, priorities: Sequence[str], limit: int) -> list[str]: ...


class Transaction(ReadingWrites, StateRepository, ClinicalWrites, KeyWrites, TimerQueries, Protocol):
    pass


# ------------------------------------------------------------------------- the store


class Lifecycle(Protocol):
    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def close(self) -> None: ...
    def ping(self) -> None: ...
    def session_established(self, client_id: str, broker: str) -> bool: ...
    def gauges(self) -> Gauges: ...


class SigningKeys(Protocol):
    """Read by every bridge each tick (a key registered through any bridge is used by all)."""

    def load_signing_keys(self) -> list[KeyRecord]: ...
    def load_signature_policies(self) -> dict[str, bool]: ...
    def signing_keys(self, scope: str, hospital_id: str | None, owner: tuple[str, ...]) -> list[dict[str, Any]]: ...
    def signing_key(self, kid: str) -> tuple[KeyRecord, int | None] | None: ...


class DashboardQueries(Protocol):
    def readings(self, patient_id: str, metric: str | None, since_ms: int | None, until_ms: int | None,
                 limit: int, cursor: str | None) -> Page: ...
    def latest_vitals(self, patient_id: str) -> dict[str, dict[str, Any]]: ...
    def alerts(self, hospitals: frozenset[str] | None, hospital_id: str | None, patient_id: str | None,
               state: str | None, limit: int, cursor: str | None) -> Page: ...
    def alert(self, alert_id: str) -> Alert | None: ...
    def alert_history(self, alert_id: str) -> list[dict[str, Any]]: ...
    # the fan-out's catch-up after the hub could not publish alarms
    def alert_transition_id(self, alert_id: str, action: str, at_ms: int) -> int | None: ...
    def alert_transitions_after(self, after_id: int, limit: int) -> list[tuple[int, Transition]]: ...
    def devices(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                cursor: str | None) -> Page: ...
    def device(self, device_type: str, device_id: str) -> DeviceRecord | None: ...
    def patient_hospital(self, patient_id: str) -> str | None: ...
    def patients(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                 cursor: str | None) -> Page: ...
    def overrides(self, patient_id: str) -> dict[str, RuleOverride]: ...
    def counts(self) -> dict[str, int]: ...


class ClinicalQueries(Protocol):
    def patient_news2_inputs(self, patient_id: str) -> PatientInputs: ...
    def news2_history(self, patient_id: str, since_ms: int | None, until_ms: int | None, limit: int,
                      cursor: str | None) -> Page: ...
    def news2_score(self, score_id: int) -> dict[str, Any] | None: ...
    def news2_scores_between(self, patient_id: str, since_ms: int | None, until_ms: int | None,
                             after: tuple[int, int] | None, limit: int) -> list[dict[str, Any]]: ...
    def reading_by_id(self, reading_id: int) -> dict[str, Any] | None: ...
    def readings_between(self, patient_id: str, since_ms: int | None, until_ms: int | None,
                         after: tuple[int, int] | None, limit: int, metrics: Sequence[str] | None = None
                         ) -> list[dict[str, Any]]: ...
    def alarms_raised_between(self, hospitals: frozenset[str] | None, hospital_id: str | None, since_ms: int,
                              until_ms: int) -> list[dict[str, Any]]: ...
    def patient_days(self, hospitals: frozenset[str] | None, hospital_id: str | None, since_ms: int,
                     until_ms: int) -> int: ...


class DeadLetterQueries(Protocol):
    def dead_letters(self, reason: str | None, limit: int, cursor: str | None) -> Page: ...


class Retention(Protocol):
    def purge(self, older_than_ms: int) -> int:
        """Remove readings, dead letters and gap records older than the cutoff; how many."""
        ...

    def maintain(self, now_ms: int) -> None:
        """Housekeeping ahead of time (PostgreSQL: the readings partitions of the coming days)."""
        ...


class Store(Lifecycle, DashboardQueries, ClinicalQueries, DeadLetterQueries, SigningKeys, Retention, Protocol):
    pass


def open_store(url: str, busy_timeout_s: float = 2.0, statement_timeout_s: float = 30.0) -> Store:
    """Open the store a URL names; the backend module is imported only when chosen.
    ``busy_timeout_s``: how long a write waits for a lock held elsewhere before it fails;
    ``statement_timeout_s`` (PostgreSQL): the longest any one statement may run."""
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        from bridge.store_sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///"):], busy_timeout_s)
    if scheme in ("postgresql", "postgres"):
        from bridge.store_postgres import PostgresStore

        return PostgresStore(url, busy_timeout_s, statement_timeout_s)
    raise ValueError(f"unsupported store URL scheme {scheme!r} in {url!r}"
                     " (expected sqlite:///path or postgresql://user@host/database)")


def cursor_parts(cursor: str | None, n: int) -> list[int] | None:
    """The ``n`` integers of a paging cursor ``"a.b"``; ValueError for a malformed one."""
    if cursor is None:
        return None
    try:
        parts = [int(p) for p in cursor.split(".") if p.isascii()]
    except ValueError:
        parts = []
    if len(parts) != n or any(abs(p) >= 2**63 for p in parts):
        raise ValueError(f"malformed cursor {cursor!r}")
    return parts


def page_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_PAGE))


def alert_as_of(a: Alert, action: str, at_ms: int, state: str, value: float | None, by: str | None) -> Alert:
    """The alarm as it was at one of its stored transitions, from its current row: what
    happened later (acknowledgement, escalation, resolution) is taken out again."""
    def before(ms: int | None) -> int | None:
        return ms if ms is not None and ms <= at_ms else None

    acknowledged_ms = before(a.acknowledged_ms)
    return dataclasses.replace(
        a, state=AlertState(state), value=a.value if value is None else value, updated_ms=at_ms,
        acknowledged_ms=acknowledged_ms,
        acknowledged_by=(by or a.acknowledged_by) if action == "acknowledged" or acknowledged_ms is not None else None,
        escalated_ms=before(a.escalated_ms), resolved_ms=before(a.resolved_ms))


def alert_json(a: Alert) -> dict[str, Any]:
    body = dataclasses.asdict(a)
    for key in ("raised_ms", "updated_ms", "acknowledged_ms", "escalated_ms", "resolved_ms"):
        value = body.pop(key)
        body[key[:-3] + "_at"] = format_ts(value) if value is not None else None
    return body


def key_json(k: KeyRecord, created_ms: int | None = None, revoked_ms: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kid": k.kid, "algorithm": "Ed25519", "public_key": b64url(k.public_key),
                            "scope": k.scope, "hospital_id": k.hospital_id}
    if k.scope == "device":
        body.update(device_type=k.device_type, device_id=k.device_id)
    else:
        body["gateway_id"] = k.gateway_id
    body["registered_at"] = format_ts(created_ms) if created_ms is not None else None
    body["revoked_at"] = format_ts(revoked_ms) if revoked_ms is not None else None
    return body


def device_json(d: DeviceRecord) -> dict[str, Any]:
    body = dataclasses.asdict(d)
    for key in ("boot_ts_ms", "prev_boot", "last_ts_ms"):  # sequence bookkeeping, not for clients
        body.pop(key)
    for key in ("last_seen_ms", "last_data_ms"):
        value = body.pop(key)
        body[key[:-3] + "_at"] = format_ts(value) if value is not None else None
    return body
