"""The bridge's domain records, pure: what the writer's rules (``bridge.devices``,
``bridge.news2_state``, ``bridge.sequence``), the working set (``bridge.state``) and the
stores share. Frozen dataclasses with no behaviour beyond their keys; the storage interface
(``bridge.store``) reads and writes them, it does not define them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from firstcare import news2

DeviceKey = tuple[str, str]  # (device type, device id)


class DeviceState(StrEnum):
    """A device's connection state as the bridge knows it (its status messages, its will, the
    heartbeat timeout); the value is what the database, the API and the events spell."""

    UNKNOWN = "unknown"  # seen only through readings, never a status
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_ms: int
    topic: str
    reason: str
    detail: str
    payload: bytes
    payload_size: int
    index: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_type: str
    device_id: str
    hospital_id: str | None
    patient_id: str | None = None
    state: DeviceState = DeviceState.UNKNOWN
    silent: bool = False
    last_seen_ms: int | None = None
    last_data_ms: int | None = None
    battery: int | None = None
    firmware: str | None = None
    last_seq: int | None = None  # highest seq stored in the current boot
    status_ms: int | None = None  # the device's own time of its latest status message
    boot: str = ""  # current boot key (bridge.sequence); '' for a device that never named one
    boot_ts_ms: int | None = None  # device time the current boot began
    prev_boot: str | None = None
    last_ts_ms: int | None = None  # newest reading time stored for the device, any boot

    def __post_init__(self) -> None:
        if type(self.state) is not DeviceState:  # a row read back from a store holds the plain string
            object.__setattr__(self, "state", DeviceState(self.state))

    @property
    def key(self) -> tuple[str, str]:
        return (self.device_type, self.device_id)


@dataclass(frozen=True, slots=True)
class SeqGap:
    """Missing ``seq`` values first_missing..last_missing of one boot of a device. Provisional
    (``confirmed_ms`` None) until the grace period has passed without a late reading filling
    it; only a confirmed gap raises ``device.seq_gap``."""

    device_type: str
    device_id: str
    first_missing: int
    last_missing: int
    detected_ms: int
    boot: str = ""
    confirmed_ms: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.device_type, self.device_id)

    @property
    def missing(self) -> int:
        return self.last_missing - self.first_missing + 1


@dataclass(frozen=True, slots=True)
class ObservationRecord:
    """One clinician observation (a NEWS2 input): one kind, one value, who recorded it and when."""

    patient_id: str
    hospital_id: str
    kind: str  # OBSERVATION_KINDS
    value: str | bool | int
    ts_ms: int  # when observed
    recorded_ms: int  # when entered
    recorded_by: str
    note: str | None = None


OBSERVATION_KINDS = ("consciousness", "supplemental_oxygen", "spo2_scale")


@dataclass(frozen=True, slots=True)
class PatientInputs:
    """Everything NEWS2 needs to know of one patient, as stored."""

    hospital_id: str | None
    inputs: dict[str, news2.Input]
    spo2_scale: int


@dataclass(frozen=True, slots=True)
class News2Record:
    """A patient's NEWS2 inputs plus what was last decided about them: the signature of the
    last stored score and when an input next goes stale (None: never)."""

    known: PatientInputs
    signature: str | None = None
    expiry_ms: int | None = None
