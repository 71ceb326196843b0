"""The gateway's spool: every accepted message on local disk until the upstream broker has
acknowledged it.

Order of delivery: status messages first, then vitals, each oldest first. Bounds: total bytes
(``max_bytes``) and vitals age (``max_age_ms``). Policy when full: the oldest vitals are
discarded first; status messages are never discarded (they are few and small, and they carry
the device-offline alarms). Every discard is counted, persistently, and reported in /stats.

``synchronous=FULL``: the device's publish is acknowledged once ``append`` has returned, so the
spool must survive a power cut, not only a crash.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
"""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    priority: int
    topic: str
    payload: bytes
    device: str
    received_ms: int


class Spool:
    def __init__(self, path: str, max_bytes: int, max_age_ms: int, dead_letter_bytes: int = 4096) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.dead_letter_bytes = dead_letter_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM spool").fetchone()
        self.depth, self.bytes = int(row[0]), int(row[1])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _count(self, name: str, n: int) -> None:
        if n:
            self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
                             " SET value = value + excluded.value", (name, n))

    def append(self, messages: Sequence[Outbound], refused: Iterable[Refused], now_ms: int) -> int:
        """Store a batch durably (one transaction); returns how many vitals the bounds discarded.
        Raises :class:`StoreUnavailable` when the disk or the database refuses (retry later)."""
        try:
            return self._append(messages, refused, now_ms)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"spool refuses writes: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"spool write failed: {exc}") from exc

    def _append(self, messages: Sequence[Outbound], refused: Iterable[Refused], now_ms: int) -> int:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO spool (priority, topic, payload, device, received_ms, size) VALUES (?,?,?,?,?,?)",
                    [(m.priority, m.topic, m.payload, m.device, m.received_ms, len(m.payload)) for m in messages])
                letters = list(refused)
                db.executemany(
                    "INSERT INTO dead_letters (received_ms, topic, reason, detail, payload, payload_size, item_index)"
                    " VALUES (?,?,?,?,?,?,?)",
                    [(r.received_ms, r.topic, r.rejection.reason, r.rejection.detail,
                      r.payload[: self._kept(r)], len(r.payload), r.rejection.index) for r in letters])
                self._count("accepted", len(messages))
                self._count("dead_letters", len(letters))
                self.depth += len(messages)
                self.bytes += sum(len(m.payload) for m in messages)
                discarded = self._enforce_bounds(now_ms)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._reload_totals()
                raise
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

    def next(self, limit: int, skip: set[int]) -> list[Entry]:
        """The next entries to forward, in delivery order, leaving out those in flight."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, priority, topic, payload, device, received_ms FROM spool ORDER BY priority, id LIMIT ?",
                (limit + len(skip),)).fetchall()
        return [Entry(*row) for row in rows if row[0] not in skip][:limit]

    def remove(self, ids: Sequence[int]) -> None:
        """Forwarded and acknowledged upstream: gone from the spool."""
        if not ids:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                sizes = self._delete(ids)
                self._count("forwarded", len(sizes))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._reload_totals()
                raise
            self.depth -= len(sizes)
            self.bytes -= sum(sizes)

    def _delete(self, ids: Sequence[int]) -> list[int]:
        sizes = []
        for i in ids:
            row = self._db.execute("DELETE FROM spool WHERE id = ? RETURNING size", (i,)).fetchone()
            if row is not None:
                sizes.append(row[0])
        return sizes

    def oldest_ms(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT min(received_ms) FROM spool").fetchone()
        return row[0]

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def dead_letters(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT received_ms, topic, reason, detail, payload_size, item_index FROM dead_letters"
                " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"received_ms": r[0], "topic": r[1], "reason": r[2], "detail": r[3], "payload_size": r[4],
                 "index": r[5]} for r in rows]
