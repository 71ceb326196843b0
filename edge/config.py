"""Edge gateway settings: ``FC_EDGE_*`` variables or ``firstcare edge`` flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from firstcare.errors import ConfigError
from firstcare.settings import EnvSettings
from firstcare.topics import check_root, is_valid_id


@dataclass(frozen=True)
class EdgeSettings(EnvSettings):
    PREFIX = "FC_EDGE_"

    upstream_url: str = field(default="mqtt://127.0.0.1:1883", metadata={"doc": "the hospital's uplink broker, `mqtts://host:port` (TLS) or `mqtt://user:pass@host:port` (the bridge subscribes there)"})
    upstream_protocol: str = field(default="auto", metadata={"doc": "MQTT version upstream: `auto` (MQTT 5, whose PUBACK reason codes tell a refused message apart; 3.1.1 from the first connection the upstream does not answer in MQTT 5 until the gateway restarts), `5` or `3.1.1`"})
    upstream_max_packet_bytes: int = field(default=0, metadata={"doc": "largest MQTT packet the upstream takes, for brokers that do not advertise it (MQTT 3.1.1); 0: only what an MQTT 5 upstream advertises in its CONNACK. Bigger vitals batches are split, what cannot be split is quarantined"})
    quarantine_after: int = field(default=3, metadata={"doc": "a message is quarantined after this many transient refusals (MQTT 5 quota exceeded, unspecified error) or connection drops while it was alone in flight"})
    status_seconds: float = field(default=10.0, metadata={"doc": "how often the gateway's status (spool, discards, quarantine) is published upstream; a discard or a quarantine publishes it within a second"})
    local_url: str = field(default="embedded", metadata={"doc": "the ward's broker the devices publish to: `embedded` runs amqtt in-process and commits each publish to the spool before acknowledging it; else a Mosquitto `mqtt://...` or `mqtts://...` (see \"What a device's acknowledgement means\")"})
    local_host: str = field(default="0.0.0.0", metadata={"doc": "bind address of the embedded ward broker"})
    local_port: int = field(default=1885, metadata={"doc": "port of the embedded ward broker"})
    hospital_id: str = field(default="h1", metadata={"doc": "the gateway's hospital: every forwarded topic carries it"})
    gateway_id: str = field(default="gw1", metadata={"doc": "this gateway's id (MQTT client ids, status topic)"})
    topic_root: str = field(default="fc", metadata={"doc": "root of the topic grammar"})
    spool_path: str = field(default="data/edge-spool.db", metadata={"doc": "SQLite spool file"})
    spool_max_mb: float = field(default=512.0, metadata={"doc": "spool size bound; beyond it the oldest vitals are discarded (counted)"})
    spool_max_age_hours: float = field(default=72.0, metadata={"doc": "vitals older than this are discarded from the spool (counted)"})
    spool_warn_percent: float = field(default=80.0, metadata={"doc": "a spool filled to this share of `FC_EDGE_SPOOL_MAX_MB` is reported `near_full` (technical alarm `gateway.spool_near_full` at the bridge)"})
    spool_busy_timeout_seconds: float = field(default=5.0, metadata={"doc": "how long a spool write waits for another process's lock before it counts as failed (retried, `/readyz` 503); reads never wait"})
    bed_map: str | None = field(default=None, metadata={"doc": "YAML file `device_type/device_id: patient_id`, reloaded when it changes"})
    drain_rate: float = field(default=1000.0, metadata={"doc": "most messages per second forwarded upstream"})
    inflight: int = field(default=100, metadata={"doc": "most unacknowledged messages upstream at once"})
    http_host: str = field(default="127.0.0.1", metadata={"doc": "bind address of /healthz, /readyz, /stats, /metrics, /dead-letters and /quarantine"})
    http_port: int = field(default=8010, metadata={"doc": "port of /healthz and /stats"})
    http_token: str | None = field(default=None, metadata={"doc": "when set, `/stats`, `/dead-letters` and `/quarantine` require `Authorization: Bearer <token>` (`/healthz`, `/readyz` and `/metrics` stay open); set it whenever `FC_EDGE_HTTP_HOST` is not loopback"})
    dead_letter_bytes: int = field(default=4096, metadata={"doc": "raw payload kept per local dead letter"})
    log_level: str = field(default="INFO", metadata={"doc": "DEBUG, INFO, WARNING or ERROR"})
    ca_file: str | None = field(default=None, metadata={"doc": "CA certificate(s), PEM, the upstream broker's certificate must chain to for `mqtts://` (default: the system's trust store); the embedded TLS ward broker also requires the devices' certificates to chain to it"})
    cert_file: str | None = field(default=None, metadata={"doc": "the gateway's client certificate (CN `gateway/{hospital}/{gateway_id}`), presented upstream and to the ward broker"})
    key_file: str | None = field(default=None, metadata={"doc": "the private key of `FC_EDGE_CERT_FILE`"})
    local_cert_file: str | None = field(default=None, metadata={"doc": "server certificate of the embedded ward broker (must name 127.0.0.1 too): when set, it speaks only TLS and requires a certificate per device from `FC_EDGE_CA_FILE`"})
    local_key_file: str | None = field(default=None, metadata={"doc": "the private key of `FC_EDGE_LOCAL_CERT_FILE`"})
    tls_insecure: bool = field(default=False, metadata={"doc": "DEVELOPMENT ONLY: do not verify the brokers' certificates; logged as a WARNING at every start"})
    signing_key: str | None = field(default=None, metadata={"doc": "Ed25519 private key (PEM) to sign the readings of devices that do not sign, on their behalf (register its public half with `PUT /api/gateways/{hospital}/{gateway}/key`)"})
    signing_kid: str | None = field(default=None, metadata={"doc": "key id named in the gateway's signatures (default `gateway/{hospital}/{gateway_id}`)"})

    def validate(self) -> None:
        self.check_mqtt_url("upstream_url", allow_embedded=False)
        self.check_mqtt_url("local_url")
        self.check_ports("local_port", "http_port")
        self.check_positive("inflight", "dead_letter_bytes", "quarantine_after")
        self.check_not_negative("spool_max_mb", "spool_max_age_hours", "spool_busy_timeout_seconds")
        if self.upstream_protocol not in ("auto", "5", "3.1.1"):
            raise self.bad("upstream_protocol", "one of auto, 5, 3.1.1")
        if not 0 <= self.upstream_max_packet_bytes <= 268_435_455:
            raise self.bad("upstream_max_packet_bytes", "0 (what the upstream advertises) or a size in bytes")
        if 0 < self.upstream_max_packet_bytes < 512:
            raise self.bad("upstream_max_packet_bytes", "at least 512: a single reading must fit")
        if not (0 < self.status_seconds <= 3600):
            raise self.bad("status_seconds", "between 0 and 3600 seconds")
        if not (0 < self.spool_warn_percent <= 100):
            raise self.bad("spool_warn_percent", "a percentage above 0, at most 100")
        if self.http_token is not None and len(self.http_token) < 16:
            raise ConfigError("FC_EDGE_HTTP_TOKEN: at least 16 characters (the value is not shown)")
        if not self.drain_rate > 0:
            raise self.bad("drain_rate", "must be a positive number of messages per second")
        for name in ("hospital_id", "gateway_id"):
            if not is_valid_id(getattr(self, name)):
                raise self.bad(name, "must match [A-Za-z0-9_-]{1,64}")
        try:
            check_root(self.topic_root)
        except Exception as exc:
            raise self.bad("topic_root", str(exc)) from exc
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise self.bad("log_level", "one of DEBUG, INFO, WARNING, ERROR")
        self.check_pair("cert_file", "key_file")
        self.check_pair("local_cert_file", "local_key_file")
        self.check_files("ca_file", "cert_file", "key_file", "local_cert_file", "local_key_file", "signing_key")
        if self.local_cert_file is not None:
            if self.local_url != "embedded":
                raise self.bad("local_cert_file", "configures the embedded ward broker: FC_EDGE_LOCAL_URL must be 'embedded'")
            for needed in ("ca_file", "cert_file"):
                if getattr(self, needed) is None:
                    raise self.bad(needed, "the embedded TLS ward broker requires client certificates: set the CA "
                                           "that issues the devices' and the gateway's own certificate and key")
        if not (self.ward_tls or self.is_tls_url("upstream_url")):
            for name in ("ca_file", "cert_file", "key_file"):
                if getattr(self, name) is not None:
                    raise self.bad(name, "only applies to mqtts:// brokers (upstream and ward are plain MQTT)")
        if self.signing_kid is not None and self.signing_key is None:
            raise self.bad("signing_kid", "needs FC_EDGE_SIGNING_KEY")

    @property
    def ward_tls(self) -> bool:
        return self.local_cert_file is not None if self.local_url == "embedded" else self.is_tls_url("local_url")

    @property
    def identity(self) -> str:
        return f"gateway/{self.hospital_id}/{self.gateway_id}"
