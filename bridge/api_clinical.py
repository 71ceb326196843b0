"""REST routes of the clinical features: NEWS2 observations and scores, the alarm-fatigue report.

Same rules as :mod:`bridge.api`: a JWT on every route, a patient the caller may not see answers
404 exactly like an unknown one, errors are ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bridge import reports
from bridge.api import ID, ApiError, Auth, _check_cursor, not_found, page, runtime_of, time_param
from bridge.records import ObservationRecord
from firstcare import news2
from firstcare.payloads import format_ts, now_ms
from firstcare.permissions import can_view_hospital, can_view_patient, visible_hospitals

router = APIRouter()

MAX_OBSERVATION_AGE_MS = 24 * 3600 * 1000
MAX_OBSERVATION_FUTURE_MS = 5 * 60 * 1000


class ObservationIn(BaseModel):
    """What a clinician observed; at least one field. ``ts`` is when (default: now)."""

    model_config = ConfigDict(strict=True, extra="forbid")  # "yes" is not a boolean here

    consciousness: Literal["A", "C", "V", "P", "U"] | None = Field(
        default=None, description="ACVPU: Alert, new Confusion, Voice, Pain, Unresponsive")
    supplemental_oxygen: bool | None = Field(default=None, description="true: on oxygen; false: on air")
    spo2_scale: Literal[1, 2] | None = Field(
        default=None, description="2 for hypercapnic respiratory failure with a prescribed target of 88-92 %")
    ts: str | int | None = Field(default=None, description="when observed: ISO-8601 with zone or epoch ms")
    note: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _something(self) -> ObservationIn:
        if self.consciousness is None and self.supplemental_oxygen is None and self.spo2_scale is None:
            raise ValueError("give at least one of consciousness, supplemental_oxygen, spo2_scale")
        return self



def _visible_patient(request: Request, c: Any, patient_id: str) -> str:
    """The patient's hospital; 404 for an unknown or invisible patient (audited as such)."""
    hospital = runtime_of(request).store.patient_hospital(patient_id)
    request.state.audit_patient = patient_id
    request.state.audit_hospital = hospital
    if hospital is None or not can_view_patient(c, patient_id, hospital):
        raise not_found(f"patient {patient_id!r}")
    return hospital


def current_score(store: Any, patient_id: str, at_ms: int) -> dict[str, Any]:
    known = store.patient_news2_inputs(patient_id)
    return news2.score_json(news2.score(known.inputs, at_ms, known.spo2_scale))


@router.post("/api/patients/{patient_id}/observations", tags=["news2"], status_code=201)
async def post_observations(request: Request, c: Auth, patient_id: ID, body: ObservationIn) -> JSONResponse:
    """Record NEWS2 inputs a device cannot measure, as the token's ``sub``. The score is
    computed again at once and its alarms evaluated."""
    hospital = _visible_patient(request, c, patient_id)
    if c.role == "patient":
        raise ApiError(403, "forbidden", "patients cannot record observations")
    now = now_ms()
    at = time_param(str(body.ts), "ts") if body.ts is not None else now
    assert at is not None
    if at > now + MAX_OBSERVATION_FUTURE_MS or at < now - MAX_OBSERVATION_AGE_MS:
        raise ApiError(400, "bad_request", "ts must be within the last 24 hours (and not in the future)")
    values = {"consciousness": body.consciousness, "supplemental_oxygen": body.supplemental_oxygen,
              "spo2_scale": body.spo2_scale}
    records = [ObservationRecord(patient_id, hospital, kind, value, at, now, c.sub, body.note)
               for kind, value in values.items() if value is not None]
    rt = runtime_of(request)
    ids, events = await rt.writer.run(rt.core.observe, records)
    await rt.publish(events)
    return JSONResponse({
        "patient_id": patient_id,
        "observations": [{"id": i, "kind": o.kind, "value": o.value, "ts": format_ts(o.ts_ms),
                          "recorded_at": format_ts(o.recorded_ms), "recorded_by": o.recorded_by, "note": o.note}
                         for i, o in zip(ids, records, strict=True)],
        "news2": current_score(rt.store, patient_id, now_ms()),
    }, 201)


@router.get("/api/patients/{patient_id}/news2", tags=["news2"])
def get_news2(request: Request, c: Auth, patient_id: ID, since: str | None = None, until: str | None = None,
              limit: Annotated[int, Query(ge=1, le=5000)] = 100, cursor: str | None = None) -> dict[str, Any]:
    """``current``: the score from the inputs known now (never called complete when an input is
    missing or stale); ``items``: the stored scores, newest first, each time what a clinician
    sees changed. Follow ``next`` (as ``cursor``) for older ones."""
    hospital = _visible_patient(request, c, patient_id)
    store = runtime_of(request).store
    history = _check_cursor(store.news2_history, patient_id, time_param(since, "since"), time_param(until, "until"),
                            limit, cursor)
    return {"patient_id": patient_id, "hospital_id": hospital, "current": current_score(store, patient_id, now_ms()),
            **page(history)}


@router.get("/api/reports/alarms", tags=["reports"])
def alarm_report(request: Request, c: Auth, hospital_id: ID | None = None, since: str | None = None,
                 until: str | None = None,
                 nuisance_seconds: Annotated[float, Query(gt=0, le=3600)] = reports.NUISANCE_SECONDS
                 ) -> dict[str, Any]:
    """Alarm fatigue over a window (default: the last 7 days): alarms per patient-day by rule
    and priority, time to acknowledge, escalation rate, nuisance candidates."""
    if c.role == "patient":
        raise ApiError(403, "forbidden", "the alarm report is for clinicians")
    if hospital_id is not None:
        request.state.audit_hospital = hospital_id
        if not can_view_hospital(c, hospital_id):
            raise ApiError(403, "forbidden", f"hospital {hospital_id!r} is not in the token's hospitals")
    until_ms = time_param(until, "until") or now_ms()
    since_ms = time_param(since, "since")
    if since_ms is None:
        since_ms = until_ms - reports.DEFAULT_WINDOW_MS
    if since_ms >= until_ms:
        raise ApiError(400, "bad_request", "since must be before until")
    store = runtime_of(request).store
    scope = visible_hospitals(c)
    alarms = store.alarms_raised_between(scope, hospital_id, since_ms, until_ms)
    days = store.patient_days(scope, hospital_id, since_ms, until_ms)
    return reports.alarm_report(alarms, days, since_ms, until_ms, int(nuisance_seconds * 1000), hospital_id)
