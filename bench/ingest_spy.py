"""Profile a real ``firstcare bridge`` draining a Mosquitto backlog (the ingest bench's product
row) with py-spy (``pip install py-spy``): every thread, folded stacks in ``--out``.

    python -m bench.ingest_spy --per-message 1 --count 20000 --out /tmp/bridge.txt
    python -m bench.ingest_spy --per-message 50 --count 400 --store postgresql://127.0.0.1/test
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.ingest_profile import _drop_postgres, _fresh_postgres
from bench.measure import run_loadgen
from bench.procs import PY, start_bridge, start_mosquitto, stop_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_spy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-message", type=int, default=1)
    p.add_argument("--count", type=int, default=20000, help="messages in the backlog")
    p.add_argument("--store", default="sqlite")
    p.add_argument("--out", type=Path, default=Path("/tmp/bridge-spy.txt"))
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--seconds", type=int, default=15, help="how long py-spy samples")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fc-spy-"))
    dropped = None
    try:
        mosq, port = start_mosquitto(work)
        url = f"mqtt://bridge@127.0.0.1:{port}"
        db = work / "spy.db"
        extra: dict[str, Any] = {"FC_MQTT_CLIENT_ID": "spy-bridge"}
        if args.store != "sqlite":
            store_url, dropped = _fresh_postgres(args.store)
            extra["FC_STORE_URL"] = store_url
        bridge, _, _ = start_bridge(work, url, name="register", db_path=db, **extra)
        time.sleep(0.5)
        bridge.stop()
        pfx = f"spy{uuid.uuid4().hex[:4]}-"
        run_loadgen(port, "--count", str(args.count), "--devices", "50", "--batch", str(args.per_message),
                    "--prefix", pfx)
        bridge, _, _ = start_bridge(work, url, name="bridge", db_path=db, **extra)
        spy = shutil.which("py-spy", path=str(Path(PY).parent)) or "py-spy"
        rec = subprocess.Popen([spy, "record", "--threads", "--nolineno", "-r", str(args.rate), "-f", "raw",
                                "-o", str(args.out), "--duration", str(args.seconds), "--pid", str(bridge.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        expect = args.count * args.per_message
        start = time.time()
        samples = []
        while time.time() - start < 600:
            samples.append((time.time(), _stored(db, extra.get("FC_STORE_URL"))))
            if samples[-1][1] >= expect:
                break
            bridge.check()
            time.sleep(0.2)
        rec.wait(args.seconds + 30)
        bridge.stop()
        first = next((s for s in samples if s[1] > 0), samples[0])
        last = samples[-1]
        rate = (last[1] - first[1]) / max(1e-9, last[0] - first[0])
        print(f"{last[1]:,} of {expect:,} readings; {rate:,.0f} readings/s while profiled; profile in {args.out}")
        mosq.stop()
    finally:
        stop_all()
        if dropped is not None:
            time.sleep(1)
            _drop_postgres(args.store, dropped)
    return 0


def _stored(db: Path, url: str | None) -> int:
    if url is None:
        from bench.procs import stored_count

        return stored_count(db)
    import psycopg

    with psycopg.connect(url) as con:
        row = con.execute("SELECT count(*) FROM readings").fetchone()
        return int(row[0]) if row is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
