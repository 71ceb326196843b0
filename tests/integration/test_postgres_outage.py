"""Lost database, PostgreSQL edition: a bridge on a PostgreSQL server of its own (initdb and
pg_ctl on a free port, never the machine's shared one) while a device streams through
Mosquitto. The server stops mid-stream and starts again: /readyz answers 503 meanwhile and 200
after, and every reading ends stored exactly once (the broker kept what was not acknowledged,
the bridge reconnected by itself)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import require_postgres
from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import MosquittoInstance
from tests.support.devices import Device
from tests.support.postgres import PrivatePostgres

TOTAL = 400


@pytest.fixture
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    require_postgres()  # the same packages; in CI their absence fails
    server = PrivatePostgres(tmp_path_factory.mktemp("pg-outage")).init().start()
    yield server
    server.stop("immediate")


def stored(url: str, device_id: str) -> list[int]:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return [r[0] for r in conn.execute("SELECT seq FROM readings WHERE device_id = %s ORDER BY seq",
                                               (device_id,))]
    except psycopg.OperationalError:
        return []


def readiness(bridge: BridgeThread) -> tuple[int, dict]:
    try:
        response = httpx.get(bridge.url + "/readyz", timeout=10)
    except httpx.HTTPError as exc:
        return 0, {"error": str(exc)}
    return response.status_code, response.json()


def test_postgres_restart_mid_stream_loses_nothing_and_readiness_follows(
        private_postgres: PrivatePostgres, mosquitto: MosquittoInstance, tmp_path: Path) -> None:
    url = private_postgres.create_database()
    settings = bridge_settings(tmp_path, mqtt_url=mosquitto.url("bridge"), mqtt_allow_anonymous=True, store_url=url,
                               store_busy_timeout_seconds=1.0, store_statement_timeout_seconds=5.0)
    with BridgeThread(settings) as bridge:
        wait_until(lambda: readiness(bridge)[0] == 200, timeout=30, what="ready on PostgreSQL")
        device = Device(mosquitto.port, "ox-pg-outage")

        stopped = threading.Event()

        def publish() -> None:
            for seq in range(1, TOTAL + 1):
                if seq == TOTAL // 2 + 1:  # however fast the first half was stored, the rest meets the outage
                    stopped.wait(60)
                device.vitals({"spo2": 97, "heart_rate": 70 + seq % 20}, seq=seq)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        wait_until(lambda: len(stored(url, device.device_id)) >= TOTAL // 8, timeout=60, what="an eighth stored")
        private_postgres.stop("fast")
        stopped.set()
        status, body = wait_until(lambda: (r := readiness(bridge))[0] == 503 and r, timeout=30,
                                  what="readiness 503 while PostgreSQL is down")
        assert body["checks"]["store"].startswith("error"), body
        private_postgres.start()
        wait_until(lambda: readiness(bridge)[0] == 200, timeout=60, what="readiness 200 once PostgreSQL is back")
        publisher.join(120)
        wait_until(lambda: len(stored(url, device.device_id)) == TOTAL, timeout=90, what="every reading stored")
        assert stored(url, device.device_id) == list(range(1, TOTAL + 1)), "a reading was lost or stored twice"
        assert bridge.runtime.ingest.counters["store_retries"] >= 1, "the outage must land mid-stream"
        device.close()
