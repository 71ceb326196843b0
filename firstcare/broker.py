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

With an ``intake`` (the edge gateway's ward broker) every device publish the topic rule allows
is handed to it, and only once it has returned True (the message is committed to the gateway's
spool) does amqtt go on with the publish and acknowledge it; a device's last will goes the
same way. This is a small adapter around amqtt 0.12's publish handling (the dependency is pinned
below 0.13): :class:`_IntakeHandler` overrides one method of its protocol handler,
``handle_publish``, which amqtt runs as a task per received PUBLISH and which acknowledges
(PUBACK, or PUBREC for QoS 2) at its end. Tasks start in the order the packets arrived and the
intake queues synchronously, so each device's order is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from firstcare.errors import BrokerError, ConfigError
from firstcare.identity import Identity, may_publish, may_read, parse_identity
from firstcare.payloads import Inbound, now_ms
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
    the session by :class:`_AdaptedBroker` from this connection's handshake). A certificate
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


CONNECT_TIMEOUT_S = 10.0
"""A connection that has not sent its CONNECT by then is closed (amqtt would wait forever)."""

Intake = Callable[[Inbound], Awaitable[bool]]
"""Takes a device publish; returns True once it is durably kept (acknowledge it), False when it
was not kept (the gateway is stopping: no acknowledgement, the device sends it again later)."""


class _IntakeHandler(BrokerProtocolHandler):
    """amqtt's protocol handler, with the intake between receipt and acknowledgement."""

    intake: Callable[[Session, PublishPacket], Awaitable[bool]] | None = None

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        if self.intake is not None and self.session is not None and publish_packet.topic_name is not None \
                and publish_packet.data is not None and not await self.intake(self.session, publish_packet):
            return  # not kept: never acknowledged
        await super().handle_publish(publish_packet)


class _AdaptedBroker(Broker):
    """amqtt 0.12 with what the product needs from it.

    For TLS identities:

    * a client certificate is required (amqtt asks for one but lets a client without one in);
    * the identity comes from *this* connection's certificate: amqtt keeps the SSL object of
      the first connection on a stored session and would authenticate a later one with it;
    * a device's client id is replaced by its identity before amqtt looks up, takes over or
      deletes a session, which it does before authentication: otherwise any device could delete
      the bridge's queued messages by connecting with its client id and clean session on.
      Bridges and gateways (trusted services) keep theirs.

    It also sends retained messages only for the connecting client's own subscriptions, each
    checked against the topic rule (amqtt sends every retained message matching anyone's).

    With ``intake``: publishes (and wills) the topic rule allows reach it before amqtt
    acknowledges them (see the module docstring); ``denied`` counts those it does not allow,
    which are acknowledged and dropped as MQTT 3.1.1 brokers do.

    Every connection is closed when it ends, whatever ended it: amqtt leaves the socket of a
    connection whose CONNECT it could not read open, and waits for a CONNECT without a bound
    (an MQTT 5 CONNECT, which it misreads, waited forever). Here a CONNECT must come within
    ``CONNECT_TIMEOUT_S``, and :meth:`close_streams` closes what is still open at shutdown.
    """

    tls: BrokerTls | None = None
    intake: Intake | None = None
    denied = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streams: set[asyncio.StreamWriter] = set()

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        self._streams.add(writer)
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            self._streams.discard(writer)
            writer.close()

    def close_streams(self) -> None:
        for writer in list(self._streams):
            writer.close()

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        assert self.tls is not None
        return server_context(self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file,
                              require_client_cert=True)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str, remote_port: int
                                         ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt's own method, with our handler, and with a TLS identity pinned before any session
        # is looked up.
        try:
            handler, session = await asyncio.wait_for(
                _IntakeHandler.init_from_connect(reader, writer, self.plugins_manager), CONNECT_TIMEOUT_S)
        except TimeoutError as exc:
            await _close_quietly(writer)
            raise AMQTTError(f"{remote_address}:{remote_port} sent no CONNECT within {CONNECT_TIMEOUT_S:.0f}s") from exc
        except (AMQTTError, NoDataError) as exc:
            await _close_quietly(writer)
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await _close_quietly(writer)
            raise MQTTError(exc) from exc
        if self.intake is not None:
            handler.intake = self._take
        if self.tls is not None:
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
        elif not session.client_id:
            session.client_id = gen_client_id()
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

    async def _take(self, session: Session, packet: PublishPacket) -> bool:
        """A device publish for the intake: the topic rule first (a publish it forbids is
        acknowledged and dropped, as amqtt does after acknowledging)."""
        assert self.intake is not None and packet.topic_name is not None and packet.data is not None
        return await self._take_message(session, packet.topic_name, bytes(packet.data), bool(packet.retain_flag))

    async def _take_message(self, session: Session, topic: str, data: bytes, retain: bool) -> bool:
        assert self.intake is not None
        if not await self._topic_filtering(session, topic, Action.PUBLISH):
            self.denied += 1
            return True
        return await self.intake(Inbound(topic, data, now_ms(), retain))

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        """A device gone without DISCONNECT: its will reaches the intake (amqtt broadcasts it
        to subscribers only)."""
        result = disconnect_waiter.result()
        if (self.intake is not None and not isinstance(result, DisconnectPacket) and client_session.will_flag
                and client_session.will_topic and client_session.will_message is not None):
            await self._take_message(client_session, client_session.will_topic, bytes(client_session.will_message),
                                     bool(client_session.will_retain))
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

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


async def _close_quietly(writer: Any) -> None:
    """amqtt's close drains and writes EOF first, which fails on a connection already gone."""
    with contextlib.suppress(Exception):
        await writer.close()


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
                 tls: BrokerTls | None = None, intake: Intake | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.intake = intake
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
        broker_class = type("FirstCareBroker", (_AdaptedBroker,), {"tls": self.tls, "intake": self.intake})
        self._broker = broker_class(self._config, loop=asyncio.get_running_loop())
        try:
            await self._broker.start()
        except Exception as exc:
            raise BrokerError(f"embedded broker failed to start on {self.host}:{self.port}: {exc}") from exc

    @property
    def denied(self) -> int:
        """Publishes the topic rule refused (acknowledged and dropped)."""
        return self._broker.denied if isinstance(self._broker, _AdaptedBroker) else 0

    def clients(self) -> int:
        """Clients connected now."""
        if self._broker is None:
            return 0
        return sum(1 for session, _ in list(self._broker._sessions.values()) if session.transitions.is_connected())

    def stop_listening(self) -> None:
        """Accept no new connection (the connected clients stay until :meth:`stop`)."""
        if self._broker is not None:
            for server in self._broker._servers.values():
                if server.instance is not None:
                    server.instance.close()

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            try:
                await asyncio.wait_for(broker.shutdown(), 10)
            except Exception:  # noqa: BLE001 - shutting down; nothing left to protect
                logging.getLogger("firstcare.broker").warning("embedded broker did not shut down cleanly",
                                                              exc_info=True)
            if isinstance(broker, _AdaptedBroker):
                broker.close_streams()
                await asyncio.sleep(0)  # let the closed connections' tasks end
