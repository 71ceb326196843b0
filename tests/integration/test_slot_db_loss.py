"""A bridge whose database session ends (its slot connection terminated by PostgreSQL) loses its
slots with it: it stops consuming them at once, the slots are claimed again (by it or the other
bridge) and every reading streamed meanwhile is stored exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import require_mosquitto, start_mosquitto
from tests.support.devices import Device

SLOTS = 4
TOTAL = 300


def slots_of(bridge: BridgeThread) -> Any:
    """The bridge's slot manager (bridge.slot_ingest), internals included."""
    return bridge.runtime.ingest


def test_a_bridge_that_loses_its_database_session_stops_its_slots_and_nothing_is_lost(
        tmp_path: Path, pg_url: str) -> None:
    require_mosquitto()
    with start_mosquitto(tmp_path / "broker", dev=True) as broker:
        def settings(name: str):  # noqa: ANN202 - test helper
            return bridge_settings(tmp_path / name, mqtt_url=broker.url(), mqtt_allow_anonymous=True,
                                   store_url=pg_url, ingest_slots=SLOTS, mqtt_client_id="fc-dbloss")

        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with BridgeThread(settings("a")) as a, BridgeThread(settings("b")) as b:
            wait_until(lambda: sorted(slots_of(a).held + slots_of(b).held) == list(range(SLOTS))
                       and len(slots_of(a).held) == 2, timeout=30, what="two slots each")
            device = Device(broker.port, "ox-dbloss", will=False)

            def publish() -> None:
                for seq in range(1, TOTAL + 1):
                    device.vitals({"spo2": 97}, seq=seq, patient_id="p-dbloss")

            publisher = threading.Thread(target=publish, daemon=True)
            publisher.start()
            wait_until(lambda: a.runtime.core.snapshot.counters.get("readings_stored", 0) > 20, what="a ingests")
            session = slots_of(a).cluster._conn  # a's slot connection (bridge.cluster_postgres)
            assert session is not None
            with psycopg.connect(pg_url, autocommit=True) as conn:
                ended = conn.execute("SELECT pg_terminate_backend(%s)", (session.info.backend_pid,)).fetchone()
            assert ended == (True,), "a's slot session ended"
            wait_until(lambda: slots_of(a).counters_extra["slots_lost"] == 2, what="a dropped both slots")
            publisher.join(60)
            wait_until(lambda: sorted(slots_of(a).held + slots_of(b).held) == list(range(SLOTS)),
                       timeout=30, what="every slot held again")
            with psycopg.connect(pg_url) as conn:
                def stored() -> Counter[int]:
                    return Counter(s for (s,) in conn.execute(
                        "SELECT seq FROM readings WHERE device_id = 'ox-dbloss'").fetchall())

                wait_until(lambda: stored() == Counter(range(1, TOTAL + 1)), timeout=60,
                           what="every reading stored once")
            device.close()
