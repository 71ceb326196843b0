"""HTTPS response headers when the bridge terminates TLS itself (``FC_HTTP_CERT_FILE``).

Behind a reverse proxy the proxy sends them instead (docs/nginx.conf). Authentication never
uses cookies (a bearer token, a query token or a single-use ticket), so there is no cookie to
mark Secure and no cross-site request to forge.
"""

from __future__ import annotations

from typing import Any


class HstsMiddleware:
    """``Strict-Transport-Security`` on every HTTP response: once a browser has seen it, it
    refuses plain HTTP to this host for ``max_age`` seconds (no downgrade, no stripped TLS)."""

    def __init__(self, app: Any, max_age: int) -> None:
        self.app = app
        self.header = (b"strict-transport-security", f"max-age={max_age}; includeSubDomains".encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
