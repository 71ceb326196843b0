"""docker-compose.yml is valid and consistent with broker-config/, and fits each service.

No Docker engine is needed: Debian's ``docker-compose`` (v1) validates the file with ``config -q``
and resolves its variables with ``config``; each health check runs here against a real Mosquitto,
bridge and gateway (with the container's port swapped for the test's).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from tests.support.bridge import BridgeThread, bridge_settings
from tests.support.brokers import (DEV_CREDENTIALS, PASSWD_FILE, REPO_ROOT, free_port, require_mosquitto,
                                   start_mosquitto)
from tests.support.edge import EdgeProcess

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def require_docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def compose_config(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_docker_compose()
    # Minimal environment: the file must not depend on the caller's FC_* or password variables.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([binary, "-f", "docker-compose.yml", "config", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def resolved() -> dict:
    """The file as Compose runs it: variables replaced by their defaults."""
    result = compose_config()
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_validates():
    result = compose_config("-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" not in compose(), "the Compose Specification has no version key"


def test_the_docs_use_one_compose_syntax():
    """`docker compose ...` (v2) everywhere; `docker-compose` only names the file or Debian's package."""
    for path in ("README.md", "docker-compose.yml", "Dockerfile", "broker-config/README.md"):
        old = re.findall(r"docker-compose (?:up|down|exec|run|build|logs|ps|kill|pull|restart|stop|cp)\b",
                         (REPO_ROOT / path).read_text())
        assert old == [], f"{path}: {old}"


def host_ports() -> dict[str, list[int]]:
    ports = {}
    for name, service in compose()["services"].items():
        ports[name] = [int(str(p).rsplit(":", 2)[-2]) for p in service.get("ports", [])]
    return ports


def test_host_ports_leave_room_for_what_already_runs_on_a_host():
    ports = host_ports()
    published = [port for service in ports.values() for port in service]
    assert len(published) == len(set(published)), ports
    # a system Mosquitto (1883), `firstcare up`'s embedded broker (1884), Redis, PostgreSQL
    assert not set(published) & {1883, 1884, 6379, 5432}, ports
    assert ports["mosquitto"] == [11883] and ports["redis"] == []
    assert ports["bridge"] == [8000] and sorted(ports["edge"]) == [1885, 8010]


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append((source, target))
    return mounts


def test_compose_mounts_exist_and_match_mosquitto_conf():
    services = compose()["services"]
    for name, service in services.items():
        for source, _target in bind_mounts(service):
            assert (REPO_ROOT / source).is_file(), f"{name} mounts missing {source}"
    mounted = dict(bind_mounts(services["mosquitto"]))
    assert mounted == {
        "./broker-config/mosquitto.conf": "/mosquitto/config/mosquitto.conf",
        "./broker-config/acl": "/mosquitto/config/acl",
        "./broker-config/passwd": "/mosquitto/config/passwd",
    }
    # the paths mosquitto.conf names are the ones mounted
    conf = (REPO_ROOT / "broker-config" / "mosquitto.conf").read_text()
    assert "password_file /mosquitto/config/passwd" in conf
    assert "acl_file /mosquitto/config/acl" in conf
    data = [v for v in services["mosquitto"]["volumes"] if v.endswith(":/mosquitto/data")]
    assert data and not data[0].startswith("."), "broker persistence needs a named volume"


def mosquitto_password_ok(user: str, password: str, passwd: Path = PASSWD_FILE) -> bool:
    """Check a password against a mosquitto_passwd ($7$ = PBKDF2-SHA512) entry."""
    for line in passwd.read_text().splitlines():
        name, _, encoded = line.partition(":")
        if name != user:
            continue
        _, kind, iterations, salt, digest = encoded.split("$")
        assert kind == "7", f"unexpected hash type ${kind}$ for {user}"
        derived = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations), 64
        )
        return hmac.compare_digest(base64.b64encode(derived).decode(), digest)
    return False


def compose_mqtt_urls() -> dict[str, str]:
    """The broker account each service uses on Mosquitto (see broker-config/acl)."""
    services = resolved()["services"]
    return {"bridge": services["bridge"]["environment"]["FC_MQTT_URL"],
            "gateway": services["edge"]["environment"]["FC_EDGE_UPSTREAM_URL"]}


def test_compose_credentials_are_in_passwd():
    for account, url in compose_mqtt_urls().items():
        parts = urlsplit(url)
        assert parts.hostname == "mosquitto" and parts.port == 1883, url
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        assert user == account, f"should log in as {account!r} (see broker-config/acl)"
        assert mosquitto_password_ok(user, password), f"{account}: password not in passwd"


def test_the_simulator_publishes_through_the_edge_gateway():
    services = compose()["services"]
    command = services["simulator"]["command"]
    url = urlsplit(command[command.index("--mqtt-url") + 1])
    assert (url.hostname, url.port) == ("edge", int(services["edge"]["environment"]["FC_EDGE_LOCAL_PORT"]))


def test_passwd_holds_exactly_the_documented_dev_users():
    for user, password in DEV_CREDENTIALS.items():
        assert mosquitto_password_ok(user, password), user
    users = [line.split(":")[0] for line in PASSWD_FILE.read_text().splitlines() if line]
    assert sorted(users) == sorted(DEV_CREDENTIALS)


def health_check(service: str) -> list[str]:
    return resolved()["services"][service]["healthcheck"]["test"]


def run_check(test: list[str], port_in_container: int, port: int, env: dict[str, str] | None = None) -> int:
    """Run a compose health check here, against ``port`` instead of the container's own port."""
    kind, *command = test
    if kind == "CMD-SHELL":
        script = command[0].replace("$$", "$").replace(f"-p {port_in_container} ", f"-p {port} ")
        argv = ["sh", "-c", script]
    else:
        assert kind == "CMD", test
        argv = [sys.executable if a == "python" else a.replace(f":{port_in_container}/", f":{port}/") for a in command]
    return subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, timeout=30).returncode


def test_every_service_has_its_own_health_check():
    services = resolved()["services"]
    assert set(services) == {"mosquitto", "redis", "bridge", "edge", "simulator"}
    # the image's default checks the bridge's port: every service built from it says what fits it
    for name, service in services.items():
        assert "healthcheck" in service, name
    assert health_check("redis") == ["CMD", "redis-cli", "ping"]
    assert health_check("simulator") == ["NONE"], "the simulator serves nothing to check"
    for name, port_variable in (("bridge", "FC_HTTP_PORT"), ("edge", "FC_EDGE_HTTP_PORT")):
        port = services[name]["environment"][port_variable]
        assert f"http://127.0.0.1:{port}/healthz" in " ".join(health_check(name)), name
    for name in ("mosquitto", "bridge", "edge"):
        assert all(d["condition"] == "service_healthy" for d in services[name].get("depends_on", {}).values())
    assert set(services["simulator"]["depends_on"]) == {"edge", "bridge"}


def test_the_mosquitto_check_logs_in_to_the_production_broker(tmp_path: Path):
    require_mosquitto()
    if shutil.which("mosquitto_sub") is None:
        pytest.fail("mosquitto_sub (Debian's mosquitto-clients) is not installed")
    services = resolved()["services"]
    env = services["mosquitto"]["environment"]
    broker = start_mosquitto(tmp_path / "mosquitto", dev=False)  # broker-config/mosquitto.conf, passwd, acl
    try:
        assert run_check(health_check("mosquitto"), 1883, broker.port, env) == 0
        assert run_check(health_check("mosquitto"), 1883, broker.port, {"MQTT_BRIDGE_PASSWORD": "wrong"}) != 0
    finally:
        broker.stop()
    assert run_check(health_check("mosquitto"), 1883, broker.port, env) != 0, "a stopped broker is unhealthy"


def test_the_bridge_check_asks_the_bridge(tmp_path: Path):
    with BridgeThread(bridge_settings(tmp_path)) as bridge:
        assert run_check(health_check("bridge"), 8000, bridge.settings.http_port) == 0
    assert run_check(health_check("bridge"), 8000, bridge.settings.http_port) != 0


def test_the_edge_check_asks_the_gateway_on_its_own_port(tmp_path: Path):
    edge = EdgeProcess(tmp_path, f"mqtt://127.0.0.1:{free_port()}").start()  # upstream down: still alive
    try:
        assert run_check(health_check("edge"), 8010, edge.http_port) == 0
    finally:
        edge.stop()
    assert run_check(health_check("edge"), 8010, edge.http_port) != 0
