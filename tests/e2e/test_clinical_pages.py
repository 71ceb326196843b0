"""The NEWS2 badge on the ward tiles and the alarm report page, in Debian's Chromium against a
real bridge: a septic patient's badge shows an incomplete high score as a lower bound, turns
complete when a nurse records oxygen and ACVPU; the report page lists the ward's alarms; no
Content-Security-Policy violation on either page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.browser import chromium_page
from tests.support.devices import Device

TIMEOUT_MS = 20_000
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SEPTIC = {"respiratory_rate": 27, "spo2": 95, "systolic_bp": 88, "heart_rate": 125, "temperature": 39.2}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeThread]:
    with BridgeThread(bridge_settings(tmp_path_factory.mktemp("pages"))) as b:
        device = Device(b.mqtt_port, "mon-page", device_type="monitor")
        for _ in range(3):
            device.vitals(SEPTIC, patient_id="p-page")
        wait_until(lambda: b.runtime.core.counters["alerts_raised"] >= 1, what="alarms")
        b.device = device  # type: ignore[attr-defined]
        yield b
        device.close()


def test_the_news2_badge_shows_a_lower_bound_until_the_score_is_complete(bridge: BridgeThread) -> None:
    nurse = token("clinician", sub="nurse-page", hospitals=("h1",))
    with chromium_page() as page:
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(f"{bridge.url}/#token={nurse}&hospital=h1")
        badge = page.locator("[data-testid=news2-p-page]")
        badge.wait_for(state="visible", timeout=TIMEOUT_MS)
        # expect() polls without eval, which the page's Content-Security-Policy forbids
        expect(badge).to_have_text("NEWS2 ≥11", timeout=TIMEOUT_MS)
        assert badge.get_attribute("data-band") == "high" and badge.get_attribute("data-complete") == "false"
        assert "ACVPU missing" in (badge.get_attribute("title") or "")
        response = httpx.post(f"{bridge.url}/api/patients/p-page/observations",
                              headers={"Authorization": f"Bearer {nurse}"},
                              json={"consciousness": "A", "supplemental_oxygen": False})
        assert response.status_code == 201
        expect(badge).to_have_attribute("data-complete", "true", timeout=TIMEOUT_MS)  # live, via patient.news2.update
        assert badge.text_content() == "NEWS2 11"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "news2-badge.png"))
        assert violations == []


def test_the_report_page_lists_the_wards_alarms(bridge: BridgeThread) -> None:
    with chromium_page() as page:
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(f"{bridge.url}/report.html#token={token('clinician', hospitals=('h1',))}")
        page.locator("#r-rules tr[data-rule='news2.high']").wait_for(timeout=TIMEOUT_MS)
        assert page.locator("[data-testid=report-error]").is_hidden()
        assert "monitored patient-days" in (page.locator("[data-testid=report-scope]").text_content() or "")
        totals = page.locator("[data-testid=report-totals]").text_content() or ""
        assert "Escalation rate" in totals and "Nuisance candidates" in totals
        assert "token=" not in page.url  # the token left the address bar
        page.screenshot(path=str(ARTIFACTS / "alarm-report.png"), full_page=True)
        assert violations == []


def test_the_report_page_without_a_token_says_how_to_sign_in(bridge: BridgeThread) -> None:
    with chromium_page() as page:
        page.goto(f"{bridge.url}/report.html")
        error = page.locator("[data-testid=report-error]")
        error.wait_for(state="visible", timeout=TIMEOUT_MS)
        assert "Sign in" in (error.text_content() or "")
