"""What only the SQLite store does: its migrations from every earlier schema, the file lock,
and the busy database (the rest is the store contract, test_store_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from firstcare.errors import StoreError
from firstcare.payloads import Reading

T0 = 1_795_688_130_120  # 2026-11-26T10:15:30.120Z
S = 1000


def reading(seq: int, ts_ms: int = T0) -> Reading:
    return Reading("h1", "monitor", "m1", seq, ts_ms, ts_ms, "p1", {"heart_rate": 70.0})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "firstcare.db"


@pytest.fixture
def store(db_path: Path):
    from bridge.store_sqlite import SQLiteStore

    s = SQLiteStore(str(db_path))
    yield s
    s.close()


def test_user_version_is_the_number_of_migrations(store, db_path: Path) -> None:
    import sqlite3

    from bridge.store_sqlite import MIGRATIONS

    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()


def test_a_database_from_before_the_cluster_state_keeps_its_gaps_raised_and_news2_due(tmp_path) -> None:
    """Gaps recorded before provisional gaps existed were all raised already: they stay
    confirmed. Patients with a stored NEWS2 score get their state, due at once (the first tick
    scores them again, as the bridge used to at every start)."""
    import sqlite3

    from bridge.store_sqlite import MIGRATIONS, SQLiteStore

    before = next(i for i, script in enumerate(MIGRATIONS) if "alert_pending" in script)
    path = tmp_path / "before-cluster.db"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:before]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version={before}")
    db.execute("INSERT INTO seq_gaps (device_type, device_id, first_missing, last_missing, detected_ms)"
               " VALUES ('monitor', 'm1', 3, 4, ?)", (T0,))
    db.execute("INSERT INTO news2_scores (patient_id, hospital_id, computed_ms, total, band, complete, max_part,"
               " spo2_scale, signature, body) VALUES ('p1', 'h1', ?, 0, 'low', 0, 0, 1, 'sig', '{}')", (T0,))
    db.commit()
    db.close()
    store = SQLiteStore(str(path))
    try:
        with store.transaction() as tx:
            assert tx.open_gaps_of([("monitor", "m1")]) == []
            assert tx.due_gaps(T0 + 3600 * S, 10) == []
            assert tx.news2_of(["p1"])["p1"].signature == "sig"
            assert tx.due_news2(T0, 10) == ["p1"]
    finally:
        store.close()


def test_an_existing_first_version_database_is_migrated_in_place(tmp_path) -> None:
    import sqlite3

    from bridge.store_sqlite import MIGRATIONS, SQLiteStore

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO devices (device_type, device_id, hospital_id, state)"
               " VALUES ('monitor', 'm1', 'h1', 'online')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SQLiteStore(str(path))
    try:
        (device,) = store.devices(None, None, 10, None).items
        assert (device["device_id"], device["state"]) == ("m1", "online")
        record = store.device("monitor", "m1")
        assert record is not None and record.status_ms is None
        assert store._writer.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        store.close()


def test_a_database_from_before_boots_keeps_its_readings_and_their_identity(tmp_path) -> None:
    """The boot migration rebuilds the readings table: rows keep their ids and get boot '',
    devices learn the time of their newest reading, and a seq stored before is still a duplicate."""
    import sqlite3

    from bridge.sequence import Content
    from bridge.store_sqlite import MIGRATIONS, SQLiteStore

    before_boots = next(i for i, script in enumerate(MIGRATIONS) if "readings_by_boot" in script)
    path = tmp_path / "before-boots.db"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:before_boots]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version={before_boots}")
    db.executemany("INSERT INTO readings (device_type, device_id, seq, hospital_id, patient_id, ts_ms, received_ms,"
                   " metrics) VALUES ('monitor', 'm1', ?, 'h1', 'p1', ?, ?, '{\"heart_rate\":70.0}')",
                   [(seq, T0 + seq * S, T0 + seq * S) for seq in (1, 2, 3)])
    db.execute("INSERT INTO devices (device_type, device_id, hospital_id, state, last_seq) VALUES"
               " ('monitor', 'm1', 'h1', 'online', 3)")
    db.commit()
    db.close()
    store = SQLiteStore(str(path))
    try:
        device = store.device("monitor", "m1")
        assert device is not None
        assert (device.boot, device.last_seq, device.last_ts_ms, device.boot_ts_ms) == ("", 3, T0 + 3 * S, None)
        assert [(i["seq"], i["boot"]) for i in store.readings("p1", None, None, None, 10, None).items] == [
            (1, ""), (2, ""), (3, "")]
        with store.transaction() as tx:
            assert tx.reading_versions("monitor", "m1", 2) == {"": Content.of(T0 + 2 * S, {"heart_rate": 70.0})}
            tx.insert_reading(reading(2), "b2")  # the same seq in another boot is another reading
        assert store.counts()["readings"] == 4
        with pytest.raises(StoreError), store.transaction() as tx:
            tx.insert_reading(reading(2), "b2")  # but never twice under one identity
    finally:
        store.close()


def test_a_locked_database_is_unavailable_a_rejected_row_is_not(store, db_path: Path) -> None:
    """The consumer retries StoreUnavailable whole and blames any other StoreError on the batch."""
    import sqlite3

    from firstcare.errors import StoreUnavailable

    store._writer.execute("PRAGMA busy_timeout=50")
    blocker = sqlite3.connect(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"), store.transaction() as tx:
            tx.insert_readings([reading(1)])
    finally:
        blocker.rollback()
        blocker.close()
    with store.transaction() as tx:
        tx.insert_readings([reading(1)])
    with pytest.raises(StoreError) as caught, store.transaction() as tx:
        tx.insert_reading(reading(1), "")
    assert not isinstance(caught.value, StoreUnavailable)
