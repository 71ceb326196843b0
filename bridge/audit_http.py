"""Where the audit trail is fed: HTTP (one ASGI middleware), real-time streams, and its own
read route ``GET /api/audit``.

* Every request under ``/api``, ``/fhir`` and ``/realtime`` (REST reads, FHIR, SSE streams,
  tickets, acknowledgements, bindings, overrides, observations) is recorded once its status is
  known, with the token's subject and role (``request.state.audit_claims``, set where the token
  is verified), the route's action name, the path without credentials, the patient and hospital
  it concerned (path, query, or ``request.state.audit_patient`` / ``audit_hospital`` set by a
  route that looked them up), the outcome, the client address and a request id (the client's
  ``X-Request-ID`` when it is sane, else a new one, echoed in the response).
* WebSocket connections, subscriptions and replays are recorded by :func:`audit_stream`, called
  from :mod:`bridge.realtime` and :mod:`bridge.realtime_ws`.

Recording only appends to the audit log's queue (:class:`bridge.audit_log.AuditLog`): no I/O here.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Query, Request

from bridge.api import ApiError, admin, time_param
from bridge.audit import OUTCOMES, Entry, outcome_for_status
from firstcare.errors import RoomError
from firstcare.payloads import now_ms
from firstcare.permissions import Claims
from firstcare.rooms import parse_room

AUDITED_PREFIXES = ("/api", "/fhir", "/realtime")
SECRET_PARAMS = frozenset({"token", "ticket"})
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

ACTIONS: dict[tuple[str, str], str] = {
    ("GET", "/api/patients"): "patient.list",
    ("GET", "/api/patients/{patient_id}/readings"): "patient.readings.read",
    ("GET", "/api/patients/{patient_id}/vitals/latest"): "patient.vitals.read",
    ("GET", "/api/patients/{patient_id}/alert-rules"): "patient.alert_rules.read",
    ("PUT", "/api/patients/{patient_id}/alert-rules"): "patient.alert_rules.change",
    ("GET", "/api/patients/{patient_id}/news2"): "patient.news2.read",
    ("POST", "/api/patients/{patient_id}/observations"): "patient.observation.create",
    ("GET", "/api/alerts"): "alert.list",
    ("GET", "/api/alerts/{alert_id}"): "alert.read",
    ("POST", "/api/alerts/{alert_id}/ack"): "alert.acknowledge",
    ("GET", "/api/alert-rules"): "alert_rules.read",
    ("GET", "/api/devices"): "device.list",
    ("GET", "/api/devices/{device_type}/{device_id}"): "device.read",
    ("PUT", "/api/devices/{device_type}/{device_id}/binding"): "device.binding.change",
    ("GET", "/api/dead-letters"): "dead_letter.list",
    ("GET", "/api/audit"): "audit.read",
    ("GET", "/api/reports/alarms"): "report.alarms.read",
    ("GET", "/fhir/metadata"): "fhir.capabilities.read",
    ("GET", "/fhir/Observation"): "fhir.observation.search",
    ("GET", "/fhir/Observation/{observation_id}"): "fhir.observation.read",
    ("GET", "/fhir/Device/{device_id}"): "fhir.device.read",
    ("GET", "/realtime/events"): "realtime.subscribe",
    ("GET", "/realtime/events/patient/{patient_id}"): "realtime.subscribe",
    ("GET", "/realtime/events/hospital/{hospital_id}"): "realtime.subscribe",
    ("GET", "/realtime/events/device/{device_type}/{device_id}"): "realtime.subscribe",
    ("POST", "/realtime/ticket"): "realtime.ticket",
    ("GET", "/realtime/presence"): "realtime.presence.read",
    ("GET", "/realtime/stats"): "operations.stats.read",
    ("POST", "/realtime/test/publish"): "realtime.test_publish",
}


def _audit_log(scope: dict[str, Any]) -> Any:
    app = scope.get("app")
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    return getattr(runtime, "audit", None)


def _resource(scope: dict[str, Any]) -> str:
    query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
             if k not in SECRET_PARAMS]
    return scope["path"] + (f"?{urlencode(query)}" if query else "")


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def request_id_of(scope: dict[str, Any]) -> str:
    given = _header(scope, b"x-request-id")
    return given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _source(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def _patient_param(value: str | None) -> str | None:
    if value is None:
        return None
    return value.removeprefix("Patient/").replace(".", "_") or None  # a FHIR id writes our "_" as "."


def http_entry(scope: dict[str, Any], status: int, request_id: str) -> Entry:
    """The audit entry of one HTTP request, from what routing and the route left in its scope."""
    state = scope.get("state") or {}
    claims: Claims | None = state.get("audit_claims")
    route = scope.get("route")
    template = getattr(route, "path", None)
    method = scope.get("method", "GET")
    action = state.get("audit_action") or ACTIONS.get((method, template or ""), f"{method} {template or scope['path']}")
    params = scope.get("path_params") or {}
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    patient = (state.get("audit_patient") or params.get("patient_id") or query.get("patient_id")
               or _patient_param(query.get("patient")))
    hospital = state.get("audit_hospital") or params.get("hospital_id") or query.get("hospital_id")
    return Entry(
        ts_ms=now_ms(), subject=claims.sub if claims else None, role=claims.role if claims else None,
        action=action, resource=state.get("audit_resource") or _resource(scope), outcome=outcome_for_status(status),
        status=status, patient_id=patient, hospital_id=hospital, source=_source(scope), request_id=request_id,
        detail=state.get("audit_detail"),
    )


class AuditMiddleware:
    """Records every audited HTTP request when its response starts (an SSE stream is recorded
    when it opens, not when it ends) and echoes the request id as ``X-Request-ID``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUDITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        started = False

        async def send_and_record(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
                audit = _audit_log(scope)
                if audit is not None:
                    audit.record(http_entry(scope, message["status"], request_id))
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            if not started:
                audit = _audit_log(scope)
                if audit is not None:
                    audit.record(http_entry(scope, 500, request_id))
            raise


def audit_stream(runtime: Any, headers: Any, client: Any, claims: Claims | None, action: str, resource: str,
                 outcome: str, status: int | None = None, detail: str | None = None) -> None:
    """A WebSocket connection, subscription or replay (``resource`` is a room or a path)."""
    audit = getattr(runtime, "audit", None)
    if audit is None:
        return
    patient = hospital = None
    try:
        room = parse_room(resource)
        patient, hospital = room.patient_id, room.hospital_id
    except RoomError:
        pass
    given = headers.get("x-request-id") if headers is not None else None
    audit.record(Entry(
        ts_ms=now_ms(), subject=claims.sub if claims else None, role=claims.role if claims else None, action=action,
        resource=resource, outcome=outcome, status=status, patient_id=patient, hospital_id=hospital,
        source=client[0] if client else None,
        request_id=given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex, detail=detail,
    ))


def audited_room(room: str) -> bool:
    """Rooms that carry patient data: patient, hospital and device rooms (not ``system``)."""
    return room != "system"


router = APIRouter()


@router.get("/api/audit", tags=["operations"])
def audit_trail(request: Request, c: Annotated[Claims, Depends(admin)], patient_id: str | None = None,
                subject: str | None = None, since: str | None = None, until: str | None = None,
                action: str | None = None,
                outcome: Annotated[str | None, Query(pattern=f"^({'|'.join(OUTCOMES)})$")] = None,
                limit: Annotated[int, Query(ge=1, le=5000)] = 100, cursor: str | None = None) -> dict[str, Any]:
    """Admin only: the audit trail, newest first, filtered by patient, subject, time, action and
    outcome. Follow ``next`` (as ``cursor``) for older records."""
    audit = request.app.state.runtime.audit
    try:
        items, next_cursor = audit.query(patient_id, subject, time_param(since, "since"), time_param(until, "until"),
                                         action, outcome, limit, cursor)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    return {"items": items, "next": next_cursor, "stats": audit.stats()}
