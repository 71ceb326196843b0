"""The bed map: which patient a device at the bedside belongs to, from a YAML file that
hospital IT edits while the gateway runs::

    # device_type/device_id: patient_id
    monitor/mon-bed-12: p-001
    oximeter/ox-7: p-001
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from firstcare.topics import DEVICE_TYPES, is_valid_id

log = logging.getLogger("firstcare.edge")


def parse_bed_map(text: str) -> dict[tuple[str, str], str]:
    """Parse and validate; ValueError naming the bad entry."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError("the bed map must be a mapping of 'device_type/device_id: patient_id'")
    result: dict[tuple[str, str], str] = {}
    for key, patient in data.items():
        device_type, _, device_id = str(key).partition("/")
        if device_type not in DEVICE_TYPES or not is_valid_id(device_id):
            raise ValueError(f"bed map entry {key!r}: expected device_type/device_id with a known type")
        if not is_valid_id(patient):
            raise ValueError(f"bed map entry {key!r}: patient id {patient!r} must match [A-Za-z0-9_-]{{1,64}}")
        result[(device_type, device_id)] = patient
    return result


@dataclass
class BedMap:
    """A reloadable bed map. A file that fails to parse keeps the previous map (and says so)."""

    path: Path | None
    entries: dict[tuple[str, str], str] = field(default_factory=dict)
    mtime: float | None = None
    reloads: int = 0
    errors: int = 0
    last_error: str | None = None

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            self._fail(f"cannot read bed map {self.path}: {exc}", mtime=None)
            return
        if mtime == self.mtime:
            return
        try:
            self.entries = parse_bed_map(self.path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self._fail(f"bed map {self.path} not loaded, keeping the previous one: {exc}", mtime)
            return
        self.mtime = mtime
        self.reloads += 1
        self.last_error = None
        log.info("bed map loaded: %d devices", len(self.entries))

    def _fail(self, message: str, mtime: float | None) -> None:
        if message != self.last_error:
            log.error(message)
            self.errors += 1
        self.last_error = message
        self.mtime = mtime

    def patient_for(self, device_type: str, device_id: str) -> str | None:
        return self.entries.get((device_type, device_id))
