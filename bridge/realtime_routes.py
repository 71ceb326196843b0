"""The HTTP routes of the real-time streams: WebSocket and SSE endpoints, tickets, presence and
the admin test publish.

Threads: every handler runs on the event loop.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, WebSocket
from pydantic import BaseModel, Field

from bridge.api import ApiError, Auth, admin
from bridge.hub import HubError
from bridge.realtime import Realtime
from bridge.realtime_sse import serve_sse
from bridge.realtime_ws import serve_websocket
from firstcare.errors import RoomError
from firstcare.events import make_event
from firstcare.payloads import format_ts
from firstcare.permissions import Claims
from firstcare.rooms import hospital_room, parse_room, patient_room

router = APIRouter()


def _rt(request_or_ws: Request | WebSocket) -> Realtime:
    return request_or_ws.app.state.runtime.realtime


# Plain Starlette WebSocket routes, not FastAPI's: they need no dependency injection, and
# FastAPI's per-call exit stacks and solved dependencies stay in memory for the whole life of
# every connection (about 9 KB each).


async def ws_rooms(ws: WebSocket) -> None:
    await serve_websocket(_rt(ws), ws, [])


async def ws_patient(ws: WebSocket) -> None:
    await serve_websocket(_rt(ws), ws, [patient_room(ws.path_params["patient_id"])])


async def ws_hospital(ws: WebSocket) -> None:
    await serve_websocket(_rt(ws), ws, [hospital_room(ws.path_params["hospital_id"])])


router.add_websocket_route("/realtime/ws", ws_rooms)
router.add_websocket_route("/realtime/ws/patient/{patient_id}", ws_patient)
router.add_websocket_route("/realtime/ws/hospital/{hospital_id}", ws_hospital)


def _sub_room(base: str, room: str | None, allowed: tuple[str, ...]) -> str:
    return f"{base}:{room}" if room in allowed else base


@router.get("/realtime/events", tags=["realtime"])
async def sse_system(request: Request) -> Any:
    """The ``system`` room (maintenance, system alerts) as Server-Sent Events."""
    return await serve_sse(_rt(request), request, "system")


@router.get("/realtime/events/patient/{patient_id}", tags=["realtime"])
async def sse_patient(request: Request, patient_id: str, room: str | None = None) -> Any:
    """``patient:{id}`` (or ``?room=vitals`` / ``?room=alerts`` for the narrower rooms)."""
    return await serve_sse(_rt(request), request, _sub_room(patient_room(patient_id), room, ("vitals", "alerts")))


@router.get("/realtime/events/hospital/{hospital_id}", tags=["realtime"])
async def sse_hospital(request: Request, hospital_id: str, room: str | None = None) -> Any:
    """``hospital:{id}`` (or ``?room=alerts`` for ``hospital:{id}:alerts``)."""
    return await serve_sse(_rt(request), request, _sub_room(hospital_room(hospital_id), room, ("alerts",)))


@router.get("/realtime/events/device/{device_type}/{device_id}", tags=["realtime"])
async def sse_device(request: Request, device_type: str, device_id: str) -> Any:
    return await serve_sse(_rt(request), request, f"device:{device_type}:{device_id}")


class TestPublish(BaseModel):
    room: str = Field(description="room to publish to, e.g. 'system' or 'patient:p-001:vitals'")
    event: str = Field(default="system.alert", description="dotted event name")
    data: dict[str, Any] = Field(default_factory=dict)


@router.post("/realtime/test/publish", tags=["realtime"])
async def test_publish(request: Request, c: Annotated[Claims, Depends(admin)], body: TestPublish) -> dict[str, Any]:
    """Admin only: publish a test event to one room (end-to-end checks of dashboards)."""
    try:
        parse_room(body.room)
        event = make_event(body.event, body.data)
    except (RoomError, ValueError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from exc
    try:
        publication = await request.app.state.runtime.hub.publish(event, [body.room])
    except HubError as exc:
        raise ApiError(503, "hub_unavailable", str(exc)) from exc
    return {"room": body.room, "id": publication.deliveries[0].id, "event": body.event}


@router.post("/realtime/ticket", tags=["realtime"])
async def ticket(request: Request, c: Auth) -> dict[str, Any]:
    """Trade the bearer token for a short-lived single-use ticket, for ``EventSource`` and
    ``WebSocket`` URLs (``?ticket=``), so the long-lived token never appears in a URL."""
    rt = _rt(request)
    value = secrets.token_urlsafe(24)
    payload = {"sub": c.sub, "role": c.role, "exp": c.exp, "hospitals": sorted(c.hospitals),
               "patients": sorted(c.patients)}
    try:
        await rt.hub.backend.put_ticket(value, json.dumps(payload), rt.settings.ticket_seconds)
    except HubError as exc:
        raise ApiError(503, "hub_unavailable", str(exc)) from exc
    return {"ticket": value, "expires_in": rt.settings.ticket_seconds}


@router.get("/realtime/presence", tags=["realtime"])
async def presence(request: Request, c: Auth, room: str) -> dict[str, Any]:
    """Who is in a room, across every bridge process sharing the hub, and when each user who
    was in it during the last day was last seen there (online users: now)."""
    rt = _rt(request)
    if await rt.room_allowed(c, room) is None:
        raise ApiError(403, "forbidden", "unknown room or not allowed")
    try:
        members = await rt.hub.backend.presence(room)
        seen = await rt.hub.backend.last_seen(room)
    except HubError as exc:
        raise ApiError(503, "hub_unavailable", str(exc)) from exc
    online = {m["user"] for m in members}
    last_seen = {user: {"last_seen": format_ts(at), "last_seen_ms": at, "online": user in online}
                 for user, at in sorted(seen.items(), key=lambda item: -item[1])}
    return {"room": room, "count": len(members), "members": members, "users": last_seen}


