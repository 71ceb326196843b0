"""Alarm and device state stay right when one device's readings land on different bridges.

Two (or more) independent :class:`BridgeCore` instances, each with its own PostgreSQL
connections, on one database: the way Mosquitto's shared subscription deals one device's
readings round-robin to several bridge processes. The reference is one core on SQLite fed the
same batches in the same order: the alarms (each one's rule, subject and every transition with
its time), devices, gaps and NEWS2 scores must come out the same, raised once and none falsely.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.alerts import default_rules
from bridge.cluster_postgres import PostgresCluster
from bridge.core import BridgeCore, CoreSettings
from bridge.store import Store
from bridge.store_postgres import PostgresStore
from bridge.store_sqlite import SQLiteStore
from firstcare.payloads import Inbound, encode_vitals
from tests.support.bridge import wait_until
from tests.support.postgres import empty_tables

T0 = 1_796_000_000_000  # 2026-12-01
S = 1000
SETTINGS = CoreSettings(silent_ms=60 * S, offline_ms=180 * S, escalation_ms=120 * S, seq_gap_grace_ms=30 * S)
NORMAL = {"heart_rate": 80.0, "spo2": 97.0, "respiratory_rate": 16.0, "temperature": 37.0, "systolic_bp": 120.0}


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def vitals(seq: int, ts: int, device: str = "m1", patient: str | None = "p1", hospital: str = "h1",
           **metrics: float) -> Inbound:
    body = encode_vitals(seq, ts, {**NORMAL, **metrics}, patient)
    return Inbound(f"fc/v1/{hospital}/monitor/{device}/vitals", body, ts + 50)


def status(state: str, ts: int, device: str = "m1", hospital: str = "h1") -> Inbound:
    return Inbound(f"fc/v1/{hospital}/monitor/{device}/status", b'{"state": "%s", "ts": %d}' % (state.encode(), ts),
                   ts + 50)


@pytest.fixture
def pg_stores(pg_url: str) -> Iterator[Callable[[], PostgresStore]]:
    """Opens independent stores (own writer connection and pool) on this module's database."""
    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        opened.append(PostgresStore(pg_url))
        return opened[-1]

    yield make
    for s in opened:
        s.close()
    empty_tables(pg_url)


def cores(make: Callable[[], Store], n: int, clock: Clock, settings: CoreSettings = SETTINGS) -> list[BridgeCore]:
    return [BridgeCore(make(), default_rules(), settings, clock=clock) for _ in range(n)]


def story(store: Store) -> list[tuple[Any, ...]]:
    """Every alarm as (rule, subject, patient, [(action, at, state, value, by)...]), in raise order."""
    alerts = store.alerts(None, None, None, None, 5000, None).items
    out = []
    for a in sorted(alerts, key=lambda a: (a["raised_at"], a["rule_id"], a["subject"])):
        history = [(h["action"], h["at"], h["state"], h["value"], h["by"]) for h in store.alert_history(a["id"])]
        out.append((a["rule_id"], a["subject"], a["patient_id"], a["state"], a["count"], history))
    return out


def devices_of(store: Store) -> list[dict[str, Any]]:
    return store.devices(None, None, 5000, None).items


def news2_of(store: Store, patient: str) -> list[tuple[Any, ...]]:
    return [(s["total"], s["band"], s["complete"]) for s in store.news2_history(patient, None, None, 5000, None).items]


# ------------------------------------------------------------------------------- the scenario


def scenario() -> list[tuple[int, list[Inbound]]]:
    """(clock time, batch) pairs for one monitored patient: a tachycardia episode that raises
    after its delay and clears, a critical one that latches, a gap filled by a reading that
    arrives later (through the other bridge), a gap never filled, then silence."""
    seq = itertools.count(1)
    ts = itertools.count(T0, 5 * S)
    batches: list[list[Inbound]] = [[status("online", T0 - S)]]

    def run(n: int, **metrics: Any) -> list[Inbound]:
        return [vitals(next(seq), next(ts), **metrics) for _ in range(n)]

    batches += [run(1) for _ in range(4)]
    batches += [run(1, heart_rate=130) for _ in range(5)]  # medium, 3 readings over 10 s: raised on the third
    batches += [run(1, heart_rate=118) for _ in range(2)]  # hysteresis band: nothing
    batches += [run(1, heart_rate=100) for _ in range(2)]  # clears
    batches += [run(1, heart_rate=160, spo2=89) for _ in range(3)]  # critical (latching) + high + SpO2 low
    batches += [run(1) for _ in range(3)]  # the critical alarm stays, latched; the others clear
    held = run(1)  # this reading is late: the next one is delivered first, by the other bridge
    batches += [run(2), held]
    batches += [run(1) for _ in range(2)]
    next(seq)  # this one never arrives
    batches += [run(1) for _ in range(3)]
    last_ts = next(ts)
    return [(b[0].received_ms if b else last_ts, b) for b in batches]


def play(nodes: list[BridgeCore], clock: Clock, ticks: Callable[[int], None] | None = None) -> None:
    """Deal the batches round-robin to ``nodes``; tick (every node, as if each led) between."""
    plan = scenario()
    for i, (at, batch) in enumerate(plan):
        clock.now = at + 100
        nodes[i % len(nodes)].process(batch)
        for node in nodes:
            node.tick()
    end = plan[-1][0]
    for step in range(1, 60):  # then the device falls silent; the timers take over
        clock.now = end + step * 5 * S
        if ticks is not None:
            ticks(step)
        else:
            for node in nodes:
                node.tick()


def test_a_patient_dealt_round_robin_to_two_bridges_gets_the_alarms_of_one(
        tmp_path: Path, pg_stores: Callable[[], PostgresStore]) -> None:
    one_clock, two_clock = Clock(), Clock()
    (reference,) = cores(lambda: SQLiteStore(str(tmp_path / "one.db")), 1, one_clock)
    pair = cores(pg_stores, 2, two_clock)
    try:
        play([reference], one_clock)
        play(pair, two_clock)
        expected = story(reference.store)
        rules = Counter(rule for rule, *_ in expected)
        # the reference itself is right: each episode raised once, the filled gap never
        assert rules == Counter({"heart_rate.high": 2, "heart_rate.high.critical": 1, "spo2.low": 1,
                                 "news2.low_medium": 1, "news2.medium": 1, "device.seq_gap": 1,
                                 "device.silent": 1, "device.offline": 1}), expected
        gap = next(s for s in expected if s[0] == "device.seq_gap")
        assert gap[4] == 1, "only the reading that never came is missing"
        assert story(pair[0].store) == story(pair[1].store) == expected
        assert devices_of(pair[1].store) == devices_of(reference.store)
        assert news2_of(pair[0].store, "p1") == news2_of(reference.store, "p1")
        counted = sum(c.counters["seq_gaps"] for c in pair)
        assert counted == reference.counters["seq_gaps"] == 1
        assert sum(c.counters["seq_gaps_filled"] for c in pair) == reference.counters["seq_gaps_filled"] == 1
    finally:
        reference.store.close()


def test_timers_fire_once_even_if_both_bridges_tick(pg_stores: Callable[[], PostgresStore]) -> None:
    """Both cores run every timer, as two bridges that both believe they lead would: each sweep
    locks and re-reads what it acts on, so silence, offline and escalation happen once."""
    clock = Clock()
    a, b = cores(pg_stores, 2, clock)
    a.process([status("online", T0 - S), vitals(1, T0, heart_rate=160), vitals(2, T0 + S, heart_rate=160)])
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def ticker(core: BridgeCore) -> None:
        try:
            for step in range(1, 50):
                barrier.wait(10)
                if core is a:
                    clock.now = T0 + step * 5 * S
                barrier.wait(10)
                core.tick()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=ticker, args=(c,)) for c in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    actions = Counter((rule, h[0]) for rule, _, _, _, _, history in story(a.store) for h in history)
    assert actions[("heart_rate.high.critical", "raised")] == 1
    assert actions[("heart_rate.high.critical", "escalated")] == 1
    assert actions[("device.silent", "raised")] == 1
    assert actions[("device.offline", "raised")] == 1
    for rule, _, _, _, _, history in story(a.store):  # each alarm escalated at most once, counted once
        assert [h[0] for h in history].count("escalated") <= 1, (rule, history)
    escalated = sum(n for (_, action), n in actions.items() if action == "escalated")
    assert sum(c.counters["alerts_escalated"] for c in (a, b)) == escalated


def test_only_the_leader_runs_the_timers_and_a_survivor_takes_over(pg_url: str) -> None:
    first, second = PostgresCluster(pg_url, "node-1"), PostgresCluster(pg_url, "node-2")
    try:
        assert first.is_leader() and not second.is_leader()
        assert first.is_leader() and not second.is_leader()  # held, not taken again
        first.close()  # the leader's process ends (its session with it): the server frees the lock
        wait_until(second.is_leader, what="the survivor leads")
        restarted = PostgresCluster(pg_url, "node-1")
        try:
            assert not restarted.is_leader()
        finally:
            restarted.close()
    finally:
        first.close()
        second.close()


def test_a_gap_filled_by_a_reading_through_the_other_bridge_raises_nothing(
        pg_stores: Callable[[], PostgresStore]) -> None:
    clock = Clock()
    a, b = cores(pg_stores, 2, clock)
    a.process([vitals(1, T0), vitals(2, T0 + S), vitals(4, T0 + 3 * S)])  # 3 went to the other bridge
    b.process([vitals(3, T0 + 2 * S)])
    a.process([vitals(5, T0 + 4 * S), vitals(7, T0 + 6 * S)])  # 6 is lost for good
    for step in range(12):
        clock.now = T0 + step * 10 * S
        (a if step % 2 else b).tick()
    (gap,) = [s for s in story(a.store) if s[0] == "device.seq_gap"]
    assert gap[4] == 1, "seq 6 only: the filled 3 was never an alarm"
    assert sum(c.counters["seq_gaps"] for c in (a, b)) == 1


def test_concurrent_bridges_on_one_patient_never_double_an_alarm(pg_stores: Callable[[], PostgresStore]) -> None:
    """Two threads, each its own core and connections, process one patient's readings dealt
    round-robin at full speed: out-of-order commits happen, yet the state stays consistent
    (one critical alarm per patient, every reading stored once, each device's newest seq)."""
    clock = Clock(T0 + 3600 * S)
    a, b = cores(pg_stores, 2, clock)
    patients = [f"p{i}" for i in range(6)]
    readings = {p: [vitals(n, T0 + n * S, device=f"m-{p}", patient=p, heart_rate=160) for n in range(1, 41)]
                for p in patients}
    errors: list[BaseException] = []

    def worker(core: BridgeCore, parity: int) -> None:
        try:
            for n in range(40):
                if n % 2 != parity:
                    continue
                batch = [readings[p][n] for p in patients]
                for attempt in range(50):
                    try:
                        core.process(batch)
                        break
                    except Exception as exc:  # noqa: BLE001 - only "retry the batch" is allowed
                        from firstcare.errors import StoreUnavailable

                        if not isinstance(exc, StoreUnavailable) or attempt == 49:
                            raise
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c, i)) for i, c in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    store = a.store
    assert store.counts()["readings"] == 40 * len(patients)
    assert sum(c.counters["readings_stored"] for c in (a, b)) == 40 * len(patients)
    raised = Counter((s[0], s[2]) for s in story(store))
    for p in patients:
        assert raised[("heart_rate.high.critical", p)] == 1, raised
        assert raised[("heart_rate.high", p)] == 1, raised
        device = store.device("monitor", f"m-{p}")
        assert device is not None and device.last_seq == 40
    assert not [s for s in story(store) if s[0] == "device.seq_gap"]


def test_a_patient_id_is_claimed_by_one_hospital_even_when_two_bridges_race(
        pg_stores: Callable[[], PostgresStore]) -> None:
    clock = Clock()
    a, b = cores(pg_stores, 2, clock)
    patients = [f"race-{i}" for i in range(30)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(core: BridgeCore, hospital: str) -> None:
        try:
            for i, p in enumerate(patients):
                barrier.wait(10)
                core.process([vitals(1, T0 + i * S, device=f"{hospital}-{p}", patient=p, hospital=hospital)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(c, h)) for c, h in ((a, "h1"), (b, "h2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for p in patients:
        owner = a.store.patient_hospital(p)
        stored = a.store.readings(p, None, None, None, 10, None).items
        assert owner in ("h1", "h2") and [r["hospital_id"] for r in stored] == [owner], (p, owner, stored)
    mismatches = sum(c.dead_letter_reasons["patient_hospital_mismatch"] for c in (a, b))
    assert mismatches == len(patients)


def test_an_acknowledgement_on_one_bridge_is_seen_by_the_other(pg_stores: Callable[[], PostgresStore]) -> None:
    clock = Clock()
    a, b = cores(pg_stores, 2, clock)
    a.process([vitals(1, T0, heart_rate=160), vitals(2, T0 + S, heart_rate=160)])
    (alert,) = [x for x in a.store.alerts(None, None, "p1", "active", 10, None).items]
    b.process([vitals(3, T0 + 2 * S)])  # the condition clears on the other bridge: latched
    body, _ = b.acknowledge(alert["id"], "nurse-1")
    assert body["state"] == "resolved"  # acknowledged, and the cleared latch resolves
    with pytest.raises(Exception, match="already resolved"):
        a.acknowledge(alert["id"], "nurse-2")
    a.process([vitals(4, T0 + 3 * S, heart_rate=160), vitals(5, T0 + 4 * S, heart_rate=160)])
    raised = [s for s in story(a.store) if s[0] == "heart_rate.high.critical"]
    assert len(raised) == 2, "a new episode after the resolution is a new alarm"


def test_overrides_set_on_one_bridge_apply_on_the_other(pg_stores: Callable[[], PostgresStore]) -> None:
    from bridge.alerts import RuleOverride

    clock = Clock()
    a, b = cores(pg_stores, 2, clock)
    a.set_overrides("p1", {"heart_rate.high.critical": RuleOverride(enabled=False)})
    b.process([vitals(1, T0, heart_rate=160), vitals(2, T0 + S, heart_rate=160)])
    assert [s[0] for s in story(b.store)] == []
    assert "heart_rate.high.critical" not in [r.id for r in b.rules_for("p1")]


def test_a_key_registered_through_one_bridge_is_used_by_the_other_after_a_tick(
        pg_stores: Callable[[], PostgresStore]) -> None:
    from firstcare.signing import KeyRecord

    clock = Clock()
    a, b = cores(pg_stores, 2, clock)
    key = KeyRecord("k-cluster", b"\x07" * 32, "device", "h1", "monitor", "m1")
    a.register_key(key)
    a.set_signature_policy("h1", True)
    assert "k-cluster" not in b.keys
    b.tick(lead=False)
    assert b.keys["k-cluster"] == key and b.requires_signatures("h1")
    a.revoke_keys(["k-cluster"])
    b.tick(lead=False)
    assert "k-cluster" not in b.keys
