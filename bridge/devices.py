"""Device status, pure: how readings, status messages, bindings and silence change a
:class:`~bridge.store.DeviceRecord`.

Continuous monitors (``monitor``, ``oximeter``) stream; silence from them is a technical alarm
and going offline raises ``device.offline``. Spot-check devices (bp, thermometer, glucometer,
scale) measure now and then and may disconnect in between, so they get no silent alarm, no
offline alarm, and a heartbeat timeout of at least a day.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from bridge import sequence
from bridge.records import DeviceRecord, DeviceState, SeqGap
from bridge.sequence import SeqState, Verdict
from firstcare.payloads import Reading, StatusReport

CONTINUOUS_TYPES = frozenset({"monitor", "oximeter"})
SPOT_CHECK_OFFLINE_MS = 25 * 3600 * 1000


def is_continuous(device_type: str) -> bool:
    return device_type in CONTINUOUS_TYPES


def offline_after_ms(device_type: str, offline_ms: int) -> int:
    return offline_ms if is_continuous(device_type) else max(offline_ms, SPOT_CHECK_OFFLINE_MS)


def new_device(device_type: str, device_id: str, hospital_id: str | None) -> DeviceRecord:
    return DeviceRecord(device_type, device_id, hospital_id)


def seq_state(device: DeviceRecord) -> SeqState:
    return SeqState(device.boot, device.boot_ts_ms, device.prev_boot, device.last_seq, device.last_ts_ms)


def with_seq_state(device: DeviceRecord, state: SeqState) -> DeviceRecord:
    return dataclasses.replace(device, boot=state.boot, boot_ts_ms=state.boot_ts_ms, prev_boot=state.prev_boot,
                               last_seq=state.last_seq, last_ts_ms=state.last_ts_ms)


def on_reading(device: DeviceRecord, reading: Reading, verdict: Verdict | None = None
               ) -> tuple[DeviceRecord, SeqGap | None]:
    """A stored (non-duplicate) reading: the device is online and not silent. ``verdict``
    (from :func:`bridge.sequence.classify`; by default a reading of the current boot) carries
    the sequence bookkeeping: a forward jump in ``seq`` within a boot is a gap, an older seq
    that was never stored fills one, and a new boot starts a sequence without a gap.

    A reading taken before the device's latest offline status (an edge gateway draining its
    backlog after forwarding the status first) does not bring the device back online."""
    if verdict is None:
        verdict = sequence.continue_boot(seq_state(device), reading.seq, reading.ts_ms)
    gap = None
    if verdict.gap is not None:
        gap = SeqGap(device.device_type, device.device_id, verdict.gap[0], verdict.gap[1], reading.received_ms,
                     verdict.boot)
    stale = device.state == DeviceState.OFFLINE and device.status_ms is not None and reading.ts_ms < device.status_ms
    seq = verdict.state
    updated = dataclasses.replace(  # one replace: the sequence state and the rest together
        device, boot=seq.boot, boot_ts_ms=seq.boot_ts_ms, prev_boot=seq.prev_boot, last_seq=seq.last_seq,
        last_ts_ms=seq.last_ts_ms,
        hospital_id=reading.hospital_id,
        state=device.state if stale else DeviceState.ONLINE,
        silent=device.silent if stale else False,
        last_seen_ms=max(device.last_seen_ms or 0, reading.received_ms),
        last_data_ms=max(device.last_data_ms or 0, reading.received_ms),
    )
    return updated, gap


def fill_gaps(gaps: Sequence[SeqGap], boot: str, seq: int) -> list[SeqGap] | None:
    """A new reading numbered ``seq`` of ``boot`` was stored: the provisional gaps of that boot
    holding ``seq`` shrink or split around it (one that held only ``seq`` disappears). None
    when it fills none, so the caller knows nothing changed.

        fill_gaps([gap 5..7 of boot b], "b", 6) -> [gap 5..5, gap 7..7]
    """
    out: list[SeqGap] = []
    filled = False
    for g in gaps:
        if g.confirmed_ms is not None or g.boot != boot or not g.first_missing <= seq <= g.last_missing:
            out.append(g)
            continue
        filled = True
        if g.first_missing < seq:
            out.append(dataclasses.replace(g, last_missing=seq - 1))
        if seq < g.last_missing:
            out.append(dataclasses.replace(g, first_missing=seq + 1))
    return out if filled else None


def on_status(device: DeviceRecord, status: StatusReport) -> DeviceRecord:
    """Apply a status message; one older than the latest applied only counts as a sign of life.
    An ``online`` status naming a new ``boot`` starts that boot's sequence."""
    if device.status_ms is not None and status.ts_ms < device.status_ms:
        return dataclasses.replace(device, last_seen_ms=max(device.last_seen_ms or 0, status.received_ms))
    if status.state == "online":
        device = with_seq_state(device, sequence.on_status_boot(seq_state(device), status.boot, status.ts_ms))
    return dataclasses.replace(
        device,
        hospital_id=status.hospital_id,
        state=DeviceState(status.state),
        silent=False if status.state == "offline" else device.silent,
        last_seen_ms=max(device.last_seen_ms or 0, status.received_ms),
        # a device that just came online has not been silent yet: restart its silence clock
        last_data_ms=(status.received_ms if status.state == "online" and device.state != DeviceState.ONLINE
                      else device.last_data_ms),
        battery=status.battery if status.battery is not None else device.battery,
        firmware=status.firmware if status.firmware is not None else device.firmware,
        status_ms=status.ts_ms,
    )


def on_binding(device: DeviceRecord, patient_id: str | None, hospital_id: str | None) -> DeviceRecord:
    return dataclasses.replace(device, patient_id=patient_id, hospital_id=hospital_id or device.hospital_id)


def sweep(device: DeviceRecord, now_ms: int, silent_ms: int, offline_ms: int) -> DeviceRecord | None:
    """Apply the heartbeat and silence timeouts; ``None`` when nothing changes."""
    if device.state != DeviceState.ONLINE or device.last_seen_ms is None:
        return None
    if now_ms - device.last_seen_ms >= offline_after_ms(device.device_type, offline_ms):
        return dataclasses.replace(device, state=DeviceState.OFFLINE, silent=False)
    last_data = device.last_data_ms or device.last_seen_ms
    if is_continuous(device.device_type) and not device.silent and now_ms - last_data >= silent_ms:
        return dataclasses.replace(device, silent=True)
    return None
