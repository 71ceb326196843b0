"""Draw docs/perf.png from the newest run in bench/RESULTS.md (needs matplotlib).

    python -m bench.plot [RESULTS.md] [OUT.png]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.report import newest_data

PRODUCT = "#1f6feb"
COLORS = {"product-ws": PRODUCT, "product-sse": "#79a8f0", "websockets": "#6e7781", "fastapi": "#d4a72c",
          "node-red": "#8f2d2d"}
NAMES = {"product-ws": "FirstCare WebSocket", "product-sse": "FirstCare SSE", "websockets": "bare websockets",
         "fastapi": "FastAPI docs loop", "node-red": "Node-RED"}


def draw(results: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = newest_data(results)
    if data is None:
        raise ValueError(f"{results} holds no run")
    res: dict[str, Any] = data["results"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    m = data["machine"]
    fig.suptitle(f"FirstCare Realtime, {data['started'][:10]}: {m['cores']} cores, Python {m['python']}, "
                 "everything on one machine (loopback)", fontsize=12)

    ax = axes[0][0]
    ing = res.get("ingest", {}).get("data", {})
    groups = [("mosquitto_1", "Mosquitto\nsingle"), ("mosquitto_50", "Mosquitto\nbatches of 50"),
              ("amqtt_1", "amqtt (embedded)\nsingle")]
    subs = [("product", "FirstCare (stored + alarms)", PRODUCT), ("paho", "bare paho, parse only", "#6e7781"),
            ("mosquitto_sub", "mosquitto_sub (C)", "#bbbbbb")]
    width = 0.27
    for k, (who, label, color) in enumerate(subs):
        values = [(ing.get(g) or {}).get(who, {}).get("rate") or 0 for g, _ in groups]
        bars = ax.bar([i + (k - 1) * width for i in range(len(groups))], values, width, label=label, color=color)
        for b, v in zip(bars, values, strict=True):
            if v:
                ax.annotate(f"{v / 1000:.0f}k" if v >= 1000 else f"{v:.0f}", (b.get_x() + b.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [g[1] for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("readings/s (log)")
    ax.set_title("Ingest at full speed, QoS 1")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    fan = res.get("fanout", {}).get("data", {})
    cells = [c for c in fan.get("cells", []) if c.get("full")]
    for server in COLORS:
        pts = sorted((c["n"], c["full"]["rate"]) for c in cells if c["server"] == server and c["full"]["rate"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[server], label=NAMES[server],
                    linewidth=2.5 if server == "product-ws" else 1.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients in the room (N)")
    ax.set_ylabel("deliveries/s (log)")
    ax.set_title("Fan-out at full speed")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    paths = [p for p in res.get("e2e", {}).get("data", {}).get("paths", []) if "error" not in p]
    paths += [p for p in res.get("peer", {}).get("data", {}).get("paths", []) if "error" not in p]
    labels, p50, p99 = [], [], []
    if paths:
        floor = paths[0]["floor"]
        labels.append("Mosquitto floor")
        p50.append(floor["p50"] or 0)
        p99.append(floor["p99"] or 0)
    for p in paths:
        name = {"product": "FirstCare", "websockets": "bare websockets", "node-red": "Node-RED"}[p["target"]]
        for audience, short in (("dashboards", "dashboards"), ("patients", "patients")):
            labels.append(f"{name}\n{short}")
            p50.append(p[audience]["p50"] or 0)
            p99.append(p[audience]["p99"] or 0)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50", color="#79a8f0")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99", color=PRODUCT)
    ax.axhline(50, color="#8f2d2d", linestyle="--", linewidth=1, label="target p99 50 ms")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms, publish → receive (log)")
    plan = res.get("e2e", {}).get("data", {}).get("plan", {})
    ax.set_title(f"End to end: {plan.get('rate', '?')} readings/s, {plan.get('clients', '?')} clients")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    sizes = fan.get("sizes", [])
    largest = max(sizes) if sizes else None
    mem = [(c["server"], c["rss_per_conn_kb"]) for c in fan.get("cells", [])
           if c.get("n") == largest and "rss_per_conn_kb" in c]
    ax.bar([NAMES[s] for s, _ in mem], [v for _, v in mem], color=[COLORS[s] for s, _ in mem])
    for i, (_, v) in enumerate(mem):
        ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.axhline(16, color=PRODUCT, linestyle="--", linewidth=1, label="target WebSocket 16 KB")
    ax.axhline(24, color="#79a8f0", linestyle=":", linewidth=1, label="target SSE 24 KB")
    ax.set_ylabel("KB of server RSS per idle connection")
    ax.set_title(f"Memory per connection at N = {largest:,}" if largest else "Memory per connection")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    results = Path(argv[0]) if argv else root / "bench" / "RESULTS.md"
    out = Path(argv[1]) if len(argv) > 1 else root / "docs" / "perf.png"
    print(draw(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
