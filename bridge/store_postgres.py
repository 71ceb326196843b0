"""PostgreSQL store (psycopg 3, sync): several bridge processes on one database.

Connections: one writer connection, used only by the writer thread inside
:meth:`PostgresStore.transaction` (READ COMMITTED, so every statement after an advisory lock
sees what the lock's previous holder committed), and a small pool of autocommit connections for
the queries of the API threads and readiness. A connection found broken (PostgreSQL restarted,
network cut) is dropped and opened again on next use; meanwhile work fails with
:class:`~firstcare.errors.StoreUnavailable`, so the consumer keeps the batch unacknowledged and
retries it, and ``/readyz`` says 503.

Session settings: ``lock_timeout`` = the busy timeout (a batch waiting on another bridge's
advisory or row lock for longer is retried), ``statement_timeout`` and
``idle_in_transaction_session_timeout`` = the statement timeout (a stuck bridge cannot hold
its locks for ever), TCP keepalives (a dead server is noticed).

Errors: connection loss (class 08, and errors without a SQLSTATE), serialisation failures
(40001), deadlocks (40P01), lock and statement timeouts (55P03, 57014), a server shutting down
or starting (57P0x), out of resources (53xxx), a read-only server (25006) are
``StoreUnavailable``: retry the whole batch. Anything else (a constraint, a value out of range)
is a plain ``StoreError``, blamed on the batch and isolated to one message.

Readings are partitioned by day on the device's own timestamp (``ts_ms``), so a redelivery
(same ``ts``) lands in the partition of its first delivery. The UNIQUE index on a partitioned
table must contain the partition key, so the database alone guarantees (device, boot, seq, ts)
once per partition; the identity rule of :mod:`bridge.sequence` (same (device, boot, seq) with
another ``ts`` is a conflict) holds across partitions because every writer of a device looks
its seq up in all partitions under the device's advisory lock before inserting
(:mod:`bridge.state`). Partitions are created a week ahead (:meth:`PostgresStore.maintain`, at
migration and hourly on the leader); a reading outside them lands in ``readings_default`` and
moves into its day's partition when that one is created. Retention drops whole day partitions
(and deletes from the default partition).

Threads: the writer connection and :class:`PostgresTransaction` belong to the writer thread;
the pool serves any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bridge.alerts import Alert, Pending, RuleOverride, Transition
from bridge.cluster import MIGRATIONS as MIGRATIONS_LOCK
from bridge.cluster import LockKey, lock_order
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
from bridge.store_postgres_clinical import ClinicalStoreMixin, ClinicalTransactionMixin
from firstcare.errors import StoreError, StoreUnavailable
from firstcare.payloads import Reading, format_ts
from firstcare.signing import KeyRecord

log = logging.getLogger("firstcare.store")

DAY_MS = 86_400_000
PARTITION_DAYS_AHEAD = 7
PARTITION_DAYS_BEHIND = 1
POOL_SIZE = 8

MIGRATIONS: list[str] = [
    """
    CREATE SEQUENCE readings_id_seq;
    CREATE TABLE readings (
        id bigint NOT NULL DEFAULT nextval('readings_id_seq'),
        device_type text NOT NULL, device_id text NOT NULL, seq bigint NOT NULL, boot text NOT NULL DEFAULT '',
        hospital_id text NOT NULL, patient_id text,
        ts_ms bigint NOT NULL, received_ms bigint NOT NULL, metrics jsonb NOT NULL
    ) PARTITION BY RANGE (ts_ms);
    ALTER SEQUENCE readings_id_seq OWNED BY readings.id;
    CREATE UNIQUE INDEX readings_identity ON readings (device_type, device_id, seq, boot, ts_ms);
    CREATE INDEX readings_patient_ts ON readings (patient_id, ts_ms, id);
    CREATE INDEX readings_by_id ON readings (id);
    CREATE TABLE readings_default PARTITION OF readings DEFAULT;
    CREATE TABLE latest_vitals (
        patient_id text NOT NULL, metric text NOT NULL, value double precision NOT NULL, ts_ms bigint NOT NULL,
        device_type text NOT NULL, device_id text NOT NULL, seq bigint NOT NULL,
        PRIMARY KEY (patient_id, metric)
    );
    CREATE TABLE patients (patient_id text PRIMARY KEY, hospital_id text NOT NULL, updated_ms bigint NOT NULL);
    CREATE INDEX patients_hospital ON patients (hospital_id, patient_id);
    CREATE TABLE dead_letters (
        id bigserial PRIMARY KEY, received_ms bigint NOT NULL, topic text NOT NULL, reason text NOT NULL,
        detail text NOT NULL, payload bytea NOT NULL, payload_size integer NOT NULL, item_index integer
    );
    CREATE INDEX dead_letters_reason ON dead_letters (reason, id);
    CREATE INDEX dead_letters_received ON dead_letters USING brin (received_ms);
    CREATE TABLE devices (
        device_type text NOT NULL, device_id text NOT NULL, hospital_id text, patient_id text,
        state text NOT NULL, silent boolean NOT NULL DEFAULT false, last_seen_ms bigint, last_data_ms bigint,
        battery integer, firmware text, last_seq bigint, status_ms bigint, boot text NOT NULL DEFAULT '',
        boot_ts_ms bigint, prev_boot text, last_ts_ms bigint,
        PRIMARY KEY (device_type, device_id)
    );
    CREATE INDEX devices_hospital ON devices (hospital_id, device_type, device_id);
    CREATE INDEX devices_online ON devices (last_seen_ms) WHERE state = 'online';
    CREATE TABLE alerts (
        id text PRIMARY KEY, n bigserial NOT NULL, rule_id text NOT NULL, kind text NOT NULL,
        priority text NOT NULL, state text NOT NULL, subject text NOT NULL, patient_id text,
        hospital_id text NOT NULL, device_type text, device_id text, metric text, value double precision,
        threshold double precision, message text NOT NULL, latching boolean NOT NULL,
        condition_active boolean NOT NULL, raised_ms bigint NOT NULL, updated_ms bigint NOT NULL,
        acknowledged_by text, acknowledged_ms bigint, escalated_ms bigint, resolved_ms bigint,
        count integer NOT NULL
    );
    CREATE INDEX alerts_hospital ON alerts (hospital_id, state, raised_ms);
    CREATE INDEX alerts_patient ON alerts (patient_id, state, raised_ms);
    CREATE INDEX alerts_raised ON alerts (raised_ms, n);
    CREATE INDEX alerts_subject ON alerts (subject) WHERE state <> 'resolved';
    CREATE INDEX alerts_unacknowledged ON alerts (raised_ms) WHERE state = 'raised';
    CREATE TABLE alert_transitions (
        id bigserial PRIMARY KEY, alert_id text NOT NULL, action text NOT NULL, at_ms bigint NOT NULL,
        state text NOT NULL, value double precision, by text
    );
    CREATE INDEX alert_transitions_alert ON alert_transitions (alert_id, id);
    CREATE TABLE alert_pending (
        subject text NOT NULL, rule_id text NOT NULL, count integer NOT NULL, first_ms bigint NOT NULL,
        last_ms bigint NOT NULL, PRIMARY KEY (subject, rule_id)
    );
    CREATE TABLE alert_overrides (
        patient_id text NOT NULL, rule_id text NOT NULL, threshold double precision, clear double precision,
        enabled boolean NOT NULL, PRIMARY KEY (patient_id, rule_id)
    );
    CREATE TABLE seq_gaps (
        id bigserial PRIMARY KEY, device_type text NOT NULL, device_id text NOT NULL,
        first_missing bigint NOT NULL, last_missing bigint NOT NULL, detected_ms bigint NOT NULL,
        boot text NOT NULL DEFAULT '', confirmed_ms bigint
    );
    CREATE INDEX seq_gaps_open ON seq_gaps (device_type, device_id) WHERE confirmed_ms IS NULL;
    CREATE INDEX seq_gaps_due ON seq_gaps (detected_ms) WHERE confirmed_ms IS NULL;
    CREATE INDEX seq_gaps_detected ON seq_gaps USING brin (detected_ms);
    CREATE TABLE observations (
        id bigserial PRIMARY KEY, patient_id text NOT NULL, hospital_id text NOT NULL, kind text NOT NULL,
        value text NOT NULL, ts_ms bigint NOT NULL, recorded_ms bigint NOT NULL, recorded_by text NOT NULL, note text
    );
    CREATE INDEX observations_patient ON observations (patient_id, kind, ts_ms, id);
    CREATE TABLE news2_scores (
        id bigserial PRIMARY KEY, patient_id text NOT NULL, hospital_id text NOT NULL, computed_ms bigint NOT NULL,
        total integer NOT NULL, band text NOT NULL, complete boolean NOT NULL, max_part integer NOT NULL,
        spo2_scale integer NOT NULL, signature text NOT NULL, body text NOT NULL
    );
    CREATE INDEX news2_scores_patient ON news2_scores (patient_id, computed_ms, id);
    CREATE TABLE news2_state (patient_id text PRIMARY KEY, signature text NOT NULL, expiry_ms bigint);
    CREATE INDEX news2_state_expiry ON news2_state (expiry_ms) WHERE expiry_ms IS NOT NULL;
    CREATE TABLE mqtt_sessions (
        client_id text NOT NULL, broker text NOT NULL, established_ms bigint NOT NULL,
        PRIMARY KEY (client_id, broker)
    );
    """,
    # signed readings (firstcare/signing.py): which key signed a reading, public keys, per-hospital policy
    """
    ALTER TABLE readings ADD COLUMN signed_by text;
    CREATE TABLE signing_keys (
        kid text PRIMARY KEY, public_key bytea NOT NULL, scope text NOT NULL, hospital_id text NOT NULL,
        device_type text, device_id text, gateway_id text, created_ms bigint NOT NULL, revoked_ms bigint
    );
    CREATE INDEX signing_keys_owner ON signing_keys (scope, hospital_id, device_type, device_id, gateway_id);
    CREATE TABLE signature_policies (
        hospital_id text PRIMARY KEY, require_signatures boolean NOT NULL, updated_ms bigint NOT NULL
    );
    """,
]

_ALERT_FIELDS = [f.name for f in dataclasses.fields(Alert)]
_DEVICE_FIELDS = [f.name for f in dataclasses.fields(DeviceRecord)]
_READING_COLUMNS = "device_type, device_id, seq, boot, hospital_id, patient_id, ts_ms, received_ms, metrics, signed_by"
_PARTITION = re.compile(r"readings_p(\d{8})")

# SQLSTATE classes and codes that say the database, not the statement, is the problem
_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
_UNAVAILABLE_CODES = frozenset({"40001", "40P01", "55P03", "25006", "55006"})


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (psycopg.InterfaceError, PoolExhausted)):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)  # no answer from the server at all
    return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_CODES


def store_error(message: str, exc: BaseException) -> StoreError:
    """Convert a psycopg error: :class:`StoreUnavailable` when the database itself failed."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (StoreUnavailable if is_unavailable(exc) else StoreError)(f"{message}: {detail}")


def connect_kwargs(busy_timeout_s: float, statement_timeout_s: float, application: str) -> dict[str, Any]:
    """libpq parameters every connection of the bridge gets (merged with the URL's own)."""
    options = (f"-c lock_timeout={int(busy_timeout_s * 1000)} -c statement_timeout={int(statement_timeout_s * 1000)}"
               f" -c idle_in_transaction_session_timeout={int(max(statement_timeout_s, 5) * 2000)}"
               " -c timezone=UTC")
    return {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3, "application_name": application, "options": options}


def day_start_ms(ms: int) -> int:
    return ms - ms % DAY_MS


def partition_name(day_ms: int) -> str:
    return "readings_p" + datetime.fromtimestamp(day_ms / 1000, UTC).strftime("%Y%m%d")


def partition_day(name: str) -> int | None:
    match = _PARTITION.fullmatch(name)
    if match is None:
        return None
    day = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
    return int(day.timestamp() * 1000)


def migrate(conn: psycopg.Connection[Any], now_ms: int) -> int:
    """Bring the database up to the newest schema (``schema_version``), under a session
    advisory lock so bridges starting together migrate once; then create partitions ahead."""
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s, 0)", (MIGRATIONS_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version"
                     " (version integer PRIMARY KEY, applied_ms bigint NOT NULL)")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        version = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with conn.transaction():
                conn.execute(script)
                conn.execute("INSERT INTO schema_version (version, applied_ms) VALUES (%s, %s)",
                             (number, int(time.time() * 1000)))
        ensure_partitions(conn, now_ms)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, 0)", (MIGRATIONS_LOCK,))
        conn.autocommit = False
    return len(MIGRATIONS)


def partitions(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Existing day partitions of ``readings``: name -> first millisecond of the day."""
    rows = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                        " WHERE i.inhparent = 'readings'::regclass").fetchall()
    found = {}
    for (name,) in rows:
        day = partition_day(name)
        if day is not None:
            found[name] = day
    return found


def ensure_partitions(conn: psycopg.Connection[Any], now_ms: int) -> list[str]:
    """Create the day partitions from yesterday to a week ahead (autocommit connection; each
    partition its own transaction). Rows of that day already in the default partition move in."""
    existing = partitions(conn)
    today = day_start_ms(now_ms)
    created = []
    for offset in range(-PARTITION_DAYS_BEHIND, PARTITION_DAYS_AHEAD + 1):
        lo = today + offset * DAY_MS
        name = partition_name(lo)
        if name in existing:
            continue
        with conn.transaction():
            conn.execute(f"CREATE TABLE {name} (LIKE readings INCLUDING DEFAULTS)")
            conn.execute(f"WITH moved AS (DELETE FROM readings_default WHERE ts_ms >= %s AND ts_ms < %s RETURNING *)"
                         f" INSERT INTO {name} SELECT * FROM moved", (lo, lo + DAY_MS))
            conn.execute(f"ALTER TABLE readings ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({lo + DAY_MS})")
        created.append(name)
    return created


class PoolExhausted(Exception):
    """Every reader connection stayed busy for the whole wait."""


class ReaderPool:
    """Autocommit connections for the API threads: at most ``size`` at once, idle ones kept and
    checked before reuse, a broken one thrown away, a new one opened on demand. No background
    thread: while PostgreSQL is down each query fails at once (connection refused) or within
    ``connect_timeout``, so readiness answers promptly, and the first query after it is back
    simply connects again."""

    def __init__(self, url: str, kwargs: dict[str, Any], size: int, wait_s: float) -> None:
        self._url, self._kwargs, self._wait_s = url, kwargs, wait_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self._wait_s):
            raise PoolExhausted(f"no reader connection free within {self._wait_s:.0f} s")
        conn: psycopg.Connection[Any] | None = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is not None and (conn.closed or conn.broken):
                conn.close()
                conn = None
            if conn is None:
                conn = psycopg.connect(self._url, autocommit=True, **self._kwargs)
            yield conn
        except BaseException:
            if conn is not None:
                conn.close()  # after any error the connection's state is unknown: never reused
            raise
        else:
            with self._lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def alert_from_row(row: Mapping[str, Any]) -> Alert:
    return Alert(**{name: row[name] for name in _ALERT_FIELDS})


def device_from_row(row: Mapping[str, Any]) -> DeviceRecord:
    return DeviceRecord(**{name: row[name] for name in _DEVICE_FIELDS})


def key_from_row(row: Mapping[str, Any]) -> KeyRecord:
    return KeyRecord(row["kid"], bytes(row["public_key"]), row["scope"], row["hospital_id"], row["device_type"],
                     row["device_id"], row["gateway_id"])


def gap_from_row(row: Mapping[str, Any]) -> SeqGap:
    return SeqGap(row["device_type"], row["device_id"], row["first_missing"], row["last_missing"], row["detected_ms"],
                  row["boot"], row["confirmed_ms"])


def _unzip(keys: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[k[i] for k in keys] for i in range(width)]


class PostgresTransaction(ClinicalTransactionMixin):
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._readings: list[tuple[Reading, str]] = []
        self._news2_rows = []
        self._news2_states = {}
        self._news2_ids = []
        self._news2_reserved = 0

    def _rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[dict[str, Any]]:
        with self._conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(sql, params).fetchall()

    # --- readings (buffered: one COPY per transaction) -------------------------------------

    def flush(self) -> None:
        """Write what is buffered: NEWS2 scores and states, then the readings: COPY into a
        temporary table, then one INSERT ... ON CONFLICT DO NOTHING into the partitioned table;
        latest vitals and patient claims with them."""
        self.flush_news2()
        pending, self._readings = self._readings, []
        if not pending:
            return
        conn = self._conn
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS readings_in ({_READING_COLUMNS.replace(',', ' text,')} text)"
                     " ON COMMIT DELETE ROWS")
        with conn.cursor() as cur:
            with cur.copy(f"COPY readings_in ({_READING_COLUMNS}) FROM STDIN") as copy:
                for r, boot in pending:
                    copy.write_row((r.device_type, r.device_id, r.seq, boot, r.hospital_id, r.patient_id, r.ts_ms,
                                    r.received_ms, metrics_json(r.metrics), r.signed_by))
            cur.execute(
                f"WITH moved AS (DELETE FROM readings_in RETURNING *) INSERT INTO readings ({_READING_COLUMNS})"
                " SELECT device_type, device_id, seq::bigint, boot, hospital_id, patient_id, ts_ms::bigint,"
                " received_ms::bigint, metrics::jsonb, signed_by FROM moved ON CONFLICT DO NOTHING")
            claims, latest = reading_side_rows(pending)
            if claims:
                cur.executemany("INSERT INTO patients (patient_id, hospital_id, updated_ms) VALUES (%s, %s, %s)"
                                " ON CONFLICT (patient_id) DO NOTHING", claims)
            if latest:
                cur.executemany(
                    "INSERT INTO latest_vitals AS l (patient_id, metric, value, ts_ms, device_type, device_id, seq)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (patient_id, metric) DO UPDATE SET"
                    " value=excluded.value, ts_ms=excluded.ts_ms, device_type=excluded.device_type,"
                    " device_id=excluded.device_id, seq=excluded.seq WHERE excluded.ts_ms >= l.ts_ms", latest)

    def reading_versions(self, device_type: str, device_id: str, seq: int) -> dict[str, Content]:
        return self.versions_of([(device_type, device_id, seq)]).get((device_type, device_id, seq), {})

    def versions_of(self, keys: Iterable[ReadingKey]) -> dict[ReadingKey, dict[str, Content]]:
        """What is stored under each (device, seq), per boot, in every partition (a conflict
        may carry another ``ts``)."""
        self.flush()
        keys = list(keys)
        if not keys:
            return {}
        types, ids, seqs = _unzip(keys, 3)
        rows = self._conn.execute(
            "SELECT r.device_type, r.device_id, r.seq, r.boot, r.ts_ms, r.metrics FROM readings r"
            " JOIN unnest(%s::text[], %s::text[], %s::bigint[]) AS k(device_type, device_id, seq)"
            " ON r.device_type = k.device_type AND r.device_id = k.device_id AND r.seq = k.seq",
            (types, ids, seqs)).fetchall()
        found: dict[ReadingKey, dict[str, Content]] = {}
        for device_type, device_id, seq, boot, ts_ms, metrics in rows:
            found.setdefault((device_type, device_id, seq), {})[boot] = Content.of(ts_ms, metrics)
        return found

    def insert_reading(self, r: Reading, boot: str) -> None:
        self._readings.append((r, boot))

    def insert_readings(self, readings: Sequence[Reading]) -> list[bool]:
        """Bulk helper for tools and tests, no classification: each reading is inserted under
        its own boot ('' without one) unless that identity is stored already."""
        new = []
        seen: set[tuple[str, str, int, str]] = set()
        stored = self.versions_of({(r.device_type, r.device_id, r.seq) for r in readings})
        for r in readings:
            identity = (r.device_type, r.device_id, r.seq, r.boot or "")
            fresh = identity not in seen and (r.boot or "") not in stored.get(identity[:3], {})
            if fresh:
                seen.add(identity)
                self.insert_reading(r, r.boot or "")
            new.append(fresh)
        return new

    def claim_patient(self, patient_id: str, hospital_id: str, at_ms: int) -> None:
        """The first hospital to report a patient owns the id (under the patient's lock)."""
        self._conn.execute("INSERT INTO patients (patient_id, hospital_id, updated_ms) VALUES (%s, %s, %s)"
                           " ON CONFLICT (patient_id) DO NOTHING", (patient_id, hospital_id, at_ms))

    def insert_dead_letters(self, letters: Iterable[DeadLetter]) -> None:
        rows = [(d.received_ms, d.topic, d.reason, d.detail, d.payload, d.payload_size, d.index) for d in letters]
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany("INSERT INTO dead_letters (received_ms, topic, reason, detail, payload, payload_size,"
                                " item_index) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)

    def remember_session(self, client_id: str, broker: str, at_ms: int) -> None:
        self._conn.execute("INSERT INTO mqtt_sessions (client_id, broker, established_ms) VALUES (%s, %s, %s)"
                           " ON CONFLICT (client_id, broker) DO UPDATE SET established_ms=excluded.established_ms",
                           (client_id, broker, at_ms))

    def probe(self) -> None:
        self._conn.execute("SELECT 1")

    # --- signing keys and the signature policy ---------------------------------------------

    def put_signing_key(self, key: KeyRecord, at_ms: int) -> None:
        self._conn.execute(
            "INSERT INTO signing_keys (kid, public_key, scope, hospital_id, device_type, device_id, gateway_id,"
            " created_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (kid) DO UPDATE SET"
            " public_key=excluded.public_key, created_ms=excluded.created_ms",
            (key.kid, key.public_key, key.scope, key.hospital_id, key.device_type, key.device_id, key.gateway_id,
             at_ms))

    def revoke_signing_keys(self, kids: Iterable[str], at_ms: int) -> None:
        self._conn.execute("UPDATE signing_keys SET revoked_ms = %s WHERE kid = ANY(%s) AND revoked_ms IS NULL",
                           (at_ms, list(kids)))

    def set_signature_policy(self, hospital_id: str, require: bool, at_ms: int) -> None:
        self._conn.execute(
            "INSERT INTO signature_policies (hospital_id, require_signatures, updated_ms) VALUES (%s, %s, %s)"
            " ON CONFLICT (hospital_id) DO UPDATE SET require_signatures=excluded.require_signatures,"
            " updated_ms=excluded.updated_ms", (hospital_id, require, at_ms))

    # --- the state repository (bridge/state.py) -------------------------------------------

    def lock(self, keys: Iterable[LockKey]) -> None:
        """Transaction-scoped advisory locks, in the cluster's order (bridge/cluster.py)."""
        ordered = lock_order(keys)
        if ordered:
            classes, hashes = _unzip(ordered, 2)
            # the subquery fixes the order the locks are taken in (a SELECT list is evaluated
            # in the order rows come out of its FROM, before any ORDER BY of its own)
            self._conn.execute("SELECT count(pg_advisory_xact_lock(c, h)) FROM (SELECT c, h FROM"
                               " unnest(%s::int[], %s::int[]) WITH ORDINALITY AS k(c, h, n) ORDER BY n) ordered",
                               (classes, hashes))

    def devices_of(self, keys: Iterable[DeviceKey]) -> dict[DeviceKey, DeviceRecord]:
        keys = list(keys)
        if not keys:
            return {}
        types, ids = _unzip(keys, 2)
        rows = self._rows("SELECT d.* FROM devices d JOIN unnest(%s::text[], %s::text[]) AS k(t, i)"
                          " ON d.device_type = k.t AND d.device_id = k.i", (types, ids))
        return {(r["device_type"], r["device_id"]): device_from_row(r) for r in rows}

    def upsert_devices(self, devices: Iterable[DeviceRecord]) -> None:
        rows = [tuple(getattr(d, c) for c in _DEVICE_FIELDS) for d in devices]
        if not rows:
            return
        cols = ", ".join(_DEVICE_FIELDS)
        marks = ", ".join("%s" for _ in _DEVICE_FIELDS)
        updates = ", ".join(f"{c}=excluded.{c}" for c in _DEVICE_FIELDS[2:])
        with self._conn.cursor() as cur:
            cur.executemany(f"INSERT INTO devices ({cols}) VALUES ({marks})"
                            f" ON CONFLICT (device_type, device_id) DO UPDATE SET {updates}", rows)

    def owners_of(self, patient_ids: Iterable[str]) -> dict[str, str]:
        rows = self._conn.execute("SELECT patient_id, hospital_id FROM patients WHERE patient_id = ANY(%s)",
                                  (list(patient_ids),)).fetchall()
        return {p: h for p, h in rows}

    def alert_state_of(self, subjects: Iterable[str]) -> tuple[list[Alert], dict[tuple[str, str], Pending]]:
        subjects = list(subjects)
        if not subjects:
            return [], {}
        alerts = self._rows("SELECT * FROM alerts WHERE state <> 'resolved' AND subject = ANY(%s)", (subjects,))
        pending = self._conn.execute("SELECT subject, rule_id, count, first_ms, last_ms FROM alert_pending"
                                     " WHERE subject = ANY(%s)", (subjects,)).fetchall()
        return [alert_from_row(r) for r in alerts], {(s, rule): Pending(c, f, last) for s, rule, c, f, last in pending}

    def alert_by_id(self, alert_id: str) -> Alert | None:
        rows = self._rows("SELECT * FROM alerts WHERE id = %s", (alert_id,))
        return alert_from_row(rows[0]) if rows else None

    def save_transitions(self, transitions: Iterable[Transition]) -> None:
        transitions = list(transitions)
        if not transitions:
            return
        cols = ", ".join(_ALERT_FIELDS)
        marks = ", ".join("%s" for _ in _ALERT_FIELDS)
        updates = ", ".join(f"{c}=excluded.{c}" for c in _ALERT_FIELDS[1:])
        with self._conn.cursor() as cur:
            # one row per alert in its latest version (an alert may change twice in one batch)
            latest = {t.alert.id: t.alert for t in transitions}
            cur.executemany(f"INSERT INTO alerts ({cols}) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates}",
                            [tuple(getattr(a, c) for c in _ALERT_FIELDS) for a in latest.values()])
            cur.executemany(
                "INSERT INTO alert_transitions (alert_id, action, at_ms, state, value, by)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [(t.alert.id, t.action, t.at_ms, t.alert.state, t.alert.value,
                  t.alert.acknowledged_by if t.action == "acknowledged" else None) for t in transitions])

    def save_pending(self, subjects: Iterable[str], pending: Mapping[tuple[str, str], Pending]) -> None:
        subjects = list(subjects)
        self._conn.execute("DELETE FROM alert_pending WHERE subject = ANY(%s)", (subjects,))
        wanted = set(subjects)
        rows = [(s, rule, p.count, p.first_ms, p.last_ms) for (s, rule), p in pending.items() if s in wanted]
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany("INSERT INTO alert_pending (subject, rule_id, count, first_ms, last_ms)"
                                " VALUES (%s, %s, %s, %s, %s)", rows)

    def overrides_of(self, patient_ids: Iterable[str]) -> dict[str, dict[str, RuleOverride]]:
        result: dict[str, dict[str, RuleOverride]] = {}
        for pid, rule, threshold, clear, enabled in self._conn.execute(
                "SELECT patient_id, rule_id, threshold, clear, enabled FROM alert_overrides WHERE patient_id = ANY(%s)",
                (list(patient_ids),)).fetchall():
            result.setdefault(pid, {})[rule] = RuleOverride(threshold=threshold, clear=clear, enabled=enabled)
        return result

    def set_overrides(self, patient_id: str, overrides: dict[str, RuleOverride]) -> None:
        self._conn.execute("DELETE FROM alert_overrides WHERE patient_id = %s", (patient_id,))
        if overrides:
            with self._conn.cursor() as cur:
                cur.executemany("INSERT INTO alert_overrides (patient_id, rule_id, threshold, clear, enabled)"
                                " VALUES (%s, %s, %s, %s, %s)",
                                [(patient_id, rule, o.threshold, o.clear, o.enabled) for rule, o in overrides.items()])

    def open_gaps_of(self, keys: Iterable[DeviceKey]) -> list[SeqGap]:
        keys = list(keys)
        if not keys:
            return []
        types, ids = _unzip(keys, 2)
        rows = self._rows("SELECT g.* FROM seq_gaps g JOIN unnest(%s::text[], %s::text[]) AS k(t, i)"
                          " ON g.device_type = k.t AND g.device_id = k.i WHERE g.confirmed_ms IS NULL ORDER BY g.id",
                          (types, ids))
        return [gap_from_row(r) for r in rows]

    def save_open_gaps(self, keys: Iterable[DeviceKey], gaps: Iterable[SeqGap]) -> None:
        keys = list(keys)
        if keys:
            types, ids = _unzip(keys, 2)
            self._conn.execute("DELETE FROM seq_gaps g USING unnest(%s::text[], %s::text[]) AS k(t, i)"
                               " WHERE g.device_type = k.t AND g.device_id = k.i AND g.confirmed_ms IS NULL",
                               (types, ids))
        self.insert_gaps(gaps)

    def insert_gaps(self, gaps: Iterable[SeqGap]) -> None:
        rows = [(g.device_type, g.device_id, g.first_missing, g.last_missing, g.detected_ms, g.boot, g.confirmed_ms)
                for g in gaps]
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany("INSERT INTO seq_gaps (device_type, device_id, first_missing, last_missing,"
                                " detected_ms, boot, confirmed_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)

    def hospitals(self) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT hospital_id FROM devices WHERE hospital_id IS NOT NULL UNION SELECT hospital_id FROM patients")]

    # --- what the timers find due (read without locks; the caller re-checks) ----------------

    def due_devices(self, now_ms: int, silent_ms: int, offline_ms: int, spot_offline_ms: int,
                    continuous: Sequence[str], limit: int) -> list[DeviceKey]:
        rows = self._conn.execute(
            "SELECT device_type, device_id FROM devices WHERE state = 'online' AND ("
            " (device_type = ANY(%(c)s) AND (last_seen_ms <= %(offline)s"
            "   OR (NOT silent AND coalesce(last_data_ms, last_seen_ms) <= %(silent)s)))"
            " OR (device_type <> ALL(%(c)s) AND last_seen_ms <= %(spot)s)) LIMIT %(limit)s",
            {"c": list(continuous), "offline": now_ms - offline_ms, "silent": now_ms - silent_ms,
             "spot": now_ms - max(offline_ms, spot_offline_ms), "limit": limit}).fetchall()
        return [(t, i) for t, i in rows]

    def due_gaps(self, detected_before_ms: int, limit: int) -> list[DeviceKey]:
        rows = self._conn.execute("SELECT DISTINCT device_type, device_id FROM seq_gaps WHERE confirmed_ms IS NULL"
                                  " AND detected_ms <= %s LIMIT %s", (detected_before_ms, limit)).fetchall()
        return [(t, i) for t, i in rows]

    def due_news2(self, now_ms: int, limit: int) -> list[str]:
        self.flush_news2()
        rows = self._conn.execute("SELECT patient_id FROM news2_state WHERE expiry_ms IS NOT NULL AND expiry_ms <= %s"
                                  " LIMIT %s", (now_ms, limit)).fetchall()
        return [r[0] for r in rows]

    def due_escalations(self, raised_before_ms: int, priorities: Sequence[str], limit: int) -> list[str]:
        rows = self._conn.execute("SELECT DISTINCT subject FROM alerts WHERE state = 'raised' AND priority = ANY(%s)"
                                  " AND raised_ms <= %s LIMIT %s",
                                  (list(priorities), raised_before_ms, limit)).fetchall()
        return [r[0] for r in rows]


class PostgresStore(ClinicalStoreMixin):
    def __init__(self, url: str, busy_timeout_s: float = 2.0, statement_timeout_s: float = 30.0,
                 pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self._kwargs = connect_kwargs(busy_timeout_s, statement_timeout_s, "firstcare-bridge")
        self._writer: psycopg.Connection[Any] | None = None
        try:
            self._writer = self._connect()
            migrate(self._writer, int(time.time() * 1000))
        except psycopg.Error as exc:
            if self._writer is not None:
                self._writer.close()
            raise StoreError(f"cannot open the PostgreSQL database {_redact(url)}: {exc}") from exc
        self._pool = ReaderPool(url, self._kwargs, max(1, pool_size), busy_timeout_s + 3)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=False, **self._kwargs)

    def _writer_connection(self) -> psycopg.Connection[Any]:
        conn = self._writer
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._writer = None
            try:
                conn = self._writer = self._connect()
            except psycopg.Error as exc:
                raise store_error("cannot connect to PostgreSQL", exc) from exc
            log.info("connected to PostgreSQL again")
        return conn

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        conn = self._writer_connection()
        tx = PostgresTransaction(conn)
        try:
            yield tx
            tx.flush()
            conn.commit()
        except psycopg.Error as exc:
            self._rollback(conn)
            raise store_error("transaction failed", exc) from exc
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()  # broken: the next transaction connects again
            self._writer = None

    def close(self) -> None:
        self._pool.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def session_established(self, client_id: str, broker: str) -> bool:
        rows = self._query("SELECT 1 FROM mqtt_sessions WHERE client_id = %s AND broker = %s", (client_id, broker))
        return bool(rows)

    def ping(self) -> None:
        try:
            self._query("SELECT 1")
        except StoreError as exc:
            raise StoreError(f"database unreachable: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[dict[str, Any]]:
        """A read on a pooled connection; once again on a fresh one if the connection was lost
        (an idle connection does not know PostgreSQL restarted until it is used)."""
        for attempt in (1, 2):
            try:
                with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                    return cur.execute(sql, params).fetchall()
            except psycopg.OperationalError as exc:
                if attempt == 2 or not is_unavailable(exc):
                    raise store_error("query failed", exc) from exc
            except (psycopg.Error, PoolExhausted) as exc:
                raise store_error("query failed", exc) from exc
        raise AssertionError("unreachable")

    def _page_rows(self, sql: str, params: list[Any], order: str, limit: int
                   ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        rows = self._query(f"{sql} ORDER BY {order} LIMIT %s", [*params, limit + 1])
        return rows[:limit], rows[limit - 1] if len(rows) > limit else None

    @staticmethod
    def _scoped(sql: str, params: list[Any], column: str, hospitals: frozenset[str] | None) -> str:
        if hospitals is not None:
            sql += f" AND {column} = ANY(%s)"
            params.append(sorted(hospitals))
        return sql

    def load_signing_keys(self) -> list[KeyRecord]:
        return [key_from_row(r) for r in self._query("SELECT * FROM signing_keys WHERE revoked_ms IS NULL")]

    def load_signature_policies(self) -> dict[str, bool]:
        return {r["hospital_id"]: r["require_signatures"]
                for r in self._query("SELECT hospital_id, require_signatures FROM signature_policies")}

    def signing_keys(self, scope: str, hospital_id: str | None, owner: tuple[str, ...]) -> list[dict[str, Any]]:
        """Keys of one device (``owner`` = (type, id)) or one gateway (``owner`` = (gateway id,)),
        revoked ones included, oldest first."""
        if scope == "device":
            rows = self._query("SELECT * FROM signing_keys WHERE scope = 'device' AND device_type = %s"
                               " AND device_id = %s ORDER BY created_ms, kid", owner)
        else:
            rows = self._query("SELECT * FROM signing_keys WHERE scope = 'gateway' AND hospital_id = %s"
                               " AND gateway_id = %s ORDER BY created_ms, kid", (hospital_id, *owner))
        return [key_json(key_from_row(r), r["created_ms"], r["revoked_ms"]) for r in rows]

    def signing_key(self, kid: str) -> tuple[KeyRecord, int | None] | None:
        rows = self._query("SELECT * FROM signing_keys WHERE kid = %s", (kid,))
        return (key_from_row(rows[0]), rows[0]["revoked_ms"]) if rows else None

    def gauges(self) -> Gauges:
        row = self._query("SELECT (SELECT count(*) FROM devices) AS devices,"
                          " (SELECT count(*) FROM devices WHERE state = 'online') AS online,"
                          " (SELECT count(*) FROM alerts WHERE state <> 'resolved') AS active")[0]
        return Gauges(row["devices"], row["online"], row["active"])

    def overrides(self, patient_id: str) -> dict[str, RuleOverride]:
        return {r["rule_id"]: RuleOverride(threshold=r["threshold"], clear=r["clear"], enabled=r["enabled"])
                for r in self._query("SELECT * FROM alert_overrides WHERE patient_id = %s", (patient_id,))}

    # --- dashboard queries --------------------------------------------------------------------

    def readings(self, patient_id: str, metric: str | None, since_ms: int | None, until_ms: int | None,
                 limit: int, cursor: str | None) -> Page:
        limit = page_limit(limit)
        sql = "SELECT * FROM readings WHERE patient_id = %s"
        params: list[Any] = [patient_id]
        if since_ms is not None:
            sql += " AND ts_ms >= %s"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND ts_ms < %s"
            params.append(until_ms)
        if metric is not None:
            sql += " AND metrics ? %s"
            params.append(metric)
        after = cursor_parts(cursor, 2)
        if after is not None:
            sql += " AND (ts_ms, id) > (%s, %s)"
            params.extend(after)
        rows, last = self._page_rows(sql, params, "ts_ms, id", limit)
        items = []
        for row in rows:
            metrics = row["metrics"]
            if metric is not None:
                metrics = {metric: metrics[metric]}
            items.append({
                "patient_id": row["patient_id"], "hospital_id": row["hospital_id"],
                "device_type": row["device_type"], "device_id": row["device_id"], "seq": row["seq"],
                "boot": row["boot"], "ts": format_ts(row["ts_ms"]), "received_ts": format_ts(row["received_ms"]),
                "metrics": metrics, "verified": row["signed_by"] is not None, "signed_by": row["signed_by"],
            })
        return Page(items, f"{last['ts_ms']}.{last['id']}" if last else None)

    def latest_vitals(self, patient_id: str) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT * FROM latest_vitals WHERE patient_id = %s ORDER BY metric", (patient_id,))
        return {r["metric"]: {"value": r["value"], "ts": format_ts(r["ts_ms"]), "device_type": r["device_type"],
                              "device_id": r["device_id"], "seq": r["seq"]} for r in rows}

    def alerts(self, hospitals: frozenset[str] | None, hospital_id: str | None, patient_id: str | None,
               state: str | None, limit: int, cursor: str | None) -> Page:
        limit = page_limit(limit)
        params: list[Any] = []
        sql = self._scoped("SELECT * FROM alerts WHERE true", params, "hospital_id", hospitals)
        for column, value in (("hospital_id", hospital_id), ("patient_id", patient_id)):
            if value is not None:
                sql += f" AND {column} = %s"
                params.append(value)
        if state == "active":
            sql += " AND state <> 'resolved'"
        elif state is not None:
            sql += " AND state = %s"
            params.append(state)
        before = cursor_parts(cursor, 2)
        if before is not None:
            sql += " AND (raised_ms, n) < (%s, %s)"
            params.extend(before)
        rows, last = self._page_rows(sql, params, "raised_ms DESC, n DESC", limit)
        return Page([alert_json(alert_from_row(r)) for r in rows], f"{last['raised_ms']}.{last['n']}" if last else None)

    def alert(self, alert_id: str) -> Alert | None:
        rows = self._query("SELECT * FROM alerts WHERE id = %s", (alert_id,))
        return alert_from_row(rows[0]) if rows else None

    def alert_history(self, alert_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM alert_transitions WHERE alert_id = %s ORDER BY id", (alert_id,))
        return [{"action": r["action"], "at": format_ts(r["at_ms"]), "state": r["state"], "value": r["value"],
                 "by": r["by"]} for r in rows]

    def alert_transition_id(self, alert_id: str, action: str, at_ms: int) -> int | None:
        rows = self._query("SELECT min(id) AS id FROM alert_transitions WHERE alert_id = %s AND action = %s"
                           " AND at_ms = %s", (alert_id, action, at_ms))
        return rows[0]["id"] if rows else None

    def alert_transitions_after(self, after_id: int, limit: int) -> list[tuple[int, Transition]]:
        """Stored transitions in id order, each with its alarm as it was then. Ids come from one
        sequence shared by every bridge, so a transaction that took a lower id may commit after a
        higher one is read; the hub's catch-up reads from before the first lost transition."""
        rows = self._query(
            "SELECT t.id AS tid, t.action AS t_action, t.at_ms AS t_at, t.state AS t_state, t.value AS t_value, "
            "t.by AS t_by, a.* FROM alert_transitions t JOIN alerts a ON a.id = t.alert_id "
            "WHERE t.id > %s ORDER BY t.id LIMIT %s", (after_id, page_limit(limit)))
        return [(r["tid"], Transition(r["t_action"], alert_as_of(alert_from_row(r), r["t_action"], r["t_at"],
                                                                  r["t_state"], r["t_value"], r["t_by"]), r["t_at"]))
                for r in rows]

    def devices(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                cursor: str | None) -> Page:
        limit = page_limit(limit)
        params: list[Any] = []
        sql = self._scoped("SELECT * FROM devices WHERE true", params, "hospital_id", hospitals)
        if hospital_id is not None:
            sql += " AND hospital_id = %s"
            params.append(hospital_id)
        if cursor is not None:
            device_type, _, device_id = cursor.partition(".")
            sql += " AND (device_type, device_id) > (%s, %s)"
            params.extend([device_type, device_id])
        rows, last = self._page_rows(sql, params, "device_type, device_id", limit)
        return Page([device_json(device_from_row(r)) for r in rows],
                    f"{last['device_type']}.{last['device_id']}" if last else None)

    def device(self, device_type: str, device_id: str) -> DeviceRecord | None:
        rows = self._query("SELECT * FROM devices WHERE device_type = %s AND device_id = %s", (device_type, device_id))
        return device_from_row(rows[0]) if rows else None

    def dead_letters(self, reason: str | None, limit: int, cursor: str | None) -> Page:
        limit = page_limit(limit)
        sql = "SELECT * FROM dead_letters WHERE true"
        params: list[Any] = []
        if reason is not None:
            sql += " AND reason = %s"
            params.append(reason)
        before = cursor_parts(cursor, 1)
        if before is not None:
            sql += " AND id < %s"
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
        rows = self._query("SELECT hospital_id FROM patients WHERE patient_id = %s", (patient_id,))
        return rows[0]["hospital_id"] if rows else None

    def patients(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                 cursor: str | None) -> Page:
        limit = page_limit(limit)
        params: list[Any] = []
        sql = self._scoped("SELECT patient_id, hospital_id, updated_ms FROM patients WHERE true", params,
                           "hospital_id", hospitals)
        if hospital_id is not None:
            sql += " AND hospital_id = %s"
            params.append(hospital_id)
        if cursor is not None:
            sql += " AND patient_id > %s"
            params.append(cursor)
        rows, last = self._page_rows(sql, params, "patient_id", limit)
        items = [{"patient_id": r["patient_id"], "hospital_id": r["hospital_id"], "since": format_ts(r["updated_ms"])}
                 for r in rows]
        return Page(items, last["patient_id"] if last else None)

    def counts(self) -> dict[str, int]:
        return {table: self._query(f"SELECT count(*) AS n FROM {table}")[0]["n"]
                for table in ("readings", "dead_letters", "devices", "alerts", "seq_gaps")}

    # --- retention and partitions ---------------------------------------------------------------

    def maintain(self, now_ms: int) -> None:
        """Create the readings partitions of the coming week (the leader, hourly)."""
        with self._admin() as conn:
            conn.execute("SELECT pg_advisory_lock(%s, 0)", (MIGRATIONS_LOCK,))
            try:
                created = ensure_partitions(conn, now_ms)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s, 0)", (MIGRATIONS_LOCK,))
        if created:
            log.info("created readings partitions %s", ", ".join(created))

    def purge(self, older_than_ms: int) -> int:
        """Drop the day partitions wholly older than the cutoff (by device time), delete older
        rows from the default partition, dead letters and gap records: how many rows went
        (dropped partitions counted by the planner's estimate)."""
        removed = 0
        with self._admin() as conn:
            for name, day in sorted(partitions(conn).items(), key=lambda item: item[1]):
                if day + DAY_MS > older_than_ms:
                    continue
                estimate = conn.execute("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE relname = %s",
                                        (name,)).fetchone()
                with conn.transaction():
                    conn.execute(f"ALTER TABLE readings DETACH PARTITION {name}")
                    conn.execute(f"DROP TABLE {name}")
                removed += int(estimate[0]) if estimate else 0
                log.info("retention: dropped readings partition %s", name)
            for sql in ("DELETE FROM readings_default WHERE ts_ms < %s",
                        "DELETE FROM dead_letters WHERE received_ms < %s",
                        "DELETE FROM seq_gaps WHERE detected_ms < %s"):
                removed += conn.execute(sql, (older_than_ms,)).rowcount
        return removed

    @contextmanager
    def _admin(self) -> Iterator[psycopg.Connection[Any]]:
        """A short-lived autocommit connection for DDL, so the writer's transactions go on."""
        try:
            with psycopg.connect(self.url, autocommit=True, **self._kwargs) as conn:
                yield conn
        except psycopg.Error as exc:
            raise store_error("maintenance failed", exc) from exc


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)

