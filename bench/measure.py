"""Driving client processes and turning their reports into numbers."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.procs import PY, REPO_ROOT, Proc


class ClientPool:
    """``procs`` client processes sharing ``clients`` (dicts with ``path``, ``send``)."""

    def __init__(self, workdir: Path, name: str, kind: str, port: int, clients: list[dict[str, Any]],
                 procs: int = 1, ready_on: str | None = None, topic: str | None = None,
                 concurrency: int = 100) -> None:
        self.procs: list[Proc] = []
        self.connected: list[dict[str, Any]] = []
        procs = max(1, min(procs, len(clients) or 1))
        for k in range(procs):
            spec = {"host": "127.0.0.1", "port": port, "kind": kind, "clients": clients[k::procs],
                    "ready_on": ready_on, "topic": topic, "concurrency": concurrency}
            spec_path = Path(workdir) / f"{name}-{k}.json"
            spec_path.write_text(json.dumps(spec))
            self.procs.append(Proc(f"{name}-{k}", [PY, "-m", "bench.clients", str(spec_path)], log_dir=Path(workdir),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    def _read(self, proc: Proc, timeout: float) -> dict[str, Any]:
        result: list[Any] = []

        def read() -> None:
            result.append(proc.popen.stdout.readline())  # type: ignore[union-attr]

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"client process {proc.name} did not answer; log:\n{proc.log_tail()}")
        return json.loads(result[0])

    def wait_connected(self, timeout: float = 300) -> dict[str, Any]:
        self.connected = [self._read(p, timeout) for p in self.procs]
        errors: Counter[str] = Counter()
        for c in self.connected:
            errors.update(c.get("errors", {}))
        return {"ok": sum(c["ok"] for c in self.connected), "failed": sum(c["failed"] for c in self.connected),
                "errors": dict(errors)}

    def command(self, word: str, timeout: float = 60) -> list[dict[str, Any]]:
        for p in self.procs:
            p.popen.stdin.write((word + "\n").encode())  # type: ignore[union-attr]
            p.popen.stdin.flush()  # type: ignore[union-attr]
        return [self._read(p, timeout) for p in self.procs]

    def reset(self) -> None:
        self.command("reset")

    def report(self) -> dict[str, Any]:
        return merge_reports(self.command("report"))

    def close(self) -> None:
        for p in self.procs:
            try:
                p.popen.stdin.write(b"quit\n")  # type: ignore[union-attr]
                p.popen.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(15)
            p.stop(timeout=5)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    hist: Counter[int] = Counter()
    for r in reports:
        hist.update({int(k): v for k, v in r["hist"].items()})
    firsts = [r["first"] for r in reports if r["first"]]
    lasts = [r["last"] for r in reports if r["last"]]
    return {"vitals": sum(r["vitals"] for r in reports), "other": sum(r["other"] for r in reports),
            "first": min(firsts) if firsts else 0.0, "last": max(lasts) if lasts else 0.0,
            "max_ms": max((r["max_ms"] for r in reports), default=0.0), "closed": sum(r["closed"] for r in reports),
            "p50_ms": _clamp(percentile(hist, 50), reports), "p99_ms": _clamp(percentile(hist, 99), reports)}


def _clamp(value: float | None, reports: list[dict[str, Any]]) -> float | None:
    """A bucket's upper edge, never above the largest latency actually seen."""
    if value is None:
        return None
    return min(value, max((r["max_ms"] for r in reports), default=value))


def percentile(hist: Counter[int], pct: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = math.ceil(total * pct / 100)
    seen = 0
    for key in sorted(hist):
        seen += hist[key]
        if seen >= rank:
            return (key + 1) / 10  # upper edge of the bucket
    return None


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes and their children."""
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            total += p.memory_info().rss
            for child in p.children(recursive=True):
                total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class CpuMeter:
    """CPU seconds used by processes (and their children) between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                self.procs.append(p)
                self.procs.extend(p.children(recursive=True))
            except psutil.Error:
                pass
        self.t0 = 0.0
        self.c0 = 0.0

    def _cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def start(self) -> CpuMeter:
        self.t0, self.c0 = time.monotonic(), self._cpu()
        return self

    def stop(self) -> float:
        """Average cores used (1.0 = one core busy)."""
        return (self._cpu() - self.c0) / max(1e-9, time.monotonic() - self.t0)


def run_loadgen(port: int, *args: str, timeout: float = 300) -> dict[str, Any]:
    out = subprocess.run([PY, "-m", "bench.loadgen", "--port", str(port), *args], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_loadgen(port: int, *args: str, workdir: Path | None = None, name: str = "loadgen") -> Proc:
    return Proc(name, [PY, "-m", "bench.loadgen", "--port", str(port), *args], log_dir=workdir or
                Path(tempfile.gettempdir()), stdout=subprocess.PIPE)


def loadgen_result(proc: Proc, timeout: float = 300) -> dict[str, Any]:
    out, _ = proc.popen.communicate(timeout=timeout)
    proc.stop()
    lines = (out or b"").decode().strip().splitlines()
    if proc.popen.returncode != 0 or not lines:
        raise RuntimeError(f"loadgen failed ({proc.popen.returncode}): {proc.log_tail()}")
    return json.loads(lines[-1])
