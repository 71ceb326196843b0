"""The audit log: a bounded in-memory queue, one flusher thread, an append-only SQLite file.

    request / connection --record()--> deque (bounded, O(1), never blocks, never does I/O)
    fc-audit thread: every FC_AUDIT_FLUSH_SECONDS (or 500 waiting) -> chain (bridge.audit)
                     -> one transaction (synchronous=FULL) -> head advances
    stop(): the thread writes everything still queued, then closes

The trail has its own database file (``FC_AUDIT_URL``, by default ``<store>-audit.db`` beside
the store), so its writes never wait for, or hold up, the ingest writer's lock, and it is never
touched by the retention purge. Triggers refuse UPDATE and DELETE on the table. A full queue
counts every record it could not take (``overflowed``) and logs it; the next batch written
starts with an ``audit.overflow`` record saying how many were lost, so the gap is in the trail
itself. A failing write keeps its batch and retries with backoff (``failures``, ``last_error``).

One writer per trail: the chain's head lives in the writing process, so a second process
appending to the same file would fork the chain. ``start`` takes an exclusive lock beside the
file (``<file>.lock``, dropped by the kernel with the process) and refuses to start when another
process holds it; several bridges on one PostgreSQL database each keep their own trail
(``FC_AUDIT_URL``), see docs/scaling.md.

Threads: ``record`` from any thread (event loop, thread pool); the chain state (head seq and
hash) and the writer connection belong to the fc-audit thread; reads open their own connection.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bridge.audit import FIELDS, GENESIS, Entry, Record, Verification, chain, verify
from firstcare.errors import StoreError
from firstcare.filelock import FileInUse, lock_exclusive
from firstcare.payloads import format_ts, now_ms

log = logging.getLogger("firstcare.audit")

BATCH_MAX = 500
MAX_BACKOFF_S = 5.0

AUDIT_MIGRATIONS: list[str] = [
    """
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, subject TEXT, role TEXT,
        action TEXT NOT NULL, resource TEXT NOT NULL, patient_id TEXT, hospital_id TEXT, outcome TEXT NOT NULL,
        status INTEGER, source TEXT, request_id TEXT, detail TEXT, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
    );
    CREATE INDEX audit_patient ON audit_log (patient_id, ts_ms);
    CREATE INDEX audit_subject ON audit_log (subject, ts_ms);
    CREATE INDEX audit_ts ON audit_log (ts_ms);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    """,
]


def audit_path(audit_url: str | None, store_path: str) -> str:
    """The audit database file: ``FC_AUDIT_URL`` (``sqlite:///path``) or ``<store>-audit.db``."""
    if audit_url:
        if not audit_url.startswith("sqlite:///"):
            raise ValueError(f"unsupported audit URL {audit_url!r} (expected sqlite:///path)")
        return audit_url[len("sqlite:///"):]
    root, _ = os.path.splitext(store_path)
    return f"{root}-audit.db"


def connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30,
                               check_same_thread=False)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(AUDIT_MIGRATIONS[version:], start=version + 1):
            # executescript: trigger bodies hold semicolons; the version moves in the same script
            conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")
    conn.row_factory = sqlite3.Row
    return conn


def verify_file(path: str, anchors: Sequence[tuple[int, str]] = ()) -> Verification:
    """Verify the trail in ``path`` (read only), streaming its rows."""
    if not os.path.exists(path):
        raise StoreError(f"no audit trail at {path!r}")
    conn = connect(path, readonly=True)
    try:
        issued = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='audit_log'").fetchone()
        rows = conn.execute(f"SELECT {', '.join(FIELDS)}, hash FROM audit_log ORDER BY seq")
        return verify((dict(r) for r in rows), issued[0] if issued else None, anchors)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the audit trail {path!r}: {exc}") from exc
    finally:
        conn.close()


class AuditTrailInUse(StoreError):
    """Another process writes this audit trail."""

    reason = "audit_in_use"


def _lock(path: str) -> int:
    """The exclusive writer lock beside the trail; raise AuditTrailInUse naming the holder."""
    try:
        return lock_exclusive(path)
    except FileInUse as exc:
        raise AuditTrailInUse(
            f"the audit trail {path!r} is written by {exc.holder} (lock {exc.lock_path!r}): one bridge per trail."
            " Give each bridge its own FC_AUDIT_URL") from exc


class AuditLog:
    def __init__(self, path: str, queue_size: int = 10_000, flush_seconds: float = 1.0) -> None:
        self.path = path
        self.queue_size = queue_size
        self.flush_seconds = flush_seconds
        self._queue: deque[Entry] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._local = threading.local()
        self._head = (0, GENESIS)
        self._lost_unrecorded = 0
        self.overflowed = 0
        self.written = 0
        self.failures = 0
        self.last_error: str | None = None

    # --- lifecycle (event loop / main thread) ---------------------------------------------

    def start(self) -> None:
        self._lock_fd = _lock(self.path)
        try:
            self._conn = connect(self.path)
            row = self._conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            self._unlock()
            raise StoreError(f"cannot open the audit trail {self.path!r}: {exc}") from exc
        if row is not None:
            self._head = (row["seq"], row["hash"])
        self._thread = threading.Thread(target=self._run, name="fc-audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything still queued, then close (a clean shutdown loses no record)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("audit trail: %d records still queued at shutdown could not be written: %s",
                          len(self._queue), self.last_error)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._unlock()
        seq, digest = self._head
        log.info("audit trail head: %d:%s (keep it to check the trail later: firstcare audit verify --anchor)",
                 seq, digest)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None

    # --- producers (any thread) --------------------------------------------------------------

    def record(self, entry: Entry) -> bool:
        """Queue ``entry``; False (counted, logged) when the queue is full. Never blocks."""
        with self._lock:
            if len(self._queue) >= self.queue_size:
                self.overflowed += 1
                self._lost_unrecorded += 1
                if self._lost_unrecorded == 1:
                    log.error("audit queue full (%d): records are being lost; see audit.overflowed",
                              self.queue_size)
                return False
            self._queue.append(entry)
            if len(self._queue) >= BATCH_MAX:
                self._wake.notify()
            return True

    # --- the fc-audit thread ------------------------------------------------------------------

    def _take(self) -> tuple[list[Entry], bool]:
        with self._wake:
            if not self._stopping and len(self._queue) < BATCH_MAX:
                self._wake.wait(self.flush_seconds)
            batch = [self._queue.popleft() for _ in range(min(BATCH_MAX, len(self._queue)))]
            if self._lost_unrecorded:
                lost, self._lost_unrecorded = self._lost_unrecorded, 0
                batch.insert(0, Entry(now_ms(), None, None, "audit.overflow", "audit", "error",
                                      detail=f"{lost} audit records lost: queue full ({self.queue_size})"))
            return batch, self._stopping and not self._queue

    def _run(self) -> None:
        pending: list[Entry] = []
        backoff = 0.1
        while True:
            batch, last = self._take()
            pending += batch
            if pending:
                try:
                    self._write(pending)
                    pending = []
                    backoff = 0.1
                except (sqlite3.Error, StoreError) as exc:
                    self.failures += 1
                    self.last_error = str(exc)
                    log.warning("audit write failed, retrying (%d records held): %s", len(pending), exc)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    if self._stopping and self.failures > 20:
                        return
                    continue
            if last:
                return

    def _write(self, entries: list[Entry]) -> None:
        assert self._conn is not None
        records = chain(entries, *self._head)
        cols = [*FIELDS, "hash"]
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f"INSERT INTO audit_log ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                             [tuple(getattr(r, c) for c in cols) for r in records])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._head = (records[-1].seq, records[-1].hash)
        self.written += len(records)

    # --- reads (any thread) ---------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, readonly=True)
        yield conn

    def query(self, patient_id: str | None, subject: str | None, since_ms: int | None, until_ms: int | None,
              action: str | None, outcome: str | None, limit: int, cursor: str | None
              ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; ``cursor`` is the ``seq`` to continue below."""
        sql = "SELECT * FROM audit_log WHERE 1=1"
        params: list[Any] = []
        for column, value in (("patient_id", patient_id), ("subject", subject), ("action", action),
                              ("outcome", outcome)):
            if value is not None:
                sql += f" AND {column}=?"
                params.append(value)
        if since_ms is not None:
            sql += " AND ts_ms >= ?"
            params.append(since_ms)
        if until_ms is not None:
            sql += " AND ts_ms < ?"
            params.append(until_ms)
        if cursor is not None:
            if not cursor.isdigit():
                raise ValueError(f"malformed cursor {cursor!r}")
            sql += " AND seq < ?"
            params.append(int(cursor))
        with self._reader() as conn:
            rows = conn.execute(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit + 1]).fetchall()
        items = [record_json(r) for r in rows[:limit]]
        return items, str(rows[limit - 1]["seq"]) if len(rows) > limit else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            queued = len(self._queue)
        return {"queued": queued, "queue_size": self.queue_size, "written": self.written,
                "overflowed": self.overflowed, "failures": self.failures, "last_error": self.last_error,
                "head_seq": self._head[0]}


def record_json(row: Any) -> dict[str, Any]:
    body = {name: row[name] for name in (*FIELDS, "hash")}
    body["ts"] = format_ts(body.pop("ts_ms"))
    return body


__all__ = ["AUDIT_MIGRATIONS", "AuditLog", "AuditTrailInUse", "Record", "audit_path", "verify_file"]
