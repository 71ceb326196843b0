"""What only the PostgreSQL store does (the rest is the store contract): day partitions created
ahead and filled from the default partition, retention by dropping partitions, versioned
migrations on an existing database (once, even when bridges start together), and the split
between "retry the batch" and "blame the batch" for its errors, including a lost connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from bridge.alerts import AlertAction
from bridge.cluster import device_key
from bridge.store_postgres import DAY_MS, MIGRATIONS, PostgresStore, is_unavailable, partition_name, partitions
from firstcare.errors import StoreError, StoreUnavailable
from firstcare.payloads import Reading
from tests.support.postgres import create_database, drop_database, empty_tables

NOW = int(time.time() * 1000)
S = 1000


def reading(seq: int, ts_ms: int, device: str = "m1") -> Reading:
    return Reading("h1", "monitor", device, seq, ts_ms, ts_ms, "p1", {"heart_rate": 70.0})


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_url, busy_timeout_s=0.5, statement_timeout_s=2)
    yield s
    s.close()
    empty_tables(pg_url)


def where(url: str, seq: int) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT tableoid::regclass::text FROM readings WHERE seq = %s", (seq,)).fetchone()
    assert row is not None
    return row[0]


def test_readings_land_in_their_days_partition_and_wait_in_the_default_one(store: PostgresStore, pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        names = partitions(conn)
    today = NOW - NOW % DAY_MS
    assert {partition_name(today + d * DAY_MS) for d in range(-1, 8)} <= set(names)
    far = today + 30 * DAY_MS
    with store.transaction() as tx:
        tx.insert_readings([reading(1, NOW), reading(2, far + 5 * S)])
    assert where(pg_url, 1) == partition_name(today)
    assert where(pg_url, 2) == "readings_default"
    store.maintain(far)  # weeks later: that day's partition is created and the reading moves in
    assert where(pg_url, 2) == partition_name(far)
    assert [r["seq"] for r in store.readings("p1", None, None, None, 10, None).items] == [1, 2]
    with store.transaction() as tx:  # and its identity is still known there
        assert tx.insert_readings([reading(2, far + 5 * S)]) == [False]


def test_retention_drops_whole_day_partitions(store: PostgresStore, pg_url: str) -> None:
    old = NOW - 40 * DAY_MS
    store.maintain(old)  # as if the bridge had run 40 days ago
    with store.transaction() as tx:
        tx.insert_readings([reading(1, old), reading(2, old + DAY_MS), reading(3, NOW - 45 * DAY_MS),
                            reading(4, NOW)])
    cutoff = NOW - 30 * DAY_MS
    assert store.purge(cutoff) >= 1  # seq 3 from the default partition counts exactly
    with psycopg.connect(pg_url) as conn:
        remaining = partitions(conn)
    assert partition_name(old) not in remaining and partition_name(old + DAY_MS) not in remaining
    assert partition_name(NOW - NOW % DAY_MS) in remaining
    assert [r["seq"] for r in store.readings("p1", None, None, None, 10, None).items] == [4]


def test_migrations_run_once_on_an_existing_database(monkeypatch: pytest.MonkeyPatch) -> None:
    url = create_database("fc_migrate")
    try:
        first = PostgresStore(url)
        with first.transaction() as tx:
            tx.insert_readings([reading(1, NOW)])
        first.close()
        # a newer bridge brings one more migration: it runs on the existing data, once, even
        # with three bridges starting at the same moment
        monkeypatch.setattr("bridge.store_postgres.MIGRATIONS",
                            [*MIGRATIONS, "ALTER TABLE devices ADD COLUMN note text"])
        opened: list[PostgresStore] = []
        errors: list[BaseException] = []

        def start() -> None:
            try:
                opened.append(PostgresStore(url))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        with psycopg.connect(url) as conn:
            versions = conn.execute("SELECT array_agg(version ORDER BY version) FROM schema_version").fetchone()
            assert versions is not None and versions[0] == list(range(1, len(MIGRATIONS) + 2))
            assert conn.execute("SELECT count(*) FROM information_schema.columns"
                                " WHERE table_name = 'devices' AND column_name = 'note'").fetchone() == (1,)
        assert opened[0].counts()["readings"] == 1
        for s in opened:
            s.close()
    finally:
        drop_database(url)


def test_a_lock_held_elsewhere_is_unavailable_a_rejected_row_is_not(store: PostgresStore, pg_url: str) -> None:
    """The consumer retries StoreUnavailable whole and blames any other StoreError on the batch."""
    from bridge.alerts import Alert, Transition

    with psycopg.connect(pg_url) as other:  # another bridge in the middle of this device's batch
        other.execute("SELECT pg_advisory_xact_lock(%s, %s)", device_key("monitor", "m1").ids)
        with pytest.raises(StoreUnavailable, match="lock"), store.transaction() as tx:
            tx.lock([device_key("monitor", "m1")])
    with store.transaction() as tx:  # released with the other transaction
        tx.lock([device_key("monitor", "m1")])
    bad = Alert("a1", "r", "clinical", "high", "raised", "patient:p1", "p1", None, None, None,  # type: ignore[arg-type]
                None, None, None, "m", True, True, NOW, NOW)  # hospital_id NOT NULL
    with pytest.raises(StoreError) as caught, store.transaction() as tx:
        tx.save_transitions([Transition(AlertAction.RAISED, bad, NOW)])
    assert not isinstance(caught.value, StoreUnavailable)


def test_a_statement_past_its_timeout_is_unavailable(store: PostgresStore) -> None:
    with pytest.raises(StoreUnavailable, match="timeout"), store.transaction() as tx:
        tx._conn.execute("SELECT pg_sleep(5)")


def test_a_lost_connection_is_unavailable_and_the_next_transaction_reconnects(store: PostgresStore,
                                                                              pg_url: str) -> None:
    with store.transaction() as tx:
        pid = tx._conn.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(StoreUnavailable), store.transaction() as tx:
        tx.insert_readings([reading(1, NOW)])
    with store.transaction() as tx:
        assert tx.insert_readings([reading(1, NOW)]) == [True]
    assert store.counts()["readings"] == 1


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (psycopg.errors.SerializationFailure, True), (psycopg.errors.DeadlockDetected, True),
        (psycopg.errors.LockNotAvailable, True), (psycopg.errors.QueryCanceled, True),
        (psycopg.errors.AdminShutdown, True), (psycopg.errors.CannotConnectNow, True),
        (psycopg.errors.TooManyConnections, True), (psycopg.errors.DiskFull, True),
        (psycopg.errors.ReadOnlySqlTransaction, True), (psycopg.errors.ConnectionFailure, True),
        (psycopg.OperationalError, True), (psycopg.InterfaceError, True),
        (psycopg.errors.UniqueViolation, False), (psycopg.errors.NotNullViolation, False),
        (psycopg.errors.NumericValueOutOfRange, False), (psycopg.errors.InvalidTextRepresentation, False),
        (psycopg.errors.UndefinedColumn, False),
    ],
)
def test_which_errors_mean_retry_the_batch(error: type[psycopg.Error], unavailable: bool) -> None:
    assert is_unavailable(error("x")) is unavailable
