"""Ingest slots on one bridge (SQLite, slots asked for explicitly) against a real Mosquitto: every
slot is a persistent session with its own client id and lease, readings spread over the slots,
and a broker that forgot the sessions raises `ingest.session_lost` once per hospital while every
slot counts its own loss."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from firstcare.lease import lease_topic
from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import MosquittoInstance, require_mosquitto, start_mosquitto
from tests.support.devices import Device

SLOTS = 3


def slots_of(bridge: BridgeThread) -> Any:
    """The bridge's slot manager (bridge.slot_ingest), internals included."""
    return bridge.runtime.ingest


@pytest.fixture
def forgetful_broker(tmp_path: Path) -> Iterator[MosquittoInstance]:
    """The dev config without persistence: a restart forgets every session and queue."""
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "broker", dev=True, overrides={"persistence": "false"})
    yield broker
    broker.stop()


def test_slots_on_one_bridge_and_a_broker_that_forgot_their_sessions(
        forgetful_broker: MosquittoInstance, tmp_path: Path) -> None:
    settings = bridge_settings(tmp_path, mqtt_url=forgetful_broker.url("bridge"), ingest_slots=SLOTS,
                               mqtt_client_id="fc-one")
    with BridgeThread(settings) as bridge:
        wait_until(lambda: slots_of(bridge).held == list(range(SLOTS)) and slots_of(bridge).connected,
                   what="every slot held and connected")
        slots = httpx.get(bridge.url + "/readyz").json()["slots"]
        assert slots["client_ids"] == [f"fc-one-{n}" for n in range(SLOTS)]
        assert slots["total"] == SLOTS and slots["members"] == 1
        leases = {s.lease.topic for s in slots_of(bridge)._slots.values() if s.lease is not None}
        assert leases == {lease_topic(f"fc-one-{n}") for n in range(SLOTS)}, "one lease per slot client id"

        devices = [Device(forgetful_broker.port, f"ox-{h}", hospital_id=h) for h in ("h1", "h2")]
        for seq in range(1, 31):
            for device in devices:
                device.vitals({"spo2": 97}, seq=seq, patient_id=f"p-{device.hospital_id}")
        wait_until(lambda: bridge.runtime.core.snapshot.counters.get("readings_stored") == 60, what="all stored")
        per_slot = [s.consumer.counters["received"] for s in slots_of(bridge)._slots.values()]
        assert sum(per_slot) == 60 and all(n > 0 for n in per_slot), per_slot  # dealt over the slots

        sub = bridge.subscribe("system")
        forgetful_broker.restart()
        bridge.receive_until(sub, lambda e: e["data"].get("rule_id") == "ingest.session_lost", timeout=60)
        wait_until(lambda: slots_of(bridge).counters["sessions_lost"] == SLOTS, timeout=60,
                   what="every slot noticed its lost session")
        with bridge.http() as client:
            alerts = [a for a in client.get("/api/alerts", params={"limit": 100}).json()["items"]
                      if a["rule_id"] == "ingest.session_lost"]
        assert sorted(a["hospital_id"] for a in alerts) == ["h1", "h2"], "one alarm per hospital, not per slot"
        wait_until(lambda: slots_of(bridge).connected, timeout=30, what="slots reconnected")
        for device in devices:
            device.close()
        text = httpx.get(bridge.url + "/metrics").text
        assert f"firstcare_ingest_slots_held {float(SLOTS)}" in text


def test_a_slot_handed_over_is_drained_first_and_the_next_holder_gets_the_rest(tmp_path: Path) -> None:
    """``AckingConsumer.close_intake`` on a real Mosquitto: the consumer settles and acknowledges
    what it took, leaves the rest with the session, and the next consumer with that client id
    (the slot's next holder) gets exactly the rest: every message processed once, never by two."""
    import asyncio
    import threading

    from firstcare.mqtt import AckingConsumer, MqttTarget
    from firstcare.payloads import Inbound

    require_mosquitto()
    with start_mosquitto(tmp_path / "broker", dev=True) as broker:
        target = MqttTarget.parse(broker.url())
        processed: list[tuple[str, bytes]] = []
        first_batch = threading.Event()

        def consumer(name: str, delay: float) -> AckingConsumer:
            async def handle(batch: list[Inbound]) -> None:
                await asyncio.sleep(delay)  # a slow store: messages wait in the consumer's queue
                processed.extend((name, m.payload) for m in batch)
                first_batch.set()

            # a small queue: most messages are still with the broker (or unread) at the hand-over
            return AckingConsumer(target, "fc-drain-0", ("$share/g/fc/v1/#",), handle, queue_size=10,
                                  batch_max=5, linger_ms=0)

        async def first() -> AckingConsumer:
            a = consumer("a", 0.05)
            task = asyncio.create_task(a.run())
            await asyncio.to_thread(wait_until, lambda: a.connected, what="a connected")
            await asyncio.sleep(0.5)  # subscribed
            device = Device(broker.port, "ox-drain", will=False)
            for seq in range(1, 201):
                device.publish(device.vitals_topic, str(seq), qos=1)
            device.close()
            await asyncio.to_thread(first_batch.wait, 10)
            a.close_intake()
            await asyncio.wait_for(task, 30)  # returns once drained, acknowledged, disconnected
            return a

        a = asyncio.run(first())
        taken = [p for n, p in processed if n == "a"]
        assert 0 < len(taken) < 200, "handed over mid-stream"
        assert a.counters["acked"] == len(taken), "everything taken was acknowledged before the hand-over"

        async def second() -> None:
            b = consumer("b", 0)
            task = asyncio.create_task(b.run())
            await asyncio.to_thread(wait_until, lambda: len(processed) >= 200, 30, 0.05, "the rest drained by b")
            await asyncio.sleep(0.5)  # nothing more arrives
            b.close_intake()
            await asyncio.wait_for(task, 30)

        asyncio.run(second())
        payloads = sorted(int(p) for _, p in processed)
        assert payloads == list(range(1, 201)), "every message processed exactly once"
