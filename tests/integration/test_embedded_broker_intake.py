"""The embedded broker's adapter around amqtt 0.12 (firstcare/broker.py), with real paho clients:
a publish is acknowledged only once the intake has kept it, never when it has not; a will
reaches the intake; a connection that never sends CONNECT is closed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

import firstcare.broker as broker_module
from firstcare.broker import EmbeddedBroker
from firstcare.payloads import Inbound
from tests.support.bridge import wait_until
from tests.support.brokers import free_port


class Intake:
    """Keeps what it is given once ``release`` is set; answers ``keep``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.keep = True
        self.kept: list[Inbound] = []

    async def __call__(self, inbound: Inbound) -> bool:
        await self.release.wait()
        if self.keep:
            self.kept.append(inbound)
        return self.keep


class BrokerThread:
    def __init__(self, intake: Intake) -> None:
        self.port = free_port()
        self.intake = intake
        self.loop = asyncio.new_event_loop()
        self.broker = EmbeddedBroker("127.0.0.1", self.port, intake=intake)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, fn: object) -> None:
        self.loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]

    def __enter__(self) -> BrokerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.broker.start(), self.loop).result(15)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.intake.release.set)
        asyncio.run_coroutine_threadsafe(self.broker.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(Intake()) as b:
        yield b


def client(port: int, client_id: str, will: bool = False) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if will:
        c.will_set("fc/v1/h1/monitor/m-1/status", b'{"state": "offline"}', qos=1, retain=True)
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()
    wait_until(c.is_connected, what="connected")
    return c


def test_a_publish_is_acknowledged_only_once_the_intake_kept_it(broker: BrokerThread) -> None:
    device = client(broker.port, "m-1")
    try:
        info = device.publish("fc/v1/h1/monitor/m-1/vitals", b'{"seq": 1}', qos=1)
        time.sleep(0.5)  # nothing to poll for: the absence of a PUBACK while the intake holds it
        assert not info.is_published(), "acknowledged before it was kept"
        broker.call(broker.intake.release.set)
        info.wait_for_publish(10)
        assert info.is_published()
        assert [(m.topic, m.payload) for m in broker.intake.kept] == [("fc/v1/h1/monitor/m-1/vitals", b'{"seq": 1}')]
    finally:
        device.disconnect()
        device.loop_stop()


def test_a_publish_the_intake_did_not_keep_is_never_acknowledged(broker: BrokerThread) -> None:
    broker.intake.keep = False
    broker.call(broker.intake.release.set)
    device = client(broker.port, "m-2")
    try:
        info = device.publish("fc/v1/h1/monitor/m-2/vitals", b'{"seq": 1}', qos=1)
        time.sleep(0.5)  # the absence of a PUBACK
        assert not info.is_published() and broker.intake.kept == []
    finally:
        device.disconnect()
        device.loop_stop()


def test_a_devices_will_reaches_the_intake(broker: BrokerThread) -> None:
    broker.call(broker.intake.release.set)
    device = client(broker.port, "m-1", will=True)
    device.loop_stop()
    sock = device.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT: the broker publishes the will
    sock.close()
    wait_until(lambda: any(m.topic.endswith("/status") for m in broker.intake.kept), what="the will kept")
    (will,) = broker.intake.kept
    assert (will.payload, will.retained) == (b'{"state": "offline"}', True)


def test_a_connection_that_never_sends_connect_is_closed(broker: BrokerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "CONNECT_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as silent:
        assert silent.recv(10) == b"", "closed by the broker"
