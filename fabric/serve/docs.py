"""Interactive API docs that work offline: Swagger UI served by the app itself, never from a CDN.

FastAPI's own ``/docs`` and ``/redoc`` pages load their JavaScript, CSS and favicon from jsdelivr and
fastapi.tiangolo.com, so they are blank on a machine without internet. :func:`offline_docs` replaces them:
``/docs`` is Swagger UI with its assets from an installed package, mounted under :data:`ASSETS_PATH`
(``swagger-ui-bundle`` where installed, else the copy vLLM ships for its own ``--enable-offline-docs``);
with neither, ``/docs`` is a plain HTML list of the operations (no script at all). ``/redoc`` redirects to
``/docs``. Every URL in the pages is relative to the app (its ``root_path`` included), and Swagger UI's
online validator badge is off.
"""

from __future__ import annotations

import html
import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs/assets"
"""Where the Swagger UI files are served (an API-key guard must leave this prefix open, like ``/docs``)."""
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
# The browser asks for a favicon anyway; an empty inline one keeps it from asking another host.
_FAVICON = "data:,"


def swagger_assets() -> Path | None:
    """A folder holding Swagger UI's bundle and CSS from an installed package, or None.

    Packages are found without importing them (vLLM's import is heavy).
    """
    for package, sub in (("swagger_ui_bundle", "vendor"), ("vllm", "entrypoints/serve/instrumentator/static")):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder in (Path(root) / sub, *sorted((Path(root) / sub).glob("swagger-ui-*"))):
                if all((folder / f).is_file() for f in _FILES):
                    return folder
    return None


def offline_docs(app: FastAPI, assets: Path | None = None) -> None:
    """Replace ``app``'s ``/docs`` and ``/redoc`` with pages that need no other host (none without an OpenAPI document).

    Args:
        app: a FastAPI app with its OpenAPI document at ``app.openapi_url``.
        assets: a folder with ``swagger-ui-bundle.js`` and ``swagger-ui.css``; default :func:`swagger_assets`.
    """
    if app.openapi_url is None:  # no OpenAPI document: the app's docs are switched off (vLLM's --disable-fastapi-docs)
        return
    docs_url = app.docs_url or "/docs"
    oauth_url = app.swagger_ui_oauth2_redirect_url or f"{docs_url}/oauth2-redirect"
    replaced = {docs_url, oauth_url, app.redoc_url or "/redoc"}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]
    folder = assets or swagger_assets()
    openapi_url = app.openapi_url

    if folder is not None:
        app.mount(ASSETS_PATH, StaticFiles(directory=str(folder)), name="docs-assets")

        async def docs(request: Request) -> Response:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
                swagger_favicon_url=_FAVICON,
                oauth2_redirect_url=root + oauth_url,
                swagger_ui_parameters={"validatorUrl": None},
            )

        async def oauth2_redirect() -> Response:
            return get_swagger_ui_oauth2_redirect_html()

        app.add_api_route(oauth_url, oauth2_redirect, methods=["GET"], include_in_schema=False)
    else:

        async def docs(request: Request) -> Response:
            root = request.scope.get("root_path", "").rstrip("/")
            return HTMLResponse(operations_page(app.openapi(), root + openapi_url))

    async def redoc(request: Request) -> Response:
        return RedirectResponse(request.scope.get("root_path", "").rstrip("/") + docs_url)

    app.add_api_route(docs_url, docs, methods=["GET"], include_in_schema=False)
    app.add_api_route(app.redoc_url or "/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.docs_url, app.swagger_ui_oauth2_redirect_url = docs_url, oauth_url


def operations_page(schema: dict[str, Any], openapi_url: str) -> str:
    """A page listing every operation of an OpenAPI document: method, path, summary (no script)."""
    info = schema.get("info", {})
    rows = []
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if isinstance(op, dict):
                summary = op.get("summary") or op.get("description", "").split("\n")[0]
                rows.append(
                    f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}</code>"
                    f"</td><td>{html.escape(summary)}</td></tr>"
                )
    title = html.escape(info.get("title", "API"))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
        f"<h1>{title} <small>{html.escape(str(info.get('version', '')))}</small></h1>"
        f"<p>{html.escape(info.get('description', ''))}</p>"
        f"<p>The full document: <a href='{html.escape(openapi_url)}'>OpenAPI JSON</a>.</p>"
        "<table><tr><th>Method</th><th>Path</th><th>What it does</th></tr>" + "".join(rows) + "</table></body></html>"
    )
