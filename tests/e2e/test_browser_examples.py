"""The dashboard examples from the README, in a real Chromium against `firstcare up`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bridge import wait_until
from tests.support.brokers import free_port
from tests.support.browser import chromium_page

WEBSOCKET_EXAMPLE = """([token, patientId]) => new Promise((resolve, reject) => {
  const ws = new WebSocket(`ws://${location.host}/realtime/ws?token=${token}`);
  ws.onopen = () => ws.send(JSON.stringify({type: 'subscribe', room: `patient:${patientId}:vitals`}));
  ws.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.type === 'vitals_update') { ws.close(); resolve(data); }
  };
  ws.onclose = (e) => reject(new Error(`closed ${e.code} ${e.reason}`));
  setTimeout(() => reject(new Error('no vitals_update within 20 s')), 20000);
})"""

EVENTSOURCE_EXAMPLE = """([token, patientId]) => new Promise((resolve, reject) => {
  const source = new EventSource(`/realtime/events/patient/${patientId}?token=${token}`);
  source.addEventListener('patient.vitals.update', (event) => {
    source.close();
    resolve({id: event.lastEventId, data: JSON.parse(event.data)});
  });
  setTimeout(() => reject(new Error('no patient.vitals.update within 20 s')), 20000);
})"""

TICKET_EXAMPLE = """async ([token, patientId]) => {
  const response = await fetch('/realtime/ticket', {method: 'POST', headers: {Authorization: `Bearer ${token}`}});
  const {ticket} = await response.json();
  return await new Promise((resolve, reject) => {
    const source = new EventSource(`/realtime/events/patient/${patientId}?ticket=${ticket}`);
    source.addEventListener('patient.vitals.update', (event) => { source.close(); resolve(JSON.parse(event.data)); });
    source.onerror = () => reject(new Error('EventSource error'));
  });
}"""

CLOSE_CODE_EXAMPLE = """() => new Promise((resolve) => {
  const ws = new WebSocket(`ws://${location.host}/realtime/ws/patient/p-001?token=not-a-token`);
  ws.onclose = (event) => resolve({code: event.code, reason: event.reason});
})"""


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("browser-up")
    http_port = free_port()
    log = tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "firstcare.cli", "up", "--simulate", "2", "--http-port",
                                 str(http_port), "--mqtt-port", str(free_port())], cwd=tmp, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        match = wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60, what="token")
        yield f"http://127.0.0.1:{http_port}", match.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_websocket_and_eventsource_examples_work_in_a_browser(up: tuple[str, str], tmp_path: Path) -> None:
    base, token = up
    with chromium_page() as page:
        page.goto(f"{base}/healthz")
        vitals = page.evaluate(WEBSOCKET_EXAMPLE, [token, "p-001"])
        assert vitals["event"] == "patient.vitals.update" and vitals["data"]["patient_id"] == "p-001"
        sse = page.evaluate(EVENTSOURCE_EXAMPLE, [token, "p-001"])
        assert ":" in sse["id"] and sse["data"]["patient_id"] == "p-001" and sse["data"]["metrics"]
        assert page.evaluate(TICKET_EXAMPLE, [token, "p-001"])["patient_id"] == "p-001"
        assert page.evaluate(CLOSE_CODE_EXAMPLE) == {"code": 4401, "reason": "invalid token: Not enough segments"}
