"""Ingest slots with real processes: one Mosquitto (broker-config, started here), one fresh
PostgreSQL database, one Redis hub, three `firstcare bridge` processes sharing one client id
and its slots (docs/ingest-slots.md).

* SIGKILL one bridge while monitors stream: every reading is stored exactly once, the alarms
  are those one bridge would raise (each once, none falsely, no `ingest.session_lost`), the
  dead bridge's slots are taken over and the backlog the broker kept for them is drained by the
  survivors without it coming back, and a WebSocket client of a survivor replays what it missed.
  The reclaim time is measured and printed, never asserted.
* Bridges joining mid-stream take slots over from the one that held them all (drained hand-over)
  and no alarm is raised twice.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
import websockets

from bridge.alerts import default_rules
from bridge.core import BridgeCore, CoreSettings
from bridge.store_sqlite import SQLiteStore
from firstcare.payloads import Inbound, format_ts
from firstcare.topics import vitals_topic
from tests.support.bridge import SECRET, BridgeProcess, token, wait_until
from tests.support.brokers import MosquittoInstance, free_port, require_mosquitto, start_mosquitto
from tests.support.postgres import create_database, drop_database

SLOTS = 6
CLIENT_ID = "fc-cluster"
STEP_S = 0.2  # each monitor publishes one reading every STEP_S
MONITORS = 4
NORMAL = {"heart_rate": 80.0, "spo2": 97.0, "respiratory_rate": 16.0}
CRITICAL = {"heart_rate": 160.0, "spo2": 97.0, "respiratory_rate": 16.0}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoInstance]:
    require_mosquitto()
    instance = start_mosquitto(tmp_path / "mosquitto", dev=True)
    yield instance
    instance.stop()


@pytest.fixture
def database() -> Iterator[str]:
    from tests.conftest import require_postgres

    require_postgres()  # CI fails without PostgreSQL
    url = create_database("fc_slots")
    yield url
    drop_database(url)


def bridge_env(tmp_path: Path, name: str, broker: MosquittoInstance, store_url: str, hub_url: str) -> dict[str, str]:
    return {"FC_MQTT_URL": broker.url(), "FC_MQTT_ALLOW_ANONYMOUS": "true", "FC_MQTT_CLIENT_ID": CLIENT_ID,
            "FC_INGEST_SLOTS": str(SLOTS), "FC_HTTP_PORT": str(free_port()), "FC_JWT_SECRET": SECRET,
            "FC_STORE_URL": store_url, "FC_HUB_URL": hub_url, "FC_DEVICE_SILENT_SECONDS": "600",
            "FC_DEVICE_OFFLINE_SECONDS": "900", "FC_AUDIT_URL": f"sqlite:///{tmp_path}/{name}-audit.db",
            "FC_LOG_LEVEL": "INFO"}


def start_bridge(tmp_path: Path, name: str, broker: MosquittoInstance, store_url: str, hub_url: str) -> BridgeProcess:
    return BridgeProcess(bridge_env(tmp_path, name, broker, store_url, hub_url), tmp_path / f"{name}.log").start()


def slots_of(bridge: BridgeProcess) -> dict[str, Any]:
    """The slots part of /readyz (empty when the bridge does not answer)."""
    try:
        body = httpx.get(bridge.url + "/readyz", timeout=3).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {**body.get("slots", {}), "ready": body.get("ready", False)}


def settled(bridges: list[BridgeProcess]) -> bool:
    """Every slot held by exactly one of ``bridges``, each within its fair share, all ready."""
    views = [slots_of(b) for b in bridges]
    held = sorted(n for v in views for n in v.get("held", []))
    share = -(-SLOTS // len(bridges))
    return (held == list(range(SLOTS)) and all(v.get("ready") for v in views)
            and all(len(v["held"]) <= share for v in views))


class Monitors:
    """``MONITORS`` monitors, one patient each, publishing QoS 1 readings with their real time
    as ``ts``; what was published (topic, payload, ts) is kept for the reference run."""

    def __init__(self, port: int) -> None:
        self.clients = []
        self.published: list[tuple[str, bytes, int]] = []
        self.publish_times: dict[tuple[int, int], float] = {}  # (monitor, seq) -> monotonic time
        for i in range(MONITORS):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"slot-mon-{i}", protocol=mqtt.MQTTv311)
            client.max_inflight_messages_set(100)
            client.connect("127.0.0.1", port, keepalive=10)
            client.loop_start()
            self.clients.append(client)
        self.infos: list[mqtt.MQTTMessageInfo] = []

    @staticmethod
    def topic(i: int) -> str:
        return vitals_topic("h1", "monitor", f"mon-{i}")

    def step(self, seq: int, metrics: dict[str, float]) -> None:
        for i, client in enumerate(self.clients):
            ts = int(time.time() * 1000)
            payload = json.dumps({"seq": seq, "ts": format_ts(ts), "patient_id": f"p-{i}", "metrics": metrics}).encode()
            self.infos.append(client.publish(self.topic(i), payload, qos=1))
            self.published.append((self.topic(i), payload, ts))
            self.publish_times[(i, seq)] = time.monotonic()

    def stream(self, phases: list[tuple[int, dict[str, float]]], at: dict[int, Any]) -> int:
        """Publish the phases (count, metrics) one step every STEP_S; ``at[step]()`` runs
        before that step's readings. Returns the last seq."""
        seq = 0
        start = time.monotonic()
        for count, metrics in phases:
            for _ in range(count):
                if seq in at:
                    at[seq]()
                seq += 1
                self.step(seq, metrics)
                time.sleep(max(0.0, start + seq * STEP_S - time.monotonic()))
        for info in self.infos:
            info.wait_for_publish(30)
            assert info.is_published(), "the broker did not acknowledge a reading"
        return seq

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


def reference(tmp_path: Path, published: list[tuple[str, bytes, int]]) -> Counter[tuple[str, str, str]]:
    """The alarms one core on SQLite raises for the same readings in publish order."""
    store = SQLiteStore(str(tmp_path / "reference.db"))
    core = BridgeCore(store, default_rules(), CoreSettings(silent_ms=600_000, offline_ms=900_000))
    try:
        for topic, payload, ts in published:
            core.process([Inbound(topic, payload, ts)])
        return Counter((a["rule_id"], a["subject"], a["state"])
                       for a in store.alerts(None, None, None, None, 1000, None).items)
    finally:
        store.close()


def cluster_alarms(url: str) -> tuple[Counter[tuple[str, str, str]], dict[str, int]]:
    """The cluster's alarms, and for each alarm how many times its history says it was raised."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token()}"}, timeout=15) as client:
        items = client.get("/api/alerts", params={"limit": 1000}).json()["items"]
        raised = {a["id"]: sum(h["action"] == "raised" for h in client.get(f"/api/alerts/{a['id']}").json()["history"])
                  for a in items}
    return Counter((a["rule_id"], a["subject"], a["state"]) for a in items), raised


def stored(store_url: str) -> Counter[tuple[str, int]]:
    with psycopg.connect(store_url) as conn:
        return Counter((d, s) for d, s in conn.execute("SELECT device_id, seq FROM readings"))


def check_alarms(tmp_path: Path, monitors: Monitors, url: str) -> None:
    expected = reference(tmp_path, monitors.published)
    assert any(r == "heart_rate.high.critical" for r, _, _ in expected), expected  # the plan does raise
    got, raised = cluster_alarms(url)
    assert got == expected
    assert all(n == 1 for n in raised.values()), raised
    assert not [k for k in got if k[0] == "ingest.session_lost"]


def test_a_killed_bridge_s_slots_are_taken_over_and_its_backlog_drained(
        tmp_path: Path, broker: MosquittoInstance, database: str, redis_url: str) -> None:
    hub_url = f"{redis_url}?prefix=slots-{secrets.token_hex(4)}:"
    a = start_bridge(tmp_path, "a", broker, database, hub_url)
    b = start_bridge(tmp_path, "b", broker, database, hub_url)
    c = start_bridge(tmp_path, "c", broker, database, hub_url)
    bridges = [a, b, c]
    wait_until(lambda: settled(bridges), timeout=60, what="six slots spread over three bridges")
    victim = max(bridges, key=lambda p: len(slots_of(p)["held"]))
    victim_slots = slots_of(victim)["held"]
    survivors = [p for p in bridges if p is not victim]
    watcher = survivors[0]
    monitors = Monitors(broker.port)
    room = "patient:p-0:vitals"
    ws_url = watcher.url.replace("http", "ws") + f"/realtime/ws?token={token(sub='ward')}"
    measured: dict[str, float] = {}
    try:
        async def first_events(n: int) -> str:
            """Subscribe, take ``n`` vitals events, return the last id (then disconnect)."""
            async with websockets.connect(ws_url) as ws:
                await ws.send(json.dumps({"type": "subscribe", "room": room}))
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if message["type"] == "vitals_update":
                        cursor.setdefault("seen", []).append(message["data"]["seq"])
                        if len(cursor["seen"]) == n:
                            return str(message["id"])

        cursor: dict[str, Any] = {}
        listener = threading.Thread(target=lambda: cursor.update(last=asyncio.run(first_events(5))), daemon=True)
        listener.start()

        def kill() -> None:
            measured["killed"] = time.monotonic()
            victim.kill()

            def reclaim() -> None:
                wait_until(lambda: settled(survivors), timeout=60, interval=0.1, what="slots reclaimed")
                measured["reclaimed"] = time.monotonic()

            threading.Thread(target=reclaim, daemon=True).start()

        # normal, critical (raises), long normal (the kill 3 s into it), critical again, normal
        phases = [(15, NORMAL), (20, CRITICAL), (100, NORMAL), (20, CRITICAL), (25, NORMAL)]
        last = monitors.stream(phases, at={15 + 20 + 15: kill})
        listener.join(30)
        assert "last" in cursor, "the WebSocket client saw the stream before the kill"
        wait_until(lambda: "reclaimed" in measured, timeout=60, what="slots reclaimed")
        reclaim_s = measured["reclaimed"] - measured["killed"]
        print(f"\ningest slots {victim_slots} of the killed bridge reclaimed in {reclaim_s:.2f} s")
        (tmp_path / "reclaim.txt").write_text(f"{reclaim_s:.3f}\n")

        # every reading stored once, the backlog included, without the killed bridge coming back
        expected = Counter((f"mon-{i}", s) for i in range(MONITORS) for s in range(1, last + 1))
        wait_until(lambda: stored(database) == expected, timeout=60, what="every reading stored once")
        assert victim.process is None
        check_alarms(tmp_path, monitors, watcher.url)
        stats = [httpx.get(p.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"},
                           timeout=10).json() for p in survivors]
        assert sum(s["cluster"]["slots"]["slots_claimed"] for s in stats) >= SLOTS
        assert all(s["ingest"]["sessions_lost"] == 0 for s in stats)

        # the WebSocket client of a survivor catches up from where it left
        async def replay() -> list[dict[str, Any]]:
            async with websockets.connect(ws_url) as ws:
                await ws.send(json.dumps({"type": "subscribe", "room": room, "since": cursor["last"]}))
                got: list[dict[str, Any]] = []
                quiet_until = time.monotonic() + 30  # the stream is over: the replay ends in silence
                while not got or got[-1]["type"] != "resync":
                    try:
                        message = json.loads(await asyncio.wait_for(ws.recv(), quiet_until - time.monotonic()))
                    except (TimeoutError, ValueError):
                        break
                    if message["type"] in ("vitals_update", "resync"):
                        got.append(message)
                        quiet_until = time.monotonic() + 5
                return got

        got = asyncio.run(replay())
        if got[-1]["type"] == "resync":  # the hub could not replay it all: the client is told to reload
            print("replay answered with resync")
        else:
            # two bridges publish one room's events: the room's order is the hub's, not the seq's
            seqs = cursor["seen"] + [m["data"]["seq"] for m in got]
            assert len(seqs) == len(set(seqs)), "no event twice"
            missing = set(range(min(seqs), last + 1)) - set(seqs)
            # only what the killed bridge had committed but not yet handed to the hub when it died
            # may lack its live event (the readings are stored, see above): readings published in
            # the few seconds before the kill (ingest and fan-out lag on a loaded machine)
            late = {s for s in missing if not (measured["killed"] - 5 <= monitors.publish_times[(0, s)]
                                               <= measured["killed"])}
            assert not late, sorted(missing)
            print(f"replayed {len(got)} events; {len(missing)} published by the killed bridge were lost with it")
    finally:
        monitors.close()
        for p in bridges:
            p.stop()


def test_bridges_joining_mid_stream_take_slots_over_without_double_alarms(
        tmp_path: Path, broker: MosquittoInstance, database: str, redis_url: str) -> None:
    hub_url = f"{redis_url}?prefix=slots-{secrets.token_hex(4)}:"
    a = start_bridge(tmp_path, "a", broker, database, hub_url)
    wait_until(lambda: settled([a]), timeout=30, what="one bridge holding every slot")
    started: list[BridgeProcess] = [a]
    monitors = Monitors(broker.port)
    threads: list[threading.Thread] = []

    def join(name: str) -> None:
        def run() -> None:
            started.append(start_bridge(tmp_path, name, broker, database, hub_url))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    try:
        # each bridge joins at the start of a long critical episode: the hand-over lands inside it
        phases = [(15, NORMAL), (50, CRITICAL), (50, NORMAL), (50, CRITICAL), (25, NORMAL)]
        last = monitors.stream(phases, at={15: lambda: join("b"), 115: lambda: join("c")})
        for thread in threads:
            thread.join(60)
        assert len(started) == 3
        wait_until(lambda: settled(started), timeout=60, what="slots spread over three bridges")
        expected = Counter((f"mon-{i}", s) for i in range(MONITORS) for s in range(1, last + 1))
        wait_until(lambda: stored(database) == expected, timeout=60, what="every reading stored once")
        check_alarms(tmp_path, monitors, a.url)
        first = httpx.get(a.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"}, timeout=10).json()
        assert first["cluster"]["slots"]["slots_released"] >= SLOTS - 2, "the first bridge handed slots over"
        assert first["cluster"]["slots"]["slots_lost"] == 0
    finally:
        monitors.close()
        for p in started:
            p.stop()
