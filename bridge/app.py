"""Composition: settings in, a running bridge out (broker, store, writer, hub, ingest, API).

    create_app(settings) -> FastAPI whose lifespan starts, in order:
      embedded broker (FC_MQTT_URL=embedded) -> store (SQLite: locked, one bridge per file;
        PostgreSQL: shared) -> cluster membership (bridge.cluster: who runs the timers)
        -> writer/core -> hub -> client-id lease on the broker -> ingest -> timers
    With ingest slots (FC_INGEST_SLOTS, bridge.slot_ingest) the lease and the session are per
    slot, and the slot manager claims, hands over and takes over slots every second.
    and stops them in reverse. A refusal at start (database in use, client id in use, a
    session that cannot be persistent) stops the process with a message saying what to change.

Threads: the event loop owns the Runtime, the outbox and the hub; the writer thread owns the
core (read elsewhere only through ``core.snapshot``); the paho threads own the MQTT consumer's
and the lease's connections. ``/realtime/stats`` and ``/metrics`` are async, so they read the
loop's state on the loop and everybody else's through snapshots; ``/readyz`` reads only
single attributes and pings the store from a pool thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from bridge.alerts import default_rules, load_rules
from bridge.api import install_error_handlers, operator, router
from bridge.api_clinical import router as clinical_router
from bridge.api_security import router as security_router
from bridge.apidocs import install_docs
from bridge.audit_http import AuditMiddleware
from bridge.audit_http import router as audit_router
from bridge.audit_log import AuditLog, audit_path
from bridge.cluster import Cluster, open_cluster
from bridge.core import BridgeCore, CoreSettings, Writer
from bridge.fanout import FanOut
from bridge.fhir_api import router as fhir_router
from bridge.hub import Hub, open_hub
from bridge.realtime import Realtime
from bridge.realtime_routes import router as realtime_router
from bridge.slot_ingest import SlotIngest
from bridge.slots import share_filters, slots_tag
from bridge.store import Store, open_store
from bridge.telemetry import LatencyTracker, StatsCollector, Telemetry
from firstcare.auth import TokenVerifier
from firstcare.broker import BrokerTls, EmbeddedBroker
from firstcare.errors import FirstCareError, StoreError
from firstcare.events import Event
from firstcare.lease import BrokerUnreachable, LeaseError, LeaseHeld, LeaseKeeper
from firstcare.mqtt import AckingConsumer, MqttTarget, backoff_delay
from firstcare.payloads import Inbound
from firstcare.permissions import Claims
from firstcare.settings import Settings
from firstcare.tls import ClientTls, note_plaintext, warn_if_insecure
from firstcare.topics import is_gateway_topic, subscription_filters

log = logging.getLogger("firstcare.bridge")

TICK_S = 1.0
PURGE_EVERY_S = 3600.0


class Runtime:
    """Everything the routes need, created by the lifespan and kept on ``app.state.runtime``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings.jwt_secret, settings.jwt_public_key, settings.jwks_url,
                                      settings.jwt_audience, settings.jwt_issuer)
        self.broker: EmbeddedBroker | None = None
        self.store: Store
        self.cluster: Cluster | None = None
        self.leader = False  # runs the cluster's timers now (always, with SQLite)
        self.core: BridgeCore
        self.writer: Writer
        self.hub: Hub
        self.ingest: AckingConsumer | SlotIngest  # SlotIngest: with ingest slots
        self.tasks: list[asyncio.Task[Any]] = []
        self.timer_errors = 0
        self.tick_store_error: str | None = None  # the last timer tick's store failure, until one succeeds
        self.fanout: FanOut
        self.node = f"{socket.gethostname()}-{os.getpid()}"
        self.realtime: Realtime
        self.audit: AuditLog | None = None  # the audit trail (bridge/audit_log.py)
        self.lease: LeaseKeeper | None = None
        self.start_error: str | None = None
        self.telemetry = Telemetry()
        self.latency: LatencyTracker
        self._metrics_figures: dict[str, Any] = {}
        self.telemetry.registry.register(StatsCollector(lambda: self._metrics_figures))
        # what start() brought up, each part's stop registered as it came up: stop() undoes
        # exactly those, however far start() got
        self._started = contextlib.AsyncExitStack()

    @property
    def mqtt_tls(self) -> ClientTls:
        s = self.settings
        return ClientTls(s.mqtt_ca_file, s.mqtt_cert_file, s.mqtt_key_file, s.tls_insecure)

    @property
    def mqtt_target(self) -> MqttTarget:
        s = self.settings
        if s.mqtt_url == "embedded":
            return MqttTarget(s.mqtt_host if s.mqtt_host not in ("0.0.0.0", "::") else "127.0.0.1",
                              s.mqtt_port, "bridge", None, self.mqtt_tls if s.broker_cert_file else None)
        return MqttTarget.parse(s.mqtt_url, tls=self.mqtt_tls)

    @property
    def broker_key(self) -> str:
        """Names the broker in the store's record of established sessions."""
        target = self.mqtt_target
        return f"{target.host}:{target.port}"

    async def start(self) -> None:
        s = self.settings
        s.check_bridge_client()
        # Each part's stop is registered right after it starts; they run in reverse, so the order
        # below is also the shutdown order read backwards: the realtime streams close first, then
        # the timers, ingest, the client-id lease, the writer, the hub, the cluster, the audit
        # trail (it writes every record still queued), the store and the broker.
        stack = self._started
        if s.mqtt_tls:
            warn_if_insecure(s.tls_insecure, "the bridge's MQTT connection", "FC_TLS_INSECURE")
        elif s.mqtt_url == "embedded":
            note_plaintext("the embedded broker (no FC_BROKER_CERT_FILE)", s.mqtt_host)
        else:
            note_plaintext("the bridge's MQTT connection", self.mqtt_target.host)
        if s.mqtt_url == "embedded":
            tls = (BrokerTls(s.broker_cert_file, s.broker_key_file or "", s.mqtt_ca_file or "", root=s.topic_root)
                   if s.broker_cert_file else None)
            self.broker = EmbeddedBroker(s.mqtt_host, s.mqtt_port, tls=tls)
            await self.broker.start()
            stack.push_async_callback(self.broker.stop)
        rules = load_rules(Path(s.alert_rules).read_text()) if s.alert_rules else default_rules()
        self.store = open_store(s.store_url, s.store_busy_timeout_seconds, s.store_statement_timeout_seconds)
        stack.callback(self.store.close)
        # after the store: a second bridge on one SQLite file is refused for the database first
        self.audit = AuditLog(audit_path(s.audit_url, s.sqlite_path), s.audit_queue_size, s.audit_flush_seconds)
        self.audit.start()
        stack.push_async_callback(asyncio.to_thread, self.audit.stop)
        self.cluster = open_cluster(s.store_url, self.node)
        stack.push_async_callback(asyncio.to_thread, self.cluster.close)  # gives up leadership at once
        self.hub = open_hub(s.hub_url, s.history_size, s.history_seconds, self.node)
        await self.hub.start()
        stack.push_async_callback(self.hub.stop)
        self.core = BridgeCore(self.store, rules, CoreSettings(
            topic_root=s.topic_root, silent_ms=int(s.device_silent_seconds * 1000),
            offline_ms=int(s.device_offline_seconds * 1000), escalation_ms=int(s.escalation_seconds * 1000),
            dead_letter_bytes=s.dead_letter_bytes, require_signatures=frozenset(s.require_signatures),
            signature_max_age_ms=int(s.signature_max_age_seconds * 1000),
            seq_gap_grace_ms=int(s.seq_gap_grace_seconds * 1000), reorder_ms=int(s.alarm_reorder_seconds * 1000)))
        self.writer = Writer(self.core)
        stack.push_async_callback(asyncio.to_thread, self.writer.close)
        self.latency = LatencyTracker(self.telemetry, synchronous=self.hub.backend.name == "memory")
        self.hub.on_dispatch = self.latency.dispatched
        self.fanout = FanOut(self.hub, self.store, latency=self.latency)
        target = self.mqtt_target
        loop = asyncio.get_running_loop()
        if s.ingest_slot_count:
            tag = slots_tag(s.mqtt_client_id, s.ingest_slot_count, s.ingest_share_group)
            self.ingest = SlotIngest(s.ingest_slot_count, s.mqtt_client_id, open_cluster(s.store_url, self.node, tag),
                                     self.node, self._open_slot, self._slot_lease, tag)
        else:
            # The embedded broker lives and dies with this process: no session outlives a restart.
            expected = s.mqtt_url != "embedded" and self.store.session_established(s.mqtt_client_id, self.broker_key)
            self.ingest = AckingConsumer(self.mqtt_target, s.mqtt_client_id, subscription_filters(s.topic_root),
                                         self.handle_batch, s.ingest_queue_size, s.batch_max, s.batch_linger_ms,
                                         protocol=s.mqtt_protocol, session_expiry_s=s.mqtt_session_expiry_seconds,
                                         session_expected=expected, on_session_lost=self._session_lost,
                                         on_session_established=self._session_established,
                                         quarantine=self.quarantine)
            ingest = self.ingest
            self.lease = LeaseKeeper(target.host, target.port, target.username, target.password, s.mqtt_client_id,
                                     on_yield=lambda message: loop.call_soon_threadsafe(ingest.yield_session, message),
                                     tls=target.tls)
            stack.push_async_callback(asyncio.to_thread, self.lease.release)
        stack.push_async_callback(self.ingest.stop)
        stack.push_async_callback(self._cancel_tasks)
        self.realtime = Realtime(self)
        self.realtime.start()
        stack.push_async_callback(self.realtime.stop)
        self.tasks = [asyncio.create_task(self._timers(), name="fc-timers"),
                      asyncio.create_task(self.fanout.run(), name="fc-fan-out")]
        if isinstance(self.ingest, SlotIngest):
            self.tasks.append(asyncio.create_task(self.ingest.run(), name="fc-slots"))
            return
        assert self.lease is not None  # one session: its client-id lease, made above
        try:
            await asyncio.to_thread(self.lease.acquire)
        except BrokerUnreachable as exc:
            log.warning("%s; ingest starts once the broker answers and the lease is taken", exc)
            self.tasks.append(asyncio.create_task(self._acquire_then_ingest(), name="fc-lease"))
        else:
            self.tasks.append(asyncio.create_task(self.ingest.run(), name="fc-ingest"))

    async def _open_slot(self, client_id: str) -> AckingConsumer:
        """The consumer of one ingest slot: its own persistent session on the shared subscription."""
        s = self.settings
        expected = await self.writer.run(self.store.session_established, client_id, self.broker_key)
        return AckingConsumer(self.mqtt_target, client_id,
                              share_filters(s.ingest_share_group, subscription_filters(s.topic_root)),
                              self.handle_batch, s.ingest_queue_size, s.batch_max, s.batch_linger_ms,
                              protocol=s.mqtt_protocol, session_expiry_s=s.mqtt_session_expiry_seconds,
                              session_expected=expected, on_session_lost=lambda: self._session_lost(client_id),
                              on_session_established=lambda: self._session_established(client_id),
                              quarantine=self.quarantine)

    def _slot_lease(self, client_id: str, on_yield: Callable[[str], object]) -> LeaseKeeper:
        target = self.mqtt_target
        return LeaseKeeper(target.host, target.port, target.username, target.password, client_id,
                           on_yield=on_yield, tls=target.tls)

    async def _acquire_then_ingest(self) -> None:
        """The broker was down at start: keep trying to take the lease, then ingest."""
        assert self.lease is not None
        rng = random.Random()
        attempt = 0
        while True:
            await asyncio.sleep(backoff_delay(attempt, rng))
            attempt += 1
            try:
                await asyncio.to_thread(self.lease.acquire)
                break
            except LeaseHeld as exc:
                self.ingest.yield_session(str(exc))
                return
            except LeaseError as exc:
                self.ingest.last_error = str(exc)
        await self.ingest.run()

    def _session_established(self, client_id: str | None = None) -> None:
        if self.settings.mqtt_url != "embedded":
            self.tasks.append(asyncio.create_task(self._remember_session(client_id or self.settings.mqtt_client_id),
                                                  name="fc-session"))

    async def _remember_session(self, client_id: str) -> None:
        try:
            await self.writer.run(self.core.remember_session, client_id, self.broker_key)
        except Exception as exc:  # noqa: BLE001 - retried at the next connect
            log.warning("could not record the MQTT session in the store: %s", exc)

    def _session_lost(self, client_id: str | None = None) -> None:
        self.tasks.append(asyncio.create_task(self._raise_session_lost(client_id or self.settings.mqtt_client_id),
                                              name="fc-session-lost"))

    async def _raise_session_lost(self, client_id: str) -> None:
        """Store the alarm (retrying while the store fails: it must not be lost), then publish it."""
        rng = random.Random()
        attempt = 0
        while True:
            try:
                events = await self.writer.run(self.core.session_lost, client_id, self.broker_key)
                break
            except Exception as exc:  # noqa: BLE001 - keep trying
                log.error("could not store the session-lost alarm (%s); retrying", exc)
                await asyncio.sleep(backoff_delay(attempt, rng))
                attempt += 1
        await self.publish(events)

    async def stop(self) -> None:
        """Stop what start() brought up, in reverse (also after a start that failed half-way)."""
        await self._started.aclose()

    async def _cancel_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def handle_batch(self, batch: list[Inbound]) -> None:
        gateways = [m for m in batch if is_gateway_topic(m.topic, self.settings.topic_root)]
        if gateways:  # edge gateways' status: technical alarms (BridgeCore.gateway_status)
            await self.publish(await self.writer.run(self.core.gateway_status, gateways))
            batch = [m for m in batch if not is_gateway_topic(m.topic, self.settings.topic_root)]
        events = await self.writer.run(self.core.process, batch)
        await self.publish(events)

    async def quarantine(self, message: Inbound, error: Exception) -> None:
        """The consumer isolated one message that fails (a bug, not the store being down):
        dead-letter it as ``internal_error`` so it is acknowledged and ingest moves on."""
        await self.writer.run(self.core.quarantine, message, error)

    async def publish(self, events: Iterable[Event]) -> None:
        """Hand committed events to the fan-out (bridge.fanout); never blocks ingest, so a slow
        or absent Redis delays events but never the ingest and its acknowledgements."""
        self.fanout.offer(events)

    async def _timers(self) -> None:
        """Every second: the timers (device heartbeats, sequence gaps, NEWS2 staleness,
        escalation) on the cluster's leader only; every bridge opens a transaction, so a store
        that refuses writes shows in readiness. Hourly on the leader: partitions ahead, retention."""
        assert self.cluster is not None
        loop = asyncio.get_running_loop()
        next_purge = loop.time() + 60
        next_maintain = loop.time()
        while True:
            await asyncio.sleep(TICK_S)
            try:
                lead = await asyncio.to_thread(self.cluster.is_leader)
                if lead != self.leader:
                    log.info("this bridge %s the cluster's timers", "now runs" if lead else "no longer runs")
                self.leader = lead
                try:
                    await self.publish(await self.writer.run(self.core.tick, lead))
                    self.tick_store_error = None
                except StoreError as exc:
                    self.tick_store_error = str(exc)  # the store refuses writes: readiness says so
                    raise
                if lead and loop.time() >= next_maintain:
                    next_maintain = loop.time() + PURGE_EVERY_S
                    await self.writer.run(self.core.maintain)
                if lead and self.settings.retention_days > 0 and loop.time() >= next_purge:
                    next_purge = loop.time() + PURGE_EVERY_S
                    cutoff = self.core.clock() - int(self.settings.retention_days * 86_400_000)
                    await self.writer.run(self.core.purge, cutoff)
            except Exception:  # noqa: BLE001 - a failing tick must not stop the next one
                self.timer_errors += 1
                log.exception("timer tick failed")

    def mqtt_check(self) -> str:
        if self.ingest.conflict is not None:
            return f"conflict: {self.ingest.conflict}"
        if self.lease is not None and self.lease.state == "acquiring":
            return "waiting for the client-id lease"
        return self.ingest.state

    def readiness(self) -> dict[str, Any]:
        """Single attribute reads plus a store ping: safe from a pool thread. The store is
        failing while a batch is being retried or the last timer tick could not write."""
        checks: dict[str, Any] = {"mqtt": self.mqtt_check(), "hub": self.hub.backend.state()}
        try:
            self.store.ping()
            failure = self.ingest.store_error or self.tick_store_error
            checks["store"] = "ok" if failure is None else f"error: {failure}"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["store"] = f"error: {exc}"
        ready = checks["mqtt"] == "connected" and checks["store"] == "ok" and checks["hub"] == "ok"
        if isinstance(self.ingest, SlotIngest):
            return {"ready": ready, "checks": checks, "slots": self.ingest.slot_stats()}
        return {"ready": ready, "checks": checks}

    def stats(self) -> dict[str, Any]:
        """Call on the event loop: the hub's and realtime's figures are the loop's own; the
        writer's come from its snapshot, the MQTT thread's from a one-step copy."""
        lease = self.lease
        return {
            "ingest": {**self.core.stats(), **self.ingest.counters.copy(), "mqtt_state": self.ingest.state,
                       "mqtt_last_error": self.ingest.last_error, "store_last_error": self.ingest.store_error,
                       "mqtt_conflict": self.ingest.conflict, "queue_depth": self.ingest.queue_depth(),
                       "queue_size": self.settings.ingest_queue_size,
                       "lease_state": lease.state if lease is not None else None,
                       "lease_rivals": lease.rivals if lease is not None else 0},
            "hub": {**self.hub.stats(), **self.fanout.stats()},
            "realtime": self.realtime.stats(),
            "timer_errors": self.timer_errors,
            "cluster": {"node": self.node, "leader": self.leader,
                        **({"slots": self.ingest.slot_stats()} if isinstance(self.ingest, SlotIngest) else {})},
            "audit": self.audit.stats() if self.audit is not None else {},
        }

    async def metrics_text(self) -> bytes:
        """Prometheus exposition: figures gathered on the loop, readiness in a pool thread."""
        readiness = await run_in_threadpool(self.readiness)
        figures = self.stats()
        figures["realtime"]["users"] = len(figures["realtime"].get("connections_per_user", {}))
        self._metrics_figures = {**figures, "readiness": readiness}
        return generate_latest(self.telemetry.registry)


def create_app(settings: Settings) -> FastAPI:
    runtime = Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            try:
                await runtime.start()
            except FirstCareError as exc:
                runtime.start_error = str(exc)
                log.error("refusing to start: %s", exc)
                raise
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="FirstCare Realtime", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Readings, alerts and devices of the remote patient-monitoring platform.")
    app.state.runtime = runtime
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "PUT"], allow_headers=["Authorization", "Content-Type"])
    if settings.http_cert_file and settings.hsts_seconds > 0:
        from bridge.https import HstsMiddleware

        app.add_middleware(HstsMiddleware, max_age=settings.hsts_seconds)
    install_error_handlers(app)
    app.add_middleware(AuditMiddleware)  # every /api, /fhir, /realtime request (bridge/audit_http.py)
    app.include_router(router)
    app.include_router(security_router)
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
    async def stats(request: Request, c: Annotated[Claims, Depends(operator)]) -> dict[str, Any]:
        """Ingest and fan-out counters: messages, stored, duplicates, dead letters by reason,
        alert transitions, queue depth, MQTT state, ingest lag."""
        return request.app.state.runtime.stats()

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition (text format 0.0.4): counters, gauges and latency histograms.
        No label carries a patient, user, device or room id."""
        return Response(await request.app.state.runtime.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    install_docs(app)  # /docs and /redoc from bundled assets, no CDN

    # the dashboard (bridge/static, no build step); mounted last so it only gets what no route matched
    from starlette.staticfiles import StaticFiles

    app.mount("/", StaticFiles(directory=Path(__file__).parent / "static", html=True), name="dashboard")
    return app
