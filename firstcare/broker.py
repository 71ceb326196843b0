"""The embedded MQTT broker (amqtt), for development, demos and QA.

``firstcare broker`` runs it alone; ``firstcare up`` and ``firstcare edge`` run it in-process.
Its configuration is ``broker-config/amqtt.yaml``; the listener address comes from settings.

With :class:`BrokerTls` it enforces what the production Mosquitto does (broker-config/): the
listener speaks only TLS, a client without a certificate from the configured CA fails the
handshake, the certificate's common name is the client's identity, a device's client id is
replaced by its identity (so no device can take over or delete another client's session, the
bridge's included), and :mod:`firstcare.identity` decides every publish, will, subscription and
delivery. Bridges and gateways keep the client ids they choose (the bridge's lease connection
needs a second one), as on Mosquitto's service listener.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from firstcare.errors import BrokerError, ConfigError
from firstcare.identity import Identity, may_publish, may_read, parse_identity
from firstcare.tls import peer_identity, server_context

log = logging.getLogger("firstcare.broker")

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


def _identity(session: Session | None) -> Identity | None:
    name = getattr(session, "username", None)
    if not name:
        return None
    try:
        return parse_identity(name)
    except ConfigError:
        return None


class CertificateAuthPlugin(BaseAuthPlugin):
    """TLS listeners: the client is who its verified certificate says (the identity was put on
    the session by :class:`_IdentityBroker` from this connection's handshake). A certificate
    whose name follows no identity rule, or a last will on a topic the identity may not write,
    refuses the connection (Mosquitto accepts such a will and drops it later)."""

    @dataclass
    class Config:
        root: str = "fc"

    async def authenticate(self, *, session: Session) -> bool:
        identity = _identity(session)
        if identity is None:
            log.warning("refused a client whose certificate names no valid identity (%r)", session.username)
            return False
        if session.will_flag and not may_publish(identity, session.will_topic or "", self.config.root):
            log.warning("refused %s: its last will is on %r, a topic it may not write", identity.name,
                        session.will_topic)
            return False
        session.is_anonymous = False
        return True


class IdentityTopicPlugin(BaseTopicPlugin):
    """Publish, subscribe and delivery decided by :mod:`firstcare.identity` (the same rule as
    broker-config/acl). ``readers`` names identities besides the bridge that may read under the
    root (an edge gateway reading its own ward broker)."""

    @dataclass
    class Config:
        root: str = "fc"
        readers: list[str] = field(default_factory=list)

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        identity = _identity(session)
        if identity is None or topic is None:
            return False
        if action == Action.PUBLISH:
            return may_publish(identity, topic, self.config.root)
        return may_read(identity, topic, self.config.root, frozenset(self.config.readers))


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """The embedded broker's TLS listener: its server certificate, the CA whose client
    certificates it accepts, and who besides ``bridge`` may read."""

    cert_file: str
    key_file: str
    client_ca_file: str
    readers: tuple[str, ...] = ()
    root: str = "fc"


class _IdentityBroker(Broker):
    """amqtt with three fixes for TLS identities (amqtt 0.12):

    * a client certificate is required (amqtt asks for one but lets a client without one in);
    * the identity comes from *this* connection's certificate: amqtt keeps the SSL object of
      the first connection on a stored session and would authenticate a later one with it;
    * a device's client id is replaced by its identity before amqtt looks up, takes over or
      deletes a session, which it does before authentication: otherwise any device could delete
      the bridge's queued messages by connecting with its client id and clean session on.
      Bridges and gateways (trusted services) keep theirs.

    It also sends retained messages only for the connecting client's own subscriptions, each
    checked against the topic rule (amqtt sends every retained message matching anyone's).
    """

    tls: BrokerTls | None = None

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:  # type: ignore[override]
        assert self.tls is not None
        return server_context(self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file,
                              require_client_cert=True)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str, remote_port: int
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        if self.tls is None:
            return await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        # amqtt's own method, with the identity pinned before any session is looked up.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        ssl_object = writer.get_ssl_info()
        identity = peer_identity(ssl_object)
        if identity is None:  # cannot pass the CERT_REQUIRED handshake; refuse all the same
            await writer.close()
            raise MQTTError(f"{remote_address}:{remote_port} presented no client certificate")
        try:
            pinned = parse_identity(identity).kind == "device"
        except ConfigError:
            pinned = True  # refused by the auth plugin below; meanwhile it touches only its own name
        if pinned or not session.client_id:
            session.client_id = identity if pinned else gen_client_id()
        session.username = identity
        session.password = None
        session.ssl_object = ssl_object
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            stored, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "ssl_object", "remote_address", "remote_port"):
                setattr(stored, name, getattr(session, name))
            session = stored
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        if not any(s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, [])):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = [asyncio.create_task(handler.mqtt_publish(r.topic, r.data, min(qos, r.qos or qos), retain=True))
                 for topic, r in list(self._retained_messages.items())
                 if self._matches(topic, topic_filter) and await self._topic_filtering(session, topic, Action.RECEIVE)]
        if tasks:
            await asyncio.wait(tasks)


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
    def __init__(self, host: str = "127.0.0.1", port: int = 1884, config_path: Path | None = None,
                 tls: BrokerTls | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        config = load_config(config_path)
        config.setdefault("listeners", {}).setdefault("default", {"type": "tcp"})
        config["listeners"]["default"]["bind"] = f"{host}:{port}"
        if tls is not None:
            # TLS only, and the identity rule replaces whatever plugins the file names.
            config["listeners"] = {"default": {**config["listeners"]["default"], "ssl": True,
                                               "certfile": tls.cert_file, "keyfile": tls.key_file,
                                               "cafile": tls.client_ca_file}}
            config["plugins"] = {
                "firstcare.broker.CertificateAuthPlugin": {"root": tls.root},
                "firstcare.broker.IdentityTopicPlugin": {"root": tls.root, "readers": list(tls.readers)},
            }
        self._config = config
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    async def start(self) -> None:
        check_port_free(self.host, self.port, "MQTT")
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        broker_class = type("FirstCareBroker", (_IdentityBroker,), {"tls": self.tls})
        self._broker = broker_class(self._config, loop=asyncio.get_running_loop())
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
