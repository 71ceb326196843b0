"""The hospital edge gateway: ward broker in, spool on local disk, upstream broker out.

    devices --MQTT--> ward broker (embedded amqtt | any) --AckingConsumer (ack after spool commit)-->
      stamp (validate, hospital, bed map) --> Spool (SQLite, bounded) --> Forwarder (QoS 1, paced) --> upstream

Nothing is acknowledged to a device's broker before it is on disk, and nothing leaves the spool
before the upstream broker has acknowledged it, so a crash or power cut of the gateway at any
point loses nothing; the bridge's deduplication absorbs the few messages that may be sent twice.

No message stalls the ward: one that makes stamping raise is dead-lettered in the spool
(``internal_error``) and acknowledged; the consumer isolates any other failing message the same
way (:class:`~firstcare.mqtt.AckingConsumer`). Only a spool that refuses writes holds the ward
stream, and ``/readyz`` says so. The event loop owns ``counters``; the spool has its own lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from edge.bedmap import BedMap
from edge.config import EdgeSettings
from edge.forwarder import Forwarder
from edge.spool import Spool
from edge.stamp import Outbound, Refused, stamp
from firstcare.broker import BrokerTls, EmbeddedBroker
from firstcare.mqtt import AckingConsumer, Inbound, MqttTarget, describe_error
from firstcare.payloads import Rejection, now_ms
from firstcare.signing import load_private, sign
from firstcare.tls import ClientTls, note_plaintext, warn_if_insecure

log = logging.getLogger("firstcare.edge")


class Gateway:
    def __init__(self, settings: EdgeSettings) -> None:
        s = self.settings = settings
        self.spool = Spool(s.spool_path, int(s.spool_max_mb * 1024 * 1024), int(s.spool_max_age_hours * 3_600_000),
                           s.dead_letter_bytes)
        self.beds = BedMap(Path(s.bed_map) if s.bed_map else None)
        self.beds.refresh()
        tls = ClientTls(s.ca_file, s.cert_file, s.key_file, s.tls_insecure)
        ward_tls = (BrokerTls(s.local_cert_file, s.local_key_file or "", s.ca_file or "", readers=(s.identity,),
                              root=s.topic_root) if s.local_cert_file else None)
        self.local_broker = EmbeddedBroker(s.local_host, s.local_port, tls=ward_tls) if s.local_url == "embedded" else None
        local = (MqttTarget("127.0.0.1" if s.local_host in ("0.0.0.0", "::") else s.local_host, s.local_port,
                            "gateway", None, tls if ward_tls else None)
                 if self.local_broker else MqttTarget.parse(s.local_url, tls=tls))
        self.signer = _signer(s)
        self.consumer = AckingConsumer(local, f"edge-{s.gateway_id}-ward", f"{s.topic_root}/v1/#", self.accept,
                                       quarantine=self.quarantine)
        self.forwarder = Forwarder(self.spool, MqttTarget.parse(s.upstream_url, tls=tls), f"edge-{s.gateway_id}",
                                   f"{s.topic_root}/edge/{s.hospital_id}/{s.gateway_id}/status", s.drain_rate,
                                   s.inflight)
        self.counters = {"messages": 0, "forwardable": 0, "dead_letters": 0, "discarded": 0, "internal_errors": 0}
        self._samples: deque[tuple[float, int]] = deque(maxlen=11)

    async def accept(self, batch: list[Inbound]) -> None:
        """Stamp a batch from the ward broker and commit it to the spool; the consumer
        acknowledges the batch to the ward broker only after this returns."""
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

    @staticmethod
    def _internal_error(message: Inbound, exc: BaseException) -> Refused:
        return Refused(message.topic, message.payload, message.received_ms,
                       Rejection("internal_error", describe_error(exc)))

    async def quarantine(self, message: Inbound, error: Exception) -> None:
        """The consumer isolated one message the spool would not take: dead-letter it."""
        await asyncio.to_thread(self.spool.append, [], [self._internal_error(message, error)], now_ms())
        self.counters["messages"] += 1
        self.counters["dead_letters"] += 1
        self.counters["internal_errors"] += 1

    def forwarded_per_s(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else 0.0

    def stats(self) -> dict[str, Any]:
        oldest = self.spool.oldest_ms()
        return {
            "hospital_id": self.settings.hospital_id, "gateway_id": self.settings.gateway_id,
            "upstream": {"state": self.forwarder.state, "last_error": self.forwarder.last_error,
                         "inflight": self.forwarder.inflight, **self.forwarder.counters},
            "ward": {"state": self.consumer.state, "last_error": self.consumer.last_error,
                     **self.consumer.counters},
            "spool": {"depth": self.spool.depth, "bytes": self.spool.bytes,
                      "oldest_age_s": round((now_ms() - oldest) / 1000, 1) if oldest else 0.0,
                      "max_bytes": self.spool.max_bytes, **self.spool.counters()},
            "forwarded_per_s": self.forwarded_per_s(),
            "bed_map": {"devices": len(self.beds.entries), "reloads": self.beds.reloads, "errors": self.beds.errors,
                        "last_error": self.beds.last_error},
            **self.counters,
        }

    async def _sample(self) -> None:
        while True:
            self._samples.append((time.monotonic(), self.forwarder.counters["acked"]))
            self.forwarder.status_extra = {"spool_depth": self.spool.depth,
                                           "forwarded_per_s": self.forwarded_per_s()}
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

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        self.warn_plaintext()
        if self.local_broker is not None:
            await self.local_broker.start()
        self.forwarder.start()
        tasks = [asyncio.create_task(self.consumer.run(), name="fc-edge-ward"),
                 asyncio.create_task(self._sample(), name="fc-edge-sample")]
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await asyncio.to_thread(self.forwarder.stop)
            if self.local_broker is not None:
                await self.local_broker.stop()
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

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """200 when both brokers are connected and ward messages reach the spool; 503 otherwise
        (degraded: still spooling, or the ward stream held by a spool that refuses writes)."""
        checks = {"upstream": gateway.forwarder.state, "ward": gateway.consumer.state,
                  "spool": gateway.consumer.health() or "ok"}
        ready = checks["upstream"] == checks["ward"] == "connected" and checks["spool"] == "ok"
        return JSONResponse({"ready": ready, "checks": checks}, 200 if ready else 503)

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """Spool depth and age, forwarded/s, upstream and ward state, dead letters, discards."""
        return gateway.stats()

    @app.get("/dead-letters")
    def dead_letters(limit: int = 100) -> dict[str, Any]:
        return {"items": gateway.spool.dead_letters(min(max(limit, 1), 1000))}

    return app
