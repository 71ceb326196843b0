"""`firstcare bench all --quick` runs every scenario at tiny scale, so the benchmark code never rots.

No timing assertions: only that each scenario ran and wrote its section with numbers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_postgres
from tests.support.brokers import require_mosquitto
from tests.support.postgres import admin_url
from tests.support.services import missing

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_RED = REPO_ROOT / "bench" / "node-red" / "node_modules" / "node-red" / "red.js"


@pytest.mark.timeout(480)
def test_bench_all_quick_writes_every_scenario(tmp_path: Path) -> None:
    require_mosquitto()
    require_postgres()  # the scale scenario's bridges run on a fresh database of the machine's server
    if shutil.which("mosquitto_sub") is None:
        message = "mosquitto_sub (Debian's mosquitto-clients) is not installed"
        missing(message)
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "all", "--quick", "--results", str(results)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=460,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "FC_BENCH_POSTGRES_URL": admin_url()})
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = results.read_text()

    assert text.startswith("# FirstCare Realtime benchmark results")
    assert "Command: `firstcare bench all --quick" in text
    assert "Machine: " in text and "paho-mqtt" in text
    for heading in ("### Ingest", "### Scale: PostgreSQL, several bridges, failover", "### Fan-out", "### End to end",
                    "### Peer: Node-RED end to end", "### Against the targets"):
        assert heading in text, heading

    def section(heading: str) -> str:
        start = text.index(heading)
        end = text.find("\n### ", start + len(heading))
        return text[start:end if end >= 0 else len(text)]

    number = re.compile(r"\| [\d,]+(\.\d+)? ")
    assert number.search(section("### Ingest")), section("### Ingest")
    assert "FirstCare bridge" in section("### Ingest") and "bare paho" in section("### Ingest")
    scale = section("### Scale: PostgreSQL, several bridges, failover")
    rows = ("1 bridge, SQLite (no slots)", "1 bridge, PostgreSQL, 6 slots", "2 bridges, PostgreSQL, 6 slots shared")
    for row in rows:
        # readings/s may be "–" at this scale (all stored between two polls); the readings column counts
        assert re.search(rf"\| single \| {re.escape(row)} \| [^|]+ \| [^|]+ bridges?; [^|]+ \| [\d,]+ \|", scale), \
            (row, scale)
    assert re.search(r"\| [\d.]+ \| ([\d,]+) of \1 \|", scale), scale  # reclaimed, and every reading stored
    assert "Failover: a killed bridge's slots reclaimed in <= 10 s" in text
    assert number.search(section("### Fan-out")) and "bare websockets" in section("### Fan-out")
    assert re.search(r"\| [\d.]+ KB", section("### Fan-out"))
    assert "Mosquitto → paho subscriber (the floor)" in section("### End to end")
    assert number.search(section("### End to end"))
    peer = section("### Peer: Node-RED end to end")
    if NODE_RED.exists() and shutil.which("node"):
        assert "Node-RED (mqtt in → websocket out per room)" in peer and number.search(peer)
    else:
        assert "peer skipped: not installed" in peer
    assert "<!-- bench-data " in text  # what bench/plot.py reads
