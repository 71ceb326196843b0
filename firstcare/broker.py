"""The embedded MQTT broker (amqtt), for development, demos and QA.

``firstcare broker`` runs it alone; ``firstcare up`` and ``firstcare edge`` run it in-process.
Its configuration is ``broker-config/amqtt.yaml``; the listener address comes from settings.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import logging
import socket
from pathlib import Path
from typing import Any

import yaml
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from firstcare.errors import BrokerError

CONFIG_PATH = Path(__file__).resolve().parent.parent / "broker-config" / "amqtt.yaml"
_FALLBACK_CONFIG: dict[str, Any] = {
    "listeners": {"default": {"type": "tcp", "max_connections": 5000}},
    "plugins": {"firstcare.broker.NamedSessionAuthPlugin": {}},
}


class NamedSessionAuthPlugin(BaseAuthPlugin):
    """Accept everyone; only clients without a username count as anonymous (amqtt discards
    queued messages of anonymous sessions)."""

    async def authenticate(self, *, session: Session) -> bool:
        session.is_anonymous = not session.username
        return True


def load_config(path: Path | None = None) -> dict[str, Any]:
    path = path or CONFIG_PATH
    if path.exists():
        with path.open() as f:
            return yaml.safe_load(f) or {}
    return copy.deepcopy(_FALLBACK_CONFIG)


def check_port_free(host: str, port: int, what: str, flag: str | None = None, variable: str | None = None) -> None:
    """Fail early with a message a person can act on, instead of a traceback from deep inside:
    ``HTTP port 127.0.0.1:8000 is already in use; choose another with --http-port or FC_HTTP_PORT``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                how = (f"{flag} or {variable}" if flag and variable
                       else "the flag or FC_ variable shown in --help")
                raise BrokerError(f"{what} port {host}:{port} is already in use; choose another with {how}",
                                  "port_in_use") from exc
            raise BrokerError(f"cannot bind {what} to {host}:{port}: {exc}") from exc


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1884, config_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        config = load_config(config_path)
        config.setdefault("listeners", {}).setdefault("default", {"type": "tcp"})
        config["listeners"]["default"]["bind"] = f"{host}:{port}"
        self._config = config
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        check_port_free(self.host, self.port, "MQTT")
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(self._config, loop=asyncio.get_running_loop())
        try:
            await self._broker.start()
        except Exception as exc:
            raise BrokerError(f"embedded broker failed to start on {self.host}:{self.port}: {exc}") from exc

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            try:
                await asyncio.wait_for(broker.shutdown(), 10)
            except Exception:  # noqa: BLE001 - shutting down; nothing left to protect
                logging.getLogger("firstcare.broker").warning("embedded broker did not shut down cleanly", exc_info=True)
