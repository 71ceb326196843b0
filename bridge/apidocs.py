"""The API documentation pages, ``/docs`` (Swagger UI) and ``/redoc``, served from this server.

FastAPI's defaults load Swagger UI and ReDoc from a CDN, so on a hospital network without internet
the pages stay blank. The ``fastapi-offline`` package bundles the same assets (swagger-ui-dist and
ReDoc's standalone build); this module mounts them under :data:`ASSETS_URL` and renders FastAPI's
own page templates pointing there. A Content-Security-Policy keeps every request on this server:
the only inline code is the template's bootstrap script, and ReDoc's search runs in a blob worker.

Stateless: routes and a static mount added to the app at composition time.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _page(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets; create the app with ``docs_url=None`` and
    ``redoc_url=None`` so FastAPI's CDN-backed pages do not shadow these."""
    if not (ASSETS / "swagger-ui-bundle.js").is_file() or not (ASSETS / "redoc.standalone.js").is_file():
        raise RuntimeError(f"the API documentation assets are missing from {ASSETS}")
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_swagger_ui_html(
            openapi_url=root + openapi_url, title=f"{app.title} - API",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # no request to validator.swagger.io
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None}))

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_redoc_html(
            openapi_url=root + openapi_url, title=f"{app.title} - API reference",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False))
