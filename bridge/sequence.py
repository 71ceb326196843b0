"""Reading identity, pure: is a reading new, a duplicate, a device reboot, or a conflict?

A reading's identity is (device, boot, seq). ``boot`` names one power cycle of the device (the
idea of Sparkplug B's birth sequence): a device that sends it, in its readings or in its
``online`` status, starts a new sequence whenever it changes, so ``seq`` may start again at 1
without anything being mistaken for a duplicate. Its content is the measurement itself:
``ts_ms`` and the canonical metrics, not the patient attribution (a binding or a bed map may
change between two deliveries of one reading).

The rules, for a reading of a device whose state is :class:`SeqState`:

With a ``boot``:
    1. stored under (device, boot, seq) with the same content -> ``duplicate``;
       with other content -> ``conflict``.
    2. the device's current boot -> ``new`` (a forward jump in seq is a gap).
    3. another boot, not older than the current boot's start -> ``new`` and a **reboot**:
       it becomes the current boot and its sequence starts here (no gap is reported across).
    4. another boot, older than the current boot's start -> ``new``, a late reading of an
       earlier boot (stored; the current sequence is left alone).
Without one:
    5. the same content stored under this seq in any boot -> ``duplicate`` (a redelivery).
    6. seq at or below the current boot's highest and ts later than every stored reading of
       the device -> ``new`` and an **implicit reboot**: a new boot ``~<ts_ms>`` begins.
    7. ts before the current boot began -> filed under the previous boot (a late reading).
    8. stored under (device, that boot, seq) with other content -> ``conflict``.
    9. otherwise ``new`` under the current boot (a forward jump is a gap; a lower seq fills one).

An online status with a ``boot`` other than the current one, not older than the current
boot's start, begins that boot too (:func:`on_status_boot`); the first reading of a boot then
starts its sequence. Implicit boot keys start with ``~``, which no device id may contain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

IMPLICIT_PREFIX = "~"


@dataclass(frozen=True, slots=True)
class Content:
    """What a reading measured: its time and canonical metrics (patient left out)."""

    ts_ms: int
    metrics: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, ts_ms: int, metrics: Mapping[str, float]) -> Content:
        return cls(ts_ms, tuple(sorted((name, float(value)) for name, value in metrics.items())))


@dataclass(frozen=True, slots=True)
class SeqState:
    """A device's sequence bookkeeping. ``boot`` is the current boot key ('' for a device that
    never named one); ``last_seq`` the highest seq stored in it (None before its first
    reading); ``last_ts_ms`` the newest reading time stored for the device in any boot."""

    boot: str = ""
    boot_ts_ms: int | None = None
    prev_boot: str | None = None
    last_seq: int | None = None
    last_ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["new", "duplicate", "conflict"]
    boot: str  # the boot key of the reading's identity
    state: SeqState  # the device's state once this reading is taken into account
    gap: tuple[int, int] | None = None  # first and last missing seq, within one boot
    reboot: bool = False  # this reading began a new boot
    late: bool = False  # a reading of an earlier boot, filed without touching the current one


def _after(state: SeqState, ts_ms: int) -> int:
    return ts_ms if state.last_ts_ms is None else max(state.last_ts_ms, ts_ms)


def continue_boot(state: SeqState, seq: int, ts_ms: int) -> Verdict:
    """A new reading in the current boot: a forward jump is a gap, a lower seq fills one."""
    gap = None
    if state.last_seq is not None and seq > state.last_seq + 1:
        gap = (state.last_seq + 1, seq - 1)
    last_seq = seq if state.last_seq is None else max(state.last_seq, seq)
    after = SeqState(state.boot, state.boot_ts_ms, state.prev_boot, last_seq, _after(state, ts_ms))
    return Verdict("new", state.boot, after, gap=gap)


def _begin(state: SeqState, boot: str, seq: int, ts_ms: int) -> Verdict:
    after = SeqState(boot=boot, boot_ts_ms=ts_ms, prev_boot=state.boot, last_seq=seq, last_ts_ms=_after(state, ts_ms))
    return Verdict("new", boot, after, reboot=True)


def _late(state: SeqState, boot: str, ts_ms: int) -> Verdict:
    return Verdict("new", boot, dataclasses.replace(state, last_ts_ms=_after(state, ts_ms)), late=True)


def classify(state: SeqState, boot: str | None, seq: int, content: Content,
             stored: Mapping[str, Content]) -> Verdict:
    """Decide what one reading is. ``stored`` maps boot key -> content of what the device
    already has stored under this ``seq`` (every boot)."""
    if boot is not None:
        if boot in stored:
            return Verdict("duplicate" if stored[boot] == content else "conflict", boot, state)
        if boot == state.boot:
            return continue_boot(state, seq, content.ts_ms)
        if state.boot_ts_ms is None or content.ts_ms >= state.boot_ts_ms:
            return _begin(state, boot, seq, content.ts_ms)
        return _late(state, boot, content.ts_ms)
    for key, existing in stored.items():
        if existing == content:
            return Verdict("duplicate", key, state)
    if (state.last_seq is not None and seq <= state.last_seq
            and (state.last_ts_ms is None or content.ts_ms > state.last_ts_ms)):
        return _begin(state, f"{IMPLICIT_PREFIX}{content.ts_ms}", seq, content.ts_ms)
    if state.boot_ts_ms is not None and content.ts_ms < state.boot_ts_ms and state.prev_boot is not None:
        key = state.prev_boot
        if key in stored:
            return Verdict("conflict", key, state)
        return _late(state, key, content.ts_ms)
    if state.boot in stored:
        return Verdict("conflict", state.boot, state)
    return continue_boot(state, seq, content.ts_ms)


def on_status_boot(state: SeqState, boot: str | None, ts_ms: int) -> SeqState:
    """An ``online`` status naming ``boot``: a boot other than the current one, not older than
    the current boot's start, begins here; its first reading then starts its sequence."""
    if boot is None or boot == state.boot:
        return state
    if state.boot_ts_ms is not None and ts_ms < state.boot_ts_ms:
        return state
    return SeqState(boot=boot, boot_ts_ms=ts_ms, prev_boot=state.boot, last_seq=None, last_ts_ms=state.last_ts_ms)
