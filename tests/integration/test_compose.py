"""docker-compose.yml is valid and consistent with broker-config/.

No Docker engine is needed: Debian's ``docker-compose`` (v1) validates the file
with ``config -q``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from tests.support.brokers import DEV_CREDENTIALS, PASSWD_FILE, REPO_ROOT

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


def test_compose_file_validates():
    binary = require_docker_compose()
    # Minimal environment: the file must not depend on the caller's FC_* variables.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [binary, "-f", "docker-compose.yml", "config", "-q"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
    services = compose()["services"]
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
