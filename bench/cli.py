"""firstcare bench: ingest, fan-out and end-to-end numbers, side by side with the limits and peers.

Each scenario starts what it needs on free loopback ports (a private Mosquitto from
broker-config/, the bridge as `firstcare bridge`, the peers), runs for a bounded time, stops
everything it started and appends a section to bench/RESULTS.md: date, machine, versions, the
exact command, a table per scenario with absolute numbers and ratios, and the targets met or not.

  ingest   QoS 1 vitals through Mosquitto (backlog drain) and the embedded amqtt, single readings
           and gateway batches: the bridge (stored + alarms) vs a bare paho parse-only subscriber
           vs mosquitto_sub; fixed rates with the CPU each costs
  fanout   N = 100, 1,000, 10,000 WebSocket (and SSE) clients in one room: deliveries/s,
           latency, RSS per connection; vs a bare `websockets` broadcast() server, FastAPI's
           documentation ConnectionManager, Node-RED
  e2e      devices -> MQTT -> browser-like WebSocket clients, 1,000 readings/s, 1,000 clients
           (ward dashboards + patient apps): publish-to-receive p50/p99/max vs the Mosquitto floor
  scale    one bridge on PostgreSQL vs SQLite, two bridges sharing ingest slots vs one (backlog
           drain through Mosquitto, single readings and gateway batches), and failover: SIGKILL
           one of three bridges, seconds until every slot is held again
  peer     the same end-to-end scenario through Node-RED (npm install --prefix bench/node-red node-red)
  all      every scenario, one section, then docs/perf.png
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.common import Ctx, ScenarioResult
from bench.procs import REPO_ROOT, raise_nofile, stop_all

# How long a run takes here (2 cores): the full runs in RESULTS.md took 576 s and 684 s before the
# scale scenario, which adds about two minutes on a quiet machine (a dozen bridge starts, short
# drains, a failover); a quick run took 45 s before it and 115 s with it on a busy machine. The
# README quotes these same words (tests/unit/test_cli_help.py checks).
FULL_RUN_TIME = "about 12-15 minutes on 2 cores"
QUICK_RUN_TIME = "about two minutes"
EXAMPLES = f"""examples:
  firstcare bench all                     every scenario, {FULL_RUN_TIME}
  firstcare bench all --quick             every scenario at tiny scale, {QUICK_RUN_TIME} (the test suite runs it)
  firstcare bench fanout --sizes 100,1000 --duration 5
  python -m bench.cli e2e --results /tmp/r.md
"""
DEFAULT_RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
DEFAULT_PLOT = REPO_ROOT / "docs" / "perf.png"
SCENARIOS = ("ingest", "scale", "fanout", "e2e", "peer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firstcare bench", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name in (*SCENARIOS, "all"):
        p = sub.add_parser(name, help=f"run the {name} scenario" if name != "all" else "run every scenario")
        p.add_argument("--quick", action="store_true",
                       help=f"tiny scale ({QUICK_RUN_TIME} for all): checks the code, measures nothing")
        p.add_argument("--duration", type=float, default=5.0,
                       help="seconds of each fixed-rate phase (end to end: twice this, at least 10 s)")
        p.add_argument("--sizes", default="100,1000,10000", help="fan-out client counts (comma-separated)")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="Markdown file to append to")
        p.add_argument("--plot", type=Path, default=None,
                       help=f"PNG to draw from the results (default {DEFAULT_PLOT.relative_to(REPO_ROOT)} "
                            "for a full `all` run; quick runs draw nothing unless asked)")
        p.add_argument("--no-node-red", action="store_true", help="leave Node-RED out even when installed")
        p.add_argument("--keep", action="store_true", help="keep the working folder (logs, databases)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    raise_nofile()
    import signal

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through stop_all(): nothing we started is left behind

    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="fc-bench-"))
    ctx = Ctx(workdir=workdir, quick=args.quick, duration=args.duration,
              sizes=[int(s) for s in args.sizes.split(",") if s.strip()], node_red=not args.no_node_red)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    results: dict[str, ScenarioResult] = {}
    failed = []
    ctx.log(f"working folder {workdir}")
    background = _busy_percent()
    ctx.log(f"background CPU load before the run: {background:.0f}% of the machine")
    try:
        for name in names:
            t = time.monotonic()
            ctx.log(f"=== {name} ===")
            try:
                results[name] = run_scenario(ctx, name)
            except Exception as exc:  # noqa: BLE001 - record what failed, keep the other scenarios
                ctx.log(f"{name} failed: {exc!r}")
                res = ScenarioResult(name)
                res.notes.append(f"failed: {type(exc).__name__}: {str(exc)[:400]}")
                results[name] = res
                failed.append(name)
            results[name].seconds = time.monotonic() - t
    finally:
        stop_all()
    command = "firstcare bench " + " ".join(shlex.quote(a) for a in argv)
    facts = report.machine()
    facts["background_busy_percent"] = background
    facts["loadavg_end"] = _loadavg()
    text = report.section(results, command, facts, started, time.monotonic() - t0, args.quick)
    report.append(args.results, text)
    ctx.log(f"results appended to {args.results}")
    plot = args.plot or (DEFAULT_PLOT if args.scenario == "all" and not args.quick else None)
    if plot is not None:
        try:
            from bench.plot import draw

            draw(args.results, plot)
            ctx.log(f"plot written to {plot}")
        except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
            ctx.log(f"no plot: {exc!r} (pip install matplotlib)")
    if args.keep:
        ctx.log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _busy_percent() -> float:
    """How busy the machine is before we start anything (other users' processes)."""
    import psutil

    return psutil.cpu_percent(interval=2.0)


def _loadavg() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_scenario(ctx: Ctx, name: str) -> ScenarioResult:
    if name == "ingest":
        from bench import ingest

        return ingest.run(ctx)
    if name == "scale":
        from bench import scale

        return scale.run(ctx)
    if name == "fanout":
        from bench import fanout

        return fanout.run(ctx)
    from bench import e2e

    if name == "e2e":
        return e2e.run(ctx, ("product", "websockets"), "e2e")
    return e2e.run(ctx, ("node-red",), "peer")


if __name__ == "__main__":
    sys.exit(main())
