"""The spool on a real SQLite file: order, bounds policy, persistence across reopen."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.spool import Spool
from edge.stamp import PRIORITY_STATUS, PRIORITY_VITALS, Outbound

NOW = 1_790_000_000_000


def out(n: int, priority: int = PRIORITY_VITALS, size: int = 100, at: int = NOW) -> Outbound:
    return Outbound(f"t/{n}", b"x" * size, priority, "monitor/m1", at)


def test_status_first_then_oldest_first_and_in_flight_entries_skipped(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.db"), 0, 0)
    spool.append([out(1), out(2), out(3, PRIORITY_STATUS), out(4)], [], NOW)
    assert [e.topic for e in spool.next(10, set())] == ["t/3", "t/1", "t/2", "t/4"]
    first = spool.next(1, set())[0]
    assert [e.topic for e in spool.next(2, {first.id})] == ["t/1", "t/2"]
    spool.remove([first.id])
    assert (spool.depth, spool.bytes) == (3, 300)
    spool.close()


def test_full_spool_discards_oldest_vitals_never_status_and_counts_it(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.db"), max_bytes=1000, max_age_ms=0)
    spool.append([out(n) for n in range(1, 9)] + [out(100, PRIORITY_STATUS)], [], NOW)
    assert spool.append([out(n) for n in range(9, 13)], [], NOW) == 3
    kept = [e.topic for e in spool.next(100, set())]
    assert kept == ["t/100"] + [f"t/{n}" for n in range(4, 13)]
    assert spool.bytes <= 1000 + 100 and spool.counters()["discarded_full"] == 3
    spool.append([out(200 + n, PRIORITY_STATUS) for n in range(20)], [], NOW)
    assert all(e.priority == PRIORITY_STATUS for e in spool.next(100, set())), "status outlives every vitals"
    assert spool.depth == 21
    spool.close()


def test_vitals_older_than_the_age_bound_are_discarded(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.db"), 0, max_age_ms=60_000)
    spool.append([out(1, at=NOW - 120_000), out(2, PRIORITY_STATUS, at=NOW - 120_000), out(3)], [], NOW)
    assert [e.topic for e in spool.next(10, set())] == ["t/2", "t/3"]
    assert spool.counters()["discarded_too_old"] == 1
    spool.close()


def test_the_spool_survives_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    spool = Spool(path, 0, 0)
    spool.append([out(1), out(2)], [], NOW)
    spool.close()
    again = Spool(path, 0, 0)
    assert (again.depth, again.bytes, [e.topic for e in again.next(5, set())]) == (2, 200, ["t/1", "t/2"])
    again.close()


def test_a_quarantined_entry_leaves_the_queue_with_its_reason_and_can_be_retried_or_dropped(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "s.db"), 0, 0)
    spool.append([out(1), out(2), out(3)], [], NOW)
    first, second, third = spool.next(3, set())
    assert spool.quarantine(second.id, "not_authorized", "upstream PUBACK 0x87", NOW + 1)
    assert not spool.quarantine(second.id, "not_authorized", "again", NOW + 2), "already moved"
    assert [e.topic for e in spool.next(10, set())] == ["t/1", "t/3"]
    assert (spool.depth, spool.bytes) == (2, 200)
    assert spool.quarantine(third.id, "packet_too_large", "5000 bytes", NOW + 3)
    held = spool.quarantined()
    assert [(q.topic, q.reason, q.payload) for q in held] == [("t/2", "not_authorized", b"x" * 100),
                                                              ("t/3", "packet_too_large", b"x" * 100)]
    assert spool.quarantine_summary() == {"depth": 2, "oldest_ms": NOW,
                                          "reasons": {"not_authorized": 1, "packet_too_large": 1}}
    assert spool.retry_quarantined([held[0].id]) == 1
    assert [e.topic for e in spool.next(10, set())] == ["t/1", "t/2"]
    assert spool.drop_quarantined() == 1
    assert spool.quarantine_summary()["depth"] == 0
    counters = spool.counters()
    assert (counters["quarantined"], counters["quarantined_not_authorized"], counters["quarantine_retried"],
            counters["quarantine_dropped"]) == (2, 1, 1, 1)
    with pytest.raises(ValueError):
        spool.quarantine(first.id, "bad luck", "", NOW)
    spool.close()


def test_drops_and_refusals_are_counted_per_entry_across_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    spool = Spool(path, 0, 0)
    spool.append([out(1)], [], NOW)
    (entry,) = spool.next(1, set())
    assert [spool.record_drop(entry.id) for _ in range(2)] == [1, 2]
    assert spool.record_refusal(entry.id) == 1
    spool.close()
    again = Spool(path, 0, 0)
    assert again.record_drop(entry.id) == 3
    assert again.record_drop(999) == 0
    again.close()


def test_a_spool_from_before_the_quarantine_opens_and_gains_it(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, topic TEXT NOT NULL,
                payload BLOB NOT NULL, device TEXT NOT NULL, received_ms INTEGER NOT NULL, size INTEGER NOT NULL);
            INSERT INTO spool (priority, topic, payload, device, received_ms, size) VALUES (1, 't/1', 'xx', 'd', 1, 2);
        """)
    spool = Spool(str(path), 0, 0)
    (entry,) = spool.next(5, set())
    assert spool.record_drop(entry.id) == 1 and spool.quarantine(entry.id, "connection_dropped", "", NOW)
    spool.close()


def test_another_process_moving_messages_in_is_picked_up(tmp_path: Path) -> None:
    """The quarantine command works on the file while the gateway runs: the gateway's depth and
    bytes follow (SQLite's data_version)."""
    path = str(tmp_path / "s.db")
    gateway = Spool(path, 0, 0)
    gateway.append([out(1)], [], NOW)
    (entry,) = gateway.next(1, set())
    gateway.quarantine(entry.id, "not_authorized", "", NOW)
    assert gateway.depth == 0
    command = Spool(path, 0, 0)
    assert command.retry_quarantined() == 1
    command.close()
    gateway.sync()
    assert (gateway.depth, gateway.bytes) == (1, 100)
    gateway.close()


def test_reads_never_wait_for_a_writer_and_a_write_waits_only_its_busy_timeout(tmp_path: Path) -> None:
    import sqlite3
    import threading
    import time

    from firstcare.errors import StoreUnavailable

    path = str(tmp_path / "s.db")
    spool = Spool(path, 0, 0, busy_timeout_s=0.5)
    spool.append([out(1)], [], NOW)
    blocker = sqlite3.connect(path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        failure: list[BaseException] = []
        writer = threading.Thread(target=lambda: _capture(failure, spool.append, [out(2)], [], NOW))
        writer.start()  # holds the spool's write lock while SQLite waits for the blocker
        deadline = time.monotonic() + 10
        while not spool._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [e.topic for e in spool.next(5, set())] == ["t/1"]
        assert spool.counters()["accepted"] == 1 and spool.oldest_ms() == NOW and spool.dead_letters() == []
        writer.join(10)
        assert failure and isinstance(failure[0], StoreUnavailable)
    finally:
        blocker.rollback()
        blocker.close()
    assert spool.append([out(2)], [], NOW) == 0 and spool.depth == 2
    spool.close()


def _capture(into: list[BaseException], fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        into.append(exc)


def test_every_counter_is_reported_from_the_start(tmp_path: Path) -> None:
    """/stats keeps one shape: a counter that has not moved yet reads 0, not missing."""
    spool = Spool(str(tmp_path / "s.db"), 0, 0)
    try:
        assert spool.counters()["forwarded"] == 0 and spool.counters()["discarded_full"] == 0
    finally:
        spool.close()
