"""Scenarios 3 and 4, end to end: devices publish over MQTT, browser-like clients receive.

A hospital group of H hospitals and P patients, one monitor per patient, publishing QoS 1 vitals
at R readings/s in total through Mosquitto. C WebSocket clients: D ward dashboards, each in its
hospital's room (``hospital:{hid}``, R/H readings/s each), and C - D patient apps, each in its
patient's room (``patient:{pid}``). Latency is publish (the reading's ``ts``) to receive, at the
client. The floor is a paho subscriber on the broker itself, running at the same time as every
path: Mosquitto to a client, with nothing in between.

``e2e`` runs the product (and the bare ``websockets`` server with the same rooms as paths, as
the Python limit); ``peer`` runs the same scenario through Node-RED, rooms as one ``mqtt in`` ->
``websocket out`` pair per room (``/ws/hospital/{hid}``, ``/ws/patient/{pid}``), which is how a
Node-RED flow gives each dashboard only its own readings.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Ctx, ScenarioResult, Table, fmt, fx, ratio
from bench.loadgen import hospital_of, patient_id
from bench.measure import ClientPool, CpuMeter, loadgen_result, rss_bytes, start_loadgen
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

LABELS = {"floor": "Mosquitto → paho subscriber (the floor)", "product": "**FirstCare** (bridge, WebSocket)",
          "websockets": "bare websockets broadcast() (rooms as paths)",
          "node-red": "Node-RED (mqtt in → websocket out per room)"}
_run = [0]


def plan(ctx: Ctx) -> dict[str, Any]:
    if ctx.quick:
        return {"hospitals": 2, "patients": 10, "rate": 50, "clients": 10, "dashboards": 2, "warmup": 0.5,
                "window": 1.5}
    return {"hospitals": 10, "patients": 500, "rate": 1000, "clients": 1000, "dashboards": 50, "warmup": 3.0,
            "window": max(10.0, 2 * ctx.duration)}


def client_paths(target: str, p: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    per_h = p["patients"] // p["hospitals"]
    dash, pats = [], []
    for i in range(p["dashboards"]):
        hid = f"h{i % p['hospitals'] + 1}"
        if target == "product":
            jwt = token(f"ward-{hid}-{i}", "clinician", hospitals=[hid])
            dash.append({"path": f"/realtime/ws/hospital/{hid}?token={jwt}"})
        else:
            dash.append({"path": f"/ws/hospital/{hid}"})
    for j in range(p["clients"] - p["dashboards"]):
        idx = j % p["patients"]
        pid = patient_id(idx)
        if target == "product":
            jwt = token(pid, "patient", patients=[pid])
            pats.append({"path": f"/realtime/ws/patient/{pid}?token={jwt}"})
        else:
            pats.append({"path": f"/ws/patient/{pid}"})
    assert hospital_of(0, per_h) == "h1"
    return dash, pats, '"subscribed"' if target == "product" else None


def run_path(ctx: Ctx, target: str, mport: int, p: dict[str, Any]) -> dict[str, Any]:
    _run[0] += 1
    prefix = f"e2e{_run[0]}-"
    per_h = p["patients"] // p["hospitals"]
    procs: list[Proc] = []
    if target == "product":
        bridge, port, _ = start_bridge(ctx.workdir, f"mqtt://bridge@127.0.0.1:{mport}", name="e2e-bridge")
        procs.append(bridge)
    elif target == "websockets":
        port = free_port()
        proc = Proc("e2e-websockets", [PY, "-m", "bench.peers", "ws-broadcast", "--port", str(port), "--mqtt-port",
                                       str(mport)], log_dir=ctx.workdir)
        wait_for(lambda: proc.check() and accepts(port) and "ready" in proc.log_tail(), 30, "websockets peer")
        time.sleep(0.5)
        procs.append(proc)
    else:
        routes = [(f"fc/v1/h{h + 1}/+/+/vitals", f"/ws/hospital/h{h + 1}") for h in range(p["hospitals"])]
        routes += [(f"fc/v1/{hospital_of(i, per_h)}/monitor/{prefix}{i}/vitals", f"/ws/patient/{patient_id(i)}")
                   for i in range(p["patients"])]
        proc, port = start_node_red(ctx.workdir, mport, routes, name="e2e-node-red")
        procs.append(proc)
    pids = [x.pid for x in procs]
    out: dict[str, Any] = {"target": target}
    pools: dict[str, ClientPool] = {}
    try:
        dash, pats, ready_on = client_paths(target, p)
        rss0 = rss_bytes(pids)
        pools["floor"] = ClientPool(ctx.workdir, f"e2e-{target}-floor", "mqtt", mport, [{}], topic="fc/v1/+/+/+/vitals")
        pools["dashboards"] = ClientPool(ctx.workdir, f"e2e-{target}-dash", "ws", port, dash, ready_on=ready_on)
        pools["patients"] = ClientPool(ctx.workdir, f"e2e-{target}-pat", "ws", port, pats, procs=1, ready_on=ready_on)
        connected = {k: pool.wait_connected(timeout=300) for k, pool in pools.items()}
        out["connected"] = {k: v["ok"] for k, v in connected.items()}
        ctx.log(f"e2e {target}: connected {out['connected']}")
        ctx.settle(1.0)
        out["rss_mb"] = rss_bytes(pids) / 2**20
        out["rss_per_conn_kb"] = (rss_bytes(pids) - rss0) / max(1, p["clients"]) / 1024
        lg = start_loadgen(mport, "--rate", str(p["rate"]), "--duration", str(p["warmup"] + p["window"]),
                           "--devices", str(p["patients"]), "--patients", str(p["patients"]), "--per-hospital",
                           str(per_h), "--prefix", prefix, "--connections", "4", workdir=ctx.workdir,
                           name=f"e2e-loadgen-{target}")
        time.sleep(p["warmup"])
        for pool in pools.values():
            pool.reset()
        cpu = CpuMeter(pids).start()
        t_reset = time.time()
        lgr = loadgen_result(lg, timeout=p["warmup"] + p["window"] + 120)
        time.sleep(0.5 if ctx.quick else 1.0)
        out["cores"] = cpu.stop()
        window = lgr["t_sent"] - t_reset
        out["window_s"] = window
        for k, pool in pools.items():
            rep = pool.report()
            n = out["connected"][k]
            expected_per_s = {"floor": p["rate"], "dashboards": n * p["rate"] / p["hospitals"],
                              "patients": n * p["rate"] / p["patients"]}[k]
            out[k] = {"clients": n, "deliveries_per_s": rep["vitals"] / window if window > 0 else None,
                      "expected_per_s": expected_per_s, "p50": rep["p50_ms"], "p99": rep["p99_ms"],
                      "max": rep["max_ms"], "closed": rep["closed"]}
            ctx.log(f"e2e {target} {k}: p50 {fmt(rep['p50_ms'], 1)} ms, p99 {fmt(rep['p99_ms'], 1)} ms, "
                    f"max {fmt(rep['max_ms'], 1)} ms, {fmt(out[k]['deliveries_per_s'])}/s")
        out["loadgen_rate"] = lgr["publish_rate"]
    finally:
        for pool in pools.values():
            pool.close()
        for x in procs:
            x.stop()
    return out


def run(ctx: Ctx, targets: tuple[str, ...] = ("product", "websockets"), name: str = "e2e") -> ScenarioResult:
    res = ScenarioResult(name)
    p = plan(ctx)
    if "node-red" in targets and not (ctx.node_red and node_red_installed()):
        res.notes.append("peer skipped: not installed (npm install --prefix bench/node-red node-red)"
                         if not node_red_installed() else "peer skipped: disabled (--no-node-red)")
        targets = tuple(t for t in targets if t != "node-red")
        if not targets:
            res.data = {"plan": p, "paths": [], "skipped": True}
            return res
    mosq, mport = start_mosquitto(ctx.workdir, name=f"{name}-mosquitto")
    paths: list[dict[str, Any]] = []
    try:
        for target in targets:
            ctx.log(f"{name}: {target}: {p['rate']:,} readings/s from {p['patients']:,} devices, "
                    f"{p['clients']:,} clients")
            try:
                paths.append(run_path(ctx, target, mport, p))
            except Exception as exc:  # noqa: BLE001 - one failed path must not lose the run
                ctx.log(f"{name} {target} failed: {exc}")
                paths.append({"target": target, "error": str(exc)[:300]})
    finally:
        mosq.stop()
    res.data = {"plan": p, "paths": paths}
    t = Table(f"End to end at {p['rate']:,} readings/s, {p['clients']:,} WebSocket clients ({p['dashboards']} ward "
              f"dashboards in {p['hospitals']} hospital rooms, {p['clients'] - p['dashboards']} patient apps in "
              f"{min(p['patients'], p['clients'] - p['dashboards'])} patient rooms): publish → receive",
              ["Path", "Clients", "Deliveries/s (expected)", "p50 ms", "p99 ms", "max ms", "Server CPU (cores)",
               "p99 ÷ floor p99"])
    for path in paths:
        if "error" in path:
            t.add(LABELS[path["target"]], "failed", path["error"][:80], "", "", "", "", "")
            continue
        floor = path["floor"]
        t.add(LABELS["floor"] + f" (during the {path['target']} run)", "1", fmt(floor["deliveries_per_s"]),
              fmt(floor["p50"], 1), fmt(floor["p99"], 1), fmt(floor["max"], 1), "", "")
        for k, label in (("dashboards", "ward dashboards"), ("patients", "patient apps")):
            r = path[k]
            t.add(f"{LABELS[path['target']]}: {label}", f"{r['clients']:,}",
                  f"{fmt(r['deliveries_per_s'])} ({fmt(r['expected_per_s'])})", fmt(r["p50"], 1), fmt(r["p99"], 1),
                  fmt(r["max"], 1), fmt(path["cores"], 2) if k == "dashboards" else "",
                  fx(ratio(r["p99"], floor["p99"])))
    t.notes.append("Latency includes up to 1 ms of rounding (the reading's `ts` has millisecond resolution) on "
                   "every path, the floor included. Clients, load generator, broker and server share 2 cores.")
    res.tables.append(t)
    return res
