"""Real Mosquitto brokers for tests, built from the project's own config files.

``start_mosquitto(tmp_dir, dev=..., certs=...)`` reads ``broker-config/mosquitto.conf``
(or ``mosquitto-dev.conf``), rewrites only what must differ on a test machine, and
starts ``mosquitto -c <tmp>/mosquitto.conf``:

* every ``listener`` gets a free port on 127.0.0.1 (never all interfaces);
* ``persistence_location`` and ``acl_file`` point into ``tmp_dir`` (a copy of
  broker-config/acl, plus ``acl_lines`` for test identities);
* ``cafile``, ``certfile``, ``keyfile`` and ``crlfile`` point into ``certs`` (a
  directory laid out by ``firstcare certs``: ca.pem, server.pem, server-key.pem);
* ``user root``: mosquitto started as root otherwise drops to the
  ``mosquitto`` user, which cannot write the tmp dir;
* logs go to ``<tmp_dir>/mosquitto.log`` (``log_text()``).

Everything else (queue limits, max_packet_size, autosave, ...) is the
production value, so tests prove the shipped config.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import quote

from tests.support.ports import free_port  # noqa: F401 - re-exported: tests import it from here
from tests.support.services import missing

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_CONFIG_DIR = REPO_ROOT / "broker-config"
PRODUCTION_CONF = BROKER_CONFIG_DIR / "mosquitto.conf"
DEV_CONF = BROKER_CONFIG_DIR / "mosquitto-dev.conf"
ACL_FILE = BROKER_CONFIG_DIR / "acl"

MOSQUITTO_DEFAULT_BIN = "/usr/sbin/mosquitto"
TLS_FILE_OPTIONS = ("cafile", "certfile", "keyfile", "crlfile")

# Brokers still running when the interpreter exits (a crashed script, a
# fixture without teardown) are killed rather than left behind.
_RUNNING: set[MosquittoInstance] = set()


@atexit.register
def _kill_leftovers() -> None:
    for instance in list(_RUNNING):
        instance.kill()


# Options start_mosquitto always rewrites; ``overrides`` may not touch them.
_MANAGED = frozenset(
    {"listener", "port", "bind_address", "persistence_location", "password_file",
     "acl_file", "log_dest", "user", "pid_file", *TLS_FILE_OPTIONS}
)
# Options that may legitimately appear several times in a config.
_REPEATABLE = frozenset({"listener", "log_type", "include_dir", "auth_opt"})


def require_mosquitto() -> str:
    """The mosquitto binary; else skip the test (fail it when CI=true)."""

    binary = mosquitto_binary()
    if binary is None:
        message = "mosquitto is not installed (apt-get install mosquitto): real-broker tests need it"
        missing(message)
    return binary


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable, or None when it is not installed."""
    if os.access(MOSQUITTO_DEFAULT_BIN, os.X_OK):
        return MOSQUITTO_DEFAULT_BIN
    return shutil.which("mosquitto")


def parse_config(path: Path) -> list[tuple[str, str]]:
    """(option, value) pairs of a mosquitto config, comments and blanks dropped."""
    pairs = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        pairs.append((key, value.strip()))
    return pairs


@dataclass(eq=False)
class MosquittoInstance:
    """A mosquitto process started by :func:`start_mosquitto`."""

    host: str
    port: int
    workdir: Path
    config_path: Path
    dev: bool
    # original listener port -> test port (``port`` is the first listener's)
    ports: dict[int, int] = field(default_factory=dict)
    certs: Path | None = None  # the TLS listener's certificate directory
    binary: str = MOSQUITTO_DEFAULT_BIN
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def tls(self) -> bool:
        return self.certs is not None

    @property
    def service_port(self) -> int:
        """The production config's listener for bridges and gateways (8884); else the only one."""
        return self.ports.get(8884, self.port)

    def service_url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.service_port}"

    def url(self, username: str | None = None, password: str | None = None) -> str:
        """``mqtt[s]://user:pass@127.0.0.1:PORT`` or ``mqtt[s]://127.0.0.1:PORT``."""
        scheme = "mqtts" if self.tls else "mqtt"
        if username is None:
            return f"{scheme}://{self.host}:{self.port}"
        auth = quote(username, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"{scheme}://{auth}@{self.host}:{self.port}"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or start again) on the same ports and persistence dir."""
        if self.is_running():
            raise RuntimeError("mosquitto is already running")
        with open(self.log_path, "ab") as out:  # stderr: startup errors
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                rc = self.process.returncode
                self.process = None
                _RUNNING.discard(self)
                raise RuntimeError(f"mosquitto exited with {rc} on start:\n{self.log_text()}")
            if all(_accepts(self.host, p) for p in self.ports.values()):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not accept on {self.ports} within {timeout}s:\n{self.log_text()}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): mosquitto writes its persistence file first."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL: a crash. Only what autosave already wrote survives."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.process = None
        _RUNNING.discard(self)

    def restart(self, *, crash: bool = False, timeout: float = 10.0) -> None:
        """Stop (or kill, with ``crash=True``) and start again: same port, same data."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start(timeout)

    def save(self) -> None:
        """Ask mosquitto to write its persistence file now (SIGUSR1)."""
        if self.process is not None and self.is_running():
            self.process.send_signal(signal.SIGUSR1)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def render_config(
    source: Path,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    ports: Mapping[int, int] | None = None,
    overrides: Mapping[str, str] | None = None,
    extra_lines: Sequence[str] = (),
    certs: Path | None = None,
    acl_lines: Sequence[str] = (),
) -> tuple[Path, dict[int, int]]:
    """Write a test copy of ``source`` into ``workdir``; return (path, port map)."""
    workdir = Path(workdir)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    bad = _MANAGED.intersection(overrides)
    if bad:
        raise ValueError(f"start_mosquitto manages {sorted(bad)} itself")
    port_map = dict(ports or {})
    out: list[str] = [f"# generated for tests from {source}"]
    seen: set[str] = set()
    for key, value in parse_config(source):
        if key == "listener":
            parts = value.split()
            original = int(parts[0])
            if original not in port_map:
                port_map[original] = free_port(host)
            out.append(" ".join(["listener", str(port_map[original]), host, *parts[2:]]))
        elif key == "persistence_location":
            out.append(f"persistence_location {data_dir}/")
        elif key in TLS_FILE_OPTIONS:
            if certs is None:
                raise ValueError(f"{source} has a TLS listener: pass certs= (a `firstcare certs` directory)")
            out.append(f"{key} {Path(certs) / Path(value).name}")
        elif key == "password_file":
            dest = workdir / "passwd"
            shutil.copyfile(BROKER_CONFIG_DIR / Path(value).name, dest)
            dest.chmod(0o600)
            out.append(f"password_file {dest}")
        elif key == "acl_file":
            dest = workdir / "acl"
            text = (BROKER_CONFIG_DIR / Path(value).name).read_text()
            dest.write_text(text + "".join(f"\n{line}" for line in acl_lines) + "\n")
            out.append(f"acl_file {dest}")
        elif key in ("log_dest", "user", "pid_file", "port", "bind_address"):
            continue
        elif key in overrides and key not in _REPEATABLE:
            if key not in seen:
                out.append(f"{key} {overrides[key]}")
        else:
            out.append(f"{key} {value}")
        seen.add(key)
    for key, value in overrides.items():
        if key not in seen or key in _REPEATABLE:
            out.append(f"{key} {value}")
    if not port_map:
        raise ValueError(f"{source} has no listener")
    out += ["user root", f"log_dest file {workdir / 'mosquitto.log'}", *extra_lines]
    path = workdir / "mosquitto.conf"
    path.write_text("\n".join(out) + "\n")
    return path, port_map


def start_mosquitto(
    tmp_dir: Path | str,
    dev: bool = False,
    *,
    overrides: Mapping[str, str] | None = None,
    extra_lines: Sequence[str] = (),
    binary: str | None = None,
    timeout: float = 10.0,
    certs: Path | str | None = None,
    acl_lines: Sequence[str] = (),
) -> MosquittoInstance:
    """Start a real mosquitto from broker-config/ (``dev``: mosquitto-dev.conf).

    The production config listens only with TLS: ``certs`` is the certificate
    directory (``firstcare certs`` layout) its ``cafile``/``certfile``/``keyfile``
    name; ``acl_lines`` are appended to the ACL copy (test gateways, bridges).
    ``overrides`` replaces option values (e.g. ``{"max_queued_messages": "10"}``),
    ``extra_lines`` are appended verbatim. Raises RuntimeError (with the broker
    log) if it does not come up; FileNotFoundError if mosquitto is missing.
    """
    binary = binary or mosquitto_binary()
    if binary is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    workdir = Path(tmp_dir)
    source = DEV_CONF if dev else PRODUCTION_CONF
    certs = Path(certs) if certs is not None else None
    config_path, ports = render_config(
        source, workdir, overrides=overrides, extra_lines=extra_lines, certs=certs, acl_lines=acl_lines
    )
    tls = any(key in TLS_FILE_OPTIONS for key, _ in parse_config(config_path))
    instance = MosquittoInstance(
        host="127.0.0.1",
        port=next(iter(ports.values())),
        workdir=workdir,
        config_path=config_path,
        dev=dev,
        ports=ports,
        binary=binary,
        certs=certs if tls else None,
    )
    instance.start(timeout)
    return instance
