"""Composition: settings in, a running bridge out (broker, store, writer, hub, ingest, API).

    create_app(settings) -> FastAPI whose lifespan starts, in order:
      embedded broker (FC_MQTT_URL=embedded) -> store -> writer/core -> hub -> ingest -> timers
    and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from bridge.alerts import default_rules, load_rules
from bridge.api import install_error_handlers, operator, router
from bridge.api_clinical import router as clinical_router
from bridge.audit_http import AuditMiddleware
from bridge.audit_http import router as audit_router
from bridge.audit_log import AuditLog, audit_path
from bridge.fhir_api import router as fhir_router
from bridge.core import BridgeCore, CoreSettings, Writer
from bridge.hub import Hub, HubError, open_hub
from bridge.router import rooms_for
from bridge.realtime import Realtime
from bridge.realtime import router as realtime_router
from bridge.store import Store, open_store
from firstcare.auth import TokenVerifier
from firstcare.broker import EmbeddedBroker
from firstcare.events import Event
from firstcare.permissions import Claims
from firstcare.mqtt import AckingConsumer, Inbound, MqttTarget
from firstcare.settings import Settings
from firstcare.topics import subscription_filter

log = logging.getLogger("firstcare.bridge")

TICK_S = 1.0
OUTBOX_SIZE = 10_000
PURGE_EVERY_S = 3600.0


class Runtime:
    """Everything the routes need, created by the lifespan and kept on ``app.state.runtime``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings.jwt_secret, settings.jwt_public_key, settings.jwks_url,
                                      settings.jwt_audience, settings.jwt_issuer)
        self.broker: EmbeddedBroker | None = None
        self.store: Store
        self.core: BridgeCore
        self.writer: Writer
        self.hub: Hub
        self.ingest: AckingConsumer
        self.tasks: list[asyncio.Task[Any]] = []
        self.timer_errors = 0
        self._outbox: asyncio.Queue[Event] = asyncio.Queue(OUTBOX_SIZE)
        self.outbox_dropped = 0
        self.node = f"{socket.gethostname()}-{os.getpid()}"
        self.realtime: Realtime
        self.audit: AuditLog | None = None  # the audit trail (bridge/audit_log.py)

    @property
    def mqtt_target(self) -> MqttTarget:
        s = self.settings
        if s.mqtt_url == "embedded":
            return MqttTarget(s.mqtt_host if s.mqtt_host not in ("0.0.0.0", "::") else "127.0.0.1",
                              s.mqtt_port, "bridge", None)
        return MqttTarget.parse(s.mqtt_url)

    async def start(self) -> None:
        s = self.settings
        self.audit = AuditLog(audit_path(s.audit_url, s.sqlite_path), s.audit_queue_size, s.audit_flush_seconds)
        self.audit.start()
        if s.mqtt_url == "embedded":
            self.broker = EmbeddedBroker(s.mqtt_host, s.mqtt_port)
            await self.broker.start()
        rules = load_rules(Path(s.alert_rules).read_text()) if s.alert_rules else default_rules()
        self.store = open_store(s.store_url)
        self.core = BridgeCore(self.store, rules, CoreSettings(
            topic_root=s.topic_root, silent_ms=int(s.device_silent_seconds * 1000),
            offline_ms=int(s.device_offline_seconds * 1000), escalation_ms=int(s.escalation_seconds * 1000),
            dead_letter_bytes=s.dead_letter_bytes))
        self.writer = Writer(self.core)
        self.hub = open_hub(s.hub_url, s.history_size, s.history_seconds, self.node)
        await self.hub.start()
        self.realtime = Realtime(self)
        self.realtime.start()
        self.ingest = AckingConsumer(self.mqtt_target, s.mqtt_client_id, subscription_filter(s.topic_root),
                                 self.handle_batch, s.ingest_queue_size, s.batch_max, s.batch_linger_ms)
        self.tasks = [asyncio.create_task(self.ingest.run(), name="fc-ingest"),
                      asyncio.create_task(self._timers(), name="fc-timers"),
                      asyncio.create_task(self._fan_out(), name="fc-fan-out")]

    async def stop(self) -> None:
        if hasattr(self, "realtime"):
            await self.realtime.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if hasattr(self, "writer"):
            await asyncio.to_thread(self.writer.close)
        if hasattr(self, "hub"):
            await self.hub.stop()
        if hasattr(self, "store"):
            self.store.close()
        if self.broker is not None:
            await self.broker.stop()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.stop)  # writes every record still queued

    async def handle_batch(self, batch: list[Inbound]) -> None:
        events = await self.writer.run(self.core.process, batch)
        await self.publish(events)

    async def publish(self, events: Iterable[Event]) -> None:
        """Hand committed events to the fan-out; never blocks ingest. The backlog is bounded:
        an event that does not fit is counted and its rooms are told to resync, since its data
        is in the database already."""
        for event in events:
            try:
                self._outbox.put_nowait(event)
            except asyncio.QueueFull:
                self.outbox_dropped += 1
                self.hub.backend.mark_lost(rooms_for(event))

    async def _fan_out(self) -> None:
        """The one task that publishes to the hub, so a slow or absent Redis delays events but
        never the ingest and its acknowledgements."""
        failing = False
        while True:
            event = await self._outbox.get()
            try:
                await self.hub.publish(event)
                if failing:
                    log.info("fan-out restored")
                failing = False
            except HubError as exc:
                if not failing:
                    log.warning("fan-out failing, events are stored but not delivered live: %s", exc)
                failing = True

    async def _timers(self) -> None:
        loop = asyncio.get_running_loop()
        next_purge = loop.time() + 60
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.publish(await self.writer.run(self.core.tick))
                if self.settings.retention_days > 0 and loop.time() >= next_purge:
                    next_purge = loop.time() + PURGE_EVERY_S
                    cutoff = self.core.clock() - int(self.settings.retention_days * 86_400_000)
                    await self.writer.run(self.core.purge, cutoff)
            except Exception:  # noqa: BLE001 - a failing tick must not stop the next one
                self.timer_errors += 1
                log.exception("timer tick failed")

    def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {"mqtt": self.ingest.state, "hub": self.hub.backend.state()}
        try:
            self.store.ping()
            checks["store"] = "ok" if self.ingest.store_error is None else f"error: {self.ingest.store_error}"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["store"] = f"error: {exc}"
        ready = checks["mqtt"] == "connected" and checks["store"] == "ok" and checks["hub"] == "ok"
        return {"ready": ready, "checks": checks}

    def stats(self) -> dict[str, Any]:
        return {
            "ingest": {**self.core.stats(), **self.ingest.counters, "mqtt_state": self.ingest.state,
                       "mqtt_last_error": self.ingest.last_error, "store_last_error": self.ingest.store_error, "queue_depth": self.ingest.queue_depth(),
                       "queue_size": self.settings.ingest_queue_size},
            "hub": {**self.hub.stats(), "outbox_depth": self._outbox.qsize(), "outbox_dropped": self.outbox_dropped},
            "realtime": self.realtime.stats(),
            "timer_errors": self.timer_errors,
            "audit": self.audit.stats() if self.audit is not None else {},
        }


def create_app(settings: Settings) -> FastAPI:
    runtime = Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await runtime.start()
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="FirstCare Realtime", version="1", lifespan=lifespan,
                  description="Readings, alerts and devices of the remote patient-monitoring platform.")
    app.state.runtime = runtime
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "PUT"], allow_headers=["Authorization", "Content-Type"])
    install_error_handlers(app)
    app.add_middleware(AuditMiddleware)  # every /api, /fhir, /realtime request (bridge/audit_http.py)
    app.include_router(router)
    app.include_router(realtime_router)
    app.include_router(clinical_router)  # NEWS2 observations and scores, alarm report
    app.include_router(audit_router)  # GET /api/audit
    app.include_router(fhir_router)  # /fhir: the FHIR R4 read API (bridge/fhir_api.py)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is alive (it may still be degraded: see /readyz)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz(request: Request) -> JSONResponse:
        """200 when MQTT is connected and the store answers; 503 (degraded) otherwise."""
        body = request.app.state.runtime.readiness()
        return JSONResponse(body, 200 if body["ready"] else 503)

    @app.get("/realtime/stats", tags=["operations"])
    def stats(request: Request, c: Annotated[Claims, Depends(operator)]) -> dict[str, Any]:
        """Ingest and fan-out counters: messages, stored, duplicates, dead letters by reason,
        alert transitions, queue depth, MQTT state, ingest lag."""
        return request.app.state.runtime.stats()

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics(request: Request) -> str:
        """The figures of /realtime/stats in Prometheus text format."""
        return prometheus_text(request.app.state.runtime.stats())

    # the dashboard (bridge/static, no build step); mounted last so it only gets what no route matched
    from starlette.staticfiles import StaticFiles

    app.mount("/", StaticFiles(directory=Path(__file__).parent / "static", html=True), name="dashboard")
    return app


PRIVATE_STATS = frozenset({"connections_per_user", "rooms"})  # user and patient ids: not for /metrics


def prometheus_text(stats: dict[str, Any], prefix: str = "firstcare") -> str:
    """Flatten numeric stats to Prometheus gauges; counters keyed by reason become labels.
    /metrics is unauthenticated, so nothing naming a user or a patient is exported."""
    lines: list[str] = []

    def walk(name: str, value: Any, labels: str) -> None:
        if name.rsplit("_", 1)[-1] in PRIVATE_STATS or any(name.endswith("_" + p) for p in PRIVATE_STATS):
            return
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            lines.append(f"{name}{labels} {value}")
        elif isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, (int, float)) and not isinstance(inner, bool) and name.endswith(
                        ("_reasons", "_per_user", "_disconnects", "_opened", "refused", "_rooms")):
                    label = str(key).replace("\\", "\\\\").replace('"', '\\"')
                    lines.append(f'{name}{{key="{label}"}} {inner}')
                else:
                    walk(f"{name}_{key}", inner, labels)

    for section, values in stats.items():
        walk(f"{prefix}_{section}", values, "")
    return "\n".join(lines) + "\n"
