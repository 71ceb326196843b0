"""Poison isolation in the acknowledge-after-store consumer (firstcare/mqtt.py), without a
network: batches are fed straight into ``_settle`` and the acknowledgements it queues for the
paho thread are read back."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest

import firstcare.mqtt as mqtt_module
from firstcare.errors import StoreError, StoreUnavailable
from firstcare.mqtt import AckingConsumer, MqttTarget, _Received, describe_error
from firstcare.payloads import Inbound


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_module, "backoff_delay", lambda attempt, rng: 0.0)


def batch(*payloads: bytes) -> list[_Received]:
    return [_Received(Inbound("fc/v1/h1/monitor/m-1/vitals", p, 0), generation=0, mid=i + 1, qos=1)
            for i, p in enumerate(payloads)]


class Recorder:
    """A batch handler that fails as told and records what it was given and what stuck."""

    def __init__(self, poison: frozenset[bytes] = frozenset(), unavailable_times: int = 0,
                 error: type[Exception] = RuntimeError) -> None:
        self.poison, self.unavailable_times, self.error = poison, unavailable_times, error
        self.calls: list[list[bytes]] = []
        self.stored: list[bytes] = []
        self.quarantined: list[tuple[bytes, str]] = []

    async def handle(self, messages: list[Inbound]) -> None:
        payloads = [m.payload for m in messages]
        self.calls.append(payloads)
        if self.unavailable_times:
            self.unavailable_times -= 1
            raise StoreUnavailable("database is locked")
        if self.poison & set(payloads):
            raise self.error("boom")
        self.stored += payloads

    async def quarantine(self, message: Inbound, exc: Exception) -> None:
        self.quarantined.append((message.payload, describe_error(exc)))


def acked_mids(consumer: AckingConsumer) -> list[int]:
    mids = []
    while True:
        try:
            mids += [mid for _, mid, _ in consumer._acks.get_nowait()]
        except queue.Empty:
            return mids


def consumer_for(recorder: Recorder, with_quarantine: bool = True) -> AckingConsumer:
    return AckingConsumer(MqttTarget("127.0.0.1", 1, None, None), "test", "fc/#", recorder.handle,
                          quarantine=recorder.quarantine if with_quarantine else None)


def settle(consumer: AckingConsumer, received: list[_Received]) -> None:
    asyncio.run(consumer._settle(received))


@pytest.mark.parametrize(("size", "poison_at"), [(1, [0]), (2, [1]), (7, [3]), (8, [0, 7]), (16, [2, 3, 11])])
def test_poison_is_isolated_by_bisection_and_the_rest_stored_in_order(size: int, poison_at: list[int]) -> None:
    payloads = [f"m{i}".encode() for i in range(size)]
    poison = frozenset(payloads[i] for i in poison_at)
    recorder = Recorder(poison)
    consumer = consumer_for(recorder)
    settle(consumer, batch(*payloads))
    assert recorder.stored == [p for p in payloads if p not in poison], "every good message stored once, in order"
    assert [q[0] for q in recorder.quarantined] == [p for p in payloads if p in poison]
    assert all(q[1] == "RuntimeError: boom" for q in recorder.quarantined)
    assert sorted(acked_mids(consumer)) == list(range(1, size + 1)), "every message acknowledged exactly once"
    assert consumer.counters["poison_isolated"] == len(poison_at)
    assert consumer.store_error is None and consumer.busy_since is None


def test_a_store_error_that_is_not_unavailability_is_isolated_too() -> None:
    recorder = Recorder(frozenset({b"bad"}), error=StoreError)
    consumer = consumer_for(recorder)
    settle(consumer, batch(b"a", b"bad", b"c"))
    assert recorder.stored == [b"a", b"c"] and [q[0] for q in recorder.quarantined] == [b"bad"]


def test_an_unavailable_store_retries_the_whole_batch_unacknowledged() -> None:
    recorder = Recorder(unavailable_times=3)
    consumer = consumer_for(recorder)
    settle(consumer, batch(b"a", b"b", b"c"))
    assert recorder.calls == [[b"a", b"b", b"c"]] * 4, "retried whole, never split"
    assert recorder.quarantined == [] and recorder.stored == [b"a", b"b", b"c"]
    assert consumer.counters["store_retries"] == 3 and consumer.counters["batch_splits"] == 0
    assert sorted(acked_mids(consumer)) == [1, 2, 3]


def test_nothing_is_acknowledged_while_the_store_is_unavailable() -> None:
    recorder = Recorder(unavailable_times=10**9)
    consumer = consumer_for(recorder)

    async def run_a_while() -> None:
        task = asyncio.create_task(consumer._settle(batch(b"a", b"b")))
        while len(recorder.calls) < 5:
            await asyncio.sleep(0)
        assert (consumer.health() or "").startswith("retrying: ")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_a_while())
    assert acked_mids(consumer) == [] and recorder.stored == []


def test_without_a_quarantine_the_poison_is_kept_not_acknowledged() -> None:
    recorder = Recorder(frozenset({b"bad"}))
    consumer = consumer_for(recorder, with_quarantine=False)

    async def run_a_while() -> None:
        task = asyncio.create_task(consumer._settle(batch(b"a", b"bad")))
        while len(recorder.calls) < 6:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_a_while())
    assert acked_mids(consumer) == [1], "the good half is acknowledged, the poison held"


def test_a_failing_quarantine_is_retried_until_it_works() -> None:
    recorder = Recorder(frozenset({b"bad"}))
    failures = [StoreUnavailable("disk I/O error")] * 2

    async def flaky_quarantine(message: Inbound, exc: Exception) -> None:
        if failures:
            raise failures.pop()
        recorder.quarantined.append((message.payload, describe_error(exc)))

    consumer = AckingConsumer(MqttTarget("127.0.0.1", 1, None, None), "t", "fc/#", recorder.handle,
                              quarantine=flaky_quarantine)
    settle(consumer, batch(b"bad"))
    assert [q[0] for q in recorder.quarantined] == [b"bad"] and acked_mids(consumer) == [1]
    assert consumer.counters["store_retries"] == 2


def test_health_reports_a_stalled_batch() -> None:
    consumer = consumer_for(Recorder())
    assert consumer.health() is None
    consumer.busy_since = time.monotonic() - 60  # the consumer's clock is time.monotonic
    assert (consumer.health(stall_seconds=10) or "").startswith("stalled: ")


@pytest.mark.parametrize(("exc", "expected"), [
    (RuntimeError("boom"), "RuntimeError: boom"),
    (KeyError("heart_rate"), "KeyError: 'heart_rate'"),
    (RecursionError(), "RecursionError"),
    (ValueError("x" * 1000), "ValueError: " + "x" * 285 + "..."),
])
def test_describe_error_names_the_class_and_keeps_it_short(exc: Exception, expected: str) -> None:
    assert describe_error(exc) == expected

