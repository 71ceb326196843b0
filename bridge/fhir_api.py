"""The FHIR R4 read API under ``/fhir`` (``application/fhir+json``).

    GET /fhir/metadata                                  CapabilityStatement (no token needed)
    GET /fhir/Observation?patient=&code=&category=&date=&_count=   searchset Bundle, ``next`` link
    GET /fhir/Observation/{id}                          a reading's vital sign, or a NEWS2 score
    GET /fhir/Device/{id}

Same JWT and hospital scoping as the REST API; whatever the caller may not see answers 404
like what does not exist. Every error is an OperationOutcome. A search walks the patient's
readings and NEWS2 scores in time order, merged; its cursor (``_cursor``) is the position of
the last entry sent: ``<ts>.<source>.<id>.<kind>``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bridge import fhir
from bridge.store import Store
from firstcare.errors import AuthError
from firstcare.payloads import now_ms
from firstcare.permissions import Claims, can_view_hospital, can_view_patient
from firstcare.topics import DEVICE_TYPES, is_valid_id

router = APIRouter()

DEFAULT_COUNT = 50
MAX_COUNT = 500
PAGE_ROWS = 200
Key = tuple[int, int, int, int]  # (time, source 0 readings | 1 NEWS2, row id, kind index)


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics


def respond(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status, media_type=fhir.CONTENT_TYPE,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def guarded(fn: Callable[..., dict[str, Any]]) -> Callable[..., JSONResponse]:
    def run(*args: Any) -> JSONResponse:
        try:
            return respond(fn(*args))
        except FhirError as exc:
            return respond(fhir.operation_outcome(exc.code, exc.diagnostics), exc.status)
    return run


def _claims(request: Request) -> Claims:
    from bridge.api import bearer_token, runtime_of

    try:
        verified = runtime_of(request).verifier.verify(bearer_token(request))
    except AuthError as exc:
        request.state.audit_detail = exc.reason
        raise FhirError(401, "login", f"{exc.reason}: {exc}") from exc
    request.state.audit_claims = verified
    return verified


def _store(request: Request) -> Store:
    from bridge.api import runtime_of

    return runtime_of(request).store


def _visible_patient(request: Request, c: Claims, patient_id: str) -> None:
    hospital = _store(request).patient_hospital(patient_id)
    request.state.audit_patient, request.state.audit_hospital = patient_id, hospital
    if hospital is None or not can_view_patient(c, patient_id, hospital):
        raise FhirError(404, "not-found", f"Patient/{fhir.fhir_id(patient_id)} not found")


# ------------------------------------------------------------------------------- parameters


def parse_date(value: str) -> tuple[str, int, int]:
    """``[prefix]date`` -> (prefix, start ms, end ms): the range its precision covers."""
    prefix = value[:2] if value[:2] in ("eq", "ge", "gt", "le", "lt") else "eq"
    text = value[2:] if value[:2] == prefix else value
    try:
        if len(text) == 10:
            start = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return prefix, int(start.timestamp() * 1000), int((start + timedelta(days=1)).timestamp() * 1000)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise FhirError(400, "invalid", f"date={value!r}: expected [eq|ge|gt|le|lt]YYYY-MM-DD or a dateTime "
                                        "with a zone") from exc
    if parsed.tzinfo is None:
        raise FhirError(400, "invalid", f"date={value!r}: a dateTime needs a time zone")
    start_ms = int(parsed.timestamp() * 1000)
    return prefix, start_ms, start_ms + (1 if parsed.microsecond else 1000)


def date_window(values: list[str]) -> tuple[int | None, int | None]:
    since: int | None = None
    until: int | None = None
    for value in values:
        prefix, start, end = parse_date(value)
        low = {"eq": start, "ge": start, "gt": end}.get(prefix)
        high = {"eq": end, "le": end, "lt": start}.get(prefix)
        if low is not None:
            since = low if since is None else max(since, low)
        if high is not None:
            until = high if until is None else min(until, high)
    return since, until


def wanted(codes: list[str], categories: list[str]) -> tuple[list[fhir.Kind], bool, set[str] | None]:
    """The reading kinds and whether NEWS2 scores match ``code`` / ``category``; and the codes
    asked for (a resource must carry one of them), None for any."""
    tokens = [t for value in codes for t in value.split(",") if t]
    asked: set[str] | None = None
    kinds = list(fhir.KINDS)
    news2 = True
    if tokens:
        asked = set()
        for token in tokens:
            system, sep, code = token.rpartition("|")
            asked.add(f"{system}|{code}" if sep and system else code)

        def hit(system: str, code: str) -> bool:
            return code in asked or f"{system}|{code}" in asked

        kinds = [k for k in kinds if any(hit(fhir.LOINC, c) for c, _ in k.codings)
                 or (k.slug == "glucose" and hit(fhir.LOINC, fhir.GLUCOMETER_GLUCOSE[0]))]
        news2 = hit(fhir.SNOMED, fhir.NEWS2_TOTAL[0])
    cats = {t.rpartition("|")[2] for value in categories for t in value.split(",") if t}
    if cats:
        kinds = [k for k in kinds if k.category in cats]
        news2 = news2 and "survey" in cats
    return kinds, news2, asked


def _codes_of(resource: dict[str, Any]) -> set[str]:
    return {x for c in resource["code"]["coding"] for x in (c["code"], f"{c['system']}|{c['code']}")}


def parse_cursor(value: str | None) -> Key | None:
    if value is None:
        return None
    parts = value.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or len(value) > 80:
        raise FhirError(400, "invalid", f"_cursor={value!r} is not one this server issued")
    ts, src, row, kind = (int(p) for p in parts)
    return ts, src, row, kind


# ------------------------------------------------------------------------------ the search


def _readings(store: Any, pid: str, since: int | None, until: int | None, kinds: list[fhir.Kind],
              after: Key | None) -> Iterator[tuple[Key, dict[str, Any]]]:
    metrics = sorted({m for k in kinds for m in k.metrics})
    slugs = {k.slug for k in kinds}
    position = (after[0], 0) if after is not None else None
    while True:
        rows = store.readings_between(pid, since, until, position, PAGE_ROWS, metrics)
        for row in rows:
            for index, kind in enumerate(fhir.KINDS):
                if kind.slug in slugs and any(m in row["metrics"] for m in kind.metrics):
                    key = (row["ts_ms"], 0, row["id"], index)
                    if after is None or key > after:
                        yield key, fhir.reading_observation(row, kind)
        if len(rows) < PAGE_ROWS:
            return
        position = (rows[-1]["ts_ms"], rows[-1]["id"] + 1)


def _scores(store: Any, pid: str, since: int | None, until: int | None,
            after: Key | None) -> Iterator[tuple[Key, dict[str, Any]]]:
    position = (after[0], -1) if after is not None else None
    while True:
        rows = store.news2_scores_between(pid, since, until, position, PAGE_ROWS)
        for row in rows:
            key = (row["computed_ms"], 1, row["id"], 0)
            if after is None or key > after:
                yield key, fhir.news2_observation(row)
        if len(rows) < PAGE_ROWS:
            return
        position = (rows[-1]["computed_ms"], rows[-1]["id"])


def _page_url(request: Request, cursor: str | None) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("_cursor", "token", "ticket")]
    if cursor:
        params.append(("_cursor", cursor))
    from urllib.parse import urlencode

    return f"{str(request.base_url).rstrip('/')}/fhir/Observation" + (f"?{urlencode(params)}" if params else "")


def _search(request: Request) -> dict[str, Any]:
    c = _claims(request)
    q = request.query_params
    known = {"patient", "subject", "code", "category", "date", "_count", "_cursor", "token", "ticket", "_format"}
    unknown = sorted(set(q.keys()) - known)
    if unknown:
        raise FhirError(400, "not-supported", f"search parameter(s) not supported: {', '.join(unknown)}")
    reference = q.get("patient") or q.get("subject")
    if not reference:
        raise FhirError(400, "required", "patient is required: /fhir/Observation?patient=<id>")
    pid = fhir.our_id(reference.removeprefix("Patient/"))
    if not is_valid_id(pid):
        raise FhirError(404, "not-found", f"{reference} not found")
    _visible_patient(request, c, pid)
    raw_count = q.get("_count", str(DEFAULT_COUNT))
    if not raw_count.isdigit() or not 1 <= int(raw_count) <= MAX_COUNT:
        raise FhirError(400, "invalid", f"_count={raw_count!r}: expected 1..{MAX_COUNT}")
    count = int(raw_count)
    since, until = date_window(q.getlist("date"))
    kinds, news2, asked = wanted(q.getlist("code"), q.getlist("category"))
    after = parse_cursor(q.get("_cursor"))
    store = _store(request)
    streams = []
    if kinds:
        streams.append(_readings(store, pid, since, until, kinds, after))
    if news2:
        streams.append(_scores(store, pid, since, until, after))
    entries: list[tuple[Key, dict[str, Any]]] = []
    for key, resource in heapq.merge(*streams, key=lambda item: item[0]):
        if asked is not None and not _codes_of(resource) & asked:
            continue
        entries.append((key, resource))
        if len(entries) > count:
            break
    next_url = None
    if len(entries) > count:
        entries = entries[:count]
        next_url = _page_url(request, ".".join(str(p) for p in entries[-1][0]))
    base = str(request.base_url).rstrip("/") + "/fhir/Observation/"
    return fhir.bundle(_page_url(request, q.get("_cursor")), next_url,
                       [(base + resource["id"], resource) for _, resource in entries])


def _read_observation(request: Request, observation_id: str) -> dict[str, Any]:
    c = _claims(request)
    parsed = fhir.parse_observation_id(observation_id)
    missing = FhirError(404, "not-found", f"Observation/{observation_id} not found")
    if parsed is None:
        raise missing
    source, row_id, slug = parsed
    store = _store(request)
    if source == "news2":
        score = store.news2_score(row_id)
        if score is None:
            raise missing
        _visible(request, c, score["patient_id"], score["hospital_id"], missing)
        return fhir.news2_observation(score)
    reading = store.reading_by_id(row_id)
    kind = fhir.KIND_BY_SLUG[slug]
    if reading is None or not any(m in reading["metrics"] for m in kind.metrics):
        raise missing
    _visible(request, c, reading["patient_id"], reading["hospital_id"], missing)
    return fhir.reading_observation(reading, kind)


def _visible(request: Request, c: Claims, patient_id: str | None, hospital_id: str | None, missing: FhirError) -> None:
    request.state.audit_patient, request.state.audit_hospital = patient_id, hospital_id
    if patient_id is not None:
        owner = _store(request).patient_hospital(patient_id)
        if not can_view_patient(c, patient_id, owner):
            raise missing
    elif not can_view_hospital(c, hospital_id):
        raise missing


def _read_device(request: Request, device_id: str) -> dict[str, Any]:
    c = _claims(request)
    missing = FhirError(404, "not-found", f"Device/{device_id} not found")
    store = _store(request)
    parsed = fhir.parse_device_fhir_id(device_id)
    found = None
    if parsed is not None and parsed[0] in DEVICE_TYPES and is_valid_id(parsed[1]):
        found = store.device(*parsed)
    elif device_id.startswith("h-"):  # a hashed long id: rare, so a scan is fine
        cursor = None
        while found is None:
            page = store.devices(None, None, 5000, cursor)
            found_json = next((d for d in page.items
                               if fhir.device_fhir_id(d["device_type"], d["device_id"]) == device_id), None)
            if found_json is not None:
                found = store.device(found_json["device_type"], found_json["device_id"])
            if page.next is None:
                break
            cursor = page.next
    if found is None or not can_view_hospital(c, found.hospital_id):
        raise missing
    request.state.audit_patient, request.state.audit_hospital = found.patient_id, found.hospital_id
    from bridge.store import device_json

    return fhir.device_resource(device_json(found))


@router.get("/fhir/metadata", tags=["fhir"])
def metadata(request: Request) -> JSONResponse:
    """The CapabilityStatement: what this server supports (readable without a token, as FHIR
    clients expect before they authenticate)."""
    base = str(request.base_url).rstrip("/") + "/fhir"
    return respond(fhir.capability_statement(base, request.app.version, now_ms()))


@router.get("/fhir/Observation", tags=["fhir"])
def search_observations(request: Request) -> JSONResponse:
    """A searchset Bundle of the patient's vital-sign and NEWS2 Observations, oldest first."""
    return guarded(_search)(request)


@router.get("/fhir/Observation/{observation_id}", tags=["fhir"])
def read_observation(request: Request, observation_id: str) -> JSONResponse:
    return guarded(_read_observation)(request, observation_id)


@router.get("/fhir/Device/{device_id}", tags=["fhir"])
def read_device(request: Request, device_id: str) -> JSONResponse:
    return guarded(_read_device)(request, device_id)


@router.api_route("/fhir/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
def unsupported(request: Request, rest: str) -> JSONResponse:
    if request.method != "GET":
        return respond(fhir.operation_outcome("not-supported", "this FHIR server is read only"), 405)
    return respond(fhir.operation_outcome("not-supported", f"/fhir/{rest} is not supported (see /fhir/metadata)"),
                   404)
