"""The edge gateway in-process (its real ward broker, spool and upstream Mosquitto) with a fault
injected into our own code for one message: that message is dead-lettered in the spool and
acknowledged, the others reach the bridge."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import edge.gateway as gateway_module
from edge.config import EdgeSettings
from edge.gateway import Gateway
from tests.support.bridge import BridgeThread, bridge_settings, wait_until
from tests.support.brokers import MosquittoInstance, free_port, require_mosquitto, start_mosquitto
from tests.support.devices import Device


class GatewayThread:
    """``Gateway.running()`` on its own event loop, so a test can reach its parts."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.gateway = Gateway(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            async with self.gateway.running():
                self._ready.set()
                await self._stop.wait()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
        self._loop.close()

    def __enter__(self) -> Gateway:
        self._thread.start()
        assert self._ready.wait(30), "gateway did not start"
        wait_until(lambda: self.gateway.ward.state in ("connected", "listening")
                   and self.gateway.forwarder.state == "connected",
                   what="gateway connected to both brokers")
        return self.gateway

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[MosquittoInstance]:
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "upstream", dev=True)
    yield broker
    broker.stop()


@pytest.fixture
def bridge(upstream: MosquittoInstance, tmp_path: Path) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path, mqtt_url=upstream.url("bridge"))) as b:
        yield b


@pytest.fixture
def settings(upstream: MosquittoInstance, tmp_path: Path) -> EdgeSettings:
    return EdgeSettings.from_env({}, upstream_url=upstream.url("gateway"), local_host="127.0.0.1",
                                 local_port=free_port(), http_port=free_port(), spool_path=str(tmp_path / "spool.db"),
                                 gateway_id=f"gw-{free_port()}", log_level="WARNING")


def reading(seq: int, heart_rate: float) -> bytes:
    return json.dumps({"seq": seq, "ts": int(time.time() * 1000), "metrics": {"heart_rate": heart_rate}}).encode()


def burst(device: Device) -> None:
    infos = [device.client.publish(device.vitals_topic, reading(seq, hr), qos=1)
             for seq, hr in ((1, 70), (2, 71), (3, 123), (4, 72))]
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published()


def stored(bridge: BridgeThread, device_id: str) -> list[int]:
    import sqlite3

    with sqlite3.connect(bridge.settings.sqlite_path) as db:
        return [r[0] for r in db.execute("SELECT seq FROM readings WHERE device_id=? ORDER BY seq", (device_id,))]


def test_a_message_that_breaks_stamping_is_dead_lettered_and_acknowledged(
        settings: EdgeSettings, bridge: BridgeThread, monkeypatch: pytest.MonkeyPatch) -> None:
    original = gateway_module.stamp

    def stamp(message: Any, *args: Any) -> Any:
        if b"123" in message.payload:
            raise ValueError("stamp exploded")
        return original(message, *args)

    monkeypatch.setattr(gateway_module, "stamp", stamp)
    with GatewayThread(settings) as gateway:
        device = Device(settings.local_port, "mon-edge-bug", device_type="monitor")
        try:
            burst(device)  # returns once all four are acknowledged by the ward broker
            wait_until(lambda: stored(bridge, "mon-edge-bug") == [1, 2, 4], what="the others at the bridge")
            (letter,) = gateway.spool.dead_letters()
            assert (letter["reason"], letter["detail"]) == ("internal_error", "ValueError: stamp exploded")
            assert gateway.counters["internal_errors"] == 1
            assert gateway.ward.counters["acked"] == 4 and gateway.ward.health() is None
        finally:
            device.close()


def test_a_spool_failure_for_one_message_is_isolated_by_splitting_the_batch(
        settings: EdgeSettings, bridge: BridgeThread) -> None:
    with GatewayThread(settings) as gateway:
        original = gateway.spool.append

        def append(messages: Any, refused: Any, now_ms: int) -> int:
            if any(b"123" in m.payload for m in messages):
                raise RuntimeError("spool exploded")
            return original(messages, refused, now_ms)

        gateway.spool.append = append  # type: ignore[method-assign]
        device = Device(settings.local_port, "mon-edge-spool", device_type="monitor")
        try:
            burst(device)
            wait_until(lambda: stored(bridge, "mon-edge-spool") == [1, 2, 4], what="the others at the bridge")
            (letter,) = gateway.spool.dead_letters()
            assert (letter["reason"], letter["detail"]) == ("internal_error", "RuntimeError: spool exploded")
            assert gateway.ward.counters["poison_isolated"] == 1
            assert gateway.ward.counters["acked"] == 4
        finally:
            device.close()
