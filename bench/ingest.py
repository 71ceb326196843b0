"""Scenario 1, ingest: readings/s durably stored with alarms evaluated, beside the limits.

Full speed through Mosquitto is measured as a **backlog drain**: each subscriber's persistent
session is created, the subscriber leaves, the load generator queues M QoS 1 messages for it
in the broker, then the subscriber starts again and we time how fast it takes them. So the
publishers never compete for the two cores while a subscriber is being measured, and every
subscriber gets the identical backlog from the identical broker:

* the product: ``firstcare bridge`` (paho, manual ack after the SQLite commit, alarms evaluated),
  rate from a read-only ``SELECT count(*) FROM readings`` polled every 50 ms;
* a bare paho subscriber that only parses (``json.loads``), QoS 1, auto-ack;
* ``mosquitto_sub`` (C), QoS 1: the broker's own delivery limit.

The embedded amqtt broker loses queued messages (see DESIGN), so through it the publishers run
live, at full speed, while the subscriber takes what it can. Fixed rates are live too, and
report what each subscriber costs in CPU (1.0 = one core busy).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import Ctx, ScenarioResult, Table, fmt, fx, ratio
from bench.measure import CpuMeter, loadgen_result, run_loadgen, start_loadgen
from bench.procs import (
    PY,
    Proc,
    start_amqtt,
    start_bridge,
    start_mosquitto,
    stored_count,
)

_run = [0]


def _prefix() -> str:
    _run[0] += 1
    return f"ing{_run[0]}-"


def drain_product(ctx: Ctx, mqtt_url: str, produce: Any, expect: int, name: str) -> dict[str, Any]:
    """Register the bridge's session, stop it, queue the backlog, start it, time the drain."""
    db = ctx.workdir / f"{name}.db"
    client_id = f"bench-{name}"
    bridge, _, _ = start_bridge(ctx.workdir, mqtt_url, name=f"{name}-register", db_path=db,
                                FC_MQTT_CLIENT_ID=client_id)
    time.sleep(0.5)  # SUBACK before leaving
    bridge.stop()
    produce()
    base = stored_count(db)
    t_start = time.time()
    bridge, _, _ = start_bridge(ctx.workdir, mqtt_url, name=name, db_path=db, FC_MQTT_CLIENT_ID=client_id)
    cpu = CpuMeter([bridge.pid]).start()
    # one transaction holds up to FC_BATCH_MAX messages (25,000 readings in gateway batches of 50):
    # on a busy machine that is more than 10 s without a visible change
    return _follow_store(bridge, db, base, expect, t_start, cpu, idle=30.0)


def _follow_store(bridge: Proc, db: Path, base: int, expect: int, t_start: float, cpu: CpuMeter,
                  idle: float) -> dict[str, Any]:
    samples: list[tuple[float, int]] = []
    last_change = time.time()
    last = base
    deadline = time.time() + 600
    while time.time() < deadline:
        n = stored_count(db) - base
        now = time.time()
        samples.append((now, n))
        if n != last:
            last, last_change = n, now
        if n >= expect or now - last_change > idle:
            break
        bridge.check()
        time.sleep(0.05)
    cores = cpu.stop()
    bridge.stop()
    started = next(((t, n) for t, n in samples if n > 0), None)
    done = next(((t, n) for t, n in samples if n >= last), samples[-1])
    rate = None
    if started and done[0] > started[0]:
        rate = (done[1] - started[1]) / (done[0] - started[0])
    return {"readings": last, "expected": expect, "rate": rate, "cores": cores,
            "seconds": (done[0] - started[0]) if started else None}


def drain_peer(ctx: Ctx, kind: str, port: int, produce: Any, expect: int, batch: int, name: str) -> dict[str, Any]:
    client_id = f"bench-{name}"
    common = [PY, "-m", "bench.peers", kind, "--mqtt-port", str(port), "--topic", "fc/v1/#", "--client-id",
              client_id, "--persistent", "--batch", str(batch)]
    subprocess.run(common + ["--register"], check=True, capture_output=True, timeout=60)
    produce()
    proc = Proc(name, common + ["--expect", str(expect), "--idle", "5"], log_dir=ctx.workdir,
                stdout=subprocess.PIPE)
    return _peer_result(proc)


def _peer_result(proc: Proc, start: Any = None) -> dict[str, Any]:
    """The peer's JSON summary; ``start()`` runs once the peer has subscribed."""
    import json

    assert proc.popen.stdout is not None
    first = proc.popen.stdout.readline().decode()  # {"event": "subscribed"}
    lg = start() if start is not None else None
    # the rest through the same buffered reader: communicate(timeout=...) reads the raw pipe and
    # loses a summary that arrived with the first line (a quick drain); the peer ends by itself
    # (--expect, --idle, its own --timeout)
    out = proc.popen.stdout.read()
    proc.popen.wait(60)
    lines = [ln for ln in (first + out.decode()).splitlines() if ln.strip()]
    proc.stop()
    if lg is not None:
        loadgen_result(lg)
    result = json.loads(lines[-1])
    if "last" not in result:
        raise RuntimeError(f"{proc.name} reported no result (rc {proc.popen.returncode}): {lines}; {proc.log_tail()}")
    span = result["last"] - result["first"]
    # the first message's time starts the clock, so it is not counted in the rate
    per_message = result["readings"] / max(1, result["messages"])
    counted = result["readings"] - per_message * result.get("first_messages", 1)
    result["rate"] = counted / span if span > 0 else None
    return result


def run(ctx: Ctx) -> ScenarioResult:
    res = ScenarioResult("ingest")
    q = ctx.quick
    singles = 600 if q else 60000
    batch = 50
    batch_msgs = 40 if q else 4000
    amqtt_msgs = 600 if q else 24000
    rates = [200] if q else [1000, 2500, 5000]
    batch_rate = 10 if q else 400  # messages/s of 50 readings
    dur = 1.0 if q else max(3.0, ctx.duration)

    mosq, mport = start_mosquitto(ctx.workdir)
    url = f"mqtt://bridge@127.0.0.1:{mport}"
    full = Table("Ingest at full speed (QoS 1; Mosquitto: backlog drain, amqtt: live publishers)",
                 ["Broker", "Payload", "Subscriber", "Readings/s", "CPU (cores)", "Readings", "Product ÷ this"])
    data: dict[str, Any] = {}
    try:
        for label, per_msg, count in (("single", 1, singles), ("batch of 50", batch, batch_msgs)):
            rows: dict[str, dict[str, Any]] = {}
            expect = count * per_msg
            for who in ("product", "paho", "mosquitto_sub"):
                pfx = _prefix()
                args = ["--count", str(count), "--devices", "50", "--batch", str(per_msg), "--prefix", pfx]

                def produce(args: list[str] = args) -> None:
                    run_loadgen(mport, *args)

                ctx.log(f"ingest: Mosquitto, {label}, {who}: queue {expect:,} readings, then drain")
                if who == "product":
                    r = drain_product(ctx, url, produce, expect, f"ingest-{pfx.rstrip('-')}")
                else:
                    r = drain_peer(ctx, "paho-sub" if who == "paho" else "mosquitto-sub", mport, produce, expect,
                                   per_msg, f"{who}-{pfx.rstrip('-')}")
                rows[who] = r
                ctx.log(f"ingest: {who}: {fmt(r['rate'])} readings/s ({r['readings']:,} of {expect:,})")
            for who, r in rows.items():
                full.add("Mosquitto", label, _name(who), fmt(r["rate"]), fmt(r["cores"], 2),
                         f"{r['readings']:,}",
                         "" if who == "product" else fx(ratio(rows["product"]["rate"], r["rate"])))
            data[f"mosquitto_{per_msg}"] = rows

        # live fixed rates through Mosquitto: throughput kept and CPU it costs
        fixed = Table("Ingest at fixed rates (live publishers, Mosquitto, QoS 1)",
                      ["Offered", "Subscriber", "Readings/s kept", "CPU (cores)", "CPU ÷ paho"])
        fixed_data: list[dict[str, Any]] = []
        plan = [(r, 1) for r in rates] + [(batch_rate, batch)]
        for rate, per_msg in plan:
            offered = f"{rate * per_msg:,} readings/s" + (" (batches of 50)" if per_msg > 1 else "")
            pair: dict[str, dict[str, Any]] = {}
            for who in ("product", "paho"):
                pfx = _prefix()
                lg_args = ["--rate", str(rate), "--duration", str(dur), "--devices", "50", "--batch", str(per_msg),
                           "--prefix", pfx, "--connections", "2"]
                expect = int(rate * dur) * per_msg
                ctx.log(f"ingest: fixed {offered}, {who}")
                if who == "product":
                    db = ctx.workdir / f"fixed-{pfx.rstrip('-')}.db"
                    bridge, _, _ = start_bridge(ctx.workdir, url, name=f"fixed-{pfx.rstrip('-')}", db_path=db,
                                                FC_MQTT_CLIENT_ID=f"bench-fixed-{pfx}")
                    cpu = CpuMeter([bridge.pid]).start()
                    lg = start_loadgen(mport, *lg_args, workdir=ctx.workdir)
                    r = _follow_store(bridge, db, 0, expect, time.time(), cpu, idle=3.0)
                    loadgen_result(lg)
                else:
                    proc = Proc(f"fixed-paho-{pfx}", [PY, "-m", "bench.peers", "paho-sub", "--mqtt-port", str(mport),
                                                      "--topic", "fc/v1/#", "--client-id", f"bench-fixed-{pfx}",
                                                      "--expect", str(expect), "--idle", "3"],
                                log_dir=ctx.workdir, stdout=subprocess.PIPE)
                    r = _peer_result(proc, lambda lg_args=lg_args: start_loadgen(mport, *lg_args, workdir=ctx.workdir))
                pair[who] = r
            for who, r in pair.items():
                fixed.add(offered, _name(who), fmt(r["rate"]), fmt(r["cores"], 2),
                          "" if who == "paho" else fx(ratio(r["cores"], pair["paho"]["cores"])))
            fixed_data.append({"offered": rate * per_msg, "batch": per_msg, **{k: v for k, v in pair.items()}})
        data["fixed"] = fixed_data
        fixed.notes.append("CPU is measured over the whole run of each subscriber (a few idle tenths of a second "
                           "included), so it slightly understates the busy cost; both columns alike.")
    finally:
        mosq.stop()

    # the embedded amqtt broker: live publishers at full speed
    rows = {}
    for who in ("product", "paho", "mosquitto_sub"):
        pfx = _prefix()
        lg_args = ["--count", str(amqtt_msgs), "--devices", "50", "--prefix", pfx, "--connections", "4"]
        ctx.log(f"ingest: embedded amqtt, single, {who}: {amqtt_msgs:,} readings published live")
        if who == "product":
            from bench.procs import free_port

            port = free_port()
            db = ctx.workdir / f"amqtt-{pfx.rstrip('-')}.db"
            bridge, _, _ = start_bridge(ctx.workdir, "embedded", name=f"amqtt-bridge-{pfx.rstrip('-')}",
                                        mqtt_port=port, db_path=db)
            cpu = CpuMeter([bridge.pid]).start()
            lg = start_loadgen(port, *lg_args, workdir=ctx.workdir)
            r = _follow_store(bridge, db, 0, amqtt_msgs, time.time(), cpu, idle=5.0)
            loadgen_result(lg)
        else:
            broker, port = start_amqtt(ctx.workdir, name=f"amqtt-{pfx.rstrip('-')}")
            try:
                proc = Proc(f"amqtt-{who}-{pfx}", [PY, "-m", "bench.peers",
                                                   "paho-sub" if who == "paho" else "mosquitto-sub", "--mqtt-port",
                                                   str(port), "--topic", "fc/v1/#", "--client-id", f"bench-{pfx}sub",
                                                   "--expect", str(amqtt_msgs), "--idle", "5"],
                            log_dir=ctx.workdir, stdout=subprocess.PIPE)
                r = _peer_result(proc, lambda lg_args=lg_args, port=port: start_loadgen(port, *lg_args,
                                                                                       workdir=ctx.workdir))
            finally:
                broker.stop()
        rows[who] = r
        ctx.log(f"ingest: amqtt {who}: {fmt(r['rate'])} readings/s")
    for who, r in rows.items():
        full.add("amqtt (embedded)", "single", _name(who), fmt(r["rate"]), fmt(r["cores"], 2), f"{r['readings']:,}",
                 "" if who == "product" else fx(ratio(rows["product"]["rate"], r["rate"])))
    data["amqtt_1"] = rows
    full.notes += [
        "Mosquitto rows: the subscriber drains a backlog of QoS 1 messages queued for its persistent session "
        "(no publisher running while it is measured). amqtt rows: publishers run live at full speed on the same "
        "cores (amqtt loses queued messages); with amqtt the product runs the broker in its own process, the peers "
        "use `firstcare broker`.",
        "CPU (cores) is the subscriber process alone (the product: broker excluded except with embedded amqtt).",
    ]
    res.tables += [full, fixed]
    res.data = data
    return res


def _name(who: str) -> str:
    return {"product": "**FirstCare bridge** (stored + alarms)", "paho": "bare paho, parse only",
            "mosquitto_sub": "mosquitto_sub (C)"}[who]
