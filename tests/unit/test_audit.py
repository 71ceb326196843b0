"""The audit trail's hash chain, pure: canonical bytes, chaining, and every kind of tampering
that verify() must name."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import pytest

from bridge.audit import GENESIS, Entry, canonical, chain, outcome_for_status, parse_anchor, record_hash, verify


def entries(n: int) -> list[Entry]:
    return [Entry(1_800_000_000_000 + i, f"nurse-{i}", "clinician", "patient.readings.read",
                  f"/api/patients/p-{i}/readings", "success", 200, f"p-{i}", "h1", "127.0.0.1", f"req-{i}")
            for i in range(1, n + 1)]


def rows(n: int) -> list[dict]:
    return [asdict(r) for r in chain(entries(n), 0, GENESIS)]


def test_canonical_form_is_sorted_compact_utf8_json_without_the_hash() -> None:
    row = rows(1)[0]
    text = canonical({**row, "detail": "Müller"}).decode("utf-8")
    assert text.startswith('{"action":"patient.readings.read","detail":"Müller","hospital_id":"h1",')
    assert '"hash"' not in text and " " not in text.replace("Müller", "")
    assert json.loads(text)["prev_hash"] == GENESIS
    assert record_hash(row) == hashlib.sha256(canonical(row)).hexdigest() == row["hash"]


def test_records_chain_from_the_genesis_and_continue_from_a_head() -> None:
    first = chain(entries(3), 0, GENESIS)
    assert [r.seq for r in first] == [1, 2, 3]
    assert first[0].prev_hash == GENESIS and first[1].prev_hash == first[0].hash
    more = chain(entries(2), first[-1].seq, first[-1].hash)
    assert more[0].seq == 4 and more[0].prev_hash == first[-1].hash
    result = verify([asdict(r) for r in first + more], issued_seq=5)
    assert result.ok and result.records == 5 and (result.head_seq, result.head_hash) == (5, more[-1].hash)


def test_an_edited_record_is_named() -> None:
    trail = rows(5)
    trail[2] = {**trail[2], "subject": "someone-else"}
    result = verify(trail, issued_seq=5)
    assert [(p.seq, p.kind) for p in result.problems] == [(3, "edited")]


def test_an_edited_and_rehashed_record_breaks_the_link_to_the_next() -> None:
    trail = rows(5)
    forged = {**trail[2], "outcome": "denied"}
    forged["hash"] = record_hash(forged)
    trail[2] = forged
    result = verify(trail, issued_seq=5)
    assert [(p.seq, p.kind) for p in result.problems] == [(3, "chain_broken")]
    assert "record 3 was altered" in result.problems[0].message


@pytest.mark.parametrize(("deleted", "expected"), [
    ([2], [(2, "deleted")]), ([2, 3, 4], [(2, "deleted")]), ([1], [(1, "deleted")]), ([5], [(5, "truncated")]),
    ([4, 5], [(4, "truncated")]),
])
def test_deleted_records_are_named(deleted: list[int], expected: list[tuple[int, str]]) -> None:
    trail = [r for r in rows(5) if r["seq"] not in deleted]
    result = verify(trail, issued_seq=5)
    assert [(p.seq, p.kind) for p in result.problems] == expected
    assert str(deleted[0]) in result.problems[0].message


def test_reordered_records_are_named() -> None:
    trail = rows(4)
    trail[1], trail[2] = trail[2], trail[1]
    assert not verify(trail, issued_seq=4).ok


def test_a_whole_rewrite_is_caught_only_by_an_anchor() -> None:
    original = rows(4)
    rewritten = [asdict(r) for r in chain([replace(e, subject="x") for e in entries(4)], 0, GENESIS)]
    assert verify(rewritten, issued_seq=4).ok
    result = verify(rewritten, issued_seq=4, anchors=[(4, original[3]["hash"])])
    assert [(p.seq, p.kind) for p in result.problems] == [(4, "anchor")]


def test_anchor_parsing() -> None:
    assert parse_anchor(f"12:{'a' * 64}") == (12, "a" * 64)
    for bad in ("12", f"x:{'a' * 64}", "12:abc", f"12:{'G' * 64}"):
        with pytest.raises(ValueError):
            parse_anchor(bad)


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "success"), (201, "success"), (401, "denied"), (403, "denied"), (4401, "denied"), (4403, "denied"),
    (404, "not_found"), (409, "error"), (422, "error"), (500, "error"),
])
def test_outcomes(status: int, outcome: str) -> None:
    assert outcome_for_status(status) == outcome
