"""The hospital edge gateway: ward side in, spool on local disk, upstream broker out.

    embedded ward broker (default):
      devices --MQTT--> amqtt --WardIntake (spool commit, then PUBACK)--> stamp --> Spool
    a Mosquitto ward broker (FC_EDGE_LOCAL_URL=mqtt[s]://...):
      devices --MQTT--> Mosquitto (PUBACK) --AckingConsumer (ack after spool commit)--> stamp --> Spool
    then, either way:
      Spool (SQLite, bounded; quarantine) --> Forwarder (QoS 1, MQTT 5 where possible, paced) --> upstream

With the embedded broker a device's PUBACK means the message is on the gateway's disk (the
broker hands every publish to the intake and acknowledges it only once committed); with
Mosquitto it means Mosquitto has it, and the gateway's persistent session takes it from there,
acknowledging to Mosquitto only after the spool commit. Nothing leaves the spool before the
upstream broker has acknowledged it, so a crash or power cut of the gateway at any point loses
nothing; the bridge's deduplication absorbs the few messages that may be sent twice. A stop
(SIGTERM) first stops accepting device connections, then lets the batch being committed
finish, then stops the rest.

No message stalls the ward: one that makes stamping raise is dead-lettered in the spool
(``internal_error``) and acknowledged; the settler isolates any other failing message the same
way (:class:`~firstcare.mqtt.Settler`). Only a spool that refuses writes holds the ward stream,
and ``/readyz`` says so. Upstream, a message the broker refuses for good is quarantined
(:mod:`edge.forwarder`), and the gateway's status tells the hospital (``gateway.*`` technical
alarms at the bridge).

The event loop owns ``counters`` and the ward side; the forwarder thread owns its own state;
the spool has its own locks (reads never wait for a writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge.bedmap import BedMap
from edge.config import EdgeSettings
from edge.forwarder import Forwarder
from edge.intake import WardIntake
from edge.spool import Spool, age_s
from edge.stamp import Outbound, Refused, stamp
from edge.telemetry import registry_for
from firstcare.broker import BrokerTls, EmbeddedBroker
from firstcare.mqtt import AckingConsumer, LinkState, MqttTarget, describe_error
from firstcare.payloads import Inbound, Rejection, now_ms
from firstcare.signing import load_private, sign
from firstcare.tls import ClientTls, is_loopback, note_plaintext, warn_if_insecure
from firstcare.topics import gateway_status_topic, subscription_filter

log = logging.getLogger("firstcare.edge")

CLOSE_TIMEOUT_S = 10.0
EVICTING_INTERVALS = 3  # "evicting" while the last discard is at most this many status intervals old


class Gateway:
    def __init__(self, settings: EdgeSettings) -> None:
        s = self.settings = settings
        self.spool = Spool(s.spool_path, int(s.spool_max_mb * 1024 * 1024), int(s.spool_max_age_hours * 3_600_000),
                           s.dead_letter_bytes, s.spool_busy_timeout_seconds)
        self.beds = BedMap(Path(s.bed_map) if s.bed_map else None)
        self.beds.refresh()
        tls = ClientTls(s.ca_file, s.cert_file, s.key_file, s.tls_insecure)
        self.signer = _signer(s)
        self.intake: WardIntake | None = None
        self.consumer: AckingConsumer | None = None
        self.local_broker: EmbeddedBroker | None = None
        if s.local_url == "embedded":
            ward_tls = (BrokerTls(s.local_cert_file, s.local_key_file or "", s.ca_file or "", root=s.topic_root)
                        if s.local_cert_file else None)
            self.intake = WardIntake(self.accept, self.quarantine)
            self.local_broker = EmbeddedBroker(s.local_host, s.local_port, tls=ward_tls, intake=self.intake.put)
        else:
            self.consumer = AckingConsumer(MqttTarget.parse(s.local_url, tls=tls), f"edge-{s.gateway_id}-ward",
                                           subscription_filter(s.topic_root), self.accept, quarantine=self.quarantine)
        self.forwarder = Forwarder(self.spool, MqttTarget.parse(s.upstream_url, tls=tls), f"edge-{s.gateway_id}",
                                   gateway_status_topic(s.hospital_id, s.gateway_id, s.topic_root), s.drain_rate,
                                   s.inflight, protocol=s.upstream_protocol,
                                   max_packet_bytes=s.upstream_max_packet_bytes, quarantine_after=s.quarantine_after,
                                   status_every_s=s.status_seconds, status_body=self.status_body)
        self.counters = {"messages": 0, "forwardable": 0, "dead_letters": 0, "discarded": 0, "internal_errors": 0}
        self._samples: deque[tuple[float, int]] = deque(maxlen=11)
        self.registry = registry_for(self.stats)

    @property
    def ward(self) -> WardIntake | AckingConsumer:
        ward = self.intake or self.consumer
        assert ward is not None
        return ward

    async def accept(self, batch: list[Inbound]) -> None:
        """Stamp a batch from the ward and commit it to the spool; the device's publish (or the
        ward broker's message) is acknowledged only after this returns."""
        self.beds.refresh()
        outbound: list[Outbound] = []
        refused: list[Refused] = []
        internal = 0
        for message in batch:
            try:
                out, bad = stamp(message, self.settings.hospital_id, self.beds.patient_for, self.settings.topic_root,
                                 self.signer)
            except Exception as exc:  # noqa: BLE001 - a bug in stamping costs only this message
                log.error("stamping a message on %s failed: %s", message.topic, describe_error(exc), exc_info=exc)
                out, bad = [], [self._internal_error(message, exc)]
                internal += 1
            outbound += out
            refused += bad
        discarded = await asyncio.to_thread(self.spool.append, outbound, refused, now_ms())
        self.counters["internal_errors"] += internal
        self.counters["messages"] += len(batch)
        self.counters["forwardable"] += len(outbound)
        self.counters["dead_letters"] += len(refused)
        self.counters["discarded"] += discarded
        if discarded:
            log.warning("spool full: discarded %d oldest vitals (FC_EDGE_SPOOL_MAX_MB)", discarded)
            self.forwarder.status_changed()

    @staticmethod
    def _internal_error(message: Inbound, exc: BaseException) -> Refused:
        return Refused(message.topic, message.payload, message.received_ms,
                       Rejection("internal_error", describe_error(exc)))

    async def quarantine(self, message: Inbound, error: Exception) -> None:
        """The settler isolated one message the spool would not take: dead-letter it."""
        await asyncio.to_thread(self.spool.append, [], [self._internal_error(message, error)], now_ms())
        self.counters["messages"] += 1
        self.counters["dead_letters"] += 1
        self.counters["internal_errors"] += 1

    def forwarded_per_s(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else 0.0

    # --- what the gateway reports ------------------------------------------------------------

    def spool_report(self, counters: dict[str, int], now: int) -> dict[str, Any]:
        s, spool = self.settings, self.spool
        last_discard = spool.last_discard_ms
        return {
            "depth": spool.depth, "bytes": spool.bytes, "max_bytes": spool.max_bytes,
            "oldest_age_s": age_s(spool.oldest_ms(), now),
            "discarded_full": counters.get("discarded_full", 0),
            "discarded_too_old": counters.get("discarded_too_old", 0),
            "evicting": last_discard is not None and now - last_discard <= EVICTING_INTERVALS * s.status_seconds * 1000,
            "near_full": spool.max_bytes > 0 and spool.bytes >= spool.max_bytes * s.spool_warn_percent / 100,
        }

    def quarantine_report(self, counters: dict[str, int], now: int) -> dict[str, Any]:
        summary = self.spool.quarantine_summary()
        return {"depth": summary["depth"], "total": counters.get("quarantined", 0),
                "oldest_age_s": age_s(summary["oldest_ms"], now), "reasons": summary["reasons"]}

    def status_body(self) -> dict[str, Any]:
        """The gateway's status upstream (firstcare.payloads.GatewayStatus), from the forwarder
        thread: the spool's counts and age, its discards, and the quarantine."""
        counters, now = self.spool.counters(), now_ms()
        quarantine = self.quarantine_report(counters, now)
        quarantine.pop("reasons")
        return {"spool": self.spool_report(counters, now), "quarantine": quarantine,
                "forwarded_per_s": self.forwarded_per_s()}

    def stats(self) -> dict[str, Any]:
        """Reads only: never waits for the spool's writer."""
        counters, now = self.spool.counters(), now_ms()
        quarantine = self.quarantine_report(counters, now)
        quarantine["by_reason_total"] = {k.removeprefix("quarantined_"): v for k, v in counters.items()
                                         if k.startswith("quarantined_")}
        ward: dict[str, Any] = {"state": self.ward.state, "last_error": self.ward.last_error,
                                **self.ward.counters.copy()}
        if self.local_broker is not None:
            ward.update(mode="embedded", clients=self.local_broker.clients(), denied=self.local_broker.denied)
        else:
            ward["mode"] = "mqtt"
        return {
            "hospital_id": self.settings.hospital_id, "gateway_id": self.settings.gateway_id,
            "upstream": {"state": self.forwarder.state, "last_error": self.forwarder.last_error,
                         "protocol": self.forwarder.protocol, "max_packet": self.forwarder.max_packet,
                         "inflight": self.forwarder.inflight, **self.forwarder.counters.copy()},
            "ward": ward,
            "spool": {**counters, **self.spool_report(counters, now)},
            "quarantine": quarantine,
            "forwarded_per_s": self.forwarded_per_s(),
            "bed_map": {"devices": len(self.beds.entries), "reloads": self.beds.reloads, "errors": self.beds.errors,
                        "last_error": self.beds.last_error},
            **self.counters,
        }

    async def _sample(self) -> None:
        while True:
            self._samples.append((time.monotonic(), self.forwarder.counters["acked"]))
            await asyncio.to_thread(self.spool.sync)
            await asyncio.sleep(1)

    def warn_plaintext(self) -> None:
        s = self.settings
        ward_host = s.local_host if s.local_url == "embedded" else MqttTarget.parse(s.local_url).host
        links = (("upstream", s.is_tls_url("upstream_url"), MqttTarget.parse(s.upstream_url).host),
                 ("ward", s.ward_tls, ward_host))
        for what, secure, host in links:
            if secure:
                warn_if_insecure(s.tls_insecure, f"the gateway's {what} broker", "FC_EDGE_TLS_INSECURE")
            else:
                note_plaintext(f"the gateway's {what} link", host)
        if s.http_token is None and not is_loopback(s.http_host):
            log.warning("the gateway's HTTP endpoints listen on %s without FC_EDGE_HTTP_TOKEN: anyone who can reach"
                        " them reads /stats, /dead-letters and /quarantine (topics and device ids, no payloads)",
                        s.http_host)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        self.warn_plaintext()
        tasks = [asyncio.create_task(self.ward.run(), name="fc-edge-ward"),
                 asyncio.create_task(self._sample(), name="fc-edge-sample")]
        try:
            if self.local_broker is not None:
                await asyncio.sleep(0)  # the intake runs before the broker takes its first publish
                await self.local_broker.start()
            self.forwarder.start()
            yield self
        finally:
            await self._stop(tasks)

    async def _stop(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Devices first (no new connection, no new publish kept), then the batch being
        committed finishes, then the rest. Nothing unacknowledged is lost: devices resend it."""
        if self.local_broker is not None:
            self.local_broker.stop_listening()
        if self.intake is not None:
            try:
                await asyncio.wait_for(self.intake.close(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("the spool did not take the last batch within %.0fs; its devices send it again",
                            CLOSE_TIMEOUT_S)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.consumer is not None:
            await self.consumer.stop()
        if self.local_broker is not None:
            await self.local_broker.stop()
        await asyncio.to_thread(self.forwarder.stop)
        self.spool.close()


def _signer(s: EdgeSettings) -> Any:
    """The gateway's own signature for the readings of devices that do not sign (or None)."""
    if s.signing_key is None:
        return None
    key = load_private(Path(s.signing_key).read_bytes())
    kid = s.signing_kid or s.identity

    def signer(topic: str, payload: bytes) -> bytes:
        return sign(key, kid, topic, payload)

    return signer


def create_app(settings: EdgeSettings) -> FastAPI:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        async with gateway.running():
            yield

    app = FastAPI(title="FirstCare edge gateway", lifespan=lifespan)
    app.state.gateway = gateway
    token = settings.http_token

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def refused() -> JSONResponse:
        return JSONResponse({"error": "unauthorized", "detail": "Authorization: Bearer <FC_EDGE_HTTP_TOKEN>"}, 401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """200 when the upstream is connected and the ward side takes messages into the spool;
        503 otherwise (degraded: still spooling, or the ward stream held by a spool that refuses
        writes)."""
        ward = gateway.ward
        checks = {"upstream": gateway.forwarder.state, "ward": ward.state, "spool": ward.health() or "ok"}
        ready = (checks["upstream"] == LinkState.CONNECTED
                 and checks["ward"] in (LinkState.CONNECTED, LinkState.LISTENING) and checks["spool"] == "ok")
        return JSONResponse({"ready": ready, "checks": checks}, 200 if ready else 503)

    @app.get("/stats", response_model=None)
    def stats(request: Request) -> dict[str, Any] | JSONResponse:
        """Spool depth and age, discards, quarantine, forwarded/s, upstream and ward state, dead
        letters. Answers while another process holds the spool's write lock."""
        return gateway.stats() if authorized(request) else refused()

    @app.get("/dead-letters", response_model=None)
    def dead_letters(request: Request, limit: int = 100) -> dict[str, Any] | JSONResponse:
        """Device messages refused at the gateway: topic, reason, detail, size; never the payload
        (``firstcare edge quarantine`` and the spool file on the gateway's disk keep those)."""
        if not authorized(request):
            return refused()
        return {"items": gateway.spool.dead_letters(min(max(limit, 1), 1000))}

    @app.get("/quarantine", response_model=None)
    def quarantine(request: Request, limit: int = 100) -> dict[str, Any] | JSONResponse:
        """Messages the upstream refused for good, without their payloads; manage them with
        ``firstcare edge quarantine list|retry|drop`` on the gateway."""
        if not authorized(request):
            return refused()
        items = gateway.spool.quarantined(min(max(limit, 1), 1000))
        return {"items": [{"id": q.id, "topic": q.topic, "device": q.device, "size": q.size, "reason": q.reason,
                           "detail": q.detail, "received_ms": q.received_ms, "quarantined_ms": q.quarantined_ms}
                          for q in items]}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus exposition: spool, discards, quarantine by reason, upstream and ward."""
        return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)

    return app
