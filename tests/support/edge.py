"""`firstcare edge` as a child process for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.support.bridge import REPO_ROOT, wait_until
from tests.support.brokers import free_port


class EdgeProcess:
    def __init__(self, tmp_path: Path, upstream_url: str, **settings: Any) -> None:
        self.local_port = settings.pop("local_port", None) or free_port()
        self.http_port = free_port()
        env: dict[str, str] = {
            "FC_EDGE_UPSTREAM_URL": upstream_url, "FC_EDGE_LOCAL_PORT": str(self.local_port),
            "FC_EDGE_LOCAL_HOST": "127.0.0.1", "FC_EDGE_HTTP_PORT": str(self.http_port),
            "FC_EDGE_SPOOL_PATH": str(tmp_path / "spool.db"), "FC_EDGE_HOSPITAL_ID": "h1",
            "FC_EDGE_GATEWAY_ID": f"gw-{tmp_path.name[-20:]}".replace(".", "-"), "FC_EDGE_LOG_LEVEL": "WARNING",
        }
        env.update({f"FC_EDGE_{k.upper()}": str(v) for k, v in settings.items()})
        self.env: Mapping[str, str] = {**os.environ, **env}
        self.log_path = tmp_path / "edge.log"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "EdgeProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "firstcare.cli", "edge"], env=self.env, cwd=REPO_ROOT,
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ward_connected, timeout=30, what=f"edge gateway up (log: {self.log_path})")
        return self

    def _ward_connected(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"edge exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            return httpx.get(self.url + "/stats", timeout=2).json()["ward"]["state"] == "connected"
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/stats", timeout=5).json()

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
