"""The simulators against a real Mosquitto built from broker-config/ (the ``mosquitto`` fixture).

A paho subscriber records what the broker delivers, and the contract's own decoders judge it.
Nothing here asserts timing: tests wait, with generous timeouts, for what must happen.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from firstcare.errors import BrokerError, TopicError
from firstcare.payloads import StatusReport, decode_status, decode_vitals, encode_status
from firstcare.tls import ClientTls, client_context
from firstcare.topics import parse_topic
from simulators.physiology import DEVICE_METRICS
from simulators.runner import SimulationConfig, SimulationSummary, main, run_simulation
from tests.support.brokers import MosquittoInstance, free_port
from tests.support.pki import Certs

WAIT = 30.0


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Recorder:
    """A subscriber that keeps every message under one hospital's topics."""

    def __init__(
        self, broker: MosquittoInstance | ServiceListener, hospital_id: str, name: str = "recorder",
        credentials: tuple[str, str] | None = None, tls: ClientTls | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{hospital_id}")
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        if credentials:
            self._client.username_pw_set(*credentials)
        if tls is not None:
            self._client.tls_set_context(client_context(tls))
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"fc/v1/{hospital_id}/#", qos=1)
        self._client.loop_start()
        assert self._subscribed.wait(WAIT), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, condition: Callable[[list[Received]], bool], what: str) -> list[Received]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            messages = self.snapshot()
            if condition(messages):
                return messages
            time.sleep(0.02)
        pytest.fail(f"waited {WAIT:g} s for {what}; got {len(self.snapshot())} messages")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def recorder(mosquitto: MosquittoInstance) -> Iterator[Callable[[str], Recorder]]:
    opened: list[Recorder] = []

    def open_recorder(hospital_id: str) -> Recorder:
        opened.append(Recorder(mosquitto, hospital_id, f"rec{len(opened)}"))
        return opened[-1]

    yield open_recorder
    for r in opened:
        r.close()


def vitals(messages: list[Received]) -> list[tuple[str, list[Any], list[Any]]]:
    """(device_id, readings, rejections) per vitals message; bad topics become rejections."""
    out: list[tuple[str, list[Any], list[Any]]] = []
    for m in messages:
        try:
            topic = parse_topic(m.topic)
        except TopicError as exc:
            out.append((m.topic, [], [exc.reason]))
            continue
        if topic.kind == "vitals":
            decoded = decode_vitals(topic, m.payload)
            out.append((topic.device_id, decoded.readings, [r.reason for r in decoded.rejections]))
    return out


def statuses(messages: list[Received], device_id: str) -> list[Received]:
    return [m for m in messages if m.topic.endswith(f"/{device_id}/status")]


def seqs_by_device(messages: list[Received]) -> dict[str, list[int]]:
    by_device: dict[str, list[int]] = collections.defaultdict(list)
    for device_id, readings, _ in vitals(messages):
        by_device[device_id] += [r.seq for r in readings]
    return by_device


class Background:
    """``run_simulation`` in a thread with a stop event, the way ``firstcare up --simulate`` runs it."""

    def __init__(self, config: SimulationConfig) -> None:
        self.stop_event = threading.Event()
        self.summary: SimulationSummary | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self._thread.start()

    def _run(self, config: SimulationConfig) -> None:
        try:
            self.summary = run_simulation(config, stop_event=self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - re-raised in stop()
            self.error = exc

    def stop(self) -> SimulationSummary:
        self.stop_event.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "run_simulation did not stop"
        if self.error:
            raise self.error
        assert self.summary is not None
        return self.summary


def test_fleet_publishes_valid_increasing_readings(mosquitto: MosquittoInstance, recorder) -> None:
    rec = recorder("h-stable")
    config = SimulationConfig(
        mosquitto.url(), "h-stable", patients=2, devices=("monitor", "oximeter"), rate=5, duration=2, seed=3
    )
    summary = run_simulation(config)
    assert summary.devices == 4 and summary.errors == 0 and summary.published > 0
    assert summary.acknowledged == summary.published
    assert summary.duplicates_sent == summary.malformed_sent == 0

    messages = rec.wait_for(lambda ms: len(vitals(ms)) >= summary.published, "every reading")
    received = vitals(messages)
    assert len(received) == summary.published
    assert [rejections for _, _, rejections in received if rejections] == []
    for device_id, readings, _ in received:
        (reading,) = readings
        assert set(reading.metrics) == set(DEVICE_METRICS[reading.device_type])
        assert reading.patient_id == "p-" + device_id.rsplit("-", 1)[1]
    seqs = seqs_by_device(messages)
    assert sorted(seqs) == ["monitor-001", "monitor-002", "oximeter-001", "oximeter-002"]
    for device_id, numbers in seqs.items():
        assert numbers == sorted(set(numbers)), device_id


def test_status_is_retained_online_then_offline_on_a_clean_stop(mosquitto: MosquittoInstance, recorder) -> None:
    rec = recorder("h-status")
    devices = ("monitor-001", "bp-001")
    run = Background(SimulationConfig(mosquitto.url(), "h-status", devices=("monitor", "bp"), rate=5))
    try:
        rec.wait_for(lambda ms: set(seqs_by_device(ms)) == set(devices), "readings from both devices")
        late = recorder("h-status")
        retained = late.wait_for(
            lambda ms: all(any(m.retain for m in statuses(ms, d)) for d in devices), "retained status"
        )
    finally:
        summary = run.stop()
    assert summary.errors == 0
    for device_id in devices:
        (status,) = [m for m in statuses(retained, device_id) if m.retain]
        report = decode_status(parse_topic(status.topic), status.payload)
        assert isinstance(report, StatusReport) and report.battery is not None, report
        assert (report.state, report.firmware) == ("online", "sim-1.0.0") and 0 < report.battery <= 100

    after = recorder("h-status")
    final = after.wait_for(lambda ms: all(statuses(ms, d) for d in devices), "retained status after the run")
    for device_id in devices:
        (status,) = statuses(final, device_id)
        report = decode_status(parse_topic(status.topic), status.payload)
        assert isinstance(report, StatusReport), report
        assert status.retain and report.state == "offline" and report.battery is not None


def test_device_offline_fires_the_will(mosquitto: MosquittoInstance, recorder) -> None:
    rec = recorder("h-offline")
    devices = ("monitor-001", "oximeter-001")
    config = SimulationConfig(
        mosquitto.url(), "h-offline", devices=("monitor", "oximeter"), rate=5, scenario="device-offline",
        fault_after=0.5,
    )
    will = encode_status("offline")
    run = Background(config)
    try:
        messages = rec.wait_for(
            lambda ms: all(any(m.payload == will for m in statuses(ms, d)) for d in devices), "the wills"
        )
    finally:
        summary = run.stop()
    assert summary.connected == 0
    for device_id in devices:
        assert [m.payload for m in statuses(messages, device_id)][-1] == will
        assert b'"online"' in statuses(messages, device_id)[0].payload

    after = recorder("h-offline")
    final = after.wait_for(lambda ms: all(statuses(ms, d) for d in devices), "retained wills")
    assert all(statuses(final, d)[0].payload == will for d in devices), "the device came back"


def test_malformed_messages_are_rejected_for_many_reasons(mosquitto: MosquittoInstance, recorder) -> None:
    rec = recorder("h-malformed")
    config = SimulationConfig(mosquitto.url(), "h-malformed", rate=20, count=24, scenario="malformed")
    summary = run_simulation(config)
    assert summary.malformed_sent == 8 and summary.published == 24 and summary.errors == 0
    assert summary.acknowledged == summary.published

    received = vitals(rec.wait_for(lambda ms: len(vitals(ms)) >= 24, "all 24 messages"))
    reasons = collections.Counter(reason for _, _, rejections in received for reason in rejections)
    assert set(reasons) == {
        "payload_not_json", "metric_unknown", "value_out_of_range", "schema_invalid", "unit_unknown",
        "payload_too_large", "device_type_unknown",
    }
    assert sum(len(readings) for _, readings, _ in received) == 16


def test_flaky_devices_duplicate_reorder_skip_and_reconnect(mosquitto: MosquittoInstance, recorder) -> None:
    rec = recorder("h-flaky")
    config = SimulationConfig(
        mosquitto.url(), "h-flaky", devices=("oximeter",), rate=20, count=30, scenario="flaky", fault_after=0.5
    )
    summary = run_simulation(config)
    assert summary.duplicates_sent > 0
    messages = rec.wait_for(lambda ms: len(vitals(ms)) >= summary.published, "every message")
    seqs = seqs_by_device(messages)["oximeter-001"]
    counts = collections.Counter(seqs)
    assert any(n > 1 for n in counts.values()), "no duplicate"
    assert any(b < a for a, b in zip(seqs, seqs[1:], strict=False)), "nothing out of order"
    assert set(range(1, max(seqs) + 1)) - set(seqs), "no gap"
    payloads = [m.payload for m in statuses(messages, "oximeter-001")]
    assert encode_status("offline") in payloads, "the connection never dropped"
    assert any(b'"online"' in p for p in payloads[payloads.index(encode_status("offline")):]), "no reconnect"


def test_cli_runs_and_summarizes(mosquitto: MosquittoInstance, recorder, capsys: pytest.CaptureFixture[str]) -> None:
    recorder("h-cli")
    argv = ["--mqtt-url", mosquitto.url(), "--hospital", "h-cli", "--patients", "2", "--count", "3", "--rate", "20"]
    assert main([*argv, "--quiet"], environ={}) == 0
    out, err = capsys.readouterr()
    assert "published 6, acknowledged 6, errors 0" in out
    assert err == ""


def test_cli_cannot_connect_exits_1_naming_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"mqtt://qa:secret@127.0.0.1:{free_port()}"
    assert main(["--mqtt-url", url, "--duration", "1"], environ={}) == 1
    err = capsys.readouterr().err
    assert "mqtt://qa:***@127.0.0.1:" in err and "secret" not in err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_ctrl_c_stops_cleanly_with_a_summary(mosquitto: MosquittoInstance, recorder) -> None:
    rec = recorder("h-sigint")
    process = subprocess.Popen(
        [sys.executable, "-m", "simulators.runner", "--mqtt-url", mosquitto.url(), "--hospital", "h-sigint",
         "--rate", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        rec.wait_for(lambda ms: len(vitals(ms)) >= 3, "readings from the CLI")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "published" in out and "errors 0" in out
    final = rec.wait_for(lambda ms: b'"offline"' in statuses(ms, "monitor-001")[-1].payload, "goodbye status")
    assert b'"battery"' in statuses(final, "monitor-001")[-1].payload


class ServiceListener:
    def __init__(self, broker: MosquittoInstance) -> None:
        self.host, self.port = broker.host, broker.service_port


def test_production_broker_takes_simulated_devices_each_with_its_own_certificate(
        mosquitto_secure: MosquittoInstance, certs: Certs) -> None:
    """TLS, a certificate per device (issued from the CA in --certs on the fly) and the ACL:
    each simulated device publishes under its own identity, signed."""
    rec = Recorder(ServiceListener(mosquitto_secure), "h-acl", tls=certs.client("bridge"))
    try:
        config = SimulationConfig(mosquitto_secure.url(), "h-acl", devices=("thermometer", "scale"), rate=20,
                                  count=5, certs_dir=str(certs.dir), sign=True)
        summary = run_simulation(config)
        assert summary.errors == 0 and summary.acknowledged == summary.published == 10
        got = rec.wait_for(lambda ms: len(vitals(ms)) >= 10, "readings through the ACL")
        assert all(m.payload.startswith(b'{"signed":') for m in got if m.topic.endswith("/vitals"))
        assert (certs.dir / "clients" / "h-acl.thermometer.thermometer-001.pem").exists()
    finally:
        rec.close()


def test_a_certificate_from_another_ca_is_a_refusal_naming_the_broker(
        mosquitto_secure: MosquittoInstance, certs: Certs) -> None:
    foreign = certs.foreign("h-x/monitor/monitor-001")
    config = SimulationConfig(mosquitto_secure.url(), "h-x", duration=1, ca_file=certs.ca_file,
                              cert_file=foreign.cert_file, key_file=foreign.key_file)
    with pytest.raises(BrokerError, match=r"mqtts://127.0.0.1:\d+ refused device monitor-001"):
        run_simulation(config)
