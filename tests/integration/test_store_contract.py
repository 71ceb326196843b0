"""The store contract: one test body, run on SQLite (a file in tmp_path) and on the machine's
real PostgreSQL (a fresh database for this module, emptied between tests). What a backend
must do for the bridge, whatever it is built on (bridge/store.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bridge.alerts import Alert, AlertAction, AlertState, Pending, RuleOverride, Transition
from bridge.cluster import device_key, patient_key
from bridge.records import DeadLetter, DeviceRecord, DeviceState, News2Record, PatientInputs, SeqGap
from bridge.sequence import Content
from bridge.store import Store
from bridge.store_sqlite import SQLiteStore
from firstcare.errors import StoreError
from firstcare.payloads import Reading, format_ts

T0 = 1_795_688_130_120  # 2026-11-26T10:15:30.120Z
S = 1000


def reading(seq: int, ts_ms: int = T0, patient_id: str | None = "p1", hospital_id: str = "h1",
            device: tuple[str, str] = ("monitor", "m1"), received_ms: int | None = None, **metrics: float) -> Reading:
    return Reading(hospital_id, device[0], device[1], seq, ts_ms, ts_ms if received_ms is None else received_ms,
                   patient_id, metrics or {"heart_rate": 70.0})


def alert(id: str, patient_id: str | None = "p1", hospital_id: str = "h1", state: str = "raised",
          raised_ms: int = T0, **changes) -> Alert:
    base = Alert(
        id=id, rule_id="spo2.low", kind="clinical", priority="medium", state=AlertState(state),
        subject=f"patient:{patient_id}", patient_id=patient_id, hospital_id=hospital_id,
        device_type="oximeter", device_id="ox1", metric="spo2", value=88.0, threshold=92.0,
        message="SpO2 low", latching=False, condition_active=True, raised_ms=raised_ms, updated_ms=raised_ms,
    )
    return replace(base, **changes)


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens a store on this test's database (again, to test what survives a reopening)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "nested" / "firstcare.db"

        def make() -> Store:
            opened.append(SQLiteStore(str(path)))
            return opened[-1]
    else:
        from bridge.store_postgres import PostgresStore
        from tests.support.postgres import empty_tables

        url = request.getfixturevalue("pg_url")

        def make() -> Store:
            opened.append(PostgresStore(url))
            return opened[-1]
    yield make
    for s in opened:
        s.close()
    if request.param == "postgres":
        empty_tables(url)


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    return open_store()


# ------------------------------------------------------------------------------- schema


def test_migrations_create_the_schema(store: Store) -> None:
    assert store.counts() == {"readings": 0, "dead_letters": 0, "devices": 0, "alerts": 0, "seq_gaps": 0}
    store.ping()


def test_reopening_keeps_data_and_does_not_migrate_again(open_store: Callable[[], Store]) -> None:
    first = open_store()
    with first.transaction() as tx:
        assert tx.insert_readings([reading(1)]) == [True]
        tx.upsert_devices([DeviceRecord("monitor", "m1", "h1", "p1", DeviceState.ONLINE, last_seen_ms=T0, last_seq=1)])
        tx.save_transitions([Transition(AlertAction.RAISED, alert("a1"), T0)])
        tx.set_overrides("p1", {"spo2.low": RuleOverride(threshold=90.0, clear=93.0)})
    first.close()

    second = open_store()
    assert second.counts()["readings"] == 1
    # what the next transaction on these keys loads, in this process or another
    with second.transaction() as tx:
        (device,) = tx.devices_of([("monitor", "m1")]).values()
        assert device.last_seq == 1
        assert tx.alert_state_of(["patient:p1"]) == ([alert("a1")], {})
        assert tx.overrides_of(["p1"]) == {"p1": {"spo2.low": RuleOverride(threshold=90.0, clear=93.0)}}
        assert tx.insert_readings([reading(1)]) == [False]  # dedup survives the reopening
    assert second.overrides("p1") == {"spo2.low": RuleOverride(threshold=90.0, clear=93.0)}


# ------------------------------------------------------------------------------- readings


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([("monitor", "m1", 1), ("monitor", "m1", 1)], [True, False]),
        ([("monitor", "m1", 1), ("monitor", "m1", 2)], [True, True]),
        ([("monitor", "m1", 1), ("monitor", "m2", 1)], [True, True]),
        ([("monitor", "m1", 1), ("oximeter", "m1", 1)], [True, True]),
        ([("monitor", "m1", 5), ("monitor", "m1", 4), ("monitor", "m1", 5), ("monitor", "m1", 4)],
         [True, True, False, False]),
    ],
)
def test_insert_readings_dedups_on_device_and_seq(store: Store, keys, expected) -> None:
    batch = [reading(seq, T0 + i * S, device=(dt, di)) for i, (dt, di, seq) in enumerate(keys)]
    with store.transaction() as tx:
        assert tx.insert_readings(batch) == expected
    assert store.counts()["readings"] == sum(expected)


def test_dedup_across_transactions(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.insert_readings([reading(1)]) == [True]
    with store.transaction() as tx:
        assert tx.insert_readings([reading(1, T0 + 5 * S, heart_rate=99.0), reading(2)]) == [False, True]
    items = store.readings("p1", None, None, None, 10, None).items
    assert [(i["seq"], i["metrics"]) for i in items] == [(1, {"heart_rate": 70.0}), (2, {"heart_rate": 70.0})]


def test_latest_vitals_keeps_the_newest_ts(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_readings([reading(2, T0 + 10 * S, heart_rate=80.0)])
        tx.insert_readings([reading(1, T0, heart_rate=70.0, spo2=95.0)])  # late arrival, older ts
        tx.insert_readings([reading(3, T0 + 20 * S, device=("oximeter", "ox1"), spo2=97.0)])
        tx.insert_readings([reading(9, T0 + 30 * S, patient_id=None, heart_rate=120.0)])  # no patient
    latest = store.latest_vitals("p1")
    assert latest == {
        "heart_rate": {"value": 80.0, "ts": format_ts(T0 + 10 * S), "device_type": "monitor", "device_id": "m1",
                       "seq": 2},
        "spo2": {"value": 97.0, "ts": format_ts(T0 + 20 * S), "device_type": "oximeter", "device_id": "ox1",
                 "seq": 3},
    }
    assert store.latest_vitals("nobody") == {}


def test_scores_written_in_one_transaction_get_their_own_ids_and_are_read_back(store: Store) -> None:
    """Stores may buffer score and state writes until the commit (PostgreSQL does): the id a
    score gets inside the transaction is the one it is stored under, and the next transaction
    loads the saved state."""
    from firstcare import news2

    inputs = {"heart_rate": news2.Input(135.0, T0, "monitor/m1"), "spo2": news2.Input(97.0, T0, "monitor/m1")}
    ids = []
    with store.transaction() as tx:
        for k in range(40):  # past one reserved block of ids
            s = news2.score(inputs, T0 + k * S)
            ids.append(tx.insert_news2("p1", "h1", s, f"sig{k}", f'{{"total":{s.total},"k":{k}}}'))
        tx.save_news2_state("p1", "sig39", T0 + 99 * S)
        tx.save_news2_state("p2", "other", None)
    assert len(set(ids)) == 40 and ids == sorted(ids)
    for k in (0, 17, 39):
        assert store.news2_score(ids[k]) == {"id": ids[k], "patient_id": "p1", "hospital_id": "h1", "total": 3, "k": k}
    with store.transaction() as tx:
        found = tx.news2_of(["p1", "p2"])
        assert (found["p1"].signature, found["p1"].expiry_ms) == ("sig39", T0 + 99 * S)
        assert (found["p2"].signature, found["p2"].expiry_ms) == ("other", None)
        assert tx.due_news2(T0 + 100 * S, 10) == ["p1"]


@pytest.fixture
def history(store: Store) -> Store:
    """25 readings of p1 one second apart (spo2 on even seq), inserted out of order, plus noise."""
    rows = []
    for i in range(25):
        metrics: dict[str, Any] = {"heart_rate": 60.0 + i}
        if i % 2 == 0:
            metrics["spo2"] = 90.0 + i % 10
        rows.append(reading(i, T0 + i * S, **metrics))
    rows.reverse()
    rows += [reading(100, T0 + 3 * S, patient_id="p2", device=("monitor", "m2")),
             reading(101, T0 + 4 * S, patient_id=None, device=("monitor", "m3"))]
    with store.transaction() as tx:
        assert all(tx.insert_readings(rows))
    return store


def test_readings_pages_with_cursor(history: Store) -> None:
    pages, cursor = [], None
    while True:
        page = history.readings("p1", None, None, None, 10, cursor)
        pages.append(page.items)
        cursor = page.next
        if cursor is None:
            break
        assert len(pages) < 10, "paging does not terminate"
    assert [len(p) for p in pages] == [10, 10, 5]
    seqs = [item["seq"] for p in pages for item in p]
    assert seqs == list(range(25))  # ts order, no duplicates, nothing missed
    ts = [item["ts"] for p in pages for item in p]
    assert ts == sorted(ts) and len(set(ts)) == 25
    assert all(item["patient_id"] == "p1" and item["hospital_id"] == "h1" for p in pages for item in p)


def test_readings_paging_with_equal_timestamps(store: Store) -> None:
    # twelve devices reporting in the same millisecond: the cursor must break the tie
    with store.transaction() as tx:
        tx.insert_readings([reading(1, T0, device=("monitor", f"m{i}")) for i in range(12)])
    seen, sizes, cursor = [], [], None
    for _ in range(10):
        page = store.readings("p1", None, None, None, 5, cursor)
        sizes.append(len(page.items))
        seen += [i["device_id"] for i in page.items]
        cursor = page.next
        if cursor is None:
            break
    assert sizes == [5, 5, 2]
    assert sorted(seen) == sorted(f"m{i}" for i in range(12))


@pytest.mark.parametrize(
    ("metric", "since", "until", "expected_seqs"),
    [
        (None, None, None, list(range(25))),
        ("spo2", None, None, list(range(0, 25, 2))),
        ("heart_rate", None, None, list(range(25))),
        ("glucose", None, None, []),
        (None, T0 + 20 * S, None, [20, 21, 22, 23, 24]),  # since is inclusive
        (None, None, T0 + 3 * S, [0, 1, 2]),  # until is exclusive
        (None, T0 + 5 * S, T0 + 9 * S, [5, 6, 7, 8]),
        ("spo2", T0 + 5 * S, T0 + 9 * S, [6, 8]),
        (None, T0 + 30 * S, None, []),
        (None, T0 + 9 * S, T0 + 5 * S, []),
    ],
)
def test_readings_filters(history: Store, metric, since, until, expected_seqs) -> None:
    page = history.readings("p1", metric, since, until, 100, None)
    assert [item["seq"] for item in page.items] == expected_seqs
    assert page.next is None
    if metric is not None:
        assert all(list(item["metrics"]) == [metric] for item in page.items)


def test_readings_of_other_patient(history: Store) -> None:
    assert [i["seq"] for i in history.readings("p2", None, None, None, 10, None).items] == [100]
    assert history.readings("nobody", None, None, None, 10, None).items == []


@pytest.mark.parametrize("cursor", ["", "abc", "1", "1.2.3", "1.x", "x.1", "1..2"])
def test_malformed_readings_cursor(history: Store, cursor: str) -> None:
    with pytest.raises(ValueError):
        history.readings("p1", None, None, None, 10, cursor)


@pytest.mark.parametrize(
    ("listing", "cursor"),
    [
        ("alerts", ""), ("alerts", "abc"), ("alerts", "5"), ("alerts", "1.2.3"), ("alerts", "a.1"),
        ("dead_letters", ""), ("dead_letters", "abc"), ("dead_letters", "1.2"), ("dead_letters", "-x"),
    ],
)
def test_malformed_alert_and_dead_letter_cursors(store: Store, listing: str, cursor: str) -> None:
    with pytest.raises(ValueError):
        if listing == "alerts":
            store.alerts(None, None, None, None, 10, cursor)
        else:
            store.dead_letters(None, 10, cursor)


# ------------------------------------------------------------------------------- alerts


@pytest.fixture
def alerts(store: Store) -> Store:
    a1 = alert("a1", "p1", "h1", raised_ms=T0)
    a2 = alert("a2", "p2", "h1", raised_ms=T0 + 1 * S)
    a3 = alert("a3", "p3", "h2", raised_ms=T0 + 2 * S)
    a4 = alert("a4", None, "h2", raised_ms=T0 + 3 * S, kind="technical", rule_id="device.offline",
               subject="device:monitor:m9", metric=None, value=None, threshold=None)
    with store.transaction() as tx:
        tx.save_transitions([Transition(AlertAction.RAISED, a, a.raised_ms) for a in (a1, a2, a3, a4)])
    with store.transaction() as tx:
        updated = replace(a1, value=85.0, count=2, updated_ms=T0 + 5 * S)
        acked = replace(updated, state=AlertState.ACKNOWLEDGED, acknowledged_by="dr-who", acknowledged_ms=T0 + 10 * S,
                        updated_ms=T0 + 10 * S)
        tx.save_transitions([
            Transition(AlertAction.UPDATED, updated, T0 + 5 * S),
            Transition(AlertAction.ACKNOWLEDGED, acked, T0 + 10 * S),
            Transition(AlertAction.RESOLVED, replace(acked, state=AlertState.RESOLVED, condition_active=False,
                                                     resolved_ms=T0 + 20 * S, updated_ms=T0 + 20 * S), T0 + 20 * S),
        ])
        escalated = replace(a3, state=AlertState.ESCALATED, escalated_ms=T0 + 9 * S)
        tx.save_transitions([Transition(AlertAction.ESCALATED, escalated, T0 + 9 * S)])
    return store


@pytest.mark.parametrize(
    ("hospitals", "hospital_id", "patient_id", "state", "expected"),
    [
        (None, None, None, None, ["a4", "a3", "a2", "a1"]),  # newest first
        (None, "h1", None, None, ["a2", "a1"]),
        (None, "h2", None, None, ["a4", "a3"]),
        (None, None, "p1", None, ["a1"]),
        (None, None, "p9", None, []),
        (None, None, None, "resolved", ["a1"]),
        (None, None, None, "escalated", ["a3"]),
        (None, None, None, "raised", ["a4", "a2"]),
        (None, None, None, "active", ["a4", "a3", "a2"]),
        (None, "h1", None, "active", ["a2"]),
        (frozenset({"h1"}), None, None, None, ["a2", "a1"]),
        (frozenset({"h1", "h2"}), None, None, None, ["a4", "a3", "a2", "a1"]),
        (frozenset({"h1"}), "h2", None, None, []),  # a filter never widens the scope
        (frozenset({"h9"}), None, None, None, []),
        (frozenset(), None, None, None, []),  # empty scope: nothing
        (frozenset(), "h1", "p1", None, []),
    ],
)
def test_alerts_filters_and_scope(alerts: Store, hospitals, hospital_id, patient_id, state, expected) -> None:
    page = alerts.alerts(hospitals, hospital_id, patient_id, state, 50, None)
    assert [a["id"] for a in page.items] == expected
    assert page.next is None


def test_alert_row_is_the_latest_state(alerts: Store) -> None:
    a1 = alerts.alert("a1")
    assert a1 is not None
    assert (a1.state, a1.value, a1.count, a1.acknowledged_by, a1.resolved_ms) == (
        "resolved", 85.0, 2, "dr-who", T0 + 20 * S)
    assert alerts.alert("missing") is None
    item = alerts.alerts(None, None, "p1", None, 10, None).items[0]
    assert item["acknowledged_at"] == format_ts(T0 + 10 * S)
    assert item["resolved_at"] == format_ts(T0 + 20 * S)
    assert item["latching"] is False
    with alerts.transaction() as tx:
        active, _ = tx.alert_state_of(["patient:p1", "patient:p2", "patient:p3", "device:monitor:m9"])
    assert sorted(a.id for a in active) == ["a2", "a3", "a4"]


def test_alert_history_lists_every_transition(alerts: Store) -> None:
    assert alerts.alert_history("a1") == [
        {"action": "raised", "at": format_ts(T0), "state": "raised", "value": 88.0, "by": None},
        {"action": "updated", "at": format_ts(T0 + 5 * S), "state": "raised", "value": 85.0, "by": None},
        {"action": "acknowledged", "at": format_ts(T0 + 10 * S), "state": "acknowledged", "value": 85.0,
         "by": "dr-who"},
        {"action": "resolved", "at": format_ts(T0 + 20 * S), "state": "resolved", "value": 85.0, "by": None},
    ]
    assert [h["action"] for h in alerts.alert_history("a3")] == ["raised", "escalated"]
    assert alerts.alert_history("missing") == []



def test_the_hub_catch_up_reads_transitions_in_order_with_the_alarm_as_it_was(alerts: Store) -> None:
    """What the fan-out re-publishes after a hub outage (bridge/fanout.py), on every backend."""
    got = alerts.alert_transitions_after(0, 100)
    ids = [tid for tid, _ in got]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    a1 = [(t.action, t.alert.state, t.alert.acknowledged_by) for _, t in got if t.alert.id == "a1"]
    assert a1 == [("raised", "raised", None), ("updated", "raised", None),
                  ("acknowledged", "acknowledged", "dr-who"), ("resolved", "resolved", "dr-who")]
    acked = alerts.alert_transition_id("a1", "acknowledged", T0 + 10 * S)
    assert acked is not None and [t.action for _, t in alerts.alert_transitions_after(acked, 100)
                                  if t.alert.id == "a1"] == ["resolved"]
    assert alerts.alert_transition_id("a1", "escalated", T0) is None
    assert len(alerts.alert_transitions_after(0, 2)) == 2

def test_alerts_paging(alerts: Store) -> None:
    seen, cursor = [], None
    for _ in range(5):
        page = alerts.alerts(None, None, None, None, 3, cursor)
        seen += [a["id"] for a in page.items]
        cursor = page.next
        if cursor is None:
            break
    assert seen == ["a4", "a3", "a2", "a1"]


# ------------------------------------------------------------------------------- dead letters


def test_dead_letters_page_newest_first_with_truncated_flag(store: Store) -> None:
    letters = [
        DeadLetter(T0 + i * S, f"fc/v1/h1/monitor/m{i}/vitals", "schema_invalid" if i % 2 else "ts_invalid",
                   f"detail {i}", b"x" * 8, 8 if i != 3 else 100_000, index=i if i == 4 else None)
        for i in range(5)
    ]
    with store.transaction() as tx:
        tx.insert_dead_letters(letters)
    pages, cursor = [], None
    for _ in range(5):
        page = store.dead_letters(None, 2, cursor)
        pages.append([(d["topic"], d["truncated"]) for d in page.items])
        cursor = page.next
        if cursor is None:
            break
    assert pages == [
        [("fc/v1/h1/monitor/m4/vitals", False), ("fc/v1/h1/monitor/m3/vitals", True)],
        [("fc/v1/h1/monitor/m2/vitals", False), ("fc/v1/h1/monitor/m1/vitals", False)],
        [("fc/v1/h1/monitor/m0/vitals", False)],
    ]
    newest = store.dead_letters(None, 1, None).items[0]
    assert {k: newest[k] for k in ("reason", "detail", "index", "payload_size", "payload", "received_ts")} == {
        "reason": "ts_invalid", "detail": "detail 4", "index": 4, "payload_size": 8, "payload": "xxxxxxxx",
        "received_ts": format_ts(T0 + 4 * S)}
    assert [d["topic"][-9:-7] for d in store.dead_letters("schema_invalid", 10, None).items] == ["m3", "m1"]
    assert store.dead_letters("nope", 10, None).items == []


def test_dead_letter_with_binary_payload(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_dead_letters([DeadLetter(T0, "fc/v1/h1/monitor/m1/vitals", "payload_not_json", "bad",
                                           b"\xff\xfe{", 3)])
    (item,) = store.dead_letters(None, 10, None).items
    assert item["payload"] == "\ufffd\ufffd{" and item["truncated"] is False


# ------------------------------------------------------------------------------- devices


@pytest.fixture
def devices(store: Store) -> Store:
    with store.transaction() as tx:
        tx.upsert_devices([
            DeviceRecord("monitor", "m1", "h1", "p1", DeviceState.ONLINE, last_seen_ms=T0, battery=90),
            DeviceRecord("monitor", "m2", "h2", None, DeviceState.OFFLINE, last_seen_ms=T0),
            DeviceRecord("scale", "s1", "h1", None, DeviceState.UNKNOWN),
            DeviceRecord("bp", "b1", None, None, DeviceState.UNKNOWN),
        ])
    return store


def test_device_upsert_updates_in_place(devices: Store) -> None:
    with devices.transaction() as tx:
        tx.upsert_devices([DeviceRecord("monitor", "m1", "h1", "p1", DeviceState.OFFLINE, silent=True,
                                        last_seen_ms=T0 + S, battery=15, firmware="2.0", last_seq=42)])
    assert devices.device("monitor", "m1") == DeviceRecord(
        "monitor", "m1", "h1", "p1", DeviceState.OFFLINE, True, T0 + S, None, 15, "2.0", 42)
    assert devices.counts()["devices"] == 4
    assert devices.device("monitor", "nope") is None


@pytest.mark.parametrize(
    ("hospitals", "hospital_id", "expected"),
    [
        (None, None, [("bp", "b1"), ("monitor", "m1"), ("monitor", "m2"), ("scale", "s1")]),
        (None, "h1", [("monitor", "m1"), ("scale", "s1")]),
        (frozenset({"h1"}), None, [("monitor", "m1"), ("scale", "s1")]),
        (frozenset({"h2"}), None, [("monitor", "m2")]),
        (frozenset({"h1", "h2"}), None, [("monitor", "m1"), ("monitor", "m2"), ("scale", "s1")]),
        (frozenset({"h2"}), "h1", []),
        (frozenset(), None, []),
    ],
)
def test_devices_scope(devices: Store, hospitals, hospital_id, expected) -> None:
    page = devices.devices(hospitals, hospital_id, 50, None)
    assert [(d["device_type"], d["device_id"]) for d in page.items] == expected


def test_devices_paging(devices: Store) -> None:
    seen, cursor = [], None
    for _ in range(5):
        page = devices.devices(None, None, 3, cursor)
        seen += [(d["device_type"], d["device_id"]) for d in page.items]
        cursor = page.next
        if cursor is None:
            break
    assert seen == [("bp", "b1"), ("monitor", "m1"), ("monitor", "m2"), ("scale", "s1")]


@pytest.mark.parametrize(
    ("patient_id", "expected"),
    [("p1", "h1"), ("p2", "h1"), ("p3", "h3"), ("ghost", None)],
)
def test_patient_hospital(store: Store, patient_id: str, expected: str | None) -> None:
    with store.transaction() as tx:
        tx.insert_readings([reading(1, T0, "p1", "h1"), reading(2, T0, "p2", "h1", device=("monitor", "m2"))])
        # a patient id belongs to the first hospital that reported it (the core refuses the rest)
        tx.insert_readings([reading(3, T0 + S, "p2", "h2", device=("monitor", "m3"))])
        # p3 has no reading yet, only a device bound to it, which claims it
        tx.upsert_devices([DeviceRecord("monitor", "m4", "h3", "p3", DeviceState.ONLINE)])
        tx.claim_patient("p3", "h3", T0)
    assert store.patient_hospital(patient_id) == expected


# ------------------------------------------------------------------------------- purge


def test_purge_removes_old_rows(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_readings([reading(i, T0 + i * S) for i in range(6)])
        tx.insert_dead_letters([DeadLetter(T0 + i * S, "t", "schema_invalid", "", b"", 0) for i in range(4)])
        tx.insert_gaps([SeqGap("monitor", "m1", 10, 12, T0), SeqGap("monitor", "m1", 20, 22, T0 + 9 * S)])
    removed = store.purge(T0 + 3 * S)
    assert removed == 3 + 3 + 1
    assert store.counts() == {"readings": 3, "dead_letters": 1, "devices": 0, "alerts": 0, "seq_gaps": 1}
    assert [i["seq"] for i in store.readings("p1", None, None, None, 10, None).items] == [3, 4, 5]
    assert store.purge(T0 + 3 * S) == 0


# ------------------------------------------------------------------------------- transactions


def test_failing_transaction_rolls_back_everything(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        assert tx.insert_readings([reading(1), reading(2)]) == [True, True]
        tx.insert_dead_letters([DeadLetter(T0, "t", "schema_invalid", "", b"{}", 2)])
        tx.upsert_devices([DeviceRecord("monitor", "m1", "h1", "p1", DeviceState.ONLINE)])
        tx.save_transitions([Transition(AlertAction.RAISED, alert("a1"), T0)])
        tx.insert_gaps([SeqGap("monitor", "m1", 3, 4, T0)])
        tx.set_overrides("p1", {"spo2.low": RuleOverride(enabled=False)})
        raise RuntimeError("boom")
    assert store.counts() == {"readings": 0, "dead_letters": 0, "devices": 0, "alerts": 0, "seq_gaps": 0}
    assert store.latest_vitals("p1") == {}
    assert store.patient_hospital("p1") is None
    assert store.alert_history("a1") == []
    assert store.overrides("p1") == {}
    # the store is still usable after the rollback
    with store.transaction() as tx:
        assert tx.insert_readings([reading(1)]) == [True]
    assert store.counts()["readings"] == 1


def test_database_error_becomes_store_error_and_rolls_back(store: Store) -> None:
    bad = alert("a2", hospital_id=None)  # type: ignore[arg-type]  # violates alerts.hospital_id NOT NULL
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.insert_readings([reading(1)])
        tx.save_transitions([Transition(AlertAction.RAISED, alert("a1"), T0), Transition(AlertAction.RAISED, bad, T0)])
    assert store.counts() == {"readings": 0, "dead_letters": 0, "devices": 0, "alerts": 0, "seq_gaps": 0}
    assert store.alert_history("a1") == []


def test_an_identity_is_never_stored_twice(store: Store) -> None:
    """The bridge looks an identity up before inserting it; should it insert one twice anyway,
    the store keeps one row (SQLite refuses the statement, PostgreSQL's batched insert skips it)."""
    with store.transaction() as tx:
        tx.insert_reading(reading(1), "b1")
    try:
        with store.transaction() as tx:
            tx.insert_reading(reading(1), "b1")
    except StoreError:
        pass
    assert store.counts()["readings"] == 1


# ------------------------------------------------------------------------------- the state repository


def test_readings_are_visible_to_their_own_transaction_and_after_commit(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_reading(reading(7, T0), "b1")
        tx.insert_reading(reading(7, T0 + S, heart_rate=71.0), "b2")  # the same seq in another boot
        tx.insert_reading(reading(8, T0 + 2 * S, patient_id="p2", device=("monitor", "m2")), "")
        assert tx.versions_of([("monitor", "m1", 7), ("monitor", "m2", 8), ("monitor", "m1", 9)]) == {
            ("monitor", "m1", 7): {"b1": Content.of(T0, {"heart_rate": 70.0}),
                                   "b2": Content.of(T0 + S, {"heart_rate": 71.0})},
            ("monitor", "m2", 8): {"": Content.of(T0 + 2 * S, {"heart_rate": 70.0})}}
    items = store.readings("p1", None, None, None, 10, None).items
    assert [(i["seq"], i["boot"]) for i in items] == [(7, "b1"), (7, "b2")]
    assert store.latest_vitals("p1")["heart_rate"]["value"] == 71.0
    assert (store.patient_hospital("p1"), store.patient_hospital("p2")) == ("h1", "h1")


def test_locked_keys_state_round_trips(store: Store) -> None:
    pending = {("patient:p1", "spo2.low"): Pending(2, T0, T0 + 5 * S), ("patient:p2", "spo2.low"): Pending(1, T0, T0)}
    gaps = [SeqGap("monitor", "m1", 3, 4, T0, "b1"), SeqGap("monitor", "m1", 9, 9, T0 + S, "b1", T0 + 40 * S)]
    with store.transaction() as tx:
        tx.lock([device_key("monitor", "m1"), patient_key("p1"), patient_key("p2")])
        assert tx.devices_of([("monitor", "m1")]) == {}
        assert tx.owners_of(["p1"]) == {}
        tx.claim_patient("p1", "h1", T0)
        tx.claim_patient("p1", "h2", T0 + S)  # the first hospital keeps it
        tx.upsert_devices([DeviceRecord("monitor", "m1", "h3", "p1", DeviceState.ONLINE, last_seen_ms=T0)])
        tx.save_transitions([Transition(AlertAction.RAISED, alert("a1"), T0)])
        tx.save_pending(["patient:p1", "patient:p2"], pending)
        tx.save_open_gaps([("monitor", "m1")], gaps)
        tx.save_news2_state("p1", "sig-1", T0 + 3600 * S)
    with store.transaction() as tx:
        assert tx.owners_of(["p1", "p9"]) == {"p1": "h1"}
        assert tx.alert_state_of(["patient:p1", "patient:p2"]) == ([alert("a1")], pending)
        assert tx.alert_state_of(["patient:p2"]) == ([], {("patient:p2", "spo2.low"): Pending(1, T0, T0)})
        assert tx.alert_by_id("a1") == alert("a1") and tx.alert_by_id("nope") is None
        assert tx.open_gaps_of([("monitor", "m1")]) == gaps[:1]  # the confirmed one is history, not state
        assert sorted(tx.hospitals()) == ["h1", "h3"]
        record = tx.news2_of(["p1"])["p1"]
        assert (record.signature, record.expiry_ms, record.known.hospital_id) == ("sig-1", T0 + 3600 * S, "h1")
        assert tx.news2_of(["p9"]) == {"p9": News2Record(PatientInputs(None, {}, 1))}
        # replacing one subject's pending delays leaves the others alone
        tx.save_pending(["patient:p1"], {})
        tx.save_open_gaps([("monitor", "m1")], [SeqGap("monitor", "m1", 4, 4, T0, "b1")])
    with store.transaction() as tx:
        assert tx.alert_state_of(["patient:p1", "patient:p2"])[1] == {("patient:p2", "spo2.low"): Pending(1, T0, T0)}
        assert tx.open_gaps_of([("monitor", "m1")]) == [SeqGap("monitor", "m1", 4, 4, T0, "b1")]
    assert store.counts()["seq_gaps"] == 2  # the open one and the confirmed one


def test_what_the_timers_find_due(store: Store) -> None:
    now = T0 + 3600 * S
    continuous = ["monitor", "oximeter"]
    with store.transaction() as tx:
        tx.upsert_devices([
            DeviceRecord("monitor", "quiet", "h1", state=DeviceState.ONLINE, last_seen_ms=now - 100 * S,
                         last_data_ms=now - 100 * S),
            DeviceRecord("monitor", "gone", "h1", state=DeviceState.ONLINE, last_seen_ms=now - 200 * S),
            DeviceRecord("monitor", "fine", "h1", state=DeviceState.ONLINE, last_seen_ms=now - S, last_data_ms=now - S),
            DeviceRecord("monitor", "silenced", "h1", state=DeviceState.ONLINE, silent=True, last_seen_ms=now - 100 * S,
                         last_data_ms=now - 100 * S),
            # a spot check: a day
            DeviceRecord("scale", "s1", "h1", state=DeviceState.ONLINE, last_seen_ms=now - 200 * S),
            DeviceRecord("monitor", "off", "h1", state=DeviceState.OFFLINE, last_seen_ms=now - 900 * S),
        ])
        tx.insert_gaps([SeqGap("monitor", "m1", 3, 4, now - 40 * S), SeqGap("monitor", "m2", 3, 4, now - 10 * S),
                        SeqGap("monitor", "m3", 3, 4, now - 90 * S, confirmed_ms=now - 60 * S)])
        tx.save_news2_state("p-due", "s", now - S)
        tx.save_news2_state("p-later", "s", now + S)
        tx.save_news2_state("p-never", "s", None)
        tx.save_transitions([Transition(AlertAction.RAISED, alert("old", "p1", raised_ms=now - 200 * S), now),
                             Transition(AlertAction.RAISED, alert("new", "p2", raised_ms=now - 10 * S), now),
                             Transition(AlertAction.RAISED, alert("low", "p3", raised_ms=now - 200 * S, priority="low"),
                                        now),
                             Transition(AlertAction.RAISED, alert("acked", "p4", raised_ms=now - 200 * S,
                                                                  state=AlertState.ACKNOWLEDGED), now)])
    with store.transaction() as tx:
        due = tx.due_devices(now, 60 * S, 180 * S, 25 * 3600 * S, continuous, 100)
        assert sorted(due) == [("monitor", "gone"), ("monitor", "quiet")]
        assert tx.due_devices(now, 60 * S, 180 * S, 25 * 3600 * S, continuous, 1) in ([("monitor", "gone")],
                                                                                        [("monitor", "quiet")])
        assert tx.due_gaps(now - 30 * S, 100) == [("monitor", "m1")]
        assert tx.due_news2(now, 100) == ["p-due"]
        assert tx.due_escalations(now - 120 * S, ["high", "medium"], 100) == ["patient:p1"]
    assert store.gauges() == type(store.gauges())(6, 5, 4)


def test_signing_keys_and_policies(store: Store) -> None:
    from dataclasses import replace as _replace

    from firstcare.signing import KeyRecord

    device_key_ = KeyRecord("k1", b"\x01" * 32, "device", "h1", "monitor", "m1")
    gateway_key = KeyRecord("k2", b"\x02" * 32, "gateway", "h1", gateway_id="gw-1")
    with store.transaction() as tx:
        tx.put_signing_key(device_key_, T0)
        tx.put_signing_key(gateway_key, T0 + S)
        tx.set_signature_policy("h1", True, T0)
        tx.insert_reading(_replace(reading(1), signed_by="k1"), "")
    assert sorted(k.kid for k in store.load_signing_keys()) == ["k1", "k2"]
    assert store.signing_key("k1") == (device_key_, None) and store.signing_key("nope") is None
    assert store.load_signature_policies() == {"h1": True}
    with store.transaction() as tx:
        tx.revoke_signing_keys(["k1"], T0 + 2 * S)
        tx.set_signature_policy("h1", False, T0 + 2 * S)
    assert [k.kid for k in store.load_signing_keys()] == ["k2"]
    assert store.signing_key("k1") == (device_key_, T0 + 2 * S)
    assert store.load_signature_policies() == {"h1": False}
    (listed,) = store.signing_keys("device", "h1", ("monitor", "m1"))
    assert (listed["kid"], listed["revoked_at"]) == ("k1", format_ts(T0 + 2 * S))
    assert [k["kid"] for k in store.signing_keys("gateway", "h1", ("gw-1",))] == ["k2"]
    (item,) = store.readings("p1", None, None, None, 10, None).items
    assert (item["verified"], item["signed_by"]) == (True, "k1")
