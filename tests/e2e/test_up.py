"""`firstcare up` as a user runs it: one process, embedded defaults, simulated devices."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.bridge import wait_until
from tests.support.brokers import free_port


def test_up_with_simulated_devices_serves_readings_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    http_port, mqtt_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "firstcare.cli", "up", "--simulate", "3", "--http-port", str(http_port),
             "--mqtt-port", str(mqtt_port)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        match = wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60,
                           what="the printed admin token")
        headers = {"Authorization": f"Bearer {match.group(1)}"}
        base = f"http://127.0.0.1:{http_port}"
        assert f"{base}/docs" in log.read_text()
        devices = wait_until(lambda: httpx.get(f"{base}/api/devices", headers=headers).json()["items"],
                             timeout=30, what="simulated devices")
        assert {d["hospital_id"] for d in devices} == {"h1"}
        # each simulated device is bound to its patient, as ward staff would do through the API
        bound = wait_until(lambda: {(d["device_id"], d["patient_id"]) for d in
                                    httpx.get(f"{base}/api/devices", headers=headers).json()["items"]}
                           == {(f"monitor-00{n}", f"p-00{n}") for n in (1, 2, 3)}, what="simulated devices bound")
        assert bound
        readings = wait_until(
            lambda: httpx.get(f"{base}/api/patients/p-001/readings", headers=headers).json()["items"],
            timeout=30, what="readings of p-001")
        assert readings[0]["metrics"]
        assert (tmp_path / "data" / "firstcare.db").exists()
        live = connect(f"ws://127.0.0.1:{http_port}/realtime/ws/patient/p-001?token={match.group(1)}")
        assert json.loads(live.recv(10))["type"] == "welcome"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            live.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, "shutdown must say: reconnect"
    assert "?token=eyJ" not in log.read_text(), "a token in a URL reached the log"
    # a clean stop is no news: no warning for our own disconnects; the simulated devices said
    # goodbye while the bridge still listened, so it recorded them offline
    assert not re.findall(r".* (WARNING|ERROR) .*", log.read_text()), log.read_text()
    with closing(sqlite3.connect(tmp_path / "data" / "firstcare.db")) as db:
        states = dict(db.execute("SELECT device_id, state FROM devices"))
        assert states == {f"monitor-00{n}": "offline" for n in (1, 2, 3)}


TAKEN = "{port}"  # replaced by the port a test holds open


@pytest.mark.parametrize(("argv", "message"), [
    (["up", "--mqtt-port", TAKEN, "--http-port", "free"],
     "firstcare up: MQTT port 127.0.0.1:{port} is already in use; choose another with --mqtt-port or FC_MQTT_PORT"),
    (["up", "--http-port", TAKEN, "--mqtt-port", "free"],
     "firstcare up: HTTP port 127.0.0.1:{port} is already in use; choose another with --http-port or FC_HTTP_PORT"),
    (["broker", "--mqtt-port", TAKEN],
     "firstcare broker: MQTT port 127.0.0.1:{port} is already in use; choose another with --mqtt-port or FC_MQTT_PORT"),
    (["edge", "--local-host", "127.0.0.1", "--local-port", TAKEN, "--http-port", "free"],
     "firstcare edge: ward MQTT port 127.0.0.1:{port} is already in use; choose another with --local-port or "
     "FC_EDGE_LOCAL_PORT"),
    (["edge", "--local-host", "127.0.0.1", "--local-port", "free", "--http-port", TAKEN],
     "firstcare edge: HTTP port 127.0.0.1:{port} is already in use; choose another with --http-port or "
     "FC_EDGE_HTTP_PORT"),
], ids=["up-mqtt", "up-http", "broker", "edge-mqtt", "edge-http"])
def test_a_taken_port_is_named_with_the_flag_and_the_variable_that_change_it(
        tmp_path: Path, argv: list[str], message: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [str(port) if a == TAKEN else str(free_port()) if a == "free" else a for a in argv]
        result = subprocess.run([sys.executable, "-m", "firstcare.cli", *command], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message.format(port=port) in result.stderr


def test_token_command_mints_a_token_the_server_accepts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "firstcare.cli", "token", "--role", "clinician", "--hospital", "h1"]
    refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "no signing secret" in refused.stderr
    assert not (tmp_path / "data").exists(), "it must not invent a secret the server does not know"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "jwt-secret").write_text("a-secret-firstcare-up-would-have-made-32b")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    from firstcare.auth import TokenVerifier

    secret = (tmp_path / "data" / "jwt-secret").read_text().strip()
    claims = TokenVerifier(secret).verify(result.stdout.strip())
    assert (claims.role, claims.hospitals) == ("clinician", frozenset({"h1"}))


def test_up_the_sepsis_patient_scores_high_raises_its_alarm_and_every_look_is_audited(tmp_path: Path) -> None:
    """The README's promise, as a user runs it: `firstcare up --simulate 5` deals the sepsis
    scenario to p-005, whose NEWS2 reaches the high band and raises news2.high; a FHIR client
    reads the readings and the score back; the audit trail shows who looked; verify passes."""
    from firstcare.auth import mint_token

    http_port, mqtt_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "firstcare.cli", "up", "--simulate", "5", "--http-port", str(http_port),
             "--mqtt-port", str(mqtt_port)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        match = wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60,
                           what="the printed admin token")
        admin = {"Authorization": f"Bearer {match.group(1)}"}
        secret = (tmp_path / "data" / "jwt-secret").read_text().strip()
        nurse = {"Authorization": f"Bearer {mint_token(secret, 'nurse-jo', 'clinician', ['h1'])}"}
        base = f"http://127.0.0.1:{http_port}"

        def news2_alarm() -> dict | None:
            items = httpx.get(f"{base}/api/alerts", headers=nurse, params={"patient_id": "p-005"}).json()["items"]
            return next((a for a in items if a["rule_id"] == "news2.high"), None)

        alarm = wait_until(news2_alarm, timeout=150, interval=1, what="p-005's NEWS2 high alarm")
        assert alarm["priority"] == "high" and alarm["value"] >= 7
        score = httpx.get(f"{base}/api/patients/p-005/news2", headers=nurse).json()
        assert any(s["band"] == "high" for s in score["items"])
        fhir = httpx.get(f"{base}/fhir/Observation", headers=nurse,
                         params={"patient": "p-005", "code": "http://loinc.org|9279-1", "_count": 5})
        assert fhir.status_code == 200 and fhir.json()["entry"]
        def looked() -> set[str]:
            audit = httpx.get(f"{base}/api/audit", headers=admin, params={"patient_id": "p-005", "subject": "nurse-jo"})
            return {r["action"] for r in audit.json()["items"]}

        wait_until(lambda: {"patient.news2.read", "fhir.observation.search"} <= looked(), what="the audit records")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    verified = subprocess.run([sys.executable, "-m", "firstcare.cli", "audit", "verify"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "hash chain intact" in verified.stdout, verified.stdout + verified.stderr


def test_a_second_up_shows_a_live_ward_at_once(tmp_path: Path) -> None:
    """`make up` twice on one data folder: the simulated devices start at seq 1 again under a
    new boot, and their readings are stored at once instead of being taken for duplicates."""
    http_port, mqtt_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"

    def run_until(n_readings: int) -> tuple[list[dict], str]:
        log = tmp_path / "up.log"
        log.write_bytes(b"")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "firstcare.cli", "up", "--simulate", "1", "--http-port", str(http_port),
                 "--mqtt-port", str(mqtt_port)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            match = wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60,
                               what="the printed admin token")
            headers = {"Authorization": f"Bearer {match.group(1)}"}

            def readings() -> list[dict]:
                return httpx.get(f"{base}/api/patients/p-001/readings", headers=headers,
                                 params={"limit": 5000}).json()["items"]

            items = wait_until(lambda: len(r := readings()) >= n_readings and r, timeout=60,
                               what=f"{n_readings} readings of p-001")
            boot = httpx.get(f"{base}/api/devices/monitor/monitor-001", headers=headers).json()["boot"]
            alarms = httpx.get(f"{base}/api/alerts", headers=headers).json()["items"]
            assert not [a for a in alarms if a["rule_id"] in ("device.seq_gap", "device.silent")], alarms
            return items, boot
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()

    first, first_boot = run_until(6)
    second, second_boot = run_until(len(first) + 6)
    assert second_boot != first_boot and first_boot and second_boot
    new_monitor = [r for r in second if r["device_id"] == "monitor-001" and r["boot"] == second_boot]
    assert [r["seq"] for r in new_monitor][:3] == [1, 2, 3], "the restarted device's readings are stored from seq 1"


def test_up_with_tls_runs_everything_encrypted_with_a_certificate_per_device(tmp_path: Path) -> None:
    """`make up TLS=1`: a development CA, mqtts with a certificate per simulated device, signed
    readings, HTTPS and WSS; a client that does not trust the CA gets nothing."""
    import ssl

    http_port, mqtt_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "firstcare.cli", "up", "--tls", "--simulate", "2", "--http-port", str(http_port),
             "--mqtt-port", str(mqtt_port)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        match = wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60,
                           what="the printed admin token")
        certs = tmp_path / "data" / "certs"
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        base = f"https://127.0.0.1:{http_port}"
        text = log.read_text()
        assert f"{base}/docs" in text and f"mqtts://127.0.0.1:{mqtt_port}" in text
        with httpx.Client(base_url=base, verify=context, headers={"Authorization": f"Bearer {match.group(1)}"},
                          timeout=10) as client:
            readings = wait_until(lambda: client.get("/api/patients/p-001/readings").json()["items"], timeout=30,
                                  what="readings of p-001")
            assert readings[0]["verified"] is True and readings[0]["signed_by"].startswith("h1/monitor/")
        assert (certs / "clients" / "h1.monitor.monitor-001.pem").exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=10)
        with connect(f"wss://127.0.0.1:{http_port}/realtime/ws/patient/p-001?token={match.group(1)}",
                     ssl=context) as live:
            assert json.loads(live.recv(10))["type"] == "welcome"
        plain = socket.create_connection(("127.0.0.1", mqtt_port), timeout=10)
        with plain:  # a plain MQTT CONNECT to the TLS listener gets no CONNACK
            try:
                plain.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
                answer = plain.recv(4)
            except ConnectionError:
                answer = b""
            assert answer[:1] != b"\x20"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log.read_text()


def test_up_with_only_a_public_key_starts_and_says_where_tokens_come_from(tmp_path: Path) -> None:
    """No HS256 secret to mint with: `up` must not crash minting its admin token."""
    import os

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    http_port, mqtt_port = free_port(), free_port()
    log = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FC_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "firstcare.cli", "up", "--http-port", str(http_port), "--mqtt-port", str(mqtt_port)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env={**env, "FC_JWT_PUBLIC_KEY": public})
    try:
        wait_until(lambda: "FirstCare Realtime is up" in log.read_text() or proc.poll() is not None, timeout=60,
                   what="the banner")
        text = log.read_text()
        assert proc.poll() is None, text
        assert "none minted" in text and "FC_JWT_PUBLIC_KEY" in text and "Traceback" not in text
        assert not (tmp_path / "data" / "jwt-secret").exists()
        signed = jwt.encode({"sub": "ops", "role": "admin", "exp": int(time.time()) + 600}, key, algorithm="RS256")
        response = httpx.get(f"http://127.0.0.1:{http_port}/api/devices", headers={"Authorization": f"Bearer {signed}"})
        assert response.status_code == 200, response.text
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log.read_text()
