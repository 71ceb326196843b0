"""What every scenario shares: its working folder, its scale, progress output, result rows."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Ctx:
    workdir: Path
    quick: bool = False
    duration: float = 5.0
    sizes: list[int] = field(default_factory=lambda: [100, 1000, 10000])
    node_red: bool = True
    t0: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def settle(self, seconds: float) -> None:
        time.sleep(seconds / 4 if self.quick else seconds)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


@dataclass
class ScenarioResult:
    name: str
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tables": [t.as_dict() for t in self.tables], "data": self.data,
                "notes": self.notes, "seconds": self.seconds}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}"
    return str(value)


def fx(value: float | None) -> str:
    """A ratio as ``1.23x``."""
    return "–" if value is None else f"{value:.2f}x"
