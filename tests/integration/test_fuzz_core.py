"""Property-based fuzzing of BridgeCore.process with a real SQLite store: batches of fuzzed
messages for a small fleet (so redeliveries, reboots and conflicts meet) never raise, and every
message ends stored or dead-lettered, every count adding up with the database."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

from hypothesis import given

from bridge.alerts import default_rules
from bridge.core import BridgeCore, CoreSettings
from bridge.store_sqlite import SQLiteStore
from firstcare.errors import TopicError
from firstcare.payloads import Inbound, Rejection, decode_status, decode_vitals
from firstcare.topics import parse_topic
from tests.support.fuzz import KNOWN_REASONS, NOW_MS, batches, fuzz_settings

BRIDGE_REASONS = KNOWN_REASONS | {"seq_conflict", "patient_hospital_mismatch"}  # never internal_error


def expected_rejections(m: Inbound) -> list[str]:
    """What the pure decoders refuse in ``m`` (the core must dead-letter each of these)."""
    try:
        topic = parse_topic(m.topic)
    except TopicError as exc:
        return [exc.reason]
    if topic.kind == "status":
        status = decode_status(topic, m.payload, m.received_ms)
        return [status.reason] if isinstance(status, Rejection) else []
    return [r.reason for r in decode_vitals(topic, m.payload, m.received_ms).rejections]


def valid_readings(m: Inbound) -> int:
    try:
        topic = parse_topic(m.topic)
    except TopicError:
        return 0
    return len(decode_vitals(topic, m.payload, m.received_ms).readings) if topic.kind == "vitals" else 0


def test_every_fuzzed_message_ends_stored_or_dead_lettered(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "fuzz.db"))
    clock = [NOW_MS]
    core = BridgeCore(store, default_rules(), CoreSettings(dead_letter_bytes=1 << 20, seq_gap_grace_ms=2000),
                      clock=lambda: clock[0])
    db = sqlite3.connect(tmp_path / "fuzz.db")
    seen: Counter[str] = Counter()

    @fuzz_settings(150)
    @given(batches())
    def run(batch: list[tuple[str, bytes]]) -> None:
        clock[0] += 1000
        messages = [Inbound(topic, payload, clock[0]) for topic, payload in batch]
        before = Counter(core.counters)
        letters_before = db.execute("SELECT max(id) FROM dead_letters").fetchone()[0] or 0
        core.process(messages)  # must not raise, whatever the bytes
        core.tick()
        c = Counter(core.counters)
        c.subtract(before)
        new_letters = db.execute("SELECT topic, payload, reason FROM dead_letters WHERE id > ?",
                                 (letters_before,)).fetchall()
        reasons = Counter(reason for _, _, reason in new_letters)
        assert set(reasons) <= BRIDGE_REASONS, reasons
        assert c["messages"] == len(messages) and c["dead_letters"] == len(new_letters)
        # every refusal of the decoders is a dead letter of that very message
        for m in set(messages):
            copies = sum(1 for x in messages if x == m)
            wanted = Counter({r: n * copies for r, n in Counter(expected_rejections(m)).items()})
            got = Counter(r for t, p, r in new_letters
                          if (t, bytes(p)) == (m.topic, m.payload) and r in KNOWN_REASONS)
            assert got == wanted, (m.topic, m.payload[:200], got, wanted)
        # every valid reading is stored, a duplicate, or dead-lettered with its reason
        valid = sum(valid_readings(m) for m in messages)
        assert c["readings_valid"] == valid
        assert valid == (c["readings_stored"] + c["duplicates"] + reasons["seq_conflict"]
                         + reasons["patient_hospital_mismatch"])
        assert c["seq_conflicts"] == reasons["seq_conflict"]
        assert db.execute("SELECT count(*) FROM readings").fetchone()[0] == core.counters["readings_stored"]
        # every device with a stored reading has its record, which knows its newest reading
        assert db.execute("SELECT count(*) FROM (SELECT device_type, device_id, max(ts_ms) AS ts FROM readings"
                          " GROUP BY device_type, device_id) r LEFT JOIN devices d USING (device_type, device_id)"
                          " WHERE d.last_ts_ms IS NULL OR d.last_ts_ms < r.ts").fetchone()[0] == 0
        seen.update(+c)

    try:
        run()
        # the strategies reach every outcome, not only the easy ones
        for outcome in ("readings_stored", "duplicates", "seq_conflicts", "reboots", "seq_gaps", "status_messages"):
            assert seen[outcome] > 0, (outcome, dict(seen))
    finally:
        db.close()
        store.close()
