"""The audit trail's records, their hash chain and its verification: pure, no I/O.

Every record holds the hash of the one before it, so editing, deleting or reordering a stored
record breaks the chain where it happened::

    hash(n) = sha256( canonical(record n, including seq and prev_hash = hash(n-1)) )
    hash(0) = "0" * 64                                   (the genesis "previous hash")

**Canonical serialisation** (what :func:`canonical` hashes): the record's fields other than
``hash`` as one JSON object, keys sorted, no whitespace (``","`` and ``":"`` separators),
non-ASCII characters as UTF-8 (not ``\\u`` escapes), integers as integers, absent values as
``null``; the UTF-8 bytes of that text. Any language can recompute it.

:func:`verify` walks the records in ``seq`` order and names every problem: a gap in ``seq``
(records deleted), a record whose content no longer matches its hash (edited), a record whose
``prev_hash`` is not its predecessor's hash (a predecessor edited and re-hashed, or records
inserted), the newest records missing (the highest ``seq`` ever issued is higher than the last
one stored), or an anchor (a ``seq:hash`` pair saved elsewhere) that the trail no longer holds.
Someone who can rewrite the whole file can also rewrite the whole chain after the point they
changed: only an anchor kept outside the database (the bridge logs its head when it stops, and
``firstcare audit verify`` prints it) detects that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

GENESIS = "0" * 64
OUTCOMES = ("success", "denied", "not_found", "error")

FIELDS = ("seq", "ts_ms", "subject", "role", "action", "resource", "patient_id", "hospital_id", "outcome",
          "status", "source", "request_id", "detail", "prev_hash")
"""The hashed fields, in the order they are stored (``hash`` comes last)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """What a request or connection hands to the audit log (no position in the chain yet)."""

    ts_ms: int
    subject: str | None  # the token's sub; None when no valid token was presented
    role: str | None
    action: str  # e.g. "patient.readings.read", "alert.acknowledge", "realtime.subscribe"
    resource: str  # the path (without credentials) or the room
    outcome: str  # OUTCOMES
    status: int | None = None  # HTTP status or WebSocket close code
    patient_id: str | None = None
    hospital_id: str | None = None
    source: str | None = None  # client address
    request_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """An entry in the chain."""

    seq: int
    ts_ms: int
    subject: str | None
    role: str | None
    action: str
    resource: str
    patient_id: str | None
    hospital_id: str | None
    outcome: str
    status: int | None
    source: str | None
    request_id: str | None
    detail: str | None
    prev_hash: str
    hash: str


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is computed over (see the module docstring)."""
    body = {name: fields.get(name) for name in FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(fields)).hexdigest()


def chain(entries: Iterable[Entry], last_seq: int, last_hash: str) -> list[Record]:
    """Give ``entries`` their places after (``last_seq``, ``last_hash``), in order."""
    records: list[Record] = []
    seq, prev = last_seq, last_hash
    for e in entries:
        seq += 1
        fields = {**asdict(e), "seq": seq, "prev_hash": prev}
        digest = record_hash(fields)
        records.append(Record(**{name: fields[name] for name in FIELDS}, hash=digest))
        prev = digest
    return records


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    kind: str  # "deleted" | "edited" | "chain_broken" | "truncated" | "anchor"
    message: str


@dataclass(frozen=True, slots=True)
class Verification:
    records: int
    head_seq: int
    head_hash: str
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(rows: Iterable[Mapping[str, Any]], issued_seq: int | None = None,
           anchors: Iterable[tuple[int, str]] = ()) -> Verification:
    """Check a stored trail, rows in ``seq`` order. ``issued_seq`` is the highest seq the store
    ever handed out (SQLite's AUTOINCREMENT counter), so deleting the newest rows shows too."""
    problems: list[Problem] = []
    expected_seq, expected_prev = 1, GENESIS
    count = 0
    head_seq, head_hash = 0, GENESIS
    seen: dict[int, str] = {}
    for row in rows:
        count += 1
        seq = int(row["seq"])
        if seq > expected_seq:
            first, last = expected_seq, seq - 1
            what = f"record {first}" if first == last else f"records {first}..{last}"
            problems.append(Problem(first, "deleted", f"{what} deleted (seq jumps from {expected_seq - 1} to {seq})"))
        elif seq < expected_seq:
            problems.append(Problem(seq, "chain_broken", f"record {seq} is out of order"))
        elif row["prev_hash"] != expected_prev:
            problems.append(Problem(seq - 1, "chain_broken",
                                    f"record {seq - 1} was altered or replaced: record {seq} holds a different "
                                    f"previous hash"))
        if record_hash(row) != row["hash"]:
            problems.append(Problem(seq, "edited", f"record {seq} was edited: its content no longer matches its hash"))
        expected_seq, expected_prev = seq + 1, row["hash"]
        head_seq, head_hash = seq, row["hash"]
        seen[seq] = row["hash"]
    if issued_seq is not None and issued_seq > head_seq:
        first = head_seq + 1
        what = f"record {first}" if first == issued_seq else f"records {first}..{issued_seq}"
        problems.append(Problem(first, "truncated", f"{what} deleted from the end of the trail"))
    for seq, digest in anchors:
        if seen.get(seq) != digest:
            state = "is missing" if seq not in seen else "has another hash"
            problems.append(Problem(seq, "anchor", f"anchor record {seq} {state}: the trail was rewritten"))
    return Verification(count, head_seq, head_hash, tuple(problems))


def parse_anchor(text: str) -> tuple[int, str]:
    """``"<seq>:<sha256 hex>"`` (as printed by ``firstcare audit verify``)."""
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"anchor {text!r}: expected <seq>:<64 hex digits>")
    return int(seq), digest


def outcome_for_status(status: int) -> str:
    if status in (401, 403, 4401, 4403, 4405, 4409, 4410):
        return "denied"
    if status == 404:
        return "not_found"
    if status < 400:
        return "success"
    return "error"
