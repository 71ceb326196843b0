"""/docs (Swagger UI) and /redoc render on a network with no internet, against a real `firstcare up`.

Chromium's every request that does not go to this machine is aborted (and recorded), as on a
hospital network without internet; the pages must still show the API's operations, ask nothing
from elsewhere, and break none of their own Content-Security-Policy.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.bridge import wait_until
from tests.support.brokers import free_port
from tests.support.browser import chromium_page

TIMEOUT_MS = 30_000
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("docs-up")
    http_port = free_port()
    log = tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "firstcare.cli", "up", "--http-port", str(http_port),
                                 "--mqtt-port", str(free_port())], cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "admin token" in log.read_text() or proc.poll() is not None, timeout=60,
                   what="firstcare up")
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{http_port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@dataclass
class ClosedNetwork:
    """Aborts every request to another host and remembers it; collects CSP complaints."""

    blocked: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)

    def install(self, page: Any) -> None:
        def route(r: Any) -> None:
            if urlsplit(r.request.url).hostname in LOCAL_HOSTS or r.request.url.startswith(("data:", "blob:")):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort("internetdisconnected")

        page.route("**/*", route)
        page.on("console", lambda m: self.csp.append(m.text) if "Content Security Policy" in m.text else None)


def test_swagger_ui_renders_the_operations_with_no_internet(base: str) -> None:
    from playwright.sync_api import expect

    network = ClosedNetwork()
    with chromium_page() as page:
        network.install(page)
        page.goto(f"{base}/docs")
        expect(page.locator(".opblock").first).to_be_visible(timeout=TIMEOUT_MS)
        ack = page.locator(".opblock-post", has=page.locator(".opblock-summary-path",
                                                               has_text=re.compile(r"^/api/alerts/\{alert_id\}/ack$")))
        expect(ack).to_be_visible()
        expect(page.locator(".opblock-summary-path", has_text="/readyz")).to_be_visible()
        assert page.locator(".opblock").count() >= 15
        ack.locator(".opblock-summary").click()  # an operation opens: the UI is live, not just painted
        expect(ack.locator(".opblock-body")).to_be_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "docs.png"))
    assert network.blocked == [], f"/docs asked another server: {network.blocked}"
    assert network.csp == [], network.csp


def test_redoc_renders_the_operations_with_no_internet(base: str) -> None:
    from playwright.sync_api import expect

    network = ClosedNetwork()
    with chromium_page() as page:
        network.install(page)
        page.goto(f"{base}/redoc")
        menu = page.get_by_role("menuitem")
        expect(menu.first).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_role("heading", name=re.compile("Acknowledge"))).to_have_count(1)
        assert page.locator('[data-section-id^="operation/"]').count() >= 15
        expect(page.get_by_text("/api/devices/{device_type}/{device_id}/binding").first).to_be_attached()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "redoc.png"))
    assert network.blocked == [], f"/redoc asked another server: {network.blocked}"
    # ReDoc always tries its attribution logo from its CDN and hides the image when that fails:
    # the policy stops it in the browser, before any request
    assert [m for m in network.csp if REDOC_LOGO not in m] == [], network.csp


def test_the_pages_name_only_this_server(base: str) -> None:
    with httpx.Client(base_url=base, timeout=15) as client:
        for path in ("/docs", "/redoc"):
            page = client.get(path)
            assert page.status_code == 200
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert not re.search(r"(src|href)=\"?'?https?://", page.text), page.text
            for asset in re.findall(r"/docs-assets/[\w.-]+", page.text):
                assert client.get(asset).status_code == 200, asset
