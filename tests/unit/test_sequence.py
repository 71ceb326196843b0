"""Reading identity (bridge/sequence.py): new, duplicate, reboot, conflict, as tables."""

from __future__ import annotations

import pytest

from bridge.sequence import Content, SeqState, classify, on_status_boot

T = 1_800_000_000_000


def c(ts: int, hr: float = 70.0) -> Content:
    return Content.of(ts, {"heart_rate": hr})


# A device of the old kind (no boot), seq 1..10 stored, newest reading at T+10s.
LEGACY = SeqState(boot="", last_seq=10, last_ts_ms=T + 10_000)
# A device announcing boots, now in boot "b2" that began at T+100s, seq up to 5.
BOOTED = SeqState(boot="b2", boot_ts_ms=T + 100_000, prev_boot="b1", last_seq=5, last_ts_ms=T + 105_000)

CASES = [
    # (id, state, boot, seq, content, stored, kind, key, reboot, late, gap, last_seq after)
    ("first reading ever", SeqState(), None, 1, c(T), {}, "new", "", False, False, None, 1),
    ("next in order", LEGACY, None, 11, c(T + 11_000), {}, "new", "", False, False, None, 11),
    ("forward jump is a gap", LEGACY, None, 14, c(T + 14_000), {}, "new", "", False, False, (11, 13), 14),
    ("redelivery", LEGACY, None, 7, c(T + 7_000), {"": c(T + 7_000)}, "duplicate", "", False, False, None, 10),
    ("redelivery with another patient is still a duplicate (content has no patient)",
     LEGACY, None, 10, c(T + 10_000), {"": c(T + 10_000)}, "duplicate", "", False, False, None, 10),
    ("late reading fills a hole", LEGACY, None, 6, c(T + 6_000), {}, "new", "", False, False, None, 10),
    ("same seq, other values, not newer: conflict",
     LEGACY, None, 7, c(T + 7_000, hr=99), {"": c(T + 7_000)}, "conflict", "", False, False, None, 10),
    ("same seq, older ts, other values: conflict",
     LEGACY, None, 9, c(T + 1_000), {"": c(T + 9_000)}, "conflict", "", False, False, None, 10),
    ("seq back at 1 with a newer ts: implicit reboot",
     LEGACY, None, 1, c(T + 60_000), {"": c(T + 1_000)}, "new", f"~{T + 60_000}", True, False, None, 1),
    ("implicit reboot even when the old seq 1 is gone (retention)",
     LEGACY, None, 1, c(T + 60_000), {}, "new", f"~{T + 60_000}", True, False, None, 1),
    ("same seq re-sent with a fresh time is a new reading, not lost",
     LEGACY, None, 10, c(T + 11_000), {"": c(T + 10_000)}, "new", f"~{T + 11_000}", True, False, None, 10),
    ("old-boot redelivery after an implicit reboot is a duplicate",
     SeqState(boot=f"~{T + 60_000}", boot_ts_ms=T + 60_000, prev_boot="", last_seq=3, last_ts_ms=T + 62_000),
     None, 2, c(T + 2_000), {"": c(T + 2_000), f"~{T + 60_000}": c(T + 61_000)}, "duplicate", "", False, False,
     None, 3),
    ("never-stored old-boot reading after a reboot goes to the previous boot",
     SeqState(boot=f"~{T + 60_000}", boot_ts_ms=T + 60_000, prev_boot="", last_seq=3, last_ts_ms=T + 62_000),
     None, 8, c(T + 8_000), {}, "new", "", False, True, None, 3),
    ("explicit boot: next in order", BOOTED, "b2", 6, c(T + 106_000), {}, "new", "b2", False, False, None, 6),
    ("explicit boot: gap within the boot", BOOTED, "b2", 9, c(T + 109_000), {}, "new", "b2", False, False, (6, 8), 9),
    ("explicit boot: redelivery", BOOTED, "b2", 3, c(T + 103_000), {"b2": c(T + 103_000)},
     "duplicate", "b2", False, False, None, 5),
    ("explicit boot: conflict", BOOTED, "b2", 3, c(T + 103_000, hr=50), {"b2": c(T + 103_000)},
     "conflict", "b2", False, False, None, 5),
    ("explicit boot: same seq in another boot is another reading",
     BOOTED, "b2", 4, c(T + 104_000), {"b1": c(T + 4_000)}, "new", "b2", False, False, None, 5),
    ("explicit boot: a new boot restarts the sequence without a gap",
     BOOTED, "b3", 1, c(T + 200_000), {"b1": c(T + 1_000), "b2": c(T + 101_000)}, "new", "b3", True, False, None, 1),
    ("explicit boot: a late reading of an earlier boot", BOOTED, "b1", 40, c(T + 40_000), {},
     "new", "b1", False, True, None, 5),
    ("explicit boot: first boot of a legacy device", LEGACY, "x", 1, c(T + 20_000), {"": c(T + 1_000)},
     "new", "x", True, False, None, 1),
    ("integer boot ids are keyed as strings", SeqState(boot="7", boot_ts_ms=T, last_seq=1, last_ts_ms=T),
     "7", 2, c(T + 1_000), {}, "new", "7", False, False, None, 2),
]


@pytest.mark.parametrize(("state", "boot", "seq", "content", "stored", "kind", "key", "reboot", "late", "gap",
                          "last_seq"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_classify(state, boot, seq, content, stored, kind, key, reboot, late, gap, last_seq) -> None:
    verdict = classify(state, boot, seq, content, stored)
    assert (verdict.kind, verdict.boot, verdict.reboot, verdict.late, verdict.gap) == (kind, key, reboot, late, gap)
    assert verdict.state.last_seq == last_seq
    if kind != "new":
        assert verdict.state == state, "a duplicate or a conflict changes nothing"
    else:
        assert verdict.state.last_ts_ms == max(state.last_ts_ms or 0, content.ts_ms)
    if reboot:
        assert (verdict.state.boot, verdict.state.boot_ts_ms, verdict.state.prev_boot) == (key, content.ts_ms,
                                                                                             state.boot)


def test_a_reboot_then_its_own_sequence_reports_gaps_again() -> None:
    state = LEGACY
    seen = []
    for seq, ts in [(1, T + 60_000), (2, T + 61_000), (5, T + 64_000)]:
        verdict = classify(state, None, seq, c(ts), {})
        seen.append((verdict.reboot, verdict.gap))
        state = verdict.state
    assert seen == [(True, None), (False, None), (False, (3, 4))]


@pytest.mark.parametrize(("state", "boot", "ts", "expected"), [
    (LEGACY, None, T + 50_000, LEGACY),
    (LEGACY, "b1", T + 50_000, SeqState("b1", T + 50_000, "", None, T + 10_000)),
    (BOOTED, "b2", T + 300_000, BOOTED),
    (BOOTED, "b3", T + 300_000, SeqState("b3", T + 300_000, "b2", None, T + 105_000)),
    (BOOTED, "b0", T + 50_000, BOOTED),  # older than the current boot: a stale retained status
])
def test_on_status_boot(state: SeqState, boot: str | None, ts: int, expected: SeqState) -> None:
    assert on_status_boot(state, boot, ts) == expected


def test_after_an_announced_boot_the_first_reading_starts_the_sequence() -> None:
    state = on_status_boot(BOOTED, "b3", T + 300_000)
    verdict = classify(state, None, 1, c(T + 301_000), {"b1": c(T + 1_000), "b2": c(T + 101_000)})
    assert (verdict.kind, verdict.boot, verdict.gap, verdict.state.last_seq) == ("new", "b3", None, 1)
    late = classify(state, None, 6, c(T + 106_000), {})  # taken before the status, forwarded after it
    assert (late.kind, late.boot, late.late) == ("new", "b2", True)
