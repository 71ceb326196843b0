"""The gateway's spool: every accepted message on local disk until the upstream broker has
acknowledged it, and a quarantine for the messages the upstream refuses for good.

Order of delivery: status messages first, then vitals, each oldest first. Bounds: total bytes
(``max_bytes``) and vitals age (``max_age_ms``). Policy when full: the oldest vitals are
discarded first; status messages are never discarded (they are few and small, and they carry
the device-offline alarms). Every discard is counted, persistently, and reported in /stats and
in the gateway's status upstream.

Quarantine: a message the upstream refused for good (a negative MQTT 5 PUBACK, a packet the
upstream cannot take, one that keeps getting the connection dropped) is moved, in one
transaction, from ``spool`` to ``quarantine`` with its reason; the queue behind it moves on.
``firstcare edge quarantine list|retry|drop`` works on this file, even while the gateway runs.

``synchronous=FULL``: the device's publish is acknowledged once ``append`` has returned, so the
spool must survive a power cut, not only a crash.

Threads and connections: writes (the ward's batches, the forwarder's removals and quarantines)
go through one writer connection under ``_lock``; reads (the forwarder's next entries, /stats,
the status upstream) through a second connection under ``_read_lock``. In WAL mode a read never
waits for a writer, so /stats answers while another process holds the write lock; a write waits
at most ``busy_timeout_s`` for it and then fails (``StoreUnavailable``: retried, /readyz 503).
``depth`` and ``bytes`` are kept in memory by the writer (single attribute reads, any thread) and
reloaded when another process (the quarantine command) has changed the file
(``PRAGMA data_version``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.stamp import PRIORITY_VITALS, Outbound, Refused
from firstcare.errors import StoreError, StoreUnavailable
from firstcare.payloads import MAX_PAYLOAD_BYTES

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, device TEXT NOT NULL, received_ms INTEGER NOT NULL, size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_order ON spool (priority, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, payload BLOB NOT NULL, payload_size INTEGER NOT NULL, item_index INTEGER
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, device TEXT NOT NULL, received_ms INTEGER NOT NULL, size INTEGER NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, quarantined_ms INTEGER NOT NULL
);
"""
# Columns added after the first release; added to an existing spool at open.
ADDED_COLUMNS = (
    ("drops", "INTEGER NOT NULL DEFAULT 0"),  # connection drops while it was alone in flight
    ("refusals", "INTEGER NOT NULL DEFAULT 0"),  # transient refusals (MQTT 5 reason codes)
)

QUARANTINE_REASONS = ("not_authorized", "topic_name_invalid", "packet_too_large", "payload_format_invalid",
                      "quota_exceeded", "refused", "connection_dropped")
"""Why the upstream would not take a message (README, "Quarantine"); a closed set, so metrics can
be labelled with it."""


# the counters table's names (`_count`), reported as 0 before their first event
COUNTERS = ("accepted", "dead_letters", "discarded_full", "discarded_too_old", "forwarded", "quarantined",
            "quarantine_retried", "quarantine_dropped")


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    priority: int
    topic: str
    payload: bytes
    device: str
    received_ms: int


@dataclass(frozen=True, slots=True)
class Quarantined:
    id: int
    topic: str
    payload: bytes
    device: str
    received_ms: int
    size: int
    reason: str
    detail: str
    quarantined_ms: int


class Spool:
    def __init__(self, path: str, max_bytes: int, max_age_ms: int, dead_letter_bytes: int = 4096,
                 busy_timeout_s: float = 5.0) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.dead_letter_bytes = dead_letter_bytes
        self.last_discard_ms: int | None = None  # wall time of the last discard by this process
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(spool)")}
        for name, declaration in ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE spool ADD COLUMN {name} {declaration}")
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self._version = self._data_version()
        self._reload_totals()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    # --- writes (writer connection, under _lock) ------------------------------------------

    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _begin(self) -> None:
        """BEGIN IMMEDIATE; first pick up what another process committed since our last look
        (the quarantine command moves messages in and out)."""
        version = self._data_version()
        if version != self._version:
            self._version = version
            self._reload_totals()
        self._db.execute("BEGIN IMMEDIATE")

    def _write(self, work: Any) -> Any:
        """Run ``work(db)`` in one write transaction; SQLite errors become StoreUnavailable
        (locked, disk full: retry later) or StoreError."""
        try:
            with self._lock:
                db = self._db
                self._begin()
                try:
                    result = work(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    self._reload_totals()
                    raise
                return result
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"spool refuses writes: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"spool write failed: {exc}") from exc

    def sync(self) -> None:
        """Pick up another process's changes now if the writer is free (never waits)."""
        if self._lock.acquire(blocking=False):
            try:
                version = self._data_version()
                if version != self._version:
                    self._version = version
                    self._reload_totals()
            except sqlite3.Error:
                pass
            finally:
                self._lock.release()

    def _count(self, name: str, n: int) -> None:
        if n:
            self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                             " SET value = value + excluded.value", (name, n))

    def append(self, messages: Sequence[Outbound], refused: Iterable[Refused], now_ms: int) -> int:
        """Store a batch durably (one transaction); returns how many vitals the bounds discarded.
        Raises :class:`StoreUnavailable` when the disk or the database refuses (retry later)."""
        letters = list(refused)

        def work(db: sqlite3.Connection) -> int:
            db.executemany(
                "INSERT INTO spool (priority, topic, payload, device, received_ms, size) VALUES (?,?,?,?,?,?)",
                [(m.priority, m.topic, m.payload, m.device, m.received_ms, len(m.payload)) for m in messages])
            db.executemany(
                "INSERT INTO dead_letters (received_ms, topic, reason, detail, payload, payload_size, item_index)"
                " VALUES (?,?,?,?,?,?,?)",
                [(r.received_ms, r.topic, r.rejection.reason, r.rejection.detail,
                  r.payload[: self._kept(r)], len(r.payload), r.rejection.index) for r in letters])
            self._count("accepted", len(messages))
            self._count("dead_letters", len(letters))
            self.depth += len(messages)
            self.bytes += sum(len(m.payload) for m in messages)
            return self._enforce_bounds(now_ms)

        discarded = self._write(work)
        if discarded:
            self.last_discard_ms = now_ms
        return discarded

    def _kept(self, refused: Refused) -> int:
        """Raw bytes kept of a dead letter; our own failures (``internal_error``) keep the whole
        message (up to 64 KiB), so it can be published again once the bug is fixed."""
        if refused.rejection.reason == "internal_error":
            return max(self.dead_letter_bytes, MAX_PAYLOAD_BYTES)
        return self.dead_letter_bytes

    def _enforce_bounds(self, now_ms: int) -> int:
        db = self._db
        discarded = 0
        if self.max_age_ms > 0:
            cur = db.execute("DELETE FROM spool WHERE priority = ? AND received_ms < ? RETURNING size",
                             (PRIORITY_VITALS, now_ms - self.max_age_ms))
            sizes = [r[0] for r in cur.fetchall()]
            self._count("discarded_too_old", len(sizes))
            discarded += len(sizes)
            self.depth -= len(sizes)
            self.bytes -= sum(sizes)
        while self.max_bytes > 0 and self.bytes > self.max_bytes:
            excess = self.bytes - self.max_bytes
            rows = db.execute("SELECT id, size FROM spool WHERE priority = ? ORDER BY id LIMIT 500",
                              (PRIORITY_VITALS,)).fetchall()
            if not rows:
                break  # only status messages left: they are kept even beyond the bound
            victims, freed = [], 0
            for id, size in rows:
                victims.append(id)
                freed += size
                if freed >= excess:
                    break
            db.executemany("DELETE FROM spool WHERE id = ?", [(v,) for v in victims])
            self._count("discarded_full", len(victims))
            discarded += len(victims)
            self.depth -= len(victims)
            self.bytes -= freed
        return discarded

    def _reload_totals(self) -> None:
        row = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM spool").fetchone()
        self.depth, self.bytes = int(row[0]), int(row[1])

    def remove(self, ids: Sequence[int]) -> None:
        """Forwarded and acknowledged upstream: gone from the spool."""
        if not ids:
            return

        def work(db: sqlite3.Connection) -> list[int]:
            sizes = self._delete(ids)
            self._count("forwarded", len(sizes))
            return sizes

        sizes = self._write(work)
        self.depth -= len(sizes)
        self.bytes -= sum(sizes)

    def _delete(self, ids: Sequence[int]) -> list[int]:
        sizes = []
        for i in ids:
            row = self._db.execute("DELETE FROM spool WHERE id = ? RETURNING size", (i,)).fetchone()
            if row is not None:
                sizes.append(row[0])
        return sizes

    def quarantine(self, entry_id: int, reason: str, detail: str, now_ms: int) -> bool:
        """Move one entry to the quarantine with its reason; False if it is no longer spooled."""
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")

        def work(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "INSERT INTO quarantine (priority, topic, payload, device, received_ms, size, reason, detail,"
                " quarantined_ms) SELECT priority, topic, payload, device, received_ms, size, ?, ?, ? FROM spool"
                " WHERE id = ? RETURNING size", (reason, detail, now_ms, entry_id)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM spool WHERE id = ?", (entry_id,))
            self._count("quarantined", 1)
            self._count(f"quarantined_{reason}", 1)
            return int(row[0])

        size = self._write(work)
        if size is None:
            return False
        self.depth -= 1
        self.bytes -= size
        return True

    def _bump(self, column: str, entry_id: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            row = db.execute(f"UPDATE spool SET {column} = {column} + 1 WHERE id = ? RETURNING {column}",
                             (entry_id,)).fetchone()
            return int(row[0]) if row is not None else 0

        return self._write(work)

    def record_drop(self, entry_id: int) -> int:
        """The upstream dropped the connection while this entry was alone in flight; returns how
        often that has happened to it (kept across restarts)."""
        return self._bump("drops", entry_id)

    def record_refusal(self, entry_id: int) -> int:
        """A transient refusal (MQTT 5 reason code) of this entry; returns how many so far."""
        return self._bump("refusals", entry_id)

    def retry_quarantined(self, ids: Sequence[int] | None = None) -> int:
        """Move quarantined messages (all when ``ids`` is None) back to the spool, to be sent
        again (at the end of their priority's queue); returns how many."""

        def work(db: sqlite3.Connection) -> int:
            where, args = _which(ids)
            rows = db.execute(f"DELETE FROM quarantine{where} RETURNING priority, topic, payload, device,"
                              " received_ms, size, id", args).fetchall()
            rows.sort(key=lambda r: r[6])
            db.executemany("INSERT INTO spool (priority, topic, payload, device, received_ms, size)"
                           " VALUES (?,?,?,?,?,?)", [r[:6] for r in rows])
            self._count("quarantine_retried", len(rows))
            self.depth += len(rows)
            self.bytes += sum(r[5] for r in rows)
            return len(rows)

        return self._write(work)

    def drop_quarantined(self, ids: Sequence[int] | None = None) -> int:
        """Delete quarantined messages for good (all when ``ids`` is None); returns how many."""

        def work(db: sqlite3.Connection) -> int:
            where, args = _which(ids)
            n = db.execute(f"DELETE FROM quarantine{where}", args).rowcount
            self._count("quarantine_dropped", n)
            return n

        return self._write(work)

    # --- reads (reader connection, under _read_lock: never waits for a writer) --------------

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        try:
            with self._read_lock:
                return self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"spool read failed: {exc}") from exc

    def next(self, limit: int, skip: set[int]) -> list[Entry]:
        """The next entries to forward, in delivery order, leaving out ``skip`` (in flight, or
        waiting before another try)."""
        rows = self._read("SELECT id, priority, topic, payload, device, received_ms FROM spool"
                          " ORDER BY priority, id LIMIT ?", (limit + len(skip),))
        return [Entry(*row) for row in rows if row[0] not in skip][:limit]

    def oldest_ms(self) -> int | None:
        return self._read("SELECT min(received_ms) FROM spool")[0][0]

    def counters(self) -> dict[str, int]:
        """Every counter, zero until it first moves (so /stats keeps one shape from the start)."""
        return {**dict.fromkeys(COUNTERS, 0), **dict(self._read("SELECT name, value FROM counters"))}

    def dead_letters(self, limit: int = 100) -> list[dict]:
        rows = self._read("SELECT received_ms, topic, reason, detail, payload_size, item_index FROM dead_letters"
                          " ORDER BY id DESC LIMIT ?", (limit,))
        return [{"received_ms": r[0], "topic": r[1], "reason": r[2], "detail": r[3], "payload_size": r[4],
                 "index": r[5]} for r in rows]

    def quarantined(self, limit: int = 100) -> list[Quarantined]:
        rows = self._read("SELECT id, topic, payload, device, received_ms, size, reason, detail, quarantined_ms"
                          " FROM quarantine ORDER BY id LIMIT ?", (limit,))
        return [Quarantined(*row) for row in rows]

    def quarantine_summary(self) -> dict[str, Any]:
        """``depth``, ``oldest_ms`` (the oldest quarantined message's receipt) and ``reasons``
        (how many of each are held now)."""
        rows = self._read("SELECT reason, count(*), min(received_ms) FROM quarantine GROUP BY reason")
        oldest = [r[2] for r in rows]
        return {"depth": sum(r[1] for r in rows), "oldest_ms": min(oldest) if oldest else None,
                "reasons": {r[0]: r[1] for r in rows}}


def _which(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    ids = tuple(int(i) for i in ids)
    if not ids:
        return " WHERE 0", ()
    return f" WHERE id IN ({','.join('?' * len(ids))})", ids


def age_s(ms: int | None, now_ms: int) -> float:
    return round(max(0, now_ms - ms) / 1000, 1) if ms else 0.0


__all__ = ["Entry", "QUARANTINE_REASONS", "Quarantined", "Spool", "age_s"]
