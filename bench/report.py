"""The Markdown appended to bench/RESULTS.md: machine facts, the command, tables, ratios vs targets.

Each run also embeds its raw numbers as one ``<!-- bench-data {...} -->`` line, which
``bench/plot.py`` reads back (the newest one) to draw ``docs/perf.png``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import ScenarioResult, Table, fmt, fx, ratio
from bench.procs import REPO_ROOT, node_red_version

PACKAGES = ("paho-mqtt", "amqtt", "uvicorn", "websockets", "fastapi", "starlette", "sse-starlette", "redis",
            "msgspec", "pyjwt", "uvloop")
HEADER = """# FirstCare Realtime benchmark results

Appended by `firstcare bench` (`python -m bench.cli`); newest run last. Every run records the
machine, the library versions and the exact command; every figure in a run was measured in that
run, on that machine, side by side with the limits and the peers. How each number is measured:
`bench/*.py` docstrings and `docs/performance.md`.
"""
DATA_MARK = "<!-- bench-data "


def _cmd(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def machine() -> dict[str, Any]:
    mem_kb = 0
    model = platform.processor()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    commit = _cmd(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cores": os.cpu_count(), "cpu": model, "memory_gb": round(mem_kb / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "packages": versions,
        "mosquitto": (_cmd(["mosquitto", "-h"])
                      if shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto") else None),
        "node": _cmd(["node", "--version"]) if shutil.which("node") else None,
        "node_red": node_red_version(),
        "commit": f"{commit}{' (uncommitted changes in tracked files)' if dirty else ''}" if commit else None,
    }


def render_table(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    for row in t.rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    for note in t.notes:
        lines += ["", f"_{note}_"]
    return "\n".join(lines)


def targets(results: dict[str, ScenarioResult], quick: bool = False) -> Table:
    """Each target of the issue, met or not, from whatever this run measured."""
    t = Table("Targets (ratios within this run)", ["Target", "Measured", "Met?"])

    def add(name: str, value: float | None, text: str, ok: bool | None) -> None:
        t.add(name, text if value is not None else "not measured", "–" if ok is None or value is None
              else "quick run: not judged" if quick else ("**yes**" if ok else "no"))

    ing = results.get("ingest")
    if ing:
        d = ing.data.get("mosquitto_1", {})
        r = ratio(d.get("product", {}).get("rate"), d.get("paho", {}).get("rate"))
        add("Ingest (stored + alarms) >= 1.0x bare paho parse-only, QoS 1", r, fx(r), r is not None and r >= 1.0)
        b = ing.data.get("mosquitto_50", {}).get("product", {}).get("rate")
        add("Gateway batches >= 100,000 readings/s stored", b, f"{fmt(b)} readings/s", b is not None and b >= 100_000)
    sc = results.get("scale")
    if sc:
        for per_msg, label in ((1, "single readings"), (50, "gateway batches")):
            rows = sc.data.get(f"drain_{per_msg}", {})
            rate = {k: (rows.get(k) or {}).get("rate") for k in ("sqlite", "pg1", "pg2")}
            r = ratio(rate["pg1"], rate["sqlite"])
            add(f"One bridge on PostgreSQL >= 0.9x on SQLite ({label}, backlog drain)", r, fx(r),
                r is not None and r >= 0.9)
            r = ratio(rate["pg2"], rate["pg1"])
            add(f"Two bridges >= 1.6x one bridge ({label}, backlog drain, 2 cores)", r, fx(r),
                r is not None and r >= 1.6)
        s = (sc.data.get("failover") or {}).get("reclaim_s")
        add("Failover: a killed bridge's slots reclaimed in <= 10 s", s, f"{s:.1f} s" if s is not None else "",
            s is not None and s <= 10)
    fan = results.get("fanout")
    if fan:
        cells = {(c["server"], c["n"]): c for c in fan.data.get("cells", [])}

        def full(server: str, n: int) -> float | None:
            return ((cells.get((server, n)) or {}).get("full") or {}).get("rate")

        for n in [n for n in fan.data.get("sizes", []) if n >= 1000] or fan.data.get("sizes", [])[-1:]:
            for peer, want in (("websockets", 0.9), ("fastapi", 2.0), ("node-red", 1.0)):
                r = ratio(full("product-ws", n), full(peer, n))
                add(f"Fan-out N = {n:,}: >= {want:g}x {peer}", r, fx(r), r is not None and r >= want)
        largest = max(fan.data.get("sizes", [0]))
        for server, limit in (("product-ws", 16), ("product-sse", 24)):
            kb = (cells.get((server, largest)) or {}).get("rss_per_conn_kb")
            add(f"RSS per idle {'WebSocket' if server == 'product-ws' else 'SSE'} connection <= {limit} KB "
                f"(N = {largest:,})", kb, f"{kb:.1f} KB" if kb is not None else "", kb is not None and kb <= limit)
        held = (cells.get(("product-ws", largest)) or {}).get("connected")
        add("10,000 connected clients held on one process", held, f"{held or 0:,} WebSocket clients at N = {largest:,}",
            held is not None and held >= 10_000)
    e2e = results.get("e2e")
    peer_result = results.get("peer")
    product = next((p for p in (e2e.data.get("paths", []) if e2e else []) if p.get("target") == "product"
                    and "error" not in p), None)
    nr = next((p for p in (peer_result.data.get("paths", []) if peer_result else []) if p.get("target") == "node-red"
               and "error" not in p), None)
    if product:
        p99 = max(product["dashboards"]["p99"] or 0, product["patients"]["p99"] or 0)
        add("End to end p99 <= 50 ms at 1,000 readings/s with 1,000 clients", p99, f"{p99:.1f} ms (worst class)",
            p99 <= 50)
        if nr:
            nr99 = max(nr["dashboards"]["p99"] or 0, nr["patients"]["p99"] or 0)
            add("End to end p99 no worse than Node-RED's", p99, f"{p99:.1f} ms vs {nr99:.1f} ms", p99 <= nr99)
        elif peer_result is not None or e2e is not None:
            add("End to end p99 no worse than Node-RED's", None, "", None)
    return t


def section(results: dict[str, ScenarioResult], command: str, facts: dict[str, Any], started: datetime,
            seconds: float, quick: bool) -> str:
    pk = facts["packages"]
    lines = [
        f"## Run {started.strftime('%Y-%m-%d %H:%M UTC')}{' (quick, tiny scale: not a measurement)' if quick else ''}",
        "",
        f"- Command: `{command}` ({seconds:.0f} s)",
        f"- Machine: {facts['cores']} cores ({facts['cpu']}), {facts['memory_gb']} GB memory, {facts['os']}, "
        f"Python {facts['python']}; everything (brokers, servers, clients, load generators) on this one machine, "
        "over loopback",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in pk.items())
        + f"; {facts['mosquitto'] or 'mosquitto: not installed'}; node {facts['node'] or 'not installed'}, "
        f"Node-RED {facts['node_red'] or 'not installed'}",
        f"- Code: commit {facts['commit'] or 'unknown'}",
        f"- Background: the machine was {facts.get('background_busy_percent', 0):.0f}% busy before the run started "
        f"(other processes, not the benchmark's); load average at the end {facts.get('loadavg_end', '?')}",
        "- Event loop: " + ("uvloop for the client processes, the bare `websockets` peer and the FastAPI peer "
                            "(`uvicorn.run` picks uvloop by itself when it is installed); `firstcare bridge` serves "
                            "uvicorn inside its own `asyncio.run`, so the product runs on the plain asyncio loop"
                            if pk.get("uvloop", "not installed") != "not installed"
                            else "asyncio everywhere (uvloop not installed)"),
        "",
    ]
    titles = {"ingest": "Ingest", "scale": "Scale: PostgreSQL, several bridges, failover", "fanout": "Fan-out",
              "e2e": "End to end", "peer": "Peer: Node-RED end to end"}
    for name, res in results.items():
        lines += [f"### {titles.get(name, name)}", ""]
        for note in res.notes:
            lines += [f"_{note}_", ""]
        for t in res.tables:
            lines += [render_table(t), ""]
    lines += ["### Against the targets", "", render_table(targets(results, quick)), ""]
    payload = {"started": started.isoformat(), "command": command, "quick": quick, "machine": facts,
               "results": {k: v.as_dict() for k, v in results.items()}}
    lines += [DATA_MARK + json.dumps(payload, separators=(",", ":")).replace("--", "-\\u002d") + " -->", ""]
    return "\n".join(lines)


def append(path: Path, text: str) -> None:
    path = Path(path)
    exists = path.exists() and path.stat().st_size > 0
    with open(path, "a") as f:
        if not exists:
            f.write(HEADER + "\n")
        f.write("\n" + text)


def newest_data(path: Path) -> dict[str, Any] | None:
    found = None
    for line in Path(path).read_text().splitlines():
        if line.startswith(DATA_MARK):
            found = line
    if found is None:
        return None
    return json.loads(found[len(DATA_MARK):].rsplit(" -->", 1)[0])


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(json.dumps(machine(), indent=2))
    sys.exit(0)
