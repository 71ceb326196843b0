"""The audit trail on a real bridge and real SQLite files: who looked at which patient (REST,
FHIR, WebSocket, SSE), what was changed, what was refused; the admin read; tamper detection by
`firstcare audit verify`; overflow; nothing lost at a clean shutdown (SIGTERM to a process)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from bridge.audit import Entry
from bridge.audit_log import AuditLog, AuditTrailInUse, verify_file
from tests.support.bridge import SECRET, BridgeProcess, BridgeThread, bridge_settings, token, wait_until
from tests.support.brokers import free_port
from tests.support.devices import Device
from tests.support.process import REPO_ROOT

NURSE: dict[str, Any] = {"role": "clinician", "sub": "nurse-audit", "hospitals": ("h1",)}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path_factory.mktemp("audit"), audit_flush_seconds=0.05)) as b:
        device = Device(b.mqtt_port, "mon-audit", device_type="monitor")
        device.vitals({"heart_rate": 72, "spo2": 97}, patient_id="p-a")
        other = Device(b.mqtt_port, "mon-audit-h2", device_type="monitor", hospital_id="h2")
        other.vitals({"heart_rate": 72}, patient_id="p-h2")
        wait_until(lambda: b.runtime.store.patient_hospital("p-h2") == "h2", what="seed patients")
        b.devices = (device, other)  # type: ignore[attr-defined]
        yield b
        device.close()
        other.close()


def audit_path(bridge: BridgeThread) -> str:
    assert bridge.runtime.audit is not None
    return bridge.runtime.audit.path


def find(bridge: BridgeThread, **match: object) -> dict:
    """The newest stored record matching every field (waits for the flush)."""
    def look() -> dict | None:
        conn = sqlite3.connect(audit_path(bridge))
        conn.row_factory = sqlite3.Row
        try:
            for row in conn.execute("SELECT * FROM audit_log ORDER BY seq DESC"):
                if all(row[k] == v for k, v in match.items()):
                    return dict(row)
        finally:
            conn.close()
        return None

    return wait_until(look, what=f"an audit record {match}")


def headers(role_claims: dict | None = None, request_id: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {token(**(role_claims or NURSE))}"}
    if request_id:
        out["X-Request-ID"] = request_id
    return out


def test_a_patient_read_is_recorded_with_who_what_where_and_the_request_id(bridge: BridgeThread) -> None:
    response = httpx.get(f"{bridge.url}/api/patients/p-a/vitals/latest", headers=headers(request_id="req-read-1"))
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-read-1"
    record = find(bridge, request_id="req-read-1")
    assert {k: record[k] for k in ("subject", "role", "action", "resource", "patient_id", "hospital_id",
                                   "outcome", "status", "source")} == {
        "subject": "nurse-audit", "role": "clinician", "action": "patient.vitals.read",
        "resource": "/api/patients/p-a/vitals/latest", "patient_id": "p-a", "hospital_id": "h1",
        "outcome": "success", "status": 200, "source": "127.0.0.1"}


def test_a_token_in_the_url_never_reaches_the_trail(bridge: BridgeThread) -> None:
    response = httpx.get(f"{bridge.url}/api/patients/p-a/readings",
                         params={"token": token(**NURSE), "limit": 5}, headers={"X-Request-ID": "req-url-token"})
    assert response.status_code == 200
    record = find(bridge, request_id="req-url-token")
    assert record["resource"] == "/api/patients/p-a/readings?limit=5" and "eyJ" not in json.dumps(record)


def test_a_request_without_an_id_gets_one(bridge: BridgeThread) -> None:
    response = httpx.get(f"{bridge.url}/api/patients/p-a/news2", headers=headers())
    generated = response.headers["x-request-id"]
    assert len(generated) == 32 and find(bridge, request_id=generated)["action"] == "patient.news2.read"


@pytest.mark.parametrize(("path", "auth", "status", "outcome", "patient"), [
    ("/api/patients/p-a/readings", {"Authorization": "Bearer garbage"}, 401, "denied", "p-a"),
    ("/api/patients/p-a/readings", {}, 401, "denied", "p-a"),
    ("/api/dead-letters", None, 403, "denied", None),
    ("/api/patients/p-h2/readings", None, 404, "not_found", "p-h2"),  # another hospital's patient
])
def test_refused_access_is_recorded(bridge: BridgeThread, path: str, auth: dict | None, status: int,
                                    outcome: str, patient: str | None) -> None:
    rid = f"req-refused-{status}-{len(path)}-{bool(auth)}"
    response = httpx.get(bridge.url + path, headers={**(headers() if auth is None else auth), "X-Request-ID": rid})
    assert response.status_code == status
    record = find(bridge, request_id=rid)
    assert (record["outcome"], record["status"], record["patient_id"]) == (outcome, status, patient)
    if status == 401:
        assert record["subject"] is None and record["detail"] in ("token_invalid", "token_missing")
    else:
        assert record["subject"] == "nurse-audit"


def test_changes_are_recorded_with_their_patient(bridge: BridgeThread) -> None:
    h = headers()
    assert httpx.put(f"{bridge.url}/api/patients/p-a/alert-rules", headers={**h, "X-Request-ID": "req-override"},
                     json={"spo2.low": {"threshold": 90}}).status_code == 200
    assert httpx.put(f"{bridge.url}/api/devices/monitor/mon-audit/binding",
                     headers={**h, "X-Request-ID": "req-bind"}, json={"patient_id": "p-a"}).status_code == 200
    assert httpx.post(f"{bridge.url}/api/patients/p-a/observations", headers={**h, "X-Request-ID": "req-obs"},
                      json={"consciousness": "A"}).status_code == 201
    assert find(bridge, request_id="req-override")["action"] == "patient.alert_rules.change"
    bind = find(bridge, request_id="req-bind")
    assert (bind["action"], bind["patient_id"], bind["hospital_id"]) == ("device.binding.change", "p-a", "h1")
    assert find(bridge, request_id="req-obs")["action"] == "patient.observation.create"


def test_an_acknowledgement_is_recorded_with_the_alarm_patient(bridge: BridgeThread) -> None:
    device = bridge.devices[0]  # type: ignore[attr-defined]
    for _ in range(2):
        device.vitals({"heart_rate": 170}, patient_id="p-a")
    alarm = wait_until(lambda: next((a for a in httpx.get(
        f"{bridge.url}/api/alerts", headers=headers(), params={"patient_id": "p-a", "state": "active"}).json()["items"]
        if a["rule_id"] == "heart_rate.high.critical"), None), what="an alarm")
    response = httpx.post(f"{bridge.url}/api/alerts/{alarm['id']}/ack", headers=headers(request_id="req-ack"))
    assert response.status_code == 200
    record = find(bridge, request_id="req-ack")
    assert (record["action"], record["patient_id"], record["subject"]) == ("alert.acknowledge", "p-a", "nurse-audit")


def ws_url(bridge: BridgeThread, path: str, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return bridge.url.replace("http://", "ws://") + path + (f"?{q}" if q else "")


def test_websocket_subscriptions_replays_and_refusals_are_recorded(bridge: BridgeThread) -> None:
    async def session() -> None:
        async with websockets.connect(ws_url(bridge, "/realtime/ws", token=token(**NURSE)), open_timeout=10) as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"type": "subscribe", "room": "patient:p-a"}))
            subscribed = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "subscribe", "room": "patient:p-a:vitals", "since": subscribed["last_id"]
                                      or "x:0"}))
            await ws.send(json.dumps({"type": "subscribe", "room": "patient:p-h2"}))
            for _ in range(2):
                await ws.recv()
        async with websockets.connect(ws_url(bridge, "/realtime/ws", token="garbage"), open_timeout=10) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        async with websockets.connect(ws_url(bridge, "/realtime/ws/hospital/h2", token=token(**NURSE)),
                                      open_timeout=10) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403

    asyncio.run(session())
    ok = find(bridge, action="realtime.subscribe", resource="patient:p-a")
    assert (ok["subject"], ok["patient_id"], ok["outcome"]) == ("nurse-audit", "p-a", "success")
    assert find(bridge, action="realtime.replay", resource="patient:p-a:vitals")["subject"] == "nurse-audit"
    assert find(bridge, action="realtime.subscribe", resource="patient:p-h2")["outcome"] == "denied"
    refused = find(bridge, action="realtime.connect", status=4401)
    assert (refused["outcome"], refused["subject"], refused["resource"]) == ("denied", None, "/realtime/ws")
    forbidden = find(bridge, action="realtime.subscribe", resource="hospital:h2")
    assert (forbidden["outcome"], forbidden["status"], forbidden["hospital_id"]) == ("denied", 4403, "h2")


def test_sse_streams_are_recorded_when_they_open(bridge: BridgeThread) -> None:
    with httpx.stream("GET", f"{bridge.url}/realtime/events/patient/p-a", headers=headers(request_id="req-sse"),
                      timeout=10) as response:
        assert response.status_code == 200
        record = find(bridge, request_id="req-sse")
    assert (record["action"], record["resource"], record["patient_id"]) == ("realtime.subscribe", "patient:p-a", "p-a")
    refused = httpx.get(f"{bridge.url}/realtime/events/patient/p-h2", headers=headers(request_id="req-sse-403"))
    assert refused.status_code == 403
    assert find(bridge, request_id="req-sse-403")["outcome"] == "denied"


def test_admins_read_the_trail_filtered_and_paged(bridge: BridgeThread) -> None:
    for i in range(3):
        httpx.get(f"{bridge.url}/api/patients/p-a/readings", headers={**headers({"role": "clinician",
                  "sub": "nurse-pager", "hospitals": ("h1",)}), "X-Request-ID": f"req-page-{i}"})
    find(bridge, request_id="req-page-2")
    admin = headers({"role": "admin", "sub": "officer"})
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"subject": "nurse-pager", "patient_id": "p-a", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = httpx.get(f"{bridge.url}/api/audit", headers=admin, params=params).json()
        seen += body["items"]
        cursor = body["next"]
        if cursor is None:
            break
    assert [r["request_id"] for r in seen] == ["req-page-2", "req-page-1", "req-page-0"]
    assert all(r["hash"] and r["prev_hash"] for r in seen)
    later = httpx.get(f"{bridge.url}/api/audit", headers=admin,
                      params={"subject": "nurse-pager", "since": seen[0]["ts"]}).json()["items"]
    assert {r["request_id"] for r in later} <= {"req-page-2", "req-page-1", "req-page-0"} and later
    assert httpx.get(f"{bridge.url}/api/audit", headers=headers()).status_code == 403
    assert find(bridge, action="audit.read", subject="officer")["outcome"] == "success"


def test_the_table_refuses_updates_and_deletes(bridge: BridgeThread) -> None:
    find(bridge, outcome="success")
    conn = sqlite3.connect(audit_path(bridge))
    try:
        for sql in ("UPDATE audit_log SET subject='x' WHERE seq=1", "DELETE FROM audit_log WHERE seq=1"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
    finally:
        conn.close()


def run_verify(path: Path, *anchors: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "firstcare.cli", "audit", "verify", "--audit-url", f"sqlite:///{path}"]
    for anchor in anchors:
        args += ["--anchor", anchor]
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_update")  # what someone with the file would do first
    conn.execute("DROP TRIGGER audit_no_delete")
    for sql in statements:
        conn.execute(sql)
    conn.commit()
    conn.close()


def test_verify_names_an_edited_or_deleted_record(bridge: BridgeThread, tmp_path: Path) -> None:
    find(bridge, request_id="req-read-1")
    intact = run_verify(Path(audit_path(bridge)))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "hash chain intact" in intact.stdout
    head = intact.stdout.split("head ")[1].split()[0]

    def copy(name: str) -> Path:
        target = tmp_path / name
        source = sqlite3.connect(audit_path(bridge))
        dest = sqlite3.connect(target)
        source.backup(dest)
        source.close()
        dest.close()
        return target

    edited = copy("edited.db")
    tamper(edited, "UPDATE audit_log SET subject='someone-else' WHERE seq=3")
    result = run_verify(edited)
    assert result.returncode == 1 and "TAMPERED" in result.stdout and "record 3 was edited" in result.stdout

    deleted = copy("deleted.db")
    tamper(deleted, "DELETE FROM audit_log WHERE seq IN (4, 5)")
    result = run_verify(deleted)
    assert result.returncode == 1 and "records 4..5 deleted" in result.stdout

    truncated = copy("truncated.db")
    tamper(truncated, "DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)")
    assert "deleted from the end" in run_verify(truncated).stdout

    assert run_verify(copy("anchored.db"), head).returncode == 0


def test_a_full_queue_counts_what_it_lost_and_says_so_in_the_trail(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.db"), queue_size=3, flush_seconds=3600)
    log.start()
    accepted = [log.record(Entry(i, "s", "admin", "x.read", "/api/x", "success")) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7 and log.stats()["overflowed"] == 7
    log.stop()
    conn = sqlite3.connect(tmp_path / "a.db")
    rows = conn.execute("SELECT action, detail FROM audit_log ORDER BY seq").fetchall()
    conn.close()
    assert rows[0] == ("audit.overflow", "7 audit records lost: queue full (3)") and len(rows) == 4
    assert verify_file(str(tmp_path / "a.db")).ok


def test_one_writer_per_trail_a_second_is_refused_until_the_first_stops(tmp_path: Path) -> None:
    """Two bridges on one PostgreSQL database in one directory would both default to one trail
    file: the chain's head is per process, so the second writer is refused, never forks it."""
    path = str(tmp_path / "shared-audit.db")
    first, second = AuditLog(path, flush_seconds=0.05), AuditLog(path, flush_seconds=0.05)
    first.start()
    with pytest.raises(AuditTrailInUse) as refused:
        second.start()
    assert "FC_AUDIT_URL" in str(refused.value) and "shared-audit.db" in str(refused.value)
    first.record(Entry(1, "s", "admin", "x.read", "/api/x", "success"))
    first.stop()
    second.start()
    second.record(Entry(2, "s", "admin", "x.read", "/api/x", "success"))
    second.stop()
    assert verify_file(path).ok


def test_a_clean_shutdown_by_sigterm_writes_every_queued_record(tmp_path: Path) -> None:
    env = {"FC_MQTT_URL": "embedded", "FC_MQTT_PORT": str(free_port()), "FC_HTTP_PORT": str(free_port()),
           "FC_JWT_SECRET": SECRET, "FC_STORE_URL": f"sqlite:///{tmp_path}/bridge.db", "FC_LOG_LEVEL": "INFO",
           "FC_AUDIT_FLUSH_SECONDS": "3600"}  # nothing is written before the shutdown
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    ids = [f"req-sigterm-{i}" for i in range(25)]
    with httpx.Client(base_url=bridge.url, headers={"Authorization": f"Bearer {token('admin')}"}) as client:
        for rid in ids:
            assert client.get("/api/devices", headers={"X-Request-ID": rid}).status_code == 200
        assert client.get("/realtime/stats").json()["audit"]["queued"] >= len(ids)
    bridge.stop()  # SIGTERM
    assert bridge.process is None
    conn = sqlite3.connect(tmp_path / "bridge-audit.db")
    stored = {r[0] for r in conn.execute("SELECT request_id FROM audit_log")}
    conn.close()
    assert set(ids) <= stored
    assert verify_file(str(tmp_path / "bridge-audit.db")).ok
    assert "audit trail head:" in (tmp_path / "bridge.log").read_text()


def test_verify_without_a_trail_says_so(tmp_path: Path) -> None:
    result = run_verify(tmp_path / "none.db")
    assert result.returncode == 2 and "no audit trail" in result.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)
