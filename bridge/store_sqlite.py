"""SQLite store: WAL, one writer connection (the writer thread), a read connection per thread.

``synchronous=FULL`` because a message is acknowledged to the broker once its transaction
commits: the commit has to survive a power cut, not only a crash of the process.

One process owns a database: :class:`SQLiteStore` holds an exclusive ``flock`` on
``<database>.lock`` from open to close (the kernel drops it when the process dies, even by
SIGKILL), so a second bridge on the same file is refused at start instead of interleaving its
own in-memory alarm and device state with the first one's writes. Connections wait at most
``busy_timeout_s`` for a lock held by someone else (a backup, a sqlite3 shell), so a batch
that cannot be written fails within seconds and readiness says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from bridge.alerts import Alert, Pending, RuleOverride, Transition
from bridge.cluster import LockKey
from bridge.records import DeadLetter, DeviceKey, DeviceRecord, SeqGap
from bridge.sequence import Content
from bridge.store import (
    Gauges,
    Page,
    ReadingKey,
    alert_as_of,
    alert_json,
    cursor_parts,
    device_json,
    key_json,
    metrics_json,
    page_limit,
    reading_side_rows,
)
from bridge.store_sqlite_clinical import ClinicalStoreMixin, ClinicalTransactionMixin
from firstcare.errors import StoreError, StoreUnavailable
from firstcare.filelock import FileInUse, lock_exclusive
from firstcare.payloads import Reading, format_ts
from firstcare.signing import KeyRecord

MIGRATIONS: list[str] = [
    """
    CREATE TABLE readings (
        id INTEGER PRIMARY KEY,
        device_type TEXT NOT NULL, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
        hospital_id TEXT NOT NULL, patient_id TEXT,
        ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, metrics TEXT NOT NULL,
        UNIQUE (device_type, device_id, seq)
    );
    CREATE INDEX readings_patient_ts ON readings (patient_id, ts_ms, id);
    CREATE INDEX readings_received ON readings (received_ms);
    CREATE TABLE latest_vitals (
        patient_id TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL, ts_ms INTEGER NOT NULL,
        device_type TEXT NOT NULL, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
        PRIMARY KEY (patient_id, metric)
    );
    CREATE TABLE patients (patient_id TEXT PRIMARY KEY, hospital_id TEXT NOT NULL, updated_ms INTEGER NOT NULL);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
        detail TEXT NOT NULL, payload BLOB NOT NULL, payload_size INTEGER NOT NULL, item_index INTEGER
    );
    CREATE INDEX dead_letters_reason ON dead_letters (reason, id);
    CREATE INDEX dead_letters_received ON dead_letters (received_ms);
    CREATE TABLE devices (
        device_type TEXT NOT NULL, device_id TEXT NOT NULL, hospital_id TEXT, patient_id TEXT,
        state TEXT NOT NULL, silent INTEGER NOT NULL DEFAULT 0, last_seen_ms INTEGER, last_data_ms INTEGER,
        battery INTEGER, firmware TEXT, last_seq INTEGER,
        PRIMARY KEY (device_type, device_id)
    );
    CREATE INDEX devices_hospital ON devices (hospital_id);
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY, rule_id TEXT NOT NULL, kind TEXT NOT NULL, priority TEXT NOT NULL,
        state TEXT NOT NULL, subject TEXT NOT NULL, patient_id TEXT, hospital_id TEXT NOT NULL,
        device_type TEXT, device_id TEXT, metric TEXT, value REAL, threshold REAL, message TEXT NOT NULL,
        latching INTEGER NOT NULL, condition_active INTEGER NOT NULL, raised_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL, acknowledged_by TEXT, acknowledged_ms INTEGER, escalated_ms INTEGER,
        resolved_ms INTEGER, count INTEGER NOT NULL
    );
    CREATE INDEX alerts_hospital ON alerts (hospital_id, state, raised_ms);
    CREATE INDEX alerts_patient ON alerts (patient_id, state, raised_ms);
    CREATE INDEX alerts_active ON alerts (state) WHERE state != 'resolved';
    CREATE TABLE alert_transitions (
        id INTEGER PRIMARY KEY, alert_id TEXT NOT NULL, action TEXT NOT NULL, at_ms INTEGER NOT NULL,
        state TEXT NOT NULL, value REAL, by TEXT
    );
    CREATE INDEX alert_transitions_alert ON alert_transitions (alert_id, id);
    CREATE TABLE seq_gaps (
        id INTEGER PRIMARY KEY, device_type TEXT NOT NULL, device_id TEXT NOT NULL,
        first_missing INTEGER NOT NULL, last_missing INTEGER NOT NULL, detected_ms INTEGER NOT NULL
    );
    CREATE TABLE alert_overrides (
        patient_id TEXT NOT NULL, rule_id TEXT NOT NULL, threshold REAL, clear REAL, enabled INTEGER NOT NULL,
        PRIMARY KEY (patient_id, rule_id)
    );
    """,
    "ALTER TABLE devices ADD COLUMN status_ms INTEGER;",
    # clinical: NEWS2 observations and scores (bridge/store_sqlite_clinical.py), the alarm report's window
    """
    CREATE TABLE observations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, patient_id TEXT NOT NULL, hospital_id TEXT NOT NULL,
        kind TEXT NOT NULL, value TEXT NOT NULL, ts_ms INTEGER NOT NULL, recorded_ms INTEGER NOT NULL,
        recorded_by TEXT NOT NULL, note TEXT
    );
    CREATE INDEX observations_patient ON observations (patient_id, kind, ts_ms, id);
    CREATE TABLE news2_scores (
        id INTEGER PRIMARY KEY AUTOINCREMENT, patient_id TEXT NOT NULL, hospital_id TEXT NOT NULL,
        computed_ms INTEGER NOT NULL, total INTEGER NOT NULL, band TEXT NOT NULL, complete INTEGER NOT NULL,
        max_part INTEGER NOT NULL, spo2_scale INTEGER NOT NULL, signature TEXT NOT NULL, body TEXT NOT NULL
    );
    CREATE INDEX news2_scores_patient ON news2_scores (patient_id, computed_ms, id);
    CREATE INDEX alerts_raised ON alerts (raised_ms);
    """,
    # the MQTT sessions this database's bridge has established, so that after a restart it
    # knows whether the broker ought to still hold one (and a missing one means lost readings)
    """
    CREATE TABLE mqtt_sessions (
        client_id TEXT NOT NULL, broker TEXT NOT NULL, established_ms INTEGER NOT NULL,
        PRIMARY KEY (client_id, broker)
    );
    """,
    # A reading's identity becomes (device, boot, seq) (bridge.sequence): the table is rebuilt
    # because SQLite cannot change a UNIQUE constraint; existing rows get the default boot ''.
    """
    CREATE TABLE readings_by_boot (
        id INTEGER PRIMARY KEY,
        device_type TEXT NOT NULL, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
        hospital_id TEXT NOT NULL, patient_id TEXT,
        ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, metrics TEXT NOT NULL,
        boot TEXT NOT NULL DEFAULT '',
        UNIQUE (device_type, device_id, seq, boot)
    );
    INSERT INTO readings_by_boot (id, device_type, device_id, seq, hospital_id, patient_id, ts_ms, received_ms,
                                  metrics, boot)
        SELECT id, device_type, device_id, seq, hospital_id, patient_id, ts_ms, received_ms, metrics, ''
        FROM readings;
    DROP TABLE readings;
    ALTER TABLE readings_by_boot RENAME TO readings;
    CREATE INDEX readings_patient_ts ON readings (patient_id, ts_ms, id);
    CREATE INDEX readings_received ON readings (received_ms);
    ALTER TABLE devices ADD COLUMN boot TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN boot_ts_ms INTEGER;
    ALTER TABLE devices ADD COLUMN prev_boot TEXT;
    ALTER TABLE devices ADD COLUMN last_ts_ms INTEGER;
    UPDATE devices SET last_ts_ms = (SELECT max(ts_ms) FROM readings r
                                     WHERE r.device_type = devices.device_type AND r.device_id = devices.device_id);
    """,
    # security: signed readings (firstcare/signing.py), public keys, per-hospital policy
    """
    ALTER TABLE readings ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE readings ADD COLUMN signed_by TEXT;
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY, public_key BLOB NOT NULL, scope TEXT NOT NULL, hospital_id TEXT NOT NULL,
        device_type TEXT, device_id TEXT, gateway_id TEXT, created_ms INTEGER NOT NULL, revoked_ms INTEGER
    );
    CREATE INDEX signing_keys_owner ON signing_keys (scope, hospital_id, device_type, device_id, gateway_id);
    CREATE TABLE signature_policies (
        hospital_id TEXT PRIMARY KEY, require_signatures INTEGER NOT NULL, updated_ms INTEGER NOT NULL
    );
    """,
    # Cluster-correct state (bridge/state.py): everything the writer used to keep in memory is
    # read per key from here. Pending condition delays and NEWS2 expiry are persisted; sequence
    # gaps are provisional until confirmed (gaps stored before were all raised: confirmed).
    """
    CREATE TABLE alert_pending (
        subject TEXT NOT NULL, rule_id TEXT NOT NULL, count INTEGER NOT NULL, first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL, PRIMARY KEY (subject, rule_id)
    );
    CREATE TABLE news2_state (patient_id TEXT PRIMARY KEY, signature TEXT NOT NULL, expiry_ms INTEGER);
    CREATE INDEX news2_state_expiry ON news2_state (expiry_ms) WHERE expiry_ms IS NOT NULL;
    INSERT INTO news2_state (patient_id, signature, expiry_ms)
        SELECT patient_id, signature, 0 FROM news2_scores WHERE id IN (SELECT max(id) FROM news2_scores GROUP BY patient_id);
    ALTER TABLE seq_gaps ADD COLUMN boot TEXT NOT NULL DEFAULT '';
    ALTER TABLE seq_gaps ADD COLUMN confirmed_ms INTEGER;
    UPDATE seq_gaps SET confirmed_ms = detected_ms;
    CREATE INDEX seq_gaps_open ON seq_gaps (device_type, device_id) WHERE confirmed_ms IS NULL;
    CREATE INDEX seq_gaps_detected ON seq_gaps (detected_ms);
    CREATE INDEX devices_online ON devices (last_seen_ms) WHERE state = 'online';
    CREATE INDEX alerts_subject ON alerts (subject) WHERE state != 'resolved';
    """,  # noqa: E501 - an applied migration is never edited
]

_ALERT_FIELDS = [f.name for f in dataclasses.fields(Alert)]
_DEVICE_FIELDS = [f.name for f in dataclasses.fields(DeviceRecord)]


DEFAULT_BUSY_TIMEOUT_S = 2.0


class DatabaseInUse(StoreError):
    """Another process holds the database's lock file."""

    reason = "store_in_use"


def _lock(path: str) -> int:
    """Take the exclusive lock beside the database; raise DatabaseInUse naming the holder."""
    try:
        return lock_exclusive(path)
    except FileInUse as exc:
        raise DatabaseInUse(
            f"the database {path!r} is in use by {exc.holder} (lock {exc.lock_path!r}): one bridge per SQLite"
            " database. Stop the other bridge, or give this one its own FC_STORE_URL") from exc


def _connect(path: str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


# Primary result codes that say the database, not the statement, is the problem: a batch that
# hits one is retried whole; any other error is blamed on the batch's content.
_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB,
})


def store_error(message: str, exc: sqlite3.Error) -> StoreError:
    """Convert an SQLite error: :class:`StoreUnavailable` when the database itself failed."""
    code = getattr(exc, "sqlite_errorcode", None)
    unavailable = (code & 0xFF in _UNAVAILABLE_CODES) if code is not None else isinstance(exc, sqlite3.OperationalError)
    return (StoreUnavailable if unavailable else StoreError)(f"{message}: {exc}")


def migrate(conn: sqlite3.Connection) -> int:
    """Bring an existing database up to the newest schema; returns the version reached."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


_cursor_parts = cursor_parts


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(values: Sequence[Any], size: int = 400) -> Iterator[Sequence[Any]]:
    """Keeps an IN list under SQLite's limit on bound parameters."""
    for i in range(0, len(values), size):
        yield values[i:i + size]


def _gap_from_row(row: sqlite3.Row) -> SeqGap:
    return SeqGap(row["device_type"], row["device_id"], row["first_missing"], row["last_missing"], row["detected_ms"],
                  row["boot"], row["confirmed_ms"])


_limit = page_limit


def alert_from_row(row: sqlite3.Row) -> Alert:
    values = {name: row[name] for name in _ALERT_FIELDS}
    values["latching"] = bool(values["latching"])
    values["condition_active"] = bool(values["condition_active"])
    return Alert(**values)


def _key_from_row(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(row["kid"], bytes(row["public_key"]), row["scope"], row["hospital_id"], row["device_type"],
                     row["device_id"], row["gateway_id"])


def _device_from_row(row: sqlite3.Row) -> DeviceRecord:
    values = {name: row[name] for name in _DEVICE_FIELDS}
    values["silent"] = bool(values["silent"])
    return DeviceRecord(**values)


class SQLiteTransaction(ClinicalTransactionMixin):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._readings: list[tuple[Reading, str]] = []

    # --- readings (buffered: written together before anything reads them, and at commit) ------

    def flush(self) -> None:
        """Write the buffered readings in one ``executemany``, then their patients' claims and
        latest vitals (:func:`bridge.store.reading_side_rows`)."""
        pending, self._readings = self._readings, []
        if not pending:
            return
        conn = self._conn
        conn.executemany(
            "INSERT INTO readings (device_type, device_id, seq, boot, hospital_id, patient_id,"
            " ts_ms, received_ms, metrics, verified, signed_by) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(r.device_type, r.device_id, r.seq, boot, r.hospital_id, r.patient_id, r.ts_ms, r.received_ms,
              metrics_json(r.metrics), int(r.signed_by is not None), r.signed_by) for r, boot in pending])
        claims, latest = reading_side_rows(pending)
        conn.executemany("INSERT INTO patients (patient_id, hospital_id, updated_ms) VALUES (?,?,?)"
                         " ON CONFLICT (patient_id) DO NOTHING", claims)
        conn.executemany(
            "INSERT INTO latest_vitals (patient_id, metric, value, ts_ms, device_type, device_id, seq)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT (patient_id, metric) DO UPDATE SET"
            " value=excluded.value, ts_ms=excluded.ts_ms, device_type=excluded.device_type,"
            " device_id=excluded.device_id, seq=excluded.seq WHERE excluded.ts_ms >= latest_vitals.ts_ms", latest)

    def reading_versions(self, device_type: str, device_id: str, seq: int) -> dict[str, Content]:
        """What the device has stored under ``seq``, per boot (the UNIQUE index serves it)."""
        return self.versions_of([(device_type, device_id, seq)]).get((device_type, device_id, seq), {})

    def versions_of(self, keys: Iterable[ReadingKey]) -> dict[ReadingKey, dict[str, Content]]:
        """``reading_versions`` of many (device type, device id, seq) at once: one query per
        device and chunk of seqs."""
        self.flush()
        by_device: dict[tuple[str, str], list[int]] = {}
        for device_type, device_id, seq in keys:
            by_device.setdefault((device_type, device_id), []).append(seq)
        found: dict[ReadingKey, dict[str, Content]] = {}
        for (device_type, device_id), seqs in by_device.items():
            for chunk in _chunks(sorted(set(seqs))):
                rows = self._conn.execute(
                    "SELECT seq, boot, ts_ms, metrics FROM readings WHERE device_type=? AND device_id=?"
                    f" AND seq IN ({_marks(len(chunk))})", [device_type, device_id, *chunk]).fetchall()
                for seq, boot, ts_ms, metrics in rows:
                    found.setdefault((device_type, device_id, seq), {})[boot] = Content.of(ts_ms, json.loads(metrics))
        return found

    def insert_readings(self, readings: Sequence[Reading]) -> list[bool]:
        """Bulk helper for tools and tests, no classification: each reading is inserted under
        its own boot ('' without one) unless that identity is stored already."""
        new = []
        for r in readings:
            boot = r.boot or ""
            fresh = boot not in self.reading_versions(r.device_type, r.device_id, r.seq)
            if fresh:
                self.insert_reading(r, boot)
            new.append(fresh)
        return new

    def insert_reading(self, r: Reading, boot: str) -> None:
        self._readings.append((r, boot))

    def claim_patient(self, patient_id: str, hospital_id: str, at_ms: int) -> None:
        """The first hospital to report a patient owns the id (see BridgeCore)."""
        self._conn.execute("INSERT INTO patients (patient_id, hospital_id, updated_ms) VALUES (?,?,?)"
                           " ON CONFLICT (patient_id) DO NOTHING", (patient_id, hospital_id, at_ms))

    def insert_dead_letters(self, letters: Iterable[DeadLetter]) -> None:
        self._conn.executemany(
            "INSERT INTO dead_letters (received_ms, topic, reason, detail, payload, payload_size, item_index)"
            " VALUES (?,?,?,?,?,?,?)",
            [(d.received_ms, d.topic, d.reason, d.detail, d.payload, d.payload_size, d.index) for d in letters],
        )

    def upsert_devices(self, devices: Iterable[DeviceRecord]) -> None:
        cols = ", ".join(_DEVICE_FIELDS)
        marks = ", ".join("?" for _ in _DEVICE_FIELDS)
        updates = ", ".join(f"{c}=excluded.{c}" for c in _DEVICE_FIELDS[2:])
        self._conn.executemany(
            f"INSERT INTO devices ({cols}) VALUES ({marks})"
            f" ON CONFLICT (device_type, device_id) DO UPDATE SET {updates}",
            [tuple(getattr(d, c) for c in _DEVICE_FIELDS) for d in devices],
        )

    def save_transitions(self, transitions: Iterable[Transition]) -> None:
        cols = ", ".join(_ALERT_FIELDS)
        marks = ", ".join("?" for _ in _ALERT_FIELDS)
        updates = ", ".join(f"{c}=excluded.{c}" for c in _ALERT_FIELDS[1:])
        for t in transitions:
            a = t.alert
            self._conn.execute(
                f"INSERT INTO alerts ({cols}) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates}",
                tuple(getattr(a, c) for c in _ALERT_FIELDS),
            )
            by = a.acknowledged_by if t.action == "acknowledged" else None
            self._conn.execute(
                "INSERT INTO alert_transitions (alert_id, action, at_ms, state, value, by) VALUES (?,?,?,?,?,?)",
                (a.id, t.action, t.at_ms, a.state, a.value, by),
            )

    def insert_gaps(self, gaps: Iterable[SeqGap]) -> None:
        self._conn.executemany(
            "INSERT INTO seq_gaps (device_type, device_id, first_missing, last_missing, detected_ms, boot,"
            " confirmed_ms) VALUES (?,?,?,?,?,?,?)",
            [(g.device_type, g.device_id, g.first_missing, g.last_missing, g.detected_ms, g.boot, g.confirmed_ms)
             for g in gaps],
        )

    def probe(self) -> None:
        """Nothing more to do: BEGIN IMMEDIATE has taken the write lock already."""

    # --- the state repository (bridge/state.py) -------------------------------------------

    def lock(self, keys: Iterable[LockKey]) -> None:
        """Nothing to do: one process owns the database and BEGIN IMMEDIATE serialises it."""

    def _rows(self, sql: str, values: Sequence[Any], per: int = 1) -> list[sqlite3.Row]:
        """``sql`` with ``{}`` replaced by an IN list, run over ``values`` in chunks."""
        rows: list[sqlite3.Row] = []
        for chunk in _chunks(list(values)):
            if per == 1:
                rows += self._conn.execute(sql.format(_marks(len(chunk))), list(chunk)).fetchall()
            else:
                marks = ",".join(f"({_marks(per)})" for _ in chunk)
                rows += self._conn.execute(sql.format(marks), [v for key in chunk for v in key]).fetchall()
        return rows

    def devices_of(self, keys: Iterable[DeviceKey]) -> dict[DeviceKey, DeviceRecord]:
        rows = self._rows("SELECT * FROM devices WHERE (device_type, device_id) IN (VALUES {})", list(keys), 2)
        return {(r["device_type"], r["device_id"]): _device_from_row(r) for r in rows}

    def owners_of(self, patient_ids: Iterable[str]) -> dict[str, str]:
        rows = self._rows("SELECT patient_id, hospital_id FROM patients WHERE patient_id IN ({})", list(patient_ids))
        return {r[0]: r[1] for r in rows}

    def alert_state_of(self, subjects: Iterable[str]) -> tuple[list[Alert], dict[tuple[str, str], Pending]]:
        subjects = list(subjects)
        alerts = self._rows("SELECT * FROM alerts WHERE state != 'resolved' AND subject IN ({})", subjects)
        pending = self._rows("SELECT * FROM alert_pending WHERE subject IN ({})", subjects)
        return ([alert_from_row(r) for r in alerts],
                {(r["subject"], r["rule_id"]): Pending(r["count"], r["first_ms"], r["last_ms"]) for r in pending})

    def alert_by_id(self, alert_id: str) -> Alert | None:
        row = self._conn.execute("SELECT * FROM alerts WHERE id=?", (alert_id,)).fetchone()
        return alert_from_row(row) if row is not None else None

    def save_pending(self, subjects: Iterable[str], pending: Mapping[tuple[str, str], Pending]) -> None:
        subjects = list(subjects)
        for chunk in _chunks(subjects):
            self._conn.execute(f"DELETE FROM alert_pending WHERE subject IN ({_marks(len(chunk))})", list(chunk))
        wanted = set(subjects)
        self._conn.executemany(
            "INSERT INTO alert_pending (subject, rule_id, count, first_ms, last_ms) VALUES (?,?,?,?,?)",
            [(subject, rule, p.count, p.first_ms, p.last_ms) for (subject, rule), p in pending.items()
             if subject in wanted])

    def overrides_of(self, patient_ids: Iterable[str]) -> dict[str, dict[str, RuleOverride]]:
        result: dict[str, dict[str, RuleOverride]] = {}
        for r in self._rows("SELECT * FROM alert_overrides WHERE patient_id IN ({})", list(patient_ids)):
            result.setdefault(r["patient_id"], {})[r["rule_id"]] = RuleOverride(
                threshold=r["threshold"], clear=r["clear"], enabled=bool(r["enabled"]))
        return result

    def open_gaps_of(self, keys: Iterable[DeviceKey]) -> list[SeqGap]:
        rows = self._rows("SELECT * FROM seq_gaps WHERE confirmed_ms IS NULL AND (device_type, device_id) IN"
                          " (VALUES {}) ORDER BY id", list(keys), 2)
        return [_gap_from_row(r) for r in rows]

    def save_open_gaps(self, keys: Iterable[DeviceKey], gaps: Iterable[SeqGap]) -> None:
        """Replace the provisional gaps of these devices by ``gaps`` (confirmed ones included)."""
        self._conn.executemany("DELETE FROM seq_gaps WHERE confirmed_ms IS NULL AND device_type=? AND device_id=?",
                               list(keys))
        self.insert_gaps(gaps)

    def hospitals(self) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT hospital_id FROM devices WHERE hospital_id IS NOT NULL UNION SELECT hospital_id FROM patients")]

    # --- what the timers find due (read without locks; the caller re-checks) ----------------

    def due_devices(self, now_ms: int, silent_ms: int, offline_ms: int, spot_offline_ms: int,
                    continuous: Sequence[str], limit: int) -> list[DeviceKey]:
        marks = _marks(len(continuous))
        rows = self._conn.execute(
            "SELECT device_type, device_id FROM devices WHERE state = 'online' AND ("
            f" (device_type IN ({marks}) AND (last_seen_ms <= ?"
            "   OR (NOT silent AND coalesce(last_data_ms, last_seen_ms) <= ?)))"
            f" OR (device_type NOT IN ({marks}) AND last_seen_ms <= ?)) LIMIT ?",
            [*continuous, now_ms - offline_ms, now_ms - silent_ms, *continuous,
             now_ms - max(offline_ms, spot_offline_ms), limit]).fetchall()
        return [(r[0], r[1]) for r in rows]

    def due_gaps(self, detected_before_ms: int, limit: int) -> list[DeviceKey]:
        rows = self._conn.execute("SELECT DISTINCT device_type, device_id FROM seq_gaps WHERE confirmed_ms IS NULL"
                                  " AND detected_ms <= ? LIMIT ?", (detected_before_ms, limit)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def due_news2(self, now_ms: int, limit: int) -> list[str]:
        rows = self._conn.execute("SELECT patient_id FROM news2_state WHERE expiry_ms IS NOT NULL AND expiry_ms <= ?"
                                  " LIMIT ?", (now_ms, limit)).fetchall()
        return [r[0] for r in rows]

    def due_escalations(self, raised_before_ms: int, priorities: Sequence[str], limit: int) -> list[str]:
        rows = self._conn.execute(
            f"SELECT DISTINCT subject FROM alerts WHERE state = 'raised' AND priority IN ({_marks(len(priorities))})"
            " AND raised_ms <= ? LIMIT ?", [*priorities, raised_before_ms, limit]).fetchall()
        return [r[0] for r in rows]

    def remember_session(self, client_id: str, broker: str, at_ms: int) -> None:
        self._conn.execute("INSERT INTO mqtt_sessions (client_id, broker, established_ms) VALUES (?,?,?)"
                           " ON CONFLICT (client_id, broker) DO UPDATE SET established_ms=excluded.established_ms",
                           (client_id, broker, at_ms))

    def put_signing_key(self, key: KeyRecord, at_ms: int) -> None:
        self._conn.execute(
            "INSERT INTO signing_keys (kid, public_key, scope, hospital_id, device_type, device_id, gateway_id,"
            " created_ms) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (kid) DO UPDATE SET public_key=excluded.public_key,"
            " created_ms=excluded.created_ms",
            (key.kid, key.public_key, key.scope, key.hospital_id, key.device_type, key.device_id, key.gateway_id,
             at_ms))

    def revoke_signing_keys(self, kids: Iterable[str], at_ms: int) -> None:
        self._conn.executemany("UPDATE signing_keys SET revoked_ms=? WHERE kid=? AND revoked_ms IS NULL",
                               [(at_ms, kid) for kid in kids])

    def set_signature_policy(self, hospital_id: str, require: bool, at_ms: int) -> None:
        self._conn.execute(
            "INSERT INTO signature_policies (hospital_id, require_signatures, updated_ms) VALUES (?,?,?)"
            " ON CONFLICT (hospital_id) DO UPDATE SET require_signatures=excluded.require_signatures,"
            " updated_ms=excluded.updated_ms", (hospital_id, int(require), at_ms))

    def set_overrides(self, patient_id: str, overrides: dict[str, RuleOverride]) -> None:
        self._conn.execute("DELETE FROM alert_overrides WHERE patient_id=?", (patient_id,))
        self._conn.executemany(
            "INSERT INTO alert_overrides (patient_id, rule_id, threshold, clear, enabled) VALUES (?,?,?,?,?)",
            [(patient_id, rule, o.threshold, o.clear, int(o.enabled)) for rule, o in overrides.items()],
        )


class SQLiteStore(ClinicalStoreMixin):
    def __init__(self, path: str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        directory = os.path.dirname(os.path.abspath(path))
        self._lock_fd: int | None = None
        try:
            os.makedirs(directory, exist_ok=True)
            self._lock_fd = _lock(path)
            self._writer = _connect(path, busy_timeout_s)
            migrate(self._writer)
        except DatabaseInUse:
            raise
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise StoreError(f"cannot open SQLite database {path!r}: {exc}") from exc
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self.busy_timeout_s)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[SQLiteTransaction]:
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise store_error("cannot begin a transaction", exc) from exc
        try:
            tx = SQLiteTransaction(conn)
            yield tx
            tx.flush()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise store_error("transaction failed", exc) from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """Roll back whatever is open; a failed COMMIT may already have ended the transaction."""
        if self._writer.in_transaction:
            with suppress(sqlite3.Error):
                self._writer.execute("ROLLBACK")

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._writer.close()
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def session_established(self, client_id: str, broker: str) -> bool:
        """Whether this database's bridge has held an MQTT session with this id on this broker."""
        return self._writer.execute("SELECT 1 FROM mqtt_sessions WHERE client_id=? AND broker=?",
                                    (client_id, broker)).fetchone() is not None

    def ping(self) -> None:
        try:
            self._reader().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"database unreachable: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._reader().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc

    def _page_rows(self, sql: str, params: list[Any], order: str, limit: int
                   ) -> tuple[list[sqlite3.Row], sqlite3.Row | None]:
        """One page of ``sql`` in ``order``, and its last row when another page follows (the
        row the next cursor is made from)."""
        rows = self._query(f"{sql} ORDER BY {order} LIMIT ?", [*params, limit + 1])
        return rows[:limit], rows[limit - 1] if len(rows) > limit else None

    def gauges(self) -> Gauges:
        devices, online = self._query("SELECT count(*), coalesce(sum(state = 'online'), 0) FROM devices")[0]
        active = self._query("SELECT count(*) FROM alerts WHERE state != 'resolved'")[0][0]
        return Gauges(devices, online, active)

    def overrides(self, patient_id: str) -> dict[str, RuleOverride]:
        return {r["rule_id"]: RuleOverride(threshold=r["threshold"], clear=r["clear"], enabled=bool(r["enabled"]))
                for r in self._query("SELECT * FROM alert_overrides WHERE patient_id=?", (patient_id,))}

    def load_signing_keys(self) -> list[KeyRecord]:
        rows = self._query("SELECT * FROM signing_keys WHERE revoked_ms IS NULL")
        return [_key_from_row(r) for r in rows]

    def load_signature_policies(self) -> dict[str, bool]:
        rows = self._query("SELECT hospital_id, require_signatures FROM signature_policies")
        return {r[0]: bool(r[1]) for r in rows}

    def signing_keys(self, scope: str, hospital_id: str | None, owner: tuple[str, ...]) -> list[dict[str, Any]]:
        """Keys of one device (``owner`` = (type, id)) or one gateway (``owner`` = (gateway id,)),
        revoked ones included, oldest first."""
        if scope == "device":
            rows = self._query("SELECT * FROM signing_keys WHERE scope='device' AND device_type=? AND device_id=?"
                               " ORDER BY created_ms, kid", owner)
        else:
            rows = self._query("SELECT * FROM signing_keys WHERE scope='gateway' AND hospital_id=? AND gateway_id=?"
                               " ORDER BY created_ms, kid", (hospital_id, *owner))
        return [key_json(_key_from_row(r), r["created_ms"], r["revoked_ms"]) for r in rows]

    def signing_key(self, kid: str) -> tuple[KeyRecord, int | None] | None:
        rows = self._query("SELECT * FROM signing_keys WHERE kid=?", (kid,))
        return (_key_from_row(rows[0]), rows[0]["revoked_ms"]) if rows else None

    def maintain(self, now_ms: int) -> None:
        """Nothing ahead of time: SQLite's readings table is not partitioned."""

    def readings(self, patient_id: str, metric: str | None, since_ms: int | None, until_ms: int | None,
                 limit: int, cursor: str | None) -> Page:
        limit = _limit(limit)
        sql = "SELECT * FROM readings WHERE patient_id=?"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND ts_ms >= ?"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND ts_ms < ?"
            params.append(until_ms)
        if metric is not None:
            sql += " AND json_extract(metrics, ?) IS NOT NULL"
            params.append(f'$."{metric}"')
        after = _cursor_parts(cursor, 2)
        if after is not None:
            sql += " AND (ts_ms, id) > (?, ?)"
            params.extend(after)
        rows, last = self._page_rows(sql, params, "ts_ms, id", limit)
        items = []
        for row in rows:
            metrics = json.loads(row["metrics"])
            if metric is not None:
                metrics = {metric: metrics[metric]}
            items.append({
                "patient_id": row["patient_id"], "hospital_id": row["hospital_id"],
                "device_type": row["device_type"], "device_id": row["device_id"], "seq": row["seq"],
                "boot": row["boot"], "ts": format_ts(row["ts_ms"]), "received_ts": format_ts(row["received_ms"]),
                "metrics": metrics,
                "verified": bool(row["verified"]), "signed_by": row["signed_by"],
            })
        next_cursor = f"{last['ts_ms']}.{last['id']}" if last else None
        return Page(items, next_cursor)

    def latest_vitals(self, patient_id: str) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT * FROM latest_vitals WHERE patient_id=? ORDER BY metric", (patient_id,))
        return {
            r["metric"]: {"value": r["value"], "ts": format_ts(r["ts_ms"]), "device_type": r["device_type"],
                          "device_id": r["device_id"], "seq": r["seq"]}
            for r in rows
        }

    def _scoped(self, sql: str, params: list[Any], column: str, hospitals: frozenset[str] | None) -> str:
        if hospitals is not None:
            sql += f" AND {column} IN ({','.join('?' for _ in hospitals)})" if hospitals else " AND 0"
            params.extend(sorted(hospitals))
        return sql

    def alerts(self, hospitals: frozenset[str] | None, hospital_id: str | None, patient_id: str | None,
               state: str | None, limit: int, cursor: str | None) -> Page:
        limit = _limit(limit)
        sql = "SELECT *, rowid AS rid FROM alerts WHERE 1=1"
        params: list[Any] = []
        sql = self._scoped(sql, params, "hospital_id", hospitals)
        for column, value in (("hospital_id", hospital_id), ("patient_id", patient_id)):
            if value is not None:
                sql += f" AND {column}=?"
                params.append(value)
        if state == "active":
            sql += " AND state != 'resolved'"
        elif state is not None:
            sql += " AND state=?"
            params.append(state)
        before = _cursor_parts(cursor, 2)
        if before is not None:
            sql += " AND (raised_ms, rowid) < (?, ?)"
            params.extend(before)
        rows, last = self._page_rows(sql, params, "raised_ms DESC, rowid DESC", limit)
        items = [alert_json(alert_from_row(r)) for r in rows]
        next_cursor = f"{last['raised_ms']}.{last['rid']}" if last else None
        return Page(items, next_cursor)

    def alert(self, alert_id: str) -> Alert | None:
        rows = self._query("SELECT * FROM alerts WHERE id=?", (alert_id,))
        return alert_from_row(rows[0]) if rows else None

    def alert_history(self, alert_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM alert_transitions WHERE alert_id=? ORDER BY id", (alert_id,))
        return [{"action": r["action"], "at": format_ts(r["at_ms"]), "state": r["state"], "value": r["value"],
                 "by": r["by"]} for r in rows]

    def alert_transition_id(self, alert_id: str, action: str, at_ms: int) -> int | None:
        rows = self._query("SELECT min(id) AS id FROM alert_transitions WHERE alert_id=? AND action=? AND at_ms=?",
                           (alert_id, action, at_ms))
        return rows[0]["id"] if rows else None

    def alert_transitions_after(self, after_id: int, limit: int) -> list[tuple[int, Transition]]:
        """Stored transitions in commit order, each with its alarm as it was then."""
        rows = self._query(
            "SELECT t.id AS tid, t.action AS t_action, t.at_ms AS t_at, t.state AS t_state, t.value AS t_value, "
            "t.by AS t_by, a.* FROM alert_transitions t JOIN alerts a ON a.id = t.alert_id "
            "WHERE t.id > ? ORDER BY t.id LIMIT ?", (after_id, _limit(limit)))
        return [(r["tid"], Transition(r["t_action"], alert_as_of(alert_from_row(r), r["t_action"], r["t_at"],
                                                                  r["t_state"], r["t_value"], r["t_by"]), r["t_at"]))
                for r in rows]

    def devices(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                cursor: str | None) -> Page:
        limit = _limit(limit)
        sql = "SELECT * FROM devices WHERE 1=1"
        params: list[Any] = []
        sql = self._scoped(sql, params, "hospital_id", hospitals)
        if hospital_id is not None:
            sql += " AND hospital_id=?"
            params.append(hospital_id)
        if cursor is not None:
            device_type, _, device_id = cursor.partition(".")
            sql += " AND (device_type, device_id) > (?, ?)"
            params.extend([device_type, device_id])
        rows, last = self._page_rows(sql, params, "device_type, device_id", limit)
        items = [device_json(_device_from_row(r)) for r in rows]
        return Page(items, f"{last['device_type']}.{last['device_id']}" if last else None)

    def device(self, device_type: str, device_id: str) -> DeviceRecord | None:
        rows = self._query("SELECT * FROM devices WHERE device_type=? AND device_id=?", (device_type, device_id))
        return _device_from_row(rows[0]) if rows else None

    def dead_letters(self, reason: str | None, limit: int, cursor: str | None) -> Page:
        limit = _limit(limit)
        sql = "SELECT * FROM dead_letters WHERE 1=1"
        params: list[Any] = []
        if reason is not None:
            sql += " AND reason=?"
            params.append(reason)
        before = _cursor_parts(cursor, 1)
        if before is not None:
            sql += " AND id < ?"
            params.extend(before)
        rows, last = self._page_rows(sql, params, "id DESC", limit)
        items = [{
            "id": r["id"], "received_ts": format_ts(r["received_ms"]), "topic": r["topic"], "reason": r["reason"],
            "detail": r["detail"], "index": r["item_index"], "payload_size": r["payload_size"],
            "payload": bytes(r["payload"]).decode("utf-8", "replace"),
            "truncated": len(r["payload"]) < r["payload_size"],
        } for r in rows]
        return Page(items, str(last["id"]) if last else None)

    def patient_hospital(self, patient_id: str) -> str | None:
        rows = self._query("SELECT hospital_id FROM patients WHERE patient_id=?", (patient_id,))
        return rows[0][0] if rows else None

    def patients(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                 cursor: str | None) -> Page:
        limit = _limit(limit)
        sql = "SELECT patient_id, hospital_id, updated_ms FROM patients WHERE 1=1"
        params: list[Any] = []
        sql = self._scoped(sql, params, "hospital_id", hospitals)
        if hospital_id is not None:
            sql += " AND hospital_id=?"
            params.append(hospital_id)
        if cursor is not None:
            sql += " AND patient_id > ?"
            params.append(cursor)
        rows, last = self._page_rows(sql, params, "patient_id", limit)
        items = [{"patient_id": r[0], "hospital_id": r[1], "since": format_ts(r[2])} for r in rows]
        return Page(items, last[0] if last else None)

    def counts(self) -> dict[str, int]:
        return {
            table: self._query(f"SELECT count(*) FROM {table}")[0][0]
            for table in ("readings", "dead_letters", "devices", "alerts", "seq_gaps")
        }

    def purge(self, older_than_ms: int) -> int:
        with self.transaction() as tx:
            conn = tx._conn
            # the newest reading always stays: SQLite would otherwise hand out its id again once the
            # table is empty, and a reading id is the stable id of its FHIR Observations
            removed = conn.execute("DELETE FROM readings WHERE received_ms < ? AND id < (SELECT max(id) FROM readings)",
                                   (older_than_ms,)).rowcount
            removed += conn.execute("DELETE FROM dead_letters WHERE received_ms < ?", (older_than_ms,)).rowcount
            removed += conn.execute("DELETE FROM seq_gaps WHERE detected_ms < ?", (older_than_ms,)).rowcount
        return removed

