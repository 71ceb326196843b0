"""docs/nginx.conf as shipped, in front of a real bridge: HTTPS with HSTS, WSS through the
upgrade, unbuffered SSE, the Origin check still working through the proxy, plain HTTP redirected."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.support.bridge import BridgeThread, bridge_settings, token, wait_until
from tests.support.brokers import REPO_ROOT, free_port
from tests.support.pki import Certs
from tests.support.services import missing

NGINX_CONF = REPO_ROOT / "docs" / "nginx.conf"


def nginx_binary() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        message = "nginx is not installed (apt-get install nginx-light)"
        missing(message)
    return binary


class Proxy:
    def __init__(self, workdir: Path, certs: Certs, bridge_port: int, https_port: int) -> None:
        self.https_port, self.http_port = https_port, free_port()
        site = NGINX_CONF.read_text()
        site = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", site)  # no IPv6 on every test machine
        site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{self.https_port} ssl http2;")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{self.http_port};")
        site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{bridge_port};")
        site = site.replace("/etc/ssl/firstcare/server.pem", str(certs.pki.server.cert))
        site = site.replace("/etc/ssl/firstcare/server-key.pem", str(certs.pki.server.key))
        site = site.replace("server_name monitoring.hospital.example;", "server_name localhost;")
        (workdir / "site.conf").write_text(site)
        (workdir / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n  client_body_temp_path {workdir}/body;\n  proxy_temp_path {workdir}/proxy;\n"
            f"  fastcgi_temp_path {workdir}/fcgi;\n  uwsgi_temp_path {workdir}/uwsgi;\n"
            f"  scgi_temp_path {workdir}/scgi;\n  include {workdir}/site.conf;\n}}\n")
        self.workdir = workdir
        self.process = subprocess.Popen([nginx_binary(), "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"https://localhost:{self.https_port}"
        self.context = ssl.create_default_context(cafile=certs.ca_file)
        wait_until(self._up, what=f"nginx up ({workdir / 'error.log'})")

    def _up(self) -> bool:
        assert self.process.poll() is None, (self.workdir / "error.log").read_text()
        try:
            return httpx.get(self.url + "/healthz", verify=self.context, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def proxied(tmp_path: Path, certs: Certs) -> Iterator[tuple[BridgeThread, Proxy]]:
    https_port = free_port()  # the bridge is told its public origin, as docs/nginx.conf says
    with BridgeThread(bridge_settings(tmp_path, public_origins=(f"https://localhost:{https_port}",))) as bridge:
        (tmp_path / "nginx").mkdir()
        proxy = Proxy(tmp_path / "nginx", certs, bridge.settings.http_port, https_port)
        try:
            yield bridge, proxy
        finally:
            proxy.stop()


def test_https_through_the_proxy_sends_hsts_and_redirects_plain_http(proxied: tuple[BridgeThread, Proxy]) -> None:
    _, proxy = proxied
    with httpx.Client(base_url=proxy.url, verify=proxy.context, timeout=10) as client:
        response = client.get("/api/devices", headers={"Authorization": f"Bearer {token('admin')}"})
        assert response.status_code == 200
        assert response.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        assert "set-cookie" not in response.headers
    redirect = httpx.get(f"http://localhost:{proxy.http_port}/api/devices", timeout=10)
    assert redirect.status_code == 301
    assert redirect.headers["location"].startswith("https://localhost")
    with pytest.raises(httpx.ConnectError):
        httpx.get(proxy.url + "/healthz", timeout=10)  # a client without the CA


def test_wss_through_the_proxy_and_the_origin_check_still_applies(proxied: tuple[BridgeThread, Proxy]) -> None:
    _, proxy = proxied
    url = f"wss://localhost:{proxy.https_port}/realtime/ws?token={token('admin')}"
    with ws_connect(url, ssl=proxy.context, origin=proxy.url, open_timeout=10) as ws:  # type: ignore[arg-type]
        assert json.loads(ws.recv(10))["type"] == "welcome"
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(10))["type"] == "pong"
    with (
        ws_connect(url, ssl=proxy.context, origin="https://evil.example", open_timeout=10) as ws,  # type: ignore[arg-type]
        pytest.raises(ConnectionClosed) as closed,
    ):
        while True:
            ws.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4405


def test_sse_streams_through_the_proxy_unbuffered(proxied: tuple[BridgeThread, Proxy]) -> None:
    bridge, proxy = proxied
    headers = {"Authorization": f"Bearer {token('admin')}", "Origin": proxy.url}
    with (
        httpx.Client(base_url=proxy.url, verify=proxy.context, timeout=15) as client,
        client.stream("GET", "/realtime/events", headers=headers) as stream,
    ):
        assert stream.status_code == 200
        with httpx.Client(base_url=proxy.url, verify=proxy.context, timeout=10) as poster:
            poster.post("/realtime/test/publish", headers={"Authorization": f"Bearer {token('admin')}"},
                        json={"room": "system", "event": "system.maintenance", "data": {"note": "proxied"}})
        for line in stream.iter_lines():
            if "proxied" in line:
                break
    # the stream is closed; the server notices before the bridge stops
    wait_until(lambda: bridge.runtime.realtime.stats()["connections"] == 0, what="the SSE stream closed")
