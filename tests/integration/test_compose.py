"""docker-compose.yml is valid and consistent with broker-config/ and deploy/, and fits each service.

No Docker engine is needed: Debian's ``docker-compose`` (v1) validates the file with ``config -q``
and resolves its variables with ``config``; each health check runs here against a real Mosquitto,
PostgreSQL, bridge and gateway (with the container's port swapped for the test's). The scale
profile's front (deploy/nginx.conf) is checked in tests/integration/test_scale_front.py.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from firstcare.certs_cli import gateway_acl
from firstcare.identity import file_stem, gateway_identity, parse_identity
from tests.conftest import require_postgres
from tests.support.bridge import BridgeThread, bridge_settings
from tests.support.brokers import (
    PRODUCTION_CONF,
    REPO_ROOT,
    free_port,
    parse_config,
    require_mosquitto,
    start_mosquitto,
)
from tests.support.edge import EdgeProcess
from tests.support.pki import Certs
from tests.support.services import missing

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def require_docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        missing(message)
    return binary


def compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_docker_compose()
    # Minimal environment: the file must not depend on the caller's FC_* or password variables.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([binary, "-f", "docker-compose.yml", "config", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def resolved_text(env: tuple[tuple[str, str], ...] = ()) -> str:
    """``docker-compose config`` once per run and environment (it takes seconds to start; the
    file does not change during a run)."""
    result = compose_config(env=dict(env))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def resolved(env: dict[str, str] | None = None) -> dict:
    """The file as Compose runs it: variables replaced by their defaults (or ``env``'s values)."""
    return yaml.safe_load(resolved_text(tuple(sorted((env or {}).items()))))


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
    # a system Mosquitto (1883, 8883), `firstcare up`'s embedded broker (1884), Redis, PostgreSQL
    assert not set(published) & {1883, 8883, 1884, 6379, 5432}, ports
    assert ports["mosquitto"] == [18883] and ports["redis"] == []
    # only the devices' listener: the service listener (8884) is for bridges and gateways
    assert compose()["services"]["mosquitto"]["ports"] == ["18883:8883"]
    assert ports["bridge"] == [8000] and sorted(ports["edge"]) == [1885, 8010]
    assert ports["front"] == [8080] and ports["bridge-2"] == ports["bridge-3"] == [] and ports["postgres"] == []


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
    }
    # the paths mosquitto.conf names are the ones mounted
    conf = dict(parse_config(PRODUCTION_CONF))
    assert conf["acl_file"] == "/mosquitto/config/acl" and "password_file" not in conf
    volumes = services["mosquitto"]["volumes"]
    assert "certs:/mosquitto/config/certs:ro" in volumes
    for option, value in parse_config(PRODUCTION_CONF):
        if option in ("cafile", "certfile", "keyfile"):
            assert value.startswith("/mosquitto/config/certs/"), option
    data = [v for v in volumes if v.endswith(":/mosquitto/data")]
    assert data and not data[0].startswith("."), "broker persistence needs a named volume"


def test_every_broker_client_uses_tls_with_its_own_certificate():
    services = compose()["services"]
    clients = {"bridge": ("FC_MQTT_URL", "FC_MQTT_CA_FILE", "FC_MQTT_CERT_FILE", "FC_MQTT_KEY_FILE"),
               "edge": ("FC_EDGE_UPSTREAM_URL", "FC_EDGE_CA_FILE", "FC_EDGE_CERT_FILE", "FC_EDGE_KEY_FILE")}
    for name, (url_key, ca, cert, key) in clients.items():
        env = services[name]["environment"]
        url = urlsplit(env[url_key])
        # the service listener: only the service CA's certificates, client ids kept (bridge lease)
        assert (url.scheme, url.hostname, url.port, url.username) == ("mqtts", "mosquitto", 8884, None), url
        assert "certs:/certs:ro" in services[name]["volumes"]
        assert all(env[k].startswith("/certs/") for k in (ca, cert, key))


def test_the_gateway_certificate_has_its_acl_block():
    edge = compose()["services"]["edge"]["environment"]
    identity = gateway_identity(edge["FC_EDGE_HOSPITAL_ID"], edge["FC_EDGE_GATEWAY_ID"])
    assert file_stem(identity) in edge["FC_EDGE_CERT_FILE"]
    acl = (REPO_ROOT / "broker-config" / "acl").read_text()
    assert gateway_acl(parse_identity(identity)) in acl
    assert f"--id {edge['FC_EDGE_GATEWAY_ID']}" in compose()["services"]["certs"]["command"][0]


def test_the_simulator_publishes_through_the_edge_gateway():
    services = compose()["services"]
    command = services["simulator"]["command"]
    url = urlsplit(command[command.index("--mqtt-url") + 1])
    assert (url.hostname, url.port) == ("edge", int(services["edge"]["environment"]["FC_EDGE_LOCAL_PORT"]))


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
    assert set(services) == {"certs", "mosquitto", "postgres", "redis", "bridge", "bridge-2", "bridge-3", "front",
                             "edge", "simulator"}
    # the image's default checks the bridge's port: every service built from it says what fits it
    for name, service in services.items():
        assert "healthcheck" in service, name
    assert health_check("redis") == ["CMD", "redis-cli", "ping"]
    assert health_check("simulator") == ["NONE"], "the simulator serves nothing to check"
    assert health_check("certs") == ["NONE"], "a one-shot job"
    assert services["mosquitto"]["depends_on"] == {"certs": {"condition": "service_completed_successfully"}}
    for name, port_variable in (("bridge", "FC_HTTP_PORT"), ("bridge-2", "FC_HTTP_PORT"), ("bridge-3", "FC_HTTP_PORT"),
                                ("edge", "FC_EDGE_HTTP_PORT")):
        port = services[name]["environment"][port_variable]
        assert f"http://127.0.0.1:{port}/healthz" in " ".join(health_check(name)), name
    assert "http://127.0.0.1:8080/healthz" in health_check("front"), "through the front to a bridge"
    for name in ("bridge", "bridge-2", "bridge-3", "front", "edge"):
        assert all(d["condition"] == "service_healthy" for d in services[name].get("depends_on", {}).values())
    for name in ("bridge", "bridge-2", "bridge-3"):
        assert set(services[name]["depends_on"]) == {"mosquitto", "postgres", "redis"}, name
    assert set(services["front"]["depends_on"]) == {"bridge", "bridge-2", "bridge-3"}
    assert set(services["simulator"]["depends_on"]) == {"edge", "bridge"}


# --- the scaled system (profile scale) ----------------------------------------------------------


def test_the_scale_profile_adds_two_bridges_and_the_front_to_one_cluster():
    """`docker compose up` runs one bridge; `--profile scale` adds two identical ones and the front."""
    services = resolved()["services"]
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert {name for name, p in profiles.items() if p} == {"bridge-2", "bridge-3", "front"}
    assert all(profiles[name] == ["scale"] for name in ("bridge-2", "bridge-3", "front"))
    bridges = [services[name] for name in ("bridge", "bridge-2", "bridge-3")]
    # one cluster: the same settings everywhere (one client id, whose ingest slots they share)
    assert bridges[0]["environment"] == bridges[1]["environment"] == bridges[2]["environment"]
    env = bridges[0]["environment"]
    assert urlsplit(env["FC_STORE_URL"]).hostname == "postgres" and env["FC_HUB_URL"].startswith("redis://redis:")
    assert env["FC_INGEST_SLOTS"] == "6", "two slots a bridge with three, all six with one"
    assert env["FC_AUDIT_URL"] == "sqlite:////data/audit.db", "each bridge its own audit trail, on its own volume"
    raw = compose()["services"]
    data = [next(v for v in raw[name]["volumes"] if v.endswith(":/data"))
            for name in ("bridge", "bridge-2", "bridge-3")]
    assert len(set(data)) == 3 and not any(v.startswith(".") for v in data)
    origins = env["FC_PUBLIC_ORIGINS"].split(",")
    assert "http://localhost:8080" in origins, "browsers reach the bridges through the front"
    mounted = dict(bind_mounts(compose()["services"]["front"]))
    assert mounted == {"./deploy/nginx.conf": "/etc/nginx/conf.d/default.conf"}
    upstreams = re.findall(r"^\s*server (\S+?):8000\b", (REPO_ROOT / "deploy" / "nginx.conf").read_text(), re.M)
    assert upstreams == ["bridge", "bridge-2", "bridge-3"]


def test_passwords_and_secrets_come_from_the_environment():
    """`.env` (or the environment) sets the database password once, for PostgreSQL and every bridge."""
    services = resolved({"FC_POSTGRES_PASSWORD": "s3cret-from-env", "FC_JWT_SECRET": "jwt-from-env"})["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret-from-env"
    for name in ("bridge", "bridge-2", "bridge-3"):
        env = services[name]["environment"]
        assert urlsplit(env["FC_STORE_URL"]).password == "s3cret-from-env", name
        assert env["FC_JWT_SECRET"] == "jwt-from-env", name
    assert "s3cret" not in COMPOSE_FILE.read_text()


def test_the_postgres_check_asks_the_server() -> None:
    from tests.support.postgres import admin_url

    require_postgres()
    if shutil.which("pg_isready") is None:
        pytest.fail("pg_isready (Debian's postgresql-client) is not installed")
    test = health_check("postgres")
    assert test[:2] == ["CMD", "pg_isready"]
    server = urlsplit(admin_url())

    def check(port: int) -> int:
        argv = [str(port) if a == "5432" else a for a in test[1:]]
        argv[argv.index("-h") + 1] = server.hostname or "127.0.0.1"
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    assert check(server.port or 5432) == 0
    assert check(free_port()) != 0, "nothing listening is unhealthy"


def run_mosquitto_check(broker_port: int, certs_dir: Path) -> int:
    """The compose check with the container's certificate directory swapped for ``certs_dir``."""
    kind, script = health_check("mosquitto")
    return run_check([kind, script.replace("/mosquitto/config/certs/", f"{certs_dir}/")], 8884, broker_port)


def test_the_mosquitto_check_logs_in_to_the_production_broker(tmp_path: Path, certs: Certs):
    require_mosquitto()
    if shutil.which("mosquitto_sub") is None:
        pytest.fail("mosquitto_sub (Debian's mosquitto-clients) is not installed")
    # broker-config/mosquitto.conf and acl, with a test certificate directory laid out as `certs` makes it
    broker = start_mosquitto(tmp_path / "mosquitto", dev=False, certs=certs.dir)
    try:
        assert run_mosquitto_check(broker.service_port, certs.dir) == 0
        assert run_mosquitto_check(broker.service_port, certs.rogue.dir) != 0, "another CA's certificates"
    finally:
        broker.stop()
    assert run_mosquitto_check(broker.service_port, certs.dir) != 0, "a stopped broker is unhealthy"


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


def test_the_gateway_stats_are_published_on_the_host_loopback_only() -> None:
    """/stats, /dead-letters and /quarantine name devices: not on every interface by default."""
    ports = [str(p) for p in resolved()["services"]["edge"]["ports"]]
    stats = [p for p in ports if "8010:8010" in p]  # e.g. 127.0.0.1:8010:8010/tcp
    assert stats and all(p.startswith("127.0.0.1:") for p in stats), ports
