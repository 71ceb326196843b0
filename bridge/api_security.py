"""REST for signed readings: public keys registered at provisioning, and which hospitals
require signatures. Admin and service tokens only: this is security configuration.

    PUT    /api/devices/{type}/{id}/key           register a device's Ed25519 public key
    GET    /api/devices/{type}/{id}/keys          its keys, revoked ones included
    DELETE /api/devices/{type}/{id}/key?kid=      revoke one key (every key without ``kid``)
    PUT    /api/gateways/{hospital}/{gateway}/key a gateway's key (it signs for its hospital's devices)
    GET    /api/gateways/{hospital}/{gateway}/keys
    DELETE /api/gateways/{hospital}/{gateway}/key?kid=
    GET    /api/hospitals/{hospital}/signature-policy
    PUT    /api/hospitals/{hospital}/signature-policy   {"require_signatures": true}

Only public keys are ever sent or stored; a private key never leaves the device or gateway.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from bridge.api import ID, ApiError, Auth, not_found, runtime_of
from bridge.core import KeyConflict
from firstcare.identity import device_identity, gateway_identity
from firstcare.permissions import Claims
from firstcare.signing import KID_PATTERN, KeyRecord, parse_public_key
from firstcare.topics import DEVICE_TYPES

router = APIRouter(tags=["security"])


def security_admin(c: Auth) -> Claims:
    if not c.sees_everything:
        raise ApiError(403, "forbidden", "admin or service role required")
    return c


Admin = Annotated[Claims, Depends(security_admin)]


class KeyIn(BaseModel):
    public_key: str = Field(description="Ed25519 public key: base64 of its 32 raw bytes, or PEM")
    kid: str | None = Field(default=None, pattern=f"^{KID_PATTERN.pattern}$",
                            description="key id the messages name; default the device's or gateway's identity")
    hospital_id: ID | None = Field(default=None, description="required for a device the bridge has never seen")


class PolicyIn(BaseModel):
    require_signatures: bool



def _public_key(text: str) -> bytes:
    try:
        return parse_public_key(text)
    except ValueError as exc:
        raise ApiError(422, "bad_request", f"public_key: {exc}") from exc


async def _register(request: Request, key: KeyRecord) -> dict[str, Any]:
    rt = runtime_of(request)
    try:
        await rt.writer.run(rt.core.register_key, key)
    except KeyConflict as exc:
        raise ApiError(409, exc.reason, str(exc)) from exc
    return next(k for k in rt.store.signing_keys(key.scope, key.hospital_id, key.owner) if k["kid"] == key.kid)


def _device_type(device_type: str) -> str:
    if device_type not in DEVICE_TYPES:
        raise not_found(f"device type {device_type!r}")
    return device_type


@router.put("/api/devices/{device_type}/{device_id}/key")
async def register_device_key(request: Request, c: Admin, device_type: str, device_id: ID, body: KeyIn
                              ) -> dict[str, Any]:
    """Register the public half of a device's signing key (``firstcare certs device`` makes
    the pair). The key then verifies readings on this device's topic in its hospital only."""
    existing = runtime_of(request).store.device(_device_type(device_type), device_id)
    hospital = existing.hospital_id if existing is not None and existing.hospital_id else body.hospital_id
    if hospital is None:
        raise ApiError(400, "bad_request", "device has never been seen: hospital_id is required")
    if body.hospital_id is not None and hospital != body.hospital_id:
        raise ApiError(409, "conflict", f"device belongs to hospital {hospital!r}")
    kid = body.kid or device_identity(hospital, device_type, device_id)
    key = KeyRecord(kid, _public_key(body.public_key), "device", hospital, device_type, device_id)
    return await _register(request, key)


@router.get("/api/devices/{device_type}/{device_id}/keys")
def device_keys(request: Request, c: Admin, device_type: str, device_id: ID) -> dict[str, Any]:
    return {"items": runtime_of(request).store.signing_keys("device", None, (_device_type(device_type), device_id))}


@router.delete("/api/devices/{device_type}/{device_id}/key")
async def revoke_device_key(request: Request, c: Admin, device_type: str, device_id: ID, kid: str | None = None
                            ) -> dict[str, Any]:
    """Revoke a key (a lost or replaced device): readings signed with it are refused from now
    on as ``signature_key_unknown``."""
    keys = runtime_of(request).store.signing_keys("device", None, (_device_type(device_type), device_id))
    return await _revoke(request, keys, kid)


@router.put("/api/gateways/{hospital_id}/{gateway_id}/key")
async def register_gateway_key(request: Request, c: Admin, hospital_id: ID, gateway_id: ID, body: KeyIn
                               ) -> dict[str, Any]:
    """Register an edge gateway's public key: it verifies readings the gateway signs on behalf
    of the devices of its hospital (``FC_EDGE_SIGNING_KEY``)."""
    if body.hospital_id is not None and body.hospital_id != hospital_id:
        raise ApiError(409, "conflict", f"gateway belongs to hospital {hospital_id!r}")
    kid = body.kid or gateway_identity(hospital_id, gateway_id)
    key = KeyRecord(kid, _public_key(body.public_key), "gateway", hospital_id, gateway_id=gateway_id)
    return await _register(request, key)


@router.get("/api/gateways/{hospital_id}/{gateway_id}/keys")
def gateway_keys(request: Request, c: Admin, hospital_id: ID, gateway_id: ID) -> dict[str, Any]:
    return {"items": runtime_of(request).store.signing_keys("gateway", hospital_id, (gateway_id,))}


@router.delete("/api/gateways/{hospital_id}/{gateway_id}/key")
async def revoke_gateway_key(request: Request, c: Admin, hospital_id: ID, gateway_id: ID, kid: str | None = None
                             ) -> dict[str, Any]:
    keys = runtime_of(request).store.signing_keys("gateway", hospital_id, (gateway_id,))
    return await _revoke(request, keys, kid)


async def _revoke(request: Request, keys: list[dict[str, Any]], kid: str | None) -> dict[str, Any]:
    active = [k["kid"] for k in keys if k["revoked_at"] is None and kid in (None, k["kid"])]
    if not active:
        raise not_found(f"active key {kid!r}" if kid else "active key")
    rt = runtime_of(request)
    await rt.writer.run(rt.core.revoke_keys, active)
    return {"revoked": active}


@router.get("/api/hospitals/{hospital_id}/signature-policy")
def signature_policy(request: Request, c: Admin, hospital_id: ID) -> dict[str, Any]:
    core = runtime_of(request).core
    explicit = core.signature_policies.get(hospital_id)
    return {"hospital_id": hospital_id, "require_signatures": core.requires_signatures(hospital_id),
            "source": "api" if explicit is not None else "setting"}


@router.put("/api/hospitals/{hospital_id}/signature-policy")
async def set_signature_policy(request: Request, c: Admin, hospital_id: ID, body: PolicyIn) -> dict[str, Any]:
    """Require (or stop requiring) signed readings for a hospital's devices: from then on an
    unsigned reading from it is dead-lettered as ``signature_required``. Overrides
    ``FC_REQUIRE_SIGNATURES`` for this hospital."""
    rt = runtime_of(request)
    await rt.writer.run(rt.core.set_signature_policy, hospital_id, body.require_signatures)
    return {"hospital_id": hospital_id, "require_signatures": body.require_signatures, "source": "api"}
