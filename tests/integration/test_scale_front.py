"""deploy/nginx.conf, the scale profile's front, as shipped: ``nginx -t`` accepts it, and in front
of real ``firstcare bridge`` processes on one PostgreSQL and one Redis it serves REST, WebSocket
and unbuffered SSE from whichever bridge it picks, spreads streams over the bridges, and goes
round a bridge that is down. Only the upstream addresses and the listen port are swapped for the
test's (outside compose there is no ``bridge-2`` name to resolve)."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect
from websockets.typing import Origin

from tests.integration.test_https_proxy import nginx_binary
from tests.support.bridge import SECRET, BridgeProcess, token, wait_until
from tests.support.brokers import REPO_ROOT, free_port
from tests.support.devices import Device

FRONT_CONF = REPO_ROOT / "deploy" / "nginx.conf"
PATIENT = "p-front"


def front_site(upstreams: dict[str, int], port: int) -> str:
    site = FRONT_CONF.read_text()
    for host, upstream_port in upstreams.items():
        site, n = re.subn(rf"server {re.escape(host)}:8000\b", f"server 127.0.0.1:{upstream_port}", site)
        assert n == 1, host
    assert "listen 8080;" in site
    return site.replace("listen 8080;", f"listen 127.0.0.1:{port};")


def write_nginx(workdir: Path, site: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.conf").write_text(site)
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n  client_body_temp_path {workdir}/body;\n  proxy_temp_path {workdir}/proxy;\n"
        f"  fastcgi_temp_path {workdir}/fcgi;\n  uwsgi_temp_path {workdir}/uwsgi;\n"
        f"  scgi_temp_path {workdir}/scgi;\n  include {workdir}/site.conf;\n}}\n")
    return conf


def test_nginx_accepts_the_front_config(tmp_path: Path) -> None:
    conf = write_nginx(tmp_path, front_site({"bridge": free_port(), "bridge-2": free_port(), "bridge-3": free_port()},
                                            free_port()))
    result = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_the_front_config_keeps_streams_flowing() -> None:
    """What WebSocket and SSE need from the proxy, in the file itself."""
    text = FRONT_CONF.read_text()
    ws = text[text.index("location /realtime/ws"):text.index("location /realtime/events")]
    sse = text[text.index("location /realtime/events"):text.index("location / {")]
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $firstcare_connection;" in ws
    assert "proxy_buffering off;" in sse and "proxy_cache off;" in sse
    for block in (ws, sse):
        seconds = re.search(r"proxy_read_timeout (\d+)(s|h);", block)
        assert seconds is not None
        value = int(seconds.group(1)) * (3600 if seconds.group(2) == "h" else 1)
        assert value > 20 * 2, "longer than the bridges' keepalive pings (FC_WS_PING_SECONDS, 20 s)"
    assert "proxy_http_version 1.1;" in text and "least_conn;" in text


class Front:
    def __init__(self, workdir: Path, upstreams: dict[str, int], port: int) -> None:
        self.workdir = workdir
        conf = write_nginx(workdir, front_site(upstreams, port))
        self.process = subprocess.Popen([nginx_binary(), "-p", str(workdir), "-c", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        wait_until(self._up, what=f"nginx up ({workdir / 'error.log'})")

    def _up(self) -> bool:
        assert self.process.poll() is None, (self.workdir / "error.log").read_text()
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_bridge(tmp_path: Path, name: str, store_url: str, hub_url: str, origin: str) -> tuple[BridgeProcess, int]:
    mqtt_port = free_port()
    env = {"FC_MQTT_URL": "embedded", "FC_MQTT_PORT": str(mqtt_port), "FC_HTTP_PORT": str(free_port()),
           "FC_JWT_SECRET": SECRET, "FC_STORE_URL": store_url, "FC_HUB_URL": hub_url,
           "FC_MQTT_CLIENT_ID": f"bridge-{name}", "FC_PUBLIC_ORIGINS": origin,
           "FC_AUDIT_URL": f"sqlite:///{tmp_path}/{name}-audit.db", "FC_LOG_LEVEL": "WARNING"}
    return BridgeProcess(env, tmp_path / f"{name}.log").start(), mqtt_port


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[tuple[Front, list[BridgeProcess], Device]]:
    """Two bridges and a third upstream that is down (a bridge being restarted), behind the front."""
    hub_url = f"{redis_url}?prefix=front-{secrets.token_hex(4)}:"
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    a, a_mqtt = start_bridge(tmp_path, "a", pg_url, hub_url, origin)
    b, _ = start_bridge(tmp_path, "b", pg_url, hub_url, origin)
    device = Device(a_mqtt, "mon-front", device_type="monitor", will=False)
    front = None
    try:
        front = Front(tmp_path / "nginx", {"bridge": a.port, "bridge-2": b.port, "bridge-3": free_port()}, port)
        yield front, [a, b], device
    finally:
        if front is not None:
            front.stop()
        device.close()
        a.stop()
        b.stop()


def connections(bridge: BridgeProcess) -> int:
    stats = httpx.get(bridge.url + "/realtime/stats", headers={"Authorization": f"Bearer {token()}"}, timeout=10)
    return stats.json()["realtime"]["connections"]


def test_the_front_serves_rest_websocket_and_sse_from_any_bridge(
        cluster: tuple[Front, list[BridgeProcess], Device]) -> None:
    front, bridges, device = cluster
    clinician = token("clinician", sub="dr-front", hospitals=("h1",))
    auth = {"Authorization": f"Bearer {clinician}"}
    first = device.vitals({"heart_rate": 70, "spo2": 97}, patient_id=PATIENT)
    with httpx.Client(base_url=front.url, headers=auth, timeout=15) as client:
        wait_until(lambda: client.get(f"/api/patients/{PATIENT}/readings").status_code == 200,
                   what="the reading through the front")
        for _ in range(6):  # whichever bridge answers, with the down one skipped
            response = client.get(f"/api/patients/{PATIENT}/readings")
            assert response.status_code == 200
            assert [r["seq"] for r in response.json()["items"]] == [first]

    room = f"patient:{PATIENT}:vitals"
    url = front.url.replace("http", "ws") + f"/realtime/ws?token={clinician}"
    sockets = [ws_connect(url, origin=Origin(front.url), open_timeout=10) for _ in range(4)]
    try:
        for ws in sockets:
            assert json.loads(ws.recv(10))["type"] == "welcome"
            ws.send(json.dumps({"type": "subscribe", "room": room}))
            while json.loads(ws.recv(10))["type"] != "subscribed":
                pass
        # least_conn spreads the streams: both live bridges hold some
        assert all(connections(b) > 0 for b in bridges), [connections(b) for b in bridges]
        seq = device.vitals({"heart_rate": 71, "spo2": 97}, patient_id=PATIENT)
        for ws in sockets:
            while True:
                message = json.loads(ws.recv(15))
                if message["type"] == "vitals_update":
                    assert message["data"]["seq"] == seq
                    break
    finally:
        for ws in sockets:
            ws.close()

    with (
        httpx.Client(timeout=15) as client,
        client.stream("GET", front.url + f"/realtime/events/patient/{PATIENT}", params={"room": "vitals"},
                      headers={**auth, "Origin": front.url}) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        seq = device.vitals({"heart_rate": 72, "spo2": 97}, patient_id=PATIENT)
        for line in stream.iter_lines():  # arrives while the stream is open: not buffered
            if line.startswith("data:") and json.loads(line[5:]).get("seq") == seq:
                break
