"""REST API: what a dashboard loads before it goes live, and the operations it performs.

Every route needs a JWT (``Authorization: Bearer`` or ``?token=``). A patient or device the
caller may not see answers 404 exactly like one that does not exist, so nothing leaks across
hospitals. Errors are JSON: ``{"error": "<code>", "detail": "<text>"}``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection

from bridge.alerts import AlertError, RuleOverride
from bridge.core import PatientConflict
from bridge.store import alert_json, device_json
from firstcare.errors import AuthError
from firstcare.permissions import Claims, can_view_hospital, can_view_patient, visible_hospitals
from firstcare.topics import DEVICE_TYPES, ID_PATTERN

if TYPE_CHECKING:
    from bridge.app import Runtime  # the composition imports this module

ID = Annotated[str, Field(pattern=f"^{ID_PATTERN.pattern}$")]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def install_error_handlers(app: FastAPI) -> None:
    """Every error answers ``{"error": code, "detail": text}``, FastAPI's own ones included."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.error, "detail": exc.detail}, exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "bad_request", "detail": problems}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": error, "detail": str(exc.detail)}, exc.status_code, headers=exc.headers)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query_params.get("token")


def claims(request: Request) -> Claims:
    try:
        verified = request.app.state.runtime.verifier.verify(bearer_token(request))
    except AuthError as exc:
        request.state.audit_detail = exc.reason
        raise ApiError(401, exc.reason, str(exc)) from exc
    request.state.audit_claims = verified  # who, for the audit trail (bridge/audit_http.py)
    return verified


def admin(c: Annotated[Claims, Depends(claims)]) -> Claims:
    if not c.is_admin:
        raise ApiError(403, "forbidden", "admin role required")
    return c


def operator(c: Annotated[Claims, Depends(claims)]) -> Claims:
    """Operations data (connection counts per user, room names) is not for every token."""
    if not c.sees_everything:
        raise ApiError(403, "forbidden", "admin or service role required")
    return c


Auth = Annotated[Claims, Depends(claims)]


def time_param(value: str | None, name: str) -> int | None:
    """ISO-8601 (with zone) or epoch milliseconds."""
    if value is None:
        return None
    if value.isascii() and value.lstrip("-").isdigit():
        if len(value) > 15:
            raise ApiError(400, "bad_request", f"{name}={value!r} is out of range")
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, "bad_request", f"{name}={value!r} is not ISO-8601 or epoch milliseconds") from exc
    if parsed.tzinfo is None:
        raise ApiError(400, "bad_request", f"{name}={value!r} needs a time zone")
    return int(parsed.timestamp() * 1000)


def page(p: Any) -> dict[str, Any]:
    return {"items": p.items, "next": p.next}


class Binding(BaseModel):
    patient_id: ID | None = Field(description="patient to bind the device to; null unbinds it")
    hospital_id: ID | None = Field(default=None, description="required when the device has never been seen")


class Override(BaseModel):
    threshold: float | None = None
    clear: float | None = None
    enabled: bool = True


class Ack(BaseModel):
    note: str | None = Field(default=None, max_length=500)


router = APIRouter()


def runtime_of(conn: HTTPConnection) -> Runtime:
    """The running bridge's parts, which the lifespan keeps on ``app.state.runtime``."""
    runtime: Runtime = conn.app.state.runtime
    return runtime



def _check_patient(request: Request, c: Claims, patient_id: str) -> None:
    hospital = runtime_of(request).store.patient_hospital(patient_id)
    request.state.audit_hospital = hospital
    if not can_view_patient(c, patient_id, hospital):
        raise not_found(f"patient {patient_id!r}")


def _check_cursor(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc


@router.get("/api/patients", tags=["patients"])
def patients(request: Request, c: Auth, hospital_id: ID | None = None,
             limit: Annotated[int, Query(ge=1, le=5000)] = 500, cursor: str | None = None) -> dict[str, Any]:
    """The patients of the caller's hospitals (a patient token: its own), by id."""
    store = runtime_of(request).store
    if c.role == "patient":
        items = [{"patient_id": p, "hospital_id": store.patient_hospital(p)} for p in sorted(c.patients)]
        return {"items": [i for i in items if i["hospital_id"] is not None], "next": None}
    return page(store.patients(visible_hospitals(c), hospital_id, limit, cursor))


@router.get("/api/patients/{patient_id}/readings", tags=["patients"])
def readings(request: Request, c: Auth, patient_id: ID, metric: str | None = None, since: str | None = None,
             until: str | None = None, limit: Annotated[int, Query(ge=1, le=5000)] = 500,
             cursor: str | None = None) -> dict[str, Any]:
    """Readings in time order; follow ``next`` (pass it as ``cursor``) for the following page."""
    _check_patient(request, c, patient_id)
    from firstcare.metrics import METRICS

    if metric is not None and metric not in METRICS:
        raise ApiError(400, "bad_request", f"unknown metric {metric!r} (one of {', '.join(METRICS)})")
    store = runtime_of(request).store
    return page(_check_cursor(store.readings, patient_id, metric, time_param(since, "since"),
                              time_param(until, "until"), limit, cursor))


@router.get("/api/patients/{patient_id}/vitals/latest", tags=["patients"])
def latest_vitals(request: Request, c: Auth, patient_id: ID) -> dict[str, Any]:
    _check_patient(request, c, patient_id)
    rt = runtime_of(request)
    return {"patient_id": patient_id, "hospital_id": rt.store.patient_hospital(patient_id),
            "metrics": rt.store.latest_vitals(patient_id)}


@router.get("/api/patients/{patient_id}/alert-rules", tags=["alerts"])
def patient_rules(request: Request, c: Auth, patient_id: ID) -> dict[str, Any]:
    _check_patient(request, c, patient_id)
    rules = runtime_of(request).core.rules_for(patient_id)
    return {"patient_id": patient_id, "rules": [msgspec.to_builtins(r) for r in rules]}


@router.put("/api/patients/{patient_id}/alert-rules", tags=["alerts"])
async def set_patient_rules(request: Request, c: Auth, patient_id: ID,
                            overrides: dict[str, Override]) -> dict[str, Any]:
    """Replace the patient's overrides (rule id -> threshold / clear / enabled)."""
    rt = runtime_of(request)
    hospital = rt.store.patient_hospital(patient_id)
    request.state.audit_hospital = hospital
    if not can_view_patient(c, patient_id, hospital):
        raise not_found(f"patient {patient_id!r}")
    if c.role == "patient":
        raise ApiError(403, "forbidden", "patients cannot change alarm limits")
    parsed = {rule: RuleOverride(o.threshold, o.clear, o.enabled) for rule, o in overrides.items()}
    try:
        rules = await rt.writer.run(rt.core.set_overrides, patient_id, parsed)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    return {"patient_id": patient_id, "rules": [msgspec.to_builtins(r) for r in rules]}


@router.get("/api/alert-rules", tags=["alerts"])
def default_rules(request: Request, c: Auth) -> dict[str, Any]:
    return {"rules": [msgspec.to_builtins(r) for r in runtime_of(request).core.rules]}


@router.get("/api/alerts", tags=["alerts"])
def alerts(request: Request, c: Auth, hospital_id: ID | None = None, patient_id: ID | None = None,
           state: Annotated[str | None, Query(pattern="^(raised|acknowledged|escalated|resolved|active)$")] = None,
           limit: Annotated[int, Query(ge=1, le=5000)] = 100, cursor: str | None = None) -> dict[str, Any]:
    """Newest first. ``state=active`` is everything not yet resolved."""
    store = runtime_of(request).store
    scope = visible_hospitals(c)
    if c.role == "patient":
        if patient_id is None or patient_id not in c.patients:
            raise ApiError(403, "forbidden", "a patient token lists only its own alerts: pass patient_id")
        scope = None
    return page(_check_cursor(store.alerts, scope, hospital_id, patient_id, state, limit, cursor))


def _visible_alert(request: Request, c: Claims, alert_id: str) -> Any:
    alert = runtime_of(request).store.alert(alert_id)
    if alert is None:
        raise not_found(f"alert {alert_id!r}")
    request.state.audit_patient, request.state.audit_hospital = alert.patient_id, alert.hospital_id
    visible = (can_view_patient(c, alert.patient_id, alert.hospital_id) if alert.patient_id
               else can_view_hospital(c, alert.hospital_id))
    if not visible:
        raise not_found(f"alert {alert_id!r}")
    return alert


@router.get("/api/alerts/{alert_id}", tags=["alerts"])
def alert(request: Request, c: Auth, alert_id: str) -> dict[str, Any]:
    found = _visible_alert(request, c, alert_id)
    return {**alert_json(found), "history": runtime_of(request).store.alert_history(alert_id)}


@router.post("/api/alerts/{alert_id}/ack", tags=["alerts"])
async def acknowledge(request: Request, c: Auth, alert_id: str, body: Ack | None = None) -> dict[str, Any]:
    """Acknowledge as the token's ``sub``; a latched alert whose condition has cleared resolves."""
    _visible_alert(request, c, alert_id)
    if c.role == "patient":
        raise ApiError(403, "forbidden", "patients cannot acknowledge alarms")
    rt = runtime_of(request)
    try:
        result, events = await rt.writer.run(rt.core.acknowledge, alert_id, c.sub)
    except AlertError as exc:
        status = 404 if exc.reason == "alert_not_found" else 409
        raise ApiError(status, exc.reason, str(exc)) from exc
    await rt.publish(events)
    return result


@router.get("/api/devices", tags=["devices"])
def devices(request: Request, c: Auth, hospital_id: ID | None = None,
            limit: Annotated[int, Query(ge=1, le=5000)] = 500, cursor: str | None = None) -> dict[str, Any]:
    return page(runtime_of(request).store.devices(visible_hospitals(c), hospital_id, limit, cursor))


def _device_type(device_type: str) -> str:
    if device_type not in DEVICE_TYPES:
        raise not_found(f"device type {device_type!r}")
    return device_type


@router.get("/api/devices/{device_type}/{device_id}", tags=["devices"])
def device(request: Request, c: Auth, device_type: str, device_id: ID) -> dict[str, Any]:
    found = runtime_of(request).store.device(_device_type(device_type), device_id)
    if found is None or not can_view_hospital(c, found.hospital_id):
        raise not_found(f"device {device_type}/{device_id}")
    return device_json(found)


@router.put("/api/devices/{device_type}/{device_id}/binding", tags=["devices"])
async def bind(request: Request, c: Auth, device_type: str, device_id: ID, body: Binding) -> dict[str, Any]:
    """Bind a device to a patient (readings without ``patient_id`` are then attributed to
    it), or unbind it with ``{"patient_id": null}``."""
    rt = runtime_of(request)
    existing = rt.store.device(_device_type(device_type), device_id)
    if existing is not None and not can_view_hospital(c, existing.hospital_id):
        raise not_found(f"device {device_type}/{device_id}")
    hospital = existing.hospital_id if existing and existing.hospital_id else body.hospital_id
    request.state.audit_patient = body.patient_id or (existing.patient_id if existing else None)
    request.state.audit_hospital = hospital
    if hospital is None:
        raise ApiError(400, "bad_request", "device has never been seen: hospital_id is required")
    if body.hospital_id is not None and existing is not None and existing.hospital_id not in (None, body.hospital_id):
        raise ApiError(409, "conflict", f"device belongs to hospital {existing.hospital_id!r}")
    if not can_view_hospital(c, hospital):
        raise not_found(f"device {device_type}/{device_id}")
    try:
        record, events = await rt.writer.run(rt.core.set_binding, device_type, device_id, body.patient_id, hospital)
    except PatientConflict as exc:
        raise ApiError(409, exc.reason, str(exc)) from exc
    await rt.publish(events)
    return device_json(record)


@router.get("/api/dead-letters", tags=["operations"])
def dead_letters(request: Request, c: Annotated[Claims, Depends(admin)], reason: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=5000)] = 100, cursor: str | None = None) -> dict[str, Any]:
    """Newest first: every refused message or reading, its reason and its (truncated) payload."""
    return page(_check_cursor(runtime_of(request).store.dead_letters, reason, limit, cursor))
