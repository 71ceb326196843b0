"""The storage interface and its URL-selected factory.

Writes go through one writer thread (see :mod:`bridge.core`) inside :meth:`Store.transaction`,
so a batch of readings, the alert transitions they cause and the device changes commit
together or not at all. Reads may come from any thread.

    store = open_store("sqlite:///data/firstcare.db")
    with store.transaction() as tx:
        versions = tx.reading_versions("monitor", "m-1", 42)   # {boot: Content} stored under seq 42
        tx.insert_reading(reading, boot)                        # identity (device, boot, seq)
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import dataclasses

from bridge.alerts import Alert, RuleOverride, Transition
from bridge.sequence import Content
from firstcare.payloads import Reading, format_ts
from firstcare.signing import KeyRecord, b64url

MAX_PAGE = 5000


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
    state: str = "unknown"  # unknown | online | offline
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

    @property
    def key(self) -> tuple[str, str]:
        return (self.device_type, self.device_id)


@dataclass(frozen=True, slots=True)
class SeqGap:
    device_type: str
    device_id: str
    first_missing: int
    last_missing: int
    detected_ms: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None


class Transaction(Protocol):
    def reading_versions(self, device_type: str, device_id: str, seq: int) -> dict[str, Content]: ...
    def insert_reading(self, reading: Reading, boot: str) -> None: ...
    def claim_patient(self, patient_id: str, hospital_id: str, at_ms: int) -> None: ...
    def insert_dead_letters(self, letters: Iterable[DeadLetter]) -> None: ...
    def upsert_devices(self, devices: Iterable[DeviceRecord]) -> None: ...
    def save_transitions(self, transitions: Iterable[Transition]) -> None: ...
    def insert_gaps(self, gaps: Iterable[SeqGap]) -> None: ...
    def set_overrides(self, patient_id: str, overrides: dict[str, RuleOverride]) -> None: ...
    def remember_session(self, client_id: str, broker: str, at_ms: int) -> None: ...
    def put_signing_key(self, key: KeyRecord, at_ms: int) -> None: ...
    def revoke_signing_keys(self, kids: Iterable[str], at_ms: int) -> None: ...
    def set_signature_policy(self, hospital_id: str, require: bool, at_ms: int) -> None: ...


class Store(Protocol):
    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def close(self) -> None: ...
    def ping(self) -> None: ...
    def session_established(self, client_id: str, broker: str) -> bool: ...
    # state the writer reloads at start
    def load_devices(self) -> list[DeviceRecord]: ...
    def load_active_alerts(self) -> list[Alert]: ...
    def load_overrides(self) -> dict[str, dict[str, RuleOverride]]: ...
    def load_patients(self) -> dict[str, str]: ...
    def load_signing_keys(self) -> list[KeyRecord]: ...
    def load_signature_policies(self) -> dict[str, bool]: ...
    # queries
    def readings(self, patient_id: str, metric: str | None, since_ms: int | None, until_ms: int | None,
                 limit: int, cursor: str | None) -> Page: ...
    def latest_vitals(self, patient_id: str) -> dict[str, dict[str, Any]]: ...
    def alerts(self, hospitals: frozenset[str] | None, hospital_id: str | None, patient_id: str | None,
               state: str | None, limit: int, cursor: str | None) -> Page: ...
    def alert(self, alert_id: str) -> Alert | None: ...
    def alert_history(self, alert_id: str) -> list[dict[str, Any]]: ...
    def devices(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int, cursor: str | None) -> Page: ...
    def device(self, device_type: str, device_id: str) -> DeviceRecord | None: ...
    def dead_letters(self, reason: str | None, limit: int, cursor: str | None) -> Page: ...
    def patient_hospital(self, patient_id: str) -> str | None: ...
    def patients(self, hospitals: frozenset[str] | None, hospital_id: str | None, limit: int,
                 cursor: str | None) -> Page: ...
    def signing_keys(self, scope: str, hospital_id: str | None, owner: tuple[str, ...]) -> list[dict[str, Any]]: ...
    def signing_key(self, kid: str) -> tuple[KeyRecord, int | None] | None: ...
    def counts(self) -> dict[str, int]: ...
    def purge(self, older_than_ms: int) -> int: ...


def open_store(url: str, busy_timeout_s: float = 2.0) -> Store:
    """Open the store a URL names; the backend module is imported only when chosen.
    ``busy_timeout_s``: how long a write waits for a lock held elsewhere before it fails."""
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        from bridge.store_sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///"):], busy_timeout_s)
    raise ValueError(f"unsupported store URL scheme {scheme!r} in {url!r} (expected sqlite:///path)")


def alert_json(a: Alert) -> dict[str, Any]:
    body = dataclasses.asdict(a)
    for key in ("raised_ms", "updated_ms", "acknowledged_ms", "escalated_ms", "resolved_ms"):
        value = body.pop(key)
        body[key[:-3] + "_at"] = format_ts(value) if value is not None else None
    return body


def key_json(k: KeyRecord, created_ms: int | None = None, revoked_ms: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kid": k.kid, "algorithm": "Ed25519", "public_key": b64url(k.public_key),
                            "scope": k.scope, "hospital_id": k.hospital_id}
    if k.scope == "device":
        body.update(device_type=k.device_type, device_id=k.device_id)
    else:
        body["gateway_id"] = k.gateway_id
    body["registered_at"] = format_ts(created_ms) if created_ms is not None else None
    body["revoked_at"] = format_ts(revoked_ms) if revoked_ms is not None else None
    return body


def device_json(d: DeviceRecord) -> dict[str, Any]:
    body = dataclasses.asdict(d)
    for key in ("boot_ts_ms", "prev_boot", "last_ts_ms"):  # sequence bookkeeping, not for clients
        body.pop(key)
    for key in ("last_seen_ms", "last_data_ms"):
        value = body.pop(key)
        body[key[:-3] + "_at"] = format_ts(value) if value is not None else None
    return body
