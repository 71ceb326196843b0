"""The one reconnect loop every MQTT client of the product uses (firstcare.mqtt.reconnect_loop):
backoff with full jitter between sessions, failures counted since the last connected session."""

from __future__ import annotations

import random
import threading

import pytest

import firstcare.mqtt as mqtt_module


def test_the_reconnect_loop_backs_off_until_a_session_gets_connected_and_stops_when_told(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    outcomes = iter([False, False, True, False, True, False])
    attempts: list[int] = []
    waits: list[float] = []

    def session() -> bool:
        outcome = next(outcomes, None)
        if outcome is None:
            stop.set()
            return False
        return outcome

    def delay(attempt: int, rng: random.Random) -> float:
        attempts.append(attempt)
        return 0.0

    monkeypatch.setattr(mqtt_module, "backoff_delay", delay)
    mqtt_module.reconnect_loop(session, stop, waits.append)
    assert attempts == [0, 1, 0, 1, 0, 1], "failures count up, and start again after a connected session"
    assert len(waits) == 6 and stop.is_set()


def test_a_stop_during_a_session_ends_the_loop_without_waiting() -> None:
    stop = threading.Event()
    calls = []

    def session() -> bool:
        calls.append(1)
        stop.set()
        return True

    mqtt_module.reconnect_loop(session, stop, lambda delay: pytest.fail("no wait after a stop"))
    assert calls == [1]


def test_backoff_is_full_jitter_within_its_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(mqtt_module.BACKOFF_MAX_S, mqtt_module.BACKOFF_MIN_S * 2 ** attempt)
        delays = [mqtt_module.backoff_delay(attempt, rng) for _ in range(200)]
        assert all(mqtt_module.BACKOFF_MIN_S / 2 <= d <= cap + mqtt_module.BACKOFF_MIN_S / 2 for d in delays)
        assert max(delays) - min(delays) > cap / 4, "spread over the range, not in lockstep"


def test_the_bridge_consumer_and_the_edge_forwarder_use_it() -> None:
    import inspect

    from edge.forwarder import Forwarder

    assert "reconnect_loop(" in inspect.getsource(mqtt_module.AckingConsumer._network)
    assert "reconnect_loop(" in inspect.getsource(Forwarder._run)
