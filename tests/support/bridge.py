"""Run a real bridge for tests: in-process (uvicorn in a thread, so a test can reach the
runtime and the hub) or as a ``firstcare bridge`` subprocess (so a test can SIGKILL it)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import uvicorn

from bridge.app import Runtime, create_app
from bridge.hub import Delivery, Subscriber
from bridge.server import server_config
from firstcare.auth import mint_token
from firstcare.settings import Settings
from tests.support.brokers import free_port
from tests.support.process import ChildProcess

T = TypeVar("T")
SECRET = "test-secret-that-is-long-enough-for-hs256"


def wait_until(predicate: Callable[[], T | Literal[False] | None], timeout: float = 15.0, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll until ``predicate()`` is truthy, and return that value (so ``False`` and ``None``
    are not part of what it returns); generous timeouts, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def bridge_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": "embedded", "mqtt_port": free_port(), "http_port": free_port(),
        "store_url": f"sqlite:///{tmp_path}/bridge.db", "jwt_secret": SECRET, "log_level": "WARNING",
        # beside the SQLite store, as by default; with a PostgreSQL store still this bridge's own
        # (one writer per trail: two bridges of one test must not share one)
        "audit_url": f"sqlite:///{tmp_path}/bridge-audit.db",
        "mqtt_client_id": f"bridge-{os.getpid()}-{free_port()}",
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


def token(role: str = "admin", sub: str | None = None, hospitals: tuple[str, ...] = (),
          patients: tuple[str, ...] = (), ttl: int = 3600) -> str:
    return mint_token(SECRET, sub or role, role, hospitals, patients, ttl)


class BridgeThread:
    """``create_app(settings)`` served by uvicorn on its own thread and event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.url = f"{'https' if settings.http_cert_file else 'http'}://127.0.0.1:{settings.http_port}"
        self._server = uvicorn.Server(server_config(self.app, settings, host="127.0.0.1", log_level="warning"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._server.serve())
        self._loop.close()

    def start(self) -> BridgeThread:
        self._thread.start()
        wait_until(lambda: self._server.started or not self._thread.is_alive(), what="bridge start")
        if not self._server.started:
            raise RuntimeError("bridge failed to start")
        wait_until(lambda: self.runtime.ingest.connected, what="bridge MQTT connection")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    @property
    def runtime(self) -> Runtime:
        return self.app.state.runtime

    @property
    def mqtt_port(self) -> int:
        return self.runtime.mqtt_target.port

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def subscribe(self, *rooms: str, maxsize: int = 1000) -> Subscriber:
        async def join() -> Subscriber:
            subscriber = Subscriber(maxsize=maxsize)
            for room in rooms:
                self.runtime.hub.join(subscriber, room)
            return subscriber

        return self.call(join())

    def receive(self, subscriber: Subscriber, n: int, timeout: float = 15.0) -> list[Delivery]:
        async def take() -> list[Delivery]:
            return [await asyncio.wait_for(subscriber.get(), timeout) for _ in range(n)]

        return self.call(take(), timeout * n + 5)

    def receive_until(self, subscriber: Subscriber, predicate: Callable[[dict[str, Any]], bool],
                      timeout: float = 30.0) -> dict[str, Any]:
        """Read envelopes until one matches ``predicate``; return it."""
        import json

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for a matching event")
            envelope = json.loads(self.receive(subscriber, 1, timeout=remaining)[0].data)
            if predicate(envelope):
                return envelope

    def pending(self, subscriber: Subscriber) -> int:
        return subscriber.qsize()

    def http(self, role: str = "admin", **claims: Any) -> httpx.Client:
        """A client with a token; over HTTPS it trusts the CA the bridge's MQTT settings name."""
        verify: Any = True
        if self.settings.http_cert_file:
            import ssl

            verify = ssl.create_default_context(cafile=self.settings.mqtt_ca_file)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token(role, **claims)}"},
                            timeout=15, verify=verify)

    def async_http(self, role: str = "admin", **claims: Any) -> httpx.AsyncClient:
        """:meth:`http` for a test's own event loop: one connection for many requests."""
        verify: Any = True
        if self.settings.http_cert_file:
            import ssl

            verify = ssl.create_default_context(cafile=self.settings.mqtt_ca_file)
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {token(role, **claims)}"},
                                 timeout=15, verify=verify)

    def stats(self) -> dict[str, Any]:
        with self.http() as client:
            return client.get("/realtime/stats").json()

    def __enter__(self) -> BridgeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BridgeProcess(ChildProcess):
    """``firstcare bridge`` as a child process, configured through ``FC_*`` variables."""

    command = ("bridge",)

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.port = int(env["FC_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> BridgeProcess:
        self._spawn(wait_until, "bridge process ready")
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
