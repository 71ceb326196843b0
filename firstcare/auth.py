"""JWT verification and minting.

HS256 with a shared secret by default; RS256/ES256 with a PEM public key or a JWKS URL.
``sub`` and ``exp`` are required and an algorithm allow-list is always passed, because pyjwt
otherwise accepts a token without ``exp``. Every failure is an :class:`AuthError` whose
``reason`` is ``token_missing``, ``token_expired`` or ``token_invalid``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import jwt

from firstcare.errors import AuthError, ConfigError
from firstcare.permissions import ROLES, Claims

HS_ALGORITHMS = ["HS256"]
PK_ALGORITHMS = ["RS256", "ES256"]
LEEWAY_SECONDS = 10


class TokenVerifier:
    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if not (secret or public_key or jwks_url):
            raise ConfigError("FC_JWT_SECRET, FC_JWT_PUBLIC_KEY or FC_JWKS_URL must be set")
        self._secret = secret
        self._public_key = public_key
        self._jwks = jwt.PyJWKClient(jwks_url) if jwks_url else None
        self._audience = audience
        self._issuer = issuer

    def _key_and_algorithms(self, token: str) -> tuple[object, list[str]]:
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg in HS_ALGORITHMS and self._secret:
            return self._secret, HS_ALGORITHMS
        if alg in PK_ALGORITHMS and self._public_key:
            return self._public_key, PK_ALGORITHMS
        if alg in PK_ALGORITHMS and self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key, PK_ALGORITHMS
        raise AuthError(f"token algorithm {alg!r} is not accepted", "token_invalid")

    def verify(self, token: str | None) -> Claims:
        """Verify ``token``. With a JWKS URL this may block on the network: call it off the
        event loop in that configuration."""
        if not token:
            raise AuthError("no token: send 'Authorization: Bearer <jwt>' or '?token='", "token_missing")
        try:
            key, algorithms = self._key_and_algorithms(token)
            payload = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["sub", "exp"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired", "token_expired") from exc
        except (jwt.PyJWTError, ValueError) as exc:
            raise AuthError(f"invalid token: {exc}", "token_invalid") from exc
        return claims_from_payload(payload)


def _str_set(value: object, name: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError(f"claim {name!r} must be a list of strings", "token_invalid")
    return frozenset(value)


def claims_from_payload(payload: dict[str, Any]) -> Claims:
    role = payload.get("role", "clinician")
    if not isinstance(role, str) or role not in ROLES:
        raise AuthError(f"unknown role {role!r} (one of {', '.join(sorted(ROLES))})", "token_invalid")
    sub = payload["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError("claim 'sub' must be a non-empty string", "token_invalid")
    return Claims(
        sub=sub,
        role=role,
        exp=int(payload["exp"]),
        hospitals=_str_set(payload.get("hospitals"), "hospitals"),
        patients=_str_set(payload.get("patients"), "patients"),
    )


def mint_token(
    secret: str,
    sub: str,
    role: str,
    hospitals: Iterable[str] = (),
    patients: Iterable[str] = (),
    ttl_seconds: int = 3600,
    now: float | None = None,
) -> str:
    """Mint an HS256 token (development, tests, service accounts)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(sorted(ROLES))})")
    issued = int(time.time() if now is None else now)
    payload = {
        "sub": sub,
        "role": role,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "hospitals": sorted(hospitals),
        "patients": sorted(patients),
    }
    return jwt.encode(payload, secret, algorithm="HS256")
