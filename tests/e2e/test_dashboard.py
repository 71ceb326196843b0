"""The ward dashboard (bridge/static) in Debian's Chromium against a real `firstcare up`.

A reading published over MQTT changes a tile; an abnormal series shows a red high-priority
alarm; acknowledging it in the page changes it in the API; a forbidden hospital shows an error
instead of data; a connection the network drops resumes without losing or repeating an event.
The page is reached through a small TCP proxy so a test can cut the browser's connections the
way a network or a dying server would, with no help from the page.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from firstcare.auth import mint_token
from tests.support.bridge import wait_until
from tests.support.brokers import free_port
from tests.support.browser import chromium_page
from tests.support.devices import Device

TIMEOUT_MS = 20_000
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"


class DroppingProxy:
    """A TCP proxy in front of the bridge. ``drop()`` cuts every connection at once (the
    browser sees a WebSocket close 1006, exactly as when a server dies or a network fails);
    while ``refusing`` it closes new connections at once, so reconnect attempts fail too."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refusing = threading.Event()
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.closed = False
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.open.update((client, server))
            for a, b in ((client, server), (server, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source)
            self._close(target)

    def _close(self, sock: socket.socket) -> None:
        with self.lock:
            known = sock in self.open
            self.open.discard(sock)
        if known:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def drop(self) -> None:
        with self.lock:
            victims = list(self.open)
        for sock in victims:
            self._close(sock)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.drop()
        for t in self.threads:
            t.join(5)
        self.accepter.join(5)


@dataclass
class Up:
    base: str
    mqtt_port: int
    secret: str
    proxy: DroppingProxy

    def token(self, sub: str, role: str = "clinician", hospitals: tuple[str, ...] = ("h1",)) -> str:
        return mint_token(self.secret, sub, role, hospitals, (), 3600)

    def api(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {token}"}, timeout=15)

    def page_url(self, token: str, hospital: str = "h1") -> str:
        return f"http://127.0.0.1:{self.proxy.port}/#token={token}&hospital={hospital}"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("dashboard-up")
    http_port, mqtt_port = free_port(), free_port()
    log = tmp / "up.log"
    with log.open("wb") as out:
        # six simulated patients: p-006 plays `device-offline` (its monitor dies for good ~10 s in)
        proc = subprocess.Popen([sys.executable, "-m", "firstcare.cli", "up", "--simulate", "6", "--http-port",
                                 str(http_port), "--mqtt-port", str(mqtt_port)], cwd=tmp, stdout=out,
                                stderr=subprocess.STDOUT)
    proxy = None
    try:
        wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60, what="firstcare up")
        proxy = DroppingProxy(http_port)
        yield Up(f"http://127.0.0.1:{http_port}", mqtt_port, (tmp / "data" / "jwt-secret").read_text().strip(), proxy)
    finally:
        if proxy is not None:
            proxy.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@pytest.fixture
def device(up: Up) -> Iterator[Any]:
    """Devices created through this factory are disconnected after the test."""
    with ExitStack() as stack:
        def make(device_id: str) -> Device:
            d = Device(up.mqtt_port, device_id, device_type="monitor", hospital_id="h1")
            stack.callback(d.close)
            return d

        yield make


def open_ward(page: Any, up: Up, token: str) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(up.page_url(token))
    expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)


def test_a_tile_shows_a_reading_published_over_mqtt(up: Up, device: Any) -> None:
    from playwright.sync_api import expect

    mon = device("mon-test")
    with chromium_page() as page:
        open_ward(page, up, up.token("nurse-ana"))
        assert "token=" not in page.url  # the JWT left the address bar once read
        expect(page.get_by_test_id("user")).to_have_text("nurse-ana")
        expect(page.get_by_test_id("role")).to_have_text("clinician")
        mon.vitals({"heart_rate": 77, "spo2": 97}, patient_id="p-test")
        value = page.get_by_test_id("value-p-test-heart_rate")
        expect(value).to_have_text("77", timeout=TIMEOUT_MS)
        mon.vitals({"heart_rate": 123, "spo2": 97}, patient_id="p-test")
        expect(value).to_have_text("123", timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("tile-p-test")).to_contain_text("/min")
        # the simulated patients are on the ward too, each with its device's state and battery
        for n in range(1, 5):
            expect(page.get_by_test_id(f"tile-p-00{n}")).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.locator('[data-testid="tile-p-001"] .dev[data-state="online"]')).to_contain_text("%")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ward.png"), full_page=True)


def test_a_patient_whose_monitor_goes_offline_keeps_the_tile_marked_monitor_offline(up: Up) -> None:
    from playwright.sync_api import expect

    token = up.token("nurse-gu")
    with chromium_page() as page, up.api(token) as api:
        open_ward(page, up, token)
        tile, marker = page.get_by_test_id("tile-p-006"), page.get_by_test_id("offline-p-006")
        expect(tile).to_be_visible(timeout=TIMEOUT_MS)
        # `firstcare up --simulate` bound each simulated device to its patient
        assert api.get("/api/devices/monitor/monitor-006").json()["patient_id"] == "p-006"
        wait_until(lambda: api.get("/api/devices/monitor/monitor-006").json()["state"] == "offline", timeout=60,
                   what="the device-offline scenario's monitor offline")
        alarm = wait_until(lambda: [a for a in api.get("/api/alerts?patient_id=p-006&state=active").json()["items"]
                                    if a["rule_id"] == "device.offline"], what="a device.offline alarm for p-006")[0]
        row = page.get_by_test_id(f"alarm-{alarm['id']}")
        for opened in ("live", "reloaded"):  # reloaded: the page knows the ward from the REST API alone
            expect(tile).to_be_visible(timeout=TIMEOUT_MS)
            expect(marker).to_have_text("monitor offline", timeout=TIMEOUT_MS)
            expect(tile).to_have_attribute("data-offline", "true")
            expect(page.get_by_test_id("device-monitor-monitor-006")).to_have_attribute("data-state", "offline")
            expect(row.locator(".who")).to_have_text("p-006", timeout=TIMEOUT_MS)
            expect(row.locator(".msg")).to_contain_text("monitor monitor-006")
            expect(page.locator("#unlinked-list").get_by_test_id("device-monitor-monitor-006")).to_have_count(0)
            if opened == "live":
                page.reload()
                expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)
        assert float(tile.locator(".row .value").first.evaluate("el => getComputedStyle(el).opacity")) < 1  # dimmed
        expect(page.get_by_test_id("offline-p-001")).to_be_hidden()  # a patient watched by a live monitor
        ARTIFACTS.mkdir(exist_ok=True)
        tile.screenshot(path=str(ARTIFACTS / "tile-monitor-offline.png"))


def test_a_tile_opens_the_patient_history_which_then_continues_live(up: Up, device: Any) -> None:
    from playwright.sync_api import expect

    mon = device("mon-detail")
    with chromium_page() as page:
        open_ward(page, up, up.token("nurse-fa"))
        mon.vitals({"heart_rate": 60, "spo2": 95, "systolic_bp": 118, "diastolic_bp": 76}, patient_id="p-detail")
        expect(page.get_by_test_id("value-p-detail-diastolic_bp")).to_have_text("76", timeout=TIMEOUT_MS)
        page.get_by_test_id("tile-p-detail").click()
        detail = page.get_by_test_id("detail")
        expect(detail).to_be_visible()
        expect(page.get_by_test_id("chart-caption-heart_rate")).to_contain_text("60 /min", timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("chart-caption-bp")).to_contain_text("118/76 mmHg")
        expect(page.get_by_test_id("chart-heart_rate")).to_be_visible()
        mon.vitals({"heart_rate": 88, "spo2": 95}, patient_id="p-detail")
        expect(page.get_by_test_id("chart-caption-heart_rate")).to_contain_text("88 /min", timeout=TIMEOUT_MS)
        page.locator("#detail-window").select_option("1h")  # reloaded from the REST API
        expect(page.get_by_test_id("chart-caption-heart_rate")).to_contain_text("88 /min", timeout=TIMEOUT_MS)
        expect(detail).to_contain_text("2 readings")
        page.keyboard.press("Escape")
        expect(detail).to_be_hidden()


def red(css: str) -> bool:
    r, g, b = (int(n) for n in re.findall(r"\d+", css)[:3])
    return r > 200 and g < 100 and b < 100


def raise_desaturation(mon: Device, patient_id: str) -> None:
    """spo2.low.critical (bridge/alert_rules.yaml): SpO2 below 88 % for 2 consecutive readings."""
    for _ in range(3):
        mon.vitals({"heart_rate": 90, "spo2": 80}, patient_id=patient_id)


def test_an_abnormal_series_shows_a_high_priority_alarm_in_red(up: Up, device: Any) -> None:
    from playwright.sync_api import expect

    mon = device("mon-alarm")
    with chromium_page() as page:
        open_ward(page, up, up.token("nurse-ana"))
        raise_desaturation(mon, "p-alarm")
        row = page.locator('[data-testid^="alarm-"]', has_text="p-alarm").filter(has_text="desaturation")
        expect(row).to_have_attribute("data-priority", "high", timeout=TIMEOUT_MS)
        expect(row).to_contain_text("80 %")
        tile = page.get_by_test_id("tile-p-alarm")
        expect(tile).to_have_attribute("data-priority", "high")
        # computed colours, once their CSS transitions are over
        wait_until(lambda: red(row.evaluate("el => getComputedStyle(el).borderLeftColor")), what="a red alarm row")
        wait_until(lambda: red(tile.evaluate("el => getComputedStyle(el).borderTopColor")), what="a red tile")


def test_acknowledge_in_the_page_acknowledges_in_the_api_and_a_resolved_alarm_fades_out(up: Up, device: Any) -> None:
    from playwright.sync_api import expect

    mon = device("mon-ack")
    token = up.token("nurse-bo")
    with chromium_page() as page, up.api(token) as api:
        open_ward(page, up, token)
        raise_desaturation(mon, "p-ack")
        row = page.locator('[data-testid^="alarm-"]', has_text="p-ack").filter(has_text="desaturation")
        expect(row).to_have_attribute("data-state", "raised", timeout=TIMEOUT_MS)
        alert_id = row.get_attribute("data-testid").removeprefix("alarm-")
        page.get_by_test_id(f"ack-{alert_id}").click()
        alert = wait_until(lambda: (a := api.get(f"/api/alerts/{alert_id}").json())["state"] == "acknowledged" and a,
                           timeout=20, what="the alarm acknowledged in the API")
        assert alert["acknowledged_by"] == "nurse-bo"
        expect(page.get_by_test_id(f"ack-info-{alert_id}")).to_contain_text("acknowledged by nurse-bo")
        expect(page.get_by_test_id(f"ack-{alert_id}")).to_be_hidden()
        # the high alarm latched; once acknowledged, a normal value resolves it: the row fades out and goes
        mon.vitals({"heart_rate": 80, "spo2": 97}, patient_id="p-ack")
        wait_until(lambda: api.get(f"/api/alerts/{alert_id}").json()["state"] == "resolved", timeout=20,
                   what="the alarm resolved")
        expect(page.get_by_test_id(f"alarm-{alert_id}")).to_have_count(0, timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("tile-p-ack")).not_to_have_attribute("data-priority", "high")


def test_a_forbidden_hospital_shows_an_error_instead_of_data(up: Up) -> None:
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.goto(up.page_url(up.token("nurse-h2", hospitals=("h2",)), hospital="h1"))
        error = page.get_by_test_id("error")
        expect(error).to_be_visible(timeout=TIMEOUT_MS)
        expect(error).to_contain_text("not allowed to view hospital h1")
        expect(page.get_by_test_id("connection")).to_have_text("offline")
        expect(page.locator('[data-testid^="tile-"]')).to_have_count(0)
        expect(page.locator('[data-testid^="alarm-"]')).to_have_count(0)


def test_a_patient_token_shows_its_own_record_only(up: Up) -> None:
    from playwright.sync_api import expect

    token = mint_token(up.secret, "pat-001", "patient", (), ("p-001",), 3600)
    with chromium_page() as page:
        page.goto(f"http://127.0.0.1:{up.proxy.port}/#token={token}")
        expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("value-p-001-heart_rate")).to_have_text(re.compile(r"^\d+$"), timeout=TIMEOUT_MS)
        expect(page.locator('[data-testid^="tile-"]')).to_have_count(1)
        expect(page.locator("#hospital")).to_be_hidden()


def test_a_pasted_token_signs_in_and_is_remembered_for_the_tab(up: Up) -> None:
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.goto(f"http://127.0.0.1:{up.proxy.port}/")
        page.get_by_label("Access token (JWT)").fill(up.token("nurse-cy"))
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)
        page.reload()
        expect(page.get_by_test_id("user")).to_have_text("nurse-cy")
        expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("Access token (JWT)")).to_be_visible()


def seqs_of(page: Any, key: str, device_id: str) -> Counter[int]:
    script = (f"window.__fc.{key}.filter(e => e.type === 'vitals_update' && e.device === {device_id!r})"
              ".map(e => e.seq)")
    return Counter(page.evaluate(script))


def test_after_the_connection_drops_the_page_resumes_without_losing_or_repeating_an_event(up: Up, device: Any) -> None:
    from playwright.sync_api import expect

    mon = device("mon-resume")
    token = up.token("nurse-di")
    with chromium_page() as page, up.api(token) as api:
        open_ward(page, up, token)
        published = [mon.vitals({"heart_rate": 70, "spo2": 98}, patient_id="p-resume")]
        expect(page.get_by_test_id("value-p-resume-heart_rate")).to_have_text("70", timeout=TIMEOUT_MS)
        wait_until(lambda: page.evaluate("window.__fc.lastId['hospital:h1']"), what="a cursor for the hospital room")

        up.proxy.refusing.set()
        up.proxy.drop()  # every connection of the page is cut, as by a dying server or network
        expect(page.get_by_test_id("connection")).to_have_text("reconnecting", timeout=TIMEOUT_MS)
        published += [mon.vitals({"heart_rate": 71 + i, "spo2": 98}, patient_id="p-resume") for i in range(5)]
        wait_until(lambda: api.get("/api/devices/monitor/mon-resume").json()["last_seq"] == published[-1],
                   what="the readings stored while the page was away")
        up.proxy.refusing.clear()

        expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("value-p-resume-heart_rate")).to_have_text("75", timeout=TIMEOUT_MS)
        wait_until(lambda: set(published) <= set(seqs_of(page, "received", "mon-resume")), what="every reading")
        # exactly once each: no gap, no duplicate, neither in what the page applied nor on the wire
        assert seqs_of(page, "received", "mon-resume") == Counter(published)
        assert seqs_of(page, "raw", "mon-resume") == Counter(published)
        resumed = [s for s in page.evaluate("window.__fc.subscribed") if s["room"] == "hospital:h1"][-1]
        assert resumed["answer"] == "subscribed" and resumed["since"] and resumed["replayed"] >= 5, resumed


def test_a_resync_reloads_the_ward_from_the_rest_api(up: Up, device: Any) -> None:
    from playwright.sync_api import expect

    mon = device("mon-resync")
    token = up.token("nurse-ed")
    with chromium_page() as page, up.api(token) as api:
        open_ward(page, up, token)
        mon.vitals({"heart_rate": 65, "spo2": 99}, patient_id="p-resync")
        value = page.get_by_test_id("value-p-resync-heart_rate")
        expect(value).to_have_text("65", timeout=TIMEOUT_MS)
        reloads = page.evaluate("window.__fc.reloads")
        # reconnect with a cursor from a history the hub no longer has (as after a memory hub restarted)
        page.evaluate("""() => { const c = window.__fc.client;
                                 c.lastId.set('hospital:h1', 'gone-epoch:1'); c.drop(600000); }""")
        expect(page.get_by_test_id("connection")).to_have_text("reconnecting", timeout=TIMEOUT_MS)
        missed = mon.vitals({"heart_rate": 66, "spo2": 99}, patient_id="p-resync")  # no replay will bring it
        wait_until(lambda: api.get("/api/devices/monitor/mon-resync").json()["last_seq"] == missed,
                   what="the reading stored while the page was away")
        page.evaluate("window.__fc.client.reconnectNow()")
        expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=TIMEOUT_MS)
        wait_until(lambda: page.evaluate("window.__fc.resyncs") >= 1, what="a resync answer")
        wait_until(lambda: page.evaluate("window.__fc.reloads") > reloads, what="a reload from the REST API")
        expect(value).to_have_text("66", timeout=TIMEOUT_MS)
        assert missed not in seqs_of(page, "received", "mon-resync")  # the 66 came from the REST API


def test_the_dashboard_mount_leaves_the_api_alone(up: Up) -> None:
    with closing(httpx.Client(base_url=up.base, timeout=15)) as client:
        assert client.get("/").headers["content-type"].startswith("text/html")
        assert client.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/api/devices").status_code == 401
        assert client.get("/api/nothing-here").status_code == 404
        assert client.get("/openapi.json").json()["info"]["title"] == "FirstCare Realtime"
