"""Processes the benchmarks start: Mosquitto, the bridge, the embedded broker, peers.

Everything started here is registered, so a scenario (or an interrupted run) stops exactly
what it started, by pid, and nothing else.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
BROKER_CONFIG = REPO_ROOT / "broker-config"
SECRET = "bench-secret-that-is-long-enough-for-hs256"
PY = sys.executable

_STARTED: list[Proc] = []


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


class Proc:
    """A child process with its log in a file; stopped by pid (TERM, then KILL)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 log_dir: Path | None = None, cwd: Path = REPO_ROOT, stdin: Any = subprocess.DEVNULL,
                 stdout: Any = None) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir = log_dir or Path(tempfile.gettempdir())
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the process's life, closed in stop()
        self.popen = subprocess.Popen(self.argv, env={**os.environ, **(env or {})}, cwd=cwd, stdin=stdin,
                                      stdout=stdout if stdout is not None else self._log, stderr=self._log,
                                      start_new_session=True)
        _STARTED.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> bool:
        """True while the process runs; raises with its log's tail once it has exited."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log:\n{self.log_tail()}")
        return True

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()
        if self in _STARTED:
            _STARTED.remove(self)


@atexit.register
def stop_all() -> None:
    for proc in list(reversed(_STARTED)):
        proc.stop(timeout=5)


# --- Mosquitto --------------------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


def start_mosquitto(workdir: Path, name: str = "mosquitto") -> tuple[Proc, int]:
    """A private Mosquitto from broker-config/mosquitto-dev.conf (the production config less
    authentication): same persistence, nodelay, inflight and queue limits; a free port."""
    binary = mosquitto_binary()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    workdir = Path(workdir) / name
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [f"# generated by bench from {BROKER_CONFIG / 'mosquitto-dev.conf'}"]
    for raw in (BROKER_CONFIG / "mosquitto-dev.conf").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key = line.split()[0]
        if key == "listener":
            lines.append(f"listener {port} 127.0.0.1")
        elif key == "persistence_location":
            lines.append(f"persistence_location {workdir / 'data'}/")
        elif key in ("log_dest", "user", "pid_file", "connection_messages") or key == "log_type":
            continue
        else:
            lines.append(line)
    lines += ["user root", "log_type error", "log_type warning", "connection_messages false",
              f"log_dest file {workdir / 'mosquitto.log'}"]
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = Proc(name, [binary, "-c", str(conf)], log_dir=workdir)
    wait_for(lambda: proc.check() and accepts(port), 10, "mosquitto to accept")
    return proc, port


# --- the product ------------------------------------------------------------------------------


def bridge_env(http_port: int, mqtt_url: str, db_path: Path, mqtt_port: int | None = None,
               **extra: str) -> dict[str, str]:
    env = {
        "FC_MQTT_URL": mqtt_url,
        "FC_HTTP_PORT": str(http_port),
        "FC_JWT_SECRET": SECRET,
        "FC_STORE_URL": f"sqlite:///{db_path}",
        "FC_LOG_LEVEL": "WARNING",
        "FC_MQTT_CLIENT_ID": f"bench-bridge-{http_port}",
        "FC_MAX_CONNECTIONS_PER_USER": "100000",
        # benchmark devices come and go between phases: keep silence/offline alarms out of the way
        "FC_DEVICE_SILENT_SECONDS": "86400",
        "FC_DEVICE_OFFLINE_SECONDS": "172800",
        "FC_RETENTION_DAYS": "0",
    }
    if mqtt_port is not None:
        env["FC_MQTT_PORT"] = str(mqtt_port)
    env.update(extra)
    return env


def start_bridge(workdir: Path, mqtt_url: str, name: str = "bridge", mqtt_port: int | None = None,
                 db_path: Path | None = None, **extra: str) -> tuple[Proc, int, Path]:
    """``python -m firstcare.cli bridge`` as a user runs it; returns (proc, http port, db path)."""
    http_port = free_port()
    db_path = db_path or (Path(workdir) / f"{name}-{http_port}.db")
    env = bridge_env(http_port, mqtt_url, db_path, mqtt_port, **extra)
    proc = Proc(name, [PY, "-m", "firstcare.cli", "bridge"], env=env, log_dir=Path(workdir))
    base = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        proc.check()
        return http_get(base + "/readyz", timeout=2)[0] == 200

    wait_for(ready, 60, f"bridge /readyz (log {proc.log_path})", interval=0.1)
    return proc, http_port, db_path


def start_amqtt(workdir: Path, name: str = "amqtt") -> tuple[Proc, int]:
    """The embedded amqtt broker alone: ``python -m firstcare.cli broker``."""
    port = free_port()
    proc = Proc(name, [PY, "-m", "firstcare.cli", "broker", "--mqtt-port", str(port), "--log-level", "WARNING"],
                log_dir=Path(workdir))
    wait_for(lambda: proc.check() and accepts(port), 30, "amqtt broker to accept")
    return proc, port


def stored_count(db_path: Path) -> int:
    """Readings durably stored: a read-only SQLite count (never blocks the writer)."""
    import sqlite3

    if not Path(db_path).exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT count(*) FROM readings").fetchone()[0])
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def token(sub: str, role: str = "admin", hospitals: Sequence[str] = (), patients: Sequence[str] = (),
          ttl: int = 6 * 3600) -> str:
    from firstcare.auth import mint_token

    return mint_token(SECRET, sub, role, hospitals, patients, ttl)


# --- Node-RED ---------------------------------------------------------------------------------

NODE_RED_DIR = BENCH_DIR / "node-red"
NODE_RED_JS = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"


def node_red_installed() -> bool:
    return NODE_RED_JS.exists() and shutil.which("node") is not None


def node_red_version() -> str | None:
    pkg = NODE_RED_DIR / "node_modules" / "node-red" / "package.json"
    try:
        return json.loads(pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def node_red_flow(mqtt_port: int, routes: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """A flow of ``mqtt in`` -> ``websocket out`` pairs: (MQTT topic filter, WebSocket path).
    One route ("fc/v1/#", "/ws") is the plain flow; more routes stand in for rooms."""
    flow: list[dict[str, Any]] = [
        {"id": "tab1", "type": "tab", "label": "bench"},
        {"id": "broker1", "type": "mqtt-broker", "name": "bench", "broker": "127.0.0.1", "port": str(mqtt_port),
         "clientid": f"node-red-bench-{mqtt_port}", "autoConnect": True, "usetls": False, "protocolVersion": "4",
         "keepalive": "60", "cleansession": True},
    ]
    for i, (topic, path) in enumerate(routes):
        flow.append({"id": f"ws{i}", "type": "websocket-listener", "path": path, "wholemsg": "false"})
        flow.append({"id": f"in{i}", "type": "mqtt in", "z": "tab1", "name": "", "topic": topic, "qos": "1",
                     "datatype": "utf8", "broker": "broker1", "nl": False, "rap": False, "inputs": 0,
                     "x": 100, "y": 40 + 40 * i, "wires": [[f"out{i}"]]})
        flow.append({"id": f"out{i}", "type": "websocket out", "z": "tab1", "name": "", "server": f"ws{i}",
                     "client": "", "x": 400, "y": 40 + 40 * i, "wires": []})
    return flow


def start_node_red(workdir: Path, mqtt_port: int, routes: Sequence[tuple[str, str]],
                   name: str = "node-red") -> tuple[Proc, int]:
    """Node-RED from bench/node-red (npm install, never committed) with a generated flow."""
    if not node_red_installed():
        raise RuntimeError("Node-RED is not installed: npm install --prefix bench/node-red node-red")
    user_dir = Path(workdir) / f"{name}-user"
    user_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    flow_path = user_dir / "flows.json"
    flow_path.write_text(json.dumps(node_red_flow(mqtt_port, routes)))
    (user_dir / "settings.js").write_text(
        "module.exports = {\n"
        f"  uiPort: {port}, uiHost: '127.0.0.1', flowFile: 'flows.json',\n"
        "  httpAdminRoot: false, disableEditor: true, credentialSecret: false,\n"
        "  logging: { console: { level: 'info', metrics: false, audit: false } },\n"
        "  editorTheme: { projects: { enabled: false } }, telemetry: { enabled: false },\n"
        "  diagnostics: { enabled: false }, runtimeState: { enabled: false }\n"
        "};\n")
    proc = Proc(name, ["node", "--max-old-space-size=4096", str(NODE_RED_JS), "-u", str(user_dir),
                       "-s", str(user_dir / "settings.js"), "-p", str(port), str(flow_path)],
                log_dir=Path(workdir))
    wait_for(lambda: proc.check() and accepts(port) and "Connected to broker" in proc.log_tail(100000), 60,
             f"Node-RED to listen and reach the broker (log {proc.log_path})", interval=0.1)
    return proc, port
