"""Ingest cost per reading, in one process, without MQTT: where the bridge's time goes.

Builds the bench load generator's messages (single readings or gateway batches), hands them to
:meth:`bridge.core.BridgeCore.process` in batches of ``--batch-max`` messages (the consumer's
batch, one transaction each) and publishes the events through the in-memory hub, the way
``Bridge.handle_batch`` and the fan-out do. Prints readings/s and, with ``--profile``, the top
of a cProfile sorted by own time.

    python -m bench.ingest_profile --store sqlite --per-message 1 --messages 20000 --profile
    python -m bench.ingest_profile --store postgresql://127.0.0.1/test --per-message 50 --messages 2000

A PostgreSQL URL gets a fresh database of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
import uuid
from pathlib import Path

from bench.loadgen import Devices
from bridge.alerts import default_rules
from bridge.core import BridgeCore, CoreSettings
from bridge.hub import open_hub
from bridge.store import open_store
from firstcare.payloads import Inbound, now_ms


def _messages(count: int, per_message: int, devices: int) -> list[Inbound]:
    gen = Devices(devices, devices, devices, f"prof{uuid.uuid4().hex[:6]}-", per_message)
    out = []
    for _ in range(count):
        topic, payload = gen.message()
        out.append(Inbound(topic, payload.encode(), now_ms()))
    return out


def _fresh_postgres(url: str) -> tuple[str, str]:
    import psycopg

    name = f"fc_prof_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}", name


def _drop_postgres(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _run(store_url: str, messages: list[Inbound], batch_max: int, profile: bool, top: int) -> tuple[float, float]:
    store = open_store(store_url)
    core = BridgeCore(store, default_rules(), CoreSettings(silent_ms=86_400_000, offline_ms=172_800_000))
    hub = open_hub("memory://")
    await hub.start()
    batches = [messages[i:i + batch_max] for i in range(0, len(messages), batch_max)]
    prof = cProfile.Profile() if profile else None
    start = time.perf_counter()
    cpu = time.process_time()
    if prof is not None:
        prof.enable()
    for batch in batches:
        for event in core.process(batch):
            await hub.publish(event)
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await hub.stop()
    store.close()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    return seconds, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="sqlite", help="'sqlite' (a temporary file) or a postgresql:// URL")
    p.add_argument("--per-message", type=int, default=1, help="readings per message (gateway batch when > 1)")
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--batch-max", type=int, default=500, help="messages per transaction (FC_BATCH_MAX)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    messages = _messages(args.messages, args.per_message, args.devices)
    readings = args.messages * args.per_message
    dropped = None
    if args.store == "sqlite":
        tmp = tempfile.mkdtemp(prefix="fc-prof-")
        url = f"sqlite:///{Path(tmp) / 'prof.db'}"
    else:
        url, dropped = _fresh_postgres(args.store)
    try:
        seconds, cpu = asyncio.run(_run(url, messages, args.batch_max, args.profile, args.top))
    finally:
        if dropped is not None:
            _drop_postgres(args.store, dropped)
    print(f"{args.store.split(':')[0]} per-message {args.per_message}: {readings:,} readings in {seconds:.2f}s = "
          f"{readings / seconds:,.0f} readings/s; CPU {cpu / readings * 1e6:.1f} us/reading "
          f"({readings / cpu:,.0f} readings per CPU second; the store server's own CPU not included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
