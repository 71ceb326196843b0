"""The spool on a real SQLite file: order, bounds policy, persistence across reopen."""

from __future__ import annotations

from pathlib import Path

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
