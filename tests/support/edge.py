"""`firstcare edge` as a child process for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support.bridge import wait_until
from tests.support.brokers import free_port
from tests.support.process import ChildProcess


class EdgeProcess(ChildProcess):
    command = ("edge",)

    def __init__(self, tmp_path: Path, upstream_url: str, **settings: Any) -> None:
        self.local_port = settings.pop("local_port", None) or free_port()
        self.http_port = free_port()
        self.spool_path = Path(settings.get("spool_path") or tmp_path / "spool.db")
        env: dict[str, str] = {
            "FC_EDGE_UPSTREAM_URL": upstream_url, "FC_EDGE_LOCAL_PORT": str(self.local_port),
            "FC_EDGE_LOCAL_HOST": "127.0.0.1", "FC_EDGE_HTTP_PORT": str(self.http_port),
            "FC_EDGE_SPOOL_PATH": str(self.spool_path), "FC_EDGE_HOSPITAL_ID": "h1",
            "FC_EDGE_GATEWAY_ID": f"gw-{tmp_path.name[-20:]}".replace(".", "-"), "FC_EDGE_LOG_LEVEL": "WARNING",
        }
        env.update({f"FC_EDGE_{k.upper()}": str(v) for k, v in settings.items()})
        super().__init__(env, tmp_path / "edge.log")
        self.url = f"http://127.0.0.1:{self.http_port}"
        token = settings.get("http_token")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def start(self) -> EdgeProcess:
        self._spawn(wait_until, "edge gateway up")
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).json()["checks"]["ward"] in ("connected", "listening")
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/stats", timeout=5, headers=self.headers).json()
