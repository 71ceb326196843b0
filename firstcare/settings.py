"""Settings: read once from an injectable mapping (``FC_*`` environment variables), then
overridden by CLI flags, validated with errors that name the key and the value.

Tests build ``Settings.from_env({"FC_HTTP_PORT": "0", ...})`` instead of patching os.environ.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self
from urllib.parse import urlsplit

from firstcare.errors import ConfigError
from firstcare.mqtt import URL_GRAMMAR, MqttTarget, is_tls_url
from firstcare.topics import check_root, is_valid_id

PREFIX = "FC_"
MQTT_PROTOCOLS = ("3.1.1", "5")
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class EnvSettings:
    """Read a frozen settings dataclass from ``{PREFIX}{FIELD}`` variables, validate it, and
    describe it for the README. Subclasses set ``PREFIX`` and implement ``validate``."""

    PREFIX = PREFIX

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = cls.PREFIX + f.name.upper()
            if key in environ and environ[key] != "":
                values[f.name] = _convert(key, f.type, environ[key])
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Self:
        updated = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[type-var]
        updated.validate()
        return updated

    def validate(self) -> None:
        raise NotImplementedError

    def bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{self.PREFIX}{name.upper()}={getattr(self, name)!r}: {why}")

    def check_mqtt_url(self, name: str, allow_embedded: bool = True) -> None:
        value = getattr(self, name)
        if allow_embedded and value == "embedded":
            return
        try:
            MqttTarget.parse(value)  # the one MQTT URL parser
        except ValueError:
            raise self.bad(name, ("expected 'embedded' or " if allow_embedded else "expected ") + URL_GRAMMAR) from None

    def is_tls_url(self, name: str) -> bool:
        return is_tls_url(getattr(self, name))

    def check_files(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and not os.path.isfile(value):
                raise self.bad(name, "no such file")

    def check_pair(self, cert: str, key: str) -> None:
        if (getattr(self, cert) is None) != (getattr(self, key) is None):
            raise self.bad(cert if getattr(self, cert) is None else key,
                           f"set both {self.PREFIX}{cert.upper()} and {self.PREFIX}{key.upper()}, or neither")

    def check_tls_client(self, url: str, ca: str, cert: str, key: str) -> None:
        """Certificate settings of an MQTT client: both halves of a pair, files that exist,
        and only with an ``mqtts://`` URL (a certificate on a plain connection protects nothing)."""
        self.check_pair(cert, key)
        self.check_files(ca, cert, key)
        if getattr(self, url) != "embedded" and not self.is_tls_url(url):
            for name in (ca, cert, key):
                if getattr(self, name) is not None:
                    raise self.bad(name, f"only applies to mqtts:// URLs ({self.PREFIX}{url.upper()} is plain MQTT)")

    def check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise self.bad(name, "must be at least 1")

    def check_not_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise self.bad(name, "must be a finite number, not negative")

    def check_ports(self, *names: str) -> None:
        for name in names:
            if not 0 <= getattr(self, name) <= 65535:
                raise self.bad(name, "must be a port number 0..65535")

    @classmethod
    def table(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) rows for the README's configuration tables."""
        rows = []
        for f in fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else ""
            rows.append((cls.PREFIX + f.name.upper(), "" if default in (None, ()) else str(default),
                         f.metadata.get("doc", "")))
        return rows


@dataclass(frozen=True)
class Settings(EnvSettings):
    """Every bridge setting, its default, and (in ``metadata['doc']``) the README description."""

    mqtt_url: str = field(default="embedded", metadata={"doc": "`embedded` runs the amqtt broker in-process; else `mqtts://host:port` (TLS, port 8883 by default; the production Mosquitto's listener for the bridge is 8884) or `mqtt://user:pass@host:port`"})
    mqtt_host: str = field(default="127.0.0.1", metadata={"doc": "bind address of the embedded broker"})
    mqtt_port: int = field(default=1884, metadata={"doc": "port of the embedded broker (1884 so it can sit beside a system Mosquitto on 1883)"})
    mqtt_client_id: str = field(default="firstcare-bridge", metadata={"doc": "fixed client id of the bridge's persistent MQTT session (`[A-Za-z0-9_.-]`, at most 128); one bridge per client id and broker (see Delivery guarantee)"})
    mqtt_protocol: str = field(default="3.1.1", metadata={"doc": "MQTT version of the bridge's session: `3.1.1` or `5` (the embedded broker speaks 3.1.1 only)"})
    mqtt_session_expiry_seconds: int = field(default=1209600, metadata={"doc": "MQTT 5 only: how long the broker keeps the bridge's session and queue while it is away (14 days; 0 is refused: the session would end at every disconnect)"})
    mqtt_allow_anonymous: bool = field(default=False, metadata={"doc": "`true` lets `FC_MQTT_URL` carry no username; only for a broker that keeps anonymous sessions (Mosquitto does, amqtt discards their queue)"})
    topic_root: str = field(default="fc", metadata={"doc": "root of the topic grammar: one topic level, without `+`, `#`, `$` or `/`"})
    store_url: str = field(default="sqlite:///data/firstcare.db", metadata={"doc": "`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` (one bridge per file), or `postgresql://user:password@host:port/database` (also `postgres://`; libpq parameters such as `?sslmode=require` pass through) for several bridges on one database"})
    store_busy_timeout_seconds: float = field(default=2.0, metadata={"doc": "how long a write waits for a lock held elsewhere (a locked SQLite database; a PostgreSQL row or advisory lock, as `lock_timeout`) before the batch counts as failed (retried, `/readyz` 503); keep it under 4 s so readiness turns within 5 s"})
    store_statement_timeout_seconds: float = field(default=30.0, metadata={"doc": "PostgreSQL: the longest one statement may run (`statement_timeout`; also how long a transaction may sit idle holding locks) before it is cancelled and the batch retried"})
    seq_gap_grace_seconds: float = field(default=30.0, metadata={"doc": "a sequence gap is provisional this long: a late or re-routed reading that fills it in time raises nothing; what is still missing then raises `device.seq_gap`"})
    alarm_reorder_seconds: float = field(default=30.0, metadata={"doc": "reorder window: a reading older than one of its device already stored (late) still counts towards alarms when it is at most this much older, as evidence of a condition only (it may raise, never clear); an older one is stored and shown but not evaluated"})
    hub_url: str = field(default="memory://", metadata={"doc": "fan-out hub: `memory://` (one process) or `redis://host:port/db` (several processes share rooms; `?prefix=` namespaces the keys)"})
    jwt_secret: str | None = field(default=None, metadata={"doc": "HS256 shared secret (`firstcare up` makes one in the data folder when unset)"})
    jwt_public_key: str | None = field(default=None, metadata={"doc": "PEM public key for RS256/ES256 tokens"})
    jwks_url: str | None = field(default=None, metadata={"doc": "JWKS URL for RS256/ES256 tokens"})
    jwt_audience: str | None = field(default=None, metadata={"doc": "required `aud` claim, when set"})
    jwt_issuer: str | None = field(default=None, metadata={"doc": "required `iss` claim, when set"})
    http_host: str = field(default="127.0.0.1", metadata={"doc": "HTTP bind address"})
    http_port: int = field(default=8000, metadata={"doc": "HTTP port (REST, WebSocket, SSE)"})
    allowed_origins: tuple[str, ...] = field(default=(), metadata={"doc": "comma-separated other browser origins allowed to open streams and call the API (CORS)"})
    public_origins: tuple[str, ...] = field(default=(), metadata={"doc": "comma-separated origins browsers reach this server at, e.g. `https://monitor.example.org` (empty: `http://127.0.0.1:PORT`, `http://localhost:PORT`, `http://[::1]:PORT` and `http://FC_HTTP_HOST:PORT`, also `https://`)"})
    retention_days: float = field(default=30.0, metadata={"doc": "readings and dead letters older than this are deleted (0 keeps all)"})
    device_silent_seconds: float = field(default=60.0, metadata={"doc": "an online device with no data this long raises `device.silent`"})
    device_offline_seconds: float = field(default=180.0, metadata={"doc": "a device with no message at all this long is marked offline (heartbeat timeout)"})
    escalation_seconds: float = field(default=120.0, metadata={"doc": "an alert unacknowledged this long is escalated to the hospital"})
    alert_rules: str | None = field(default=None, metadata={"doc": "path of a YAML rules file replacing the built-in defaults"})
    ingest_slots: int | None = field(default=None, metadata={"doc": "ingest slots shared by the bridges of one database (docs/ingest-slots.md): each a persistent MQTT session `{FC_MQTT_CLIENT_ID}-{slot}` on the shared subscription `$share/{FC_INGEST_SHARE_GROUP}/...`, claimed through PostgreSQL; unset: 8 with PostgreSQL and an external broker, none otherwise; `0`: one session with a plain subscription (one bridge per client id). Needs a broker with shared subscriptions (Mosquitto 2), not the embedded one; every bridge of a cluster uses the same number. More slots than bridges lets a cluster grow (a bridge holds at most ceil(slots/bridges))"})
    ingest_share_group: str = field(default="firstcare", metadata={"doc": "the shared-subscription group of the ingest slots (`[A-Za-z0-9_-]`)"})
    ingest_queue_size: int = field(default=10000, metadata={"doc": "bounded queue between the MQTT client and the writer (per ingest slot)"})
    batch_max: int = field(default=500, metadata={"doc": "most messages committed in one transaction (and at most 256 KiB of payload)"})
    batch_linger_ms: float = field(default=5.0, metadata={"doc": "how long the writer waits to fill a batch"})
    dead_letter_bytes: int = field(default=4096, metadata={"doc": "raw payload kept per dead letter (truncated beyond)"})
    history_size: int = field(default=1000, metadata={"doc": "events kept per room for replay"})
    history_seconds: float = field(default=3600.0, metadata={"doc": "how long events stay replayable"})
    ws_queue_size: int = field(default=1000, metadata={"doc": "bounded send queue per WebSocket/SSE connection"})
    ws_send_timeout_seconds: float = field(default=10.0, metadata={"doc": "a send blocked this long closes the connection (slow consumer)"})
    ws_ping_seconds: float = field(default=20.0, metadata={"doc": "server keepalive interval (WebSocket `ping` message, SSE comment)"})
    ws_max_message_bytes: int = field(default=4096, metadata={"doc": "largest client message accepted on a WebSocket"})
    ws_rate_per_second: float = field(default=20.0, metadata={"doc": "client messages per second per WebSocket (burst twice that)"})
    max_connections_per_user: int = field(default=20, metadata={"doc": "concurrent WebSocket + SSE connections per token subject, per process"})
    ticket_seconds: int = field(default=30, metadata={"doc": "lifetime of a single-use connection ticket"})
    audit_url: str | None = field(default=None, metadata={"doc": "where the audit trail is kept, `sqlite:///path.db`; empty: `<store file>-audit.db` beside the store"})
    audit_queue_size: int = field(default=10000, metadata={"doc": "audit records held in memory before they are written (beyond: counted as `overflowed` and noted in the trail)"})
    audit_flush_seconds: float = field(default=1.0, metadata={"doc": "how often queued audit records are written (and at shutdown, always)"})
    mqtt_ca_file: str | None = field(default=None, metadata={"doc": "CA certificate(s), PEM, the broker's certificate must chain to for `mqtts://` (default: the system's trust store); the embedded TLS broker also requires its clients' certificates to chain to it"})
    mqtt_cert_file: str | None = field(default=None, metadata={"doc": "the bridge's client certificate (CN `bridge`) for `mqtts://` and the embedded TLS broker"})
    mqtt_key_file: str | None = field(default=None, metadata={"doc": "the private key of `FC_MQTT_CERT_FILE`"})
    broker_cert_file: str | None = field(default=None, metadata={"doc": "server certificate of the embedded broker: when set, it speaks only TLS and requires a client certificate from `FC_MQTT_CA_FILE` (per-device rule)"})
    broker_key_file: str | None = field(default=None, metadata={"doc": "the private key of `FC_BROKER_CERT_FILE`"})
    tls_insecure: bool = field(default=False, metadata={"doc": "DEVELOPMENT ONLY: do not verify the broker's certificate; logged as a WARNING at every start"})
    http_cert_file: str | None = field(default=None, metadata={"doc": "serve HTTPS and WSS with this certificate (PEM, chain first); or terminate TLS at a reverse proxy (docs/nginx.conf)"})
    http_key_file: str | None = field(default=None, metadata={"doc": "the private key of `FC_HTTP_CERT_FILE`"})
    hsts_seconds: int = field(default=31536000, metadata={"doc": "`Strict-Transport-Security` max-age on HTTPS responses (0: not sent)"})
    require_signatures: tuple[str, ...] = field(default=(), metadata={"doc": "comma-separated hospitals whose readings must be signed (`*`: every hospital); also settable per hospital through the API"})
    signature_max_age_seconds: float = field(default=604800.0, metadata={"doc": "a signed reading whose `ts` is older than this is refused (`signature_expired`), so an old one cannot be replayed once retention has deleted it; below the retention, above the edge spool's age"})
    log_level: str = field(default="INFO", metadata={"doc": "DEBUG, INFO, WARNING or ERROR"})

    def validate(self) -> None:
        self.check_mqtt_url("mqtt_url")
        self.check_store_url()
        if urlsplit(self.hub_url).scheme not in ("memory", "redis", "rediss"):
            raise self.bad("hub_url", "expected memory:// or redis://host:port/db")
        self.validate_security()
        self.check_mqtt_session()
        self.check_ingest_slots()
        if not (math.isfinite(self.store_busy_timeout_seconds) and 0 < self.store_busy_timeout_seconds <= 60):
            raise self.bad("store_busy_timeout_seconds", "must be greater than 0 and at most 60 (seconds)")
        if not (math.isfinite(self.store_statement_timeout_seconds) and 1 <= self.store_statement_timeout_seconds <= 3600):
            raise self.bad("store_statement_timeout_seconds", "must be 1 to 3600 (seconds)")
        self.check_ports("mqtt_port", "http_port")
        self.check_positive("ingest_queue_size", "batch_max", "dead_letter_bytes", "history_size", "ws_queue_size",
                            "ws_max_message_bytes", "max_connections_per_user", "ticket_seconds", "audit_queue_size")
        if not (math.isfinite(self.audit_flush_seconds) and self.audit_flush_seconds > 0):
            raise self.bad("audit_flush_seconds", "must be greater than 0")
        if self.audit_url and (not self.audit_url.startswith("sqlite:///") or not self.audit_url[10:].strip()):
            raise self.bad("audit_url", "expected sqlite:///path")
        self.check_not_negative("retention_days", "device_silent_seconds", "device_offline_seconds",
                                "seq_gap_grace_seconds", "alarm_reorder_seconds",
                                "escalation_seconds", "batch_linger_ms", "history_seconds",
                                "ws_send_timeout_seconds", "ws_ping_seconds", "ws_rate_per_second")
        for name in ("ws_send_timeout_seconds", "ws_ping_seconds", "ws_rate_per_second"):
            if not getattr(self, name) > 0:
                raise self.bad(name, "must be greater than 0")
        for name in ("allowed_origins", "public_origins"):
            for origin in getattr(self, name):
                if not _is_origin(origin):
                    raise self.bad(name, f"{origin!r} is not an origin (scheme://host[:port], no path)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise self.bad("log_level", "one of DEBUG, INFO, WARNING, ERROR")
        try:
            check_root(self.topic_root)
        except Exception as exc:
            raise self.bad("topic_root", str(exc)) from exc

    def validate_security(self) -> None:
        self.check_tls_client("mqtt_url", "mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file")
        self.check_pair("broker_cert_file", "broker_key_file")
        self.check_pair("http_cert_file", "http_key_file")
        self.check_files("broker_cert_file", "broker_key_file", "http_cert_file", "http_key_file")
        if self.broker_cert_file is not None:
            if self.mqtt_url != "embedded":
                raise self.bad("broker_cert_file", "configures the embedded broker: FC_MQTT_URL must be 'embedded'")
            if self.mqtt_ca_file is None:
                raise self.bad("mqtt_ca_file", "the embedded TLS broker requires client certificates: set the CA "
                                               "that issues them")
        elif self.mqtt_url == "embedded":
            for name in ("mqtt_ca_file", "mqtt_cert_file"):
                if getattr(self, name) is not None:
                    raise self.bad(name, "the embedded broker is plain MQTT unless FC_BROKER_CERT_FILE is set")
        self.check_not_negative("hsts_seconds", "signature_max_age_seconds")
        if not self.signature_max_age_seconds > 0:
            raise self.bad("signature_max_age_seconds", "must be greater than 0")
        if self.retention_days > 0 and self.signature_max_age_seconds >= self.retention_days * 86400:
            raise self.bad("signature_max_age_seconds", "must be below FC_RETENTION_DAYS, or a signed reading "
                                                        "deleted by retention could be replayed and stored again")
        for hospital in self.require_signatures:
            if hospital != "*" and not is_valid_id(hospital):
                raise self.bad("require_signatures", "hospital ids ([A-Za-z0-9_-]{1,64}) or *")

    def check_bridge_client(self) -> None:
        """The bridge needs its own certificate to reach the embedded TLS broker (which takes
        nobody without one); ``firstcare broker`` alone does not."""
        if self.broker_cert_file is not None and self.mqtt_url == "embedded" and self.mqtt_cert_file is None:
            raise self.bad("mqtt_cert_file", "the bridge needs its own client certificate (CN bridge) to "
                                             "connect to the embedded TLS broker")

    @property
    def mqtt_tls(self) -> bool:
        return self.broker_cert_file is not None if self.mqtt_url == "embedded" else self.is_tls_url("mqtt_url")

    def check_mqtt_session(self) -> None:
        """Refuse a configuration whose MQTT session could not be persistent: the broker would
        then drop what it queued for the bridge while it was away, without telling anyone."""
        if not CLIENT_ID_PATTERN.fullmatch(self.mqtt_client_id):
            raise self.bad("mqtt_client_id", "expected 1 to 128 of A-Z a-z 0-9 _ . - (it also names the"
                                              " bridge's lease topic, firstcare/lease/<client id>)")
        if self.mqtt_protocol not in MQTT_PROTOCOLS:
            raise self.bad("mqtt_protocol", "expected 3.1.1 or 5")
        if self.mqtt_url == "embedded":
            if self.mqtt_protocol != "3.1.1":
                raise self.bad("mqtt_protocol", "the embedded broker (FC_MQTT_URL=embedded) speaks MQTT 3.1.1 only;"
                                                " set FC_MQTT_PROTOCOL=3.1.1 or use Mosquitto")
            return
        if self.mqtt_protocol == "5" and self.mqtt_session_expiry_seconds < 1:
            raise self.bad("mqtt_session_expiry_seconds",
                           "with FC_MQTT_PROTOCOL=5 a session without an expiry ends at every disconnect, and the"
                           " broker drops what it queued for the bridge; set it to how long the broker must keep"
                           " the queue (e.g. 1209600, 14 days) or use FC_MQTT_PROTOCOL=3.1.1")
        if self.mqtt_session_expiry_seconds < 0 or self.mqtt_session_expiry_seconds > 0xFFFFFFFF:
            raise self.bad("mqtt_session_expiry_seconds", "must be 0..4294967295 seconds")
        certified = self.is_tls_url("mqtt_url") and self.mqtt_cert_file is not None  # the certificate names it
        if not MqttTarget.parse(self.mqtt_url).username and not self.mqtt_allow_anonymous and not certified:
            raise self.bad("mqtt_url", "no username: the bridge's session would be anonymous, and the amqtt broker"
                                       " (`firstcare broker`) discards the queue of anonymous sessions, so readings"
                                       " published while the bridge is away would be lost. Put the bridge's user in"
                                       " the URL (mqtt://bridge:password@host:port) or, for a broker that keeps"
                                       " anonymous sessions (Mosquitto), set FC_MQTT_ALLOW_ANONYMOUS=true")

    @property
    def ingest_slot_count(self) -> int:
        """Ingest slots in use: 0 is one session with a plain subscription."""
        if self.ingest_slots is not None:
            return self.ingest_slots
        return 8 if self.is_postgres and self.mqtt_url != "embedded" else 0

    def check_ingest_slots(self) -> None:
        if self.ingest_slots is not None and not 0 <= self.ingest_slots <= 256:
            raise self.bad("ingest_slots", "expected 0 (one session, no slots) to 256")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.ingest_share_group):
            raise self.bad("ingest_share_group", "expected 1 to 64 of A-Z a-z 0-9 _ -")
        if self.ingest_slot_count and self.mqtt_url == "embedded":
            raise self.bad("ingest_slots", "the embedded broker (amqtt) has no shared subscriptions, which ingest"
                                           " slots need: use Mosquitto 2 (FC_MQTT_URL=mqtt://...) or set"
                                           " FC_INGEST_SLOTS=0")
        if self.ingest_slot_count and len(f"{self.mqtt_client_id}-{self.ingest_slot_count - 1}") > 128:
            raise self.bad("mqtt_client_id", "too long for the ingest slots' client ids ({client id}-{slot},"
                                              " at most 128 characters)")

    def check_store_url(self) -> None:
        if self.store_url.startswith("sqlite:///"):
            if not self.sqlite_path.strip():
                raise self.bad("store_url", "expected sqlite:///path")
            return
        parts = urlsplit(self.store_url)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("postgresql", "postgres") or not port_ok or not parts.path.strip("/"):
            raise self.bad("store_url", "expected sqlite:///path or postgresql://user:password@host:port/database")

    @property
    def is_postgres(self) -> bool:
        return self.store_url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_path(self) -> str:
        """The SQLite store's file; with a PostgreSQL store, ``data/firstcare.db``: the name the
        process's local files (the audit trail, development keys) are kept beside."""
        if self.is_postgres:
            return "data/firstcare.db"
        return self.store_url[len("sqlite:///"):]


def _is_origin(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path == "" and not parts.query


def own_origins(settings: Settings) -> frozenset[str]:
    """The origins of this server's own pages: ``FC_PUBLIC_ORIGINS`` when set, else the loopback
    names and ``FC_HTTP_HOST`` at ``FC_HTTP_PORT`` (``0.0.0.0`` and ``::`` name no origin).

    >>> sorted(own_origins(Settings(http_host="127.0.0.1", http_port=8000)))[:2]
    ['http://127.0.0.1:8000', 'http://[::1]:8000']
    """
    if settings.public_origins:
        return frozenset(settings.public_origins)
    hosts = {"127.0.0.1", "localhost", "[::1]"}
    host = settings.http_host
    if host not in ("0.0.0.0", "::", ""):
        hosts.add(f"[{host}]" if ":" in host else host)
    port = settings.http_port
    return frozenset(f"{scheme}://{h}{'' if (scheme, port) in (('http', 80), ('https', 443)) else f':{port}'}"
                     for scheme in ("http", "https") for h in hosts)


def _convert(key: str, type_: Any, raw: str) -> Any:
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    if type_name.startswith("bool"):
        if raw.strip().lower() in TRUE:
            return True
        if raw.strip().lower() in FALSE:
            return False
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{key}={raw!r}: expected {type_name.split(' ')[0]}") from exc
    return raw


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) rows for the README's configuration table."""
    return Settings.table()
