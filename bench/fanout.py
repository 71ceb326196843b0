"""Scenario 2, fan-out: N WebSocket (and SSE) clients in one room, beside the peers.

Every server is fed the same way, from the same Mosquitto, by the same load generator
publishing QoS 1 vitals of 50 devices of hospital ``h1``:

* the product: ``firstcare bridge`` (every reading validated, stored, alarms evaluated, routed to
  four rooms, history kept) with clients on ``/realtime/ws/hospital/h1`` (and SSE on
  ``/realtime/events/hospital/h1``), each authenticated with a JWT;
* a bare ``websockets`` server using ``broadcast()``: the Python limit;
* FastAPI's documentation ``ConnectionManager`` loop behind uvicorn: what a user writes by hand;
* sse-starlette with an ``asyncio.Queue`` per client: Server-Sent Events as written by hand;
* Node-RED ``mqtt in`` -> ``websocket out``, when installed.

For each N: RSS per idle connection (server RSS after N clients connected and subscribed, minus
before, over N); **full speed**, a burst of E events published as fast as the load generator
can (E x N deliveries), deliveries/s = deliveries received / (last receive - first publish);
and a **fixed rate** of events such that N x rate = the fixed delivery rate, with latency
p50/p99/max measured at the clients. The clients run in separate processes (one per 2,500).
"""

from __future__ import annotations

import math
import time
from typing import Any

from bench.common import Ctx, ScenarioResult, Table, fmt, fx, ratio
from bench.measure import ClientPool, CpuMeter, rss_bytes, run_loadgen
from bench.procs import (
    PY,
    Proc,
    accepts,
    free_port,
    node_red_installed,
    start_bridge,
    start_mosquitto,
    start_node_red,
    token,
    wait_for,
)

SERVERS = ("product-ws", "product-sse", "websockets", "fastapi", "sse-starlette", "node-red")
LABELS = {
    "product-ws": "**FirstCare WebSocket**",
    "product-sse": "**FirstCare SSE**",
    "websockets": "bare websockets broadcast()",
    "fastapi": "FastAPI docs ConnectionManager",
    "sse-starlette": "sse-starlette, a queue per client",
    "node-red": "Node-RED mqtt in → websocket out",
}
_phase = [0]


def _prefix() -> str:
    _phase[0] += 1
    return f"fan{_phase[0]}-"


class Server:
    """One server under test: its process(es), how clients reach it."""

    def __init__(self, ctx: Ctx, kind: str, mqtt_port: int) -> None:
        self.kind = kind
        self.ready_on: str | None = None
        self.procs: list[Proc] = []
        if kind == "product":
            bridge, port, _ = start_bridge(ctx.workdir, f"mqtt://bridge@127.0.0.1:{mqtt_port}", name="fanout-bridge")
            self.procs = [bridge]
            self.port = port
        elif kind in ("websockets", "fastapi", "sse-starlette"):
            self.port = free_port()
            peer = {"websockets": "ws-broadcast", "fastapi": "fastapi-docs", "sse-starlette": "sse-starlette"}[kind]
            proc = Proc(f"fanout-{kind}", [PY, "-m", "bench.peers", peer, "--port", str(self.port),
                                           "--mqtt-port", str(mqtt_port)], log_dir=ctx.workdir)
            wait_for(lambda: proc.check() and accepts(self.port) and "ready" in proc.log_tail(), 30,
                     f"{kind} peer")
            time.sleep(0.5)  # SUBACK
            self.procs = [proc]
        elif kind == "node-red":
            proc, self.port = start_node_red(ctx.workdir, mqtt_port, [("fc/v1/+/+/+/vitals", "/ws")],
                                             name="fanout-node-red")
            self.procs = [proc]
        else:
            raise ValueError(kind)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def client_specs(server: str, n: int) -> tuple[str, list[dict[str, Any]], str | None]:
    """(kind, clients, ready_on) for N clients of ``server`` in the one room."""
    if server in ("product-ws", "product-sse"):
        jwt = token("bench-dashboard", "clinician", hospitals=["h1"])
        if server == "product-ws":
            return "ws", [{"path": f"/realtime/ws/hospital/h1?token={jwt}"}] * n, '"subscribed"'
        return "sse", [{"path": f"/realtime/events/hospital/h1?token={jwt}"}] * n, None
    if server == "websockets":
        return "ws", [{"path": "/ws/hospital/h1"}] * n, None
    if server == "fastapi":
        return "ws", [{"path": f"/ws/{i}"} for i in range(n)], None
    if server == "sse-starlette":
        return "sse", [{"path": "/sse/hospital/h1"}] * n, None
    return "ws", [{"path": "/ws"}] * n, None


def measure(ctx: Ctx, server: str, srv: Server, mqtt_port: int, n: int, burst_deliveries: int,
            fixed_deliveries: int, duration: float) -> dict[str, Any]:
    kind, clients, ready_on = client_specs(server, n)
    procs = max(1, math.ceil(n / 2500))
    rss0 = rss_bytes(srv.pids)
    t = time.monotonic()
    pool = ClientPool(ctx.workdir, f"fan-{server}-{n}", kind, srv.port, clients, procs=procs, ready_on=ready_on)
    out: dict[str, Any] = {"server": server, "n": n}
    try:
        conn = pool.wait_connected(timeout=600)
        out["connected"], out["failed"] = conn["ok"], conn["failed"]
        out["connect_s"] = time.monotonic() - t
        ctx.log(f"fanout {server} N={n}: {conn['ok']:,} connected in {out['connect_s']:.1f}s"
                + (f", {conn['failed']} failed {conn['errors']}" if conn["failed"] else ""))
        ctx.settle(2.0)
        rss1 = rss_bytes(srv.pids)
        out["rss_per_conn_kb"] = (rss1 - rss0) / max(1, conn["ok"]) / 1024
        out["rss_mb"] = rss1 / 2**20
        if not conn["ok"]:
            return out

        # full speed: a burst of E events
        events = max(10, burst_deliveries // n)
        pool.reset()
        cpu = CpuMeter(srv.pids).start()
        lg = run_loadgen(mqtt_port, "--count", str(events), "--devices", "50", "--prefix", _prefix(),
                         "--connections", "2")
        expected = events * conn["ok"]
        rep = _wait_quiet(pool, expected, quiet=10.0 if not ctx.quick else 1.0, timeout=120)
        out["cores_full"] = cpu.stop()
        span = rep["last"] - lg["t0"]
        out["full"] = {"events": events, "expected": expected, "delivered": rep["vitals"],
                       "rate": rep["vitals"] / span if span > 0 else None,
                       "p50": rep["p50_ms"], "p99": rep["p99_ms"], "max": rep["max_ms"], "closed": rep["closed"]}
        ctx.log(f"fanout {server} N={n}: full speed {fmt(out['full']['rate'])} deliveries/s "
                f"({rep['vitals']:,}/{expected:,} delivered)")
        if rep["vitals"] < expected:  # let a server that fell behind catch up before the next phase
            _wait_quiet(pool, expected, quiet=3.0 if not ctx.quick else 0.5, timeout=120)

        # fixed rate
        rate = fixed_deliveries / n
        seconds = max(duration, 3 / rate)  # at least three events
        pool.reset()
        cpu = CpuMeter(srv.pids).start()
        lg = run_loadgen(mqtt_port, "--rate", f"{rate:g}", "--duration", f"{seconds:g}", "--devices", "50",
                         "--prefix", _prefix(), "--connections", "2")
        expected = lg["published"] * conn["ok"]
        rep = _wait_quiet(pool, expected, quiet=5.0 if not ctx.quick else 0.5, timeout=120)
        out["cores_fixed"] = cpu.stop()
        out["fixed"] = {"events_per_s": rate, "expected": expected, "delivered": rep["vitals"],
                        "rate": rep["vitals"] / max(1e-9, lg["t_sent"] - lg["t0"]),
                        "p50": rep["p50_ms"], "p99": rep["p99_ms"], "max": rep["max_ms"], "closed": rep["closed"]}
        ctx.log(f"fanout {server} N={n}: fixed {rate:g} events/s: p50 {fmt(rep['p50_ms'], 1)} ms, "
                f"p99 {fmt(rep['p99_ms'], 1)} ms, max {fmt(rep['max_ms'], 1)} ms")
    finally:
        pool.close()
    return out


def _wait_quiet(pool: ClientPool, expected: int, quiet: float, timeout: float = 300) -> dict[str, Any]:
    """Report once every expected delivery arrived, or nothing new came for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last_n, last_change = -1, time.monotonic()
    while True:
        time.sleep(0.25)
        rep = pool.report()
        now = time.monotonic()
        if rep["vitals"] != last_n:
            last_n, last_change = rep["vitals"], now
        if rep["vitals"] >= expected or now - last_change > quiet or now > deadline:
            return rep


def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult("fanout")
    q = ctx.quick
    sizes = [5] if q else ctx.sizes
    burst = 500 if q else 150_000
    fixed = 200 if q else 2_000
    duration = 1.0 if q else max(3.0, ctx.duration)
    servers = [s for s in SERVERS if s != "node-red" or (ctx.node_red and node_red_installed())]
    if "node-red" not in servers:
        res.notes.append("Node-RED skipped: " + ("not installed (npm install --prefix bench/node-red node-red)"
                                                 if not node_red_installed() else "disabled (--no-node-red)"))
    mosq, mport = start_mosquitto(ctx.workdir, name="fanout-mosquitto")
    results: list[dict[str, Any]] = []
    try:
        groups = [("product", ["product-ws", "product-sse"])]
        groups += [(s, [s]) for s in servers if not s.startswith("product")]
        for kind, names in groups:
            srv = Server(ctx, kind, mport)
            try:
                for name in names:
                    for n in sizes:
                        try:
                            results.append(measure(ctx, name, srv, mport, n, burst, fixed, duration))
                        except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the run
                            ctx.log(f"fanout {name} N={n} failed: {exc}")
                            results.append({"server": name, "n": n, "error": str(exc)[:300]})
                        for p in srv.procs:
                            p.check()
            finally:
                srv.stop()
    finally:
        mosq.stop()

    res.data = {"cells": results, "sizes": sizes, "burst_deliveries": burst, "fixed_deliveries": fixed}
    by = {(r["server"], r["n"]): r for r in results}
    full = Table("Fan-out at full speed: deliveries/s received by the clients (one room)",
                 ["Server", *[f"N = {n:,}" for n in sizes], "Server CPU (cores), largest N"])
    for s in [s for s in SERVERS if any(r["server"] == s for r in results)]:
        cells = []
        for n in sizes:
            r = by.get((s, n), {})
            f = r.get("full")
            if f is None:
                cells.append("failed" if "error" in r else "–")
            else:
                pct = 100 * f["delivered"] / max(1, f["expected"])
                cells.append(f"{fmt(f['rate'])}" + ("" if pct >= 99.95 else f" ({pct:.0f}% delivered)"))
        last = by.get((s, sizes[-1]), {})
        full.add(LABELS[s], *cells, fmt(last.get("cores_full"), 2))
    ratios = Table("Fan-out ratios at full speed (deliveries/s of the first ÷ the second)",
                   ["Comparison", *[f"N = {n:,}" for n in sizes], "Target"])
    pairs = [("product-ws", "websockets", ">= 1.0x"), ("product-ws", "fastapi", ">= 2x"),
             ("product-ws", "node-red", ">= 1.0x"), ("product-sse", "websockets", ">= 0.5x"),
             ("product-sse", "sse-starlette", ">= 2x"), ("product-sse", "node-red", "–")]
    for mine_s, s, target in pairs:
        if not any(r["server"] == s for r in results) or not any(r["server"] == mine_s for r in results):
            continue
        cells = []
        for n in sizes:
            mine = (by.get((mine_s, n)) or {}).get("full") or {}
            theirs = (by.get((s, n)) or {}).get("full") or {}
            cells.append(fx(ratio(mine.get("rate"), theirs.get("rate"))))
        ratios.add(f"{LABELS[mine_s]} ÷ {LABELS[s]}", *cells, target)
    lat = Table(f"Fan-out at a fixed rate ({fixed:,} deliveries/s in total: {fixed:,}/N events/s): "
                "latency at the client",
                ["Server", "N", "Events/s", "Delivered", "p50 ms", "p99 ms", "max ms"])
    mem = Table("Server memory per idle connection (RSS after N connected and subscribed, minus before, / N)",
                ["Server", *[f"N = {n:,}" for n in sizes], "Target", "Connected at largest N"])
    for s in [s for s in SERVERS if any(r["server"] == s for r in results)]:
        for n in sizes:
            r = by.get((s, n), {})
            f = r.get("fixed")
            if f:
                lat.add(LABELS[s], f"{n:,}", f"{f['events_per_s']:g}",
                        f"{100 * f['delivered'] / max(1, f['expected']):.1f}%", fmt(f["p50"], 1), fmt(f["p99"], 1),
                        fmt(f["max"], 1))
        cells = [f"{by[(s, n)]['rss_per_conn_kb']:.1f} KB" if "rss_per_conn_kb" in by.get((s, n), {}) else "–"
                 for n in sizes]
        last = by.get((s, sizes[-1]), {})
        mem.add(LABELS[s], *cells, {"product-ws": "<= 16 KB", "product-sse": "<= 24 KB"}.get(s, ""),
                f"{last.get('connected', 0):,} / {sizes[-1]:,}")
    lat_ratios = Table("Fan-out at a fixed rate: p99 latency ratios (the first ÷ the second; lower is better)",
                       ["Comparison", *[f"N = {n:,}" for n in sizes], "Target"])
    for mine_s, s, target in [("product-ws", "websockets", "<= 1.5x"), ("product-sse", "websockets", "–"),
                              ("product-sse", "sse-starlette", "<= 1.0x")]:
        if not any(r["server"] == s for r in results) or not any(r["server"] == mine_s for r in results):
            continue
        cells = []
        for n in sizes:
            mine = (by.get((mine_s, n)) or {}).get("fixed") or {}
            theirs = (by.get((s, n)) or {}).get("fixed") or {}
            cells.append(fx(ratio(mine.get("p99"), theirs.get("p99"))))
        lat_ratios.add(f"{LABELS[mine_s]} ÷ {LABELS[s]}", *cells, target)
    mem.notes.append("RSS per connection includes the client's socket buffers held by the server process and "
                     "whatever the allocator keeps; the largest N is the steadiest figure.")
    full.notes.append(f"A burst of max(10, {burst:,} / N) events from 50 devices; the product coalesces queued "
                      "vitals of one device when a client's queue is half full (FC_WS_QUEUE_SIZE), so it may "
                      "deliver fewer than E x N; the percentage says so. Peers never drop (unbounded buffers).")
    res.tables += [full, ratios, lat, lat_ratios, mem]
    return res
