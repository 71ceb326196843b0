"""Two `firstcare bridge` processes on one PostgreSQL, each with its own broker for now, and one
patient's monitor whose readings alternate between them (what a shared subscription does):
the alarms come out as one bridge would raise them, a gap filled through the other bridge
raises nothing, and only one of the two runs the timers."""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bridge.alerts import default_rules
from bridge.core import BridgeCore, CoreSettings
from bridge.store_sqlite import SQLiteStore
from firstcare.payloads import Inbound
from tests.support.bridge import SECRET, BridgeProcess, token, wait_until
from tests.support.brokers import free_port
from tests.support.devices import Device

SECOND = 1000


def start(tmp_path: Path, name: str, store_url: str) -> tuple[BridgeProcess, int]:
    mqtt_port = free_port()
    env = {"FC_MQTT_URL": "embedded", "FC_MQTT_PORT": str(mqtt_port), "FC_HTTP_PORT": str(free_port()),
           "FC_JWT_SECRET": SECRET, "FC_STORE_URL": store_url, "FC_MQTT_CLIENT_ID": f"bridge-{name}",
           "FC_SEQ_GAP_GRACE_SECONDS": "2", "FC_DEVICE_SILENT_SECONDS": "600", "FC_DEVICE_OFFLINE_SECONDS": "900",
           "FC_AUDIT_URL": f"sqlite:///{tmp_path}/{name}-audit.db", "FC_LOG_LEVEL": "WARNING"}
    return BridgeProcess(env, tmp_path / f"{name}.log").start(), mqtt_port


def plan(t0: int) -> list[tuple[int, dict[str, float]]]:
    """(seq, metrics) in the order the device publishes them; seq 15 is held back and published
    after 16 (through the other bridge), seq 21 is never published."""
    hr = [80] * 4 + [130] * 4 + [100] * 3 + [160] * 3 + [80] * 6 + [80] * 4
    order = [s for s in range(1, len(hr) + 1) if s not in (15, 21)]
    order.insert(order.index(16) + 1, 15)
    return [(s, {"heart_rate": float(hr[s - 1]), "spo2": 97.0}) for s in order]


def alarms(client: httpx.Client) -> list[tuple[Any, ...]]:
    items = client.get("/api/alerts", params={"limit": 1000}).json()["items"]
    out = []
    for a in sorted(items, key=lambda a: (a["rule_id"], a["subject"], a["raised_at"])):
        history = client.get(f"/api/alerts/{a['id']}").json()["history"]
        out.append((a["rule_id"], a["subject"], a["state"], a["count"], [h["action"] for h in history]))
    return out


def reference(tmp_path: Path, t0: int) -> list[tuple[Any, ...]]:
    """The same readings through one core on SQLite, in the same order."""
    store = SQLiteStore(str(tmp_path / "reference.db"))
    core = BridgeCore(store, default_rules(), CoreSettings(silent_ms=600 * SECOND, offline_ms=900 * SECOND,
                                                           seq_gap_grace_ms=2 * SECOND))
    try:
        for seq, metrics in plan(t0):
            ts = t0 + seq * 5 * SECOND
            body = json.dumps({"seq": seq, "ts": ts, "patient_id": "p-rr", "metrics": metrics}).encode()
            core.process([Inbound("fc/v1/h1/monitor/mon-rr/vitals", body, ts)])
        last = max(t0 + seq * 5 * SECOND for seq, _ in plan(t0))
        core.clock = lambda: last + 3 * SECOND  # past the gap's grace period, long before any escalation
        core.tick()
        out = []
        for a in sorted(store.alerts(None, None, None, None, 1000, None).items,
                        key=lambda a: (a["rule_id"], a["subject"], a["raised_at"])):
            out.append((a["rule_id"], a["subject"], a["state"], a["count"],
                        [h["action"] for h in store.alert_history(a["id"])]))
        return out
    finally:
        store.close()


def stored_readings_are(client: httpx.Client, count: int) -> bool:
    return len(client.get("/api/patients/p-rr/readings", params={"limit": 1000}).json()["items"]) == count


def test_two_bridges_ingesting_one_patient_alternately_raise_what_one_would(tmp_path: Path, pg_url: str) -> None:
    a, a_port = start(tmp_path, "a", pg_url)
    b, b_port = start(tmp_path, "b", pg_url)
    monitors = [Device(a_port, "mon-rr", device_type="monitor", will=False),
                Device(b_port, "mon-rr", device_type="monitor", will=False)]
    client = httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {token()}"}, timeout=15)
    other = httpx.Client(base_url=b.url, headers={"Authorization": f"Bearer {token()}"}, timeout=15)
    try:
        t0 = int(time.time() * 1000) - 200 * SECOND
        readings = plan(t0)
        for i, (seq, metrics) in enumerate(readings):
            monitors[i % 2].vitals(metrics, seq=seq, patient_id="p-rr", ts_ms=t0 + seq * 5 * SECOND)
            # one at a time, as a device at one reading per few seconds is dealt: in device order
            wait_until(functools.partial(stored_readings_are, client, i + 1), what=f"reading {i + 1} stored")
        expected = reference(tmp_path, t0)
        assert Counter(r for r, *_ in expected) == Counter({  # what one bridge raises: each episode once
            "heart_rate.high": 2, "heart_rate.high.critical": 1, "news2.low_medium": 1, "device.seq_gap": 1}), expected
        # the leader confirms the real gap after the grace period; the filled one never
        wait_until(lambda: [x for x in alarms(client) if x[0] == "device.seq_gap"], timeout=30,
                   what="the unfilled gap raised")
        assert alarms(client) == expected
        assert alarms(other) == expected  # the same database seen from the other bridge
        leaders = [httpx.get(p.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"},
                             timeout=10).json()["cluster"]["leader"] for p in (a, b)]
        assert sorted(leaders) == [False, True], leaders
        stats = [httpx.get(p.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"},
                           timeout=10).json()["ingest"] for p in (a, b)]
        assert sum(s.get("readings_stored", 0) for s in stats) == len(readings)
        assert all(s.get("readings_stored", 0) > 0 for s in stats), "both bridges ingested"
    finally:
        client.close()
        other.close()
        for m in monitors:
            m.close()
        a.stop()
        b.stop()
