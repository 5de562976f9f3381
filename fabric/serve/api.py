"""The thin HTTP layer: Open Inference Protocol v2 routes over a :class:`TabularService`.

Routes (``{name}`` is the model name, ``{version}`` pins a version and bypasses the traffic split):

* ``POST /v2/models/{name}/infer``, ``POST /v2/models/{name}/versions/{version}/infer``
* ``GET /v2/models/{name}``, ``GET /v2/models/{name}/versions/{version}`` (metadata)
* ``GET /v2/models/{name}/ready``, ``GET /v2/models/{name}/versions/{version}/ready``
* ``GET /v2/models/{name}/stats`` (this replica's batching counters, after Triton's statistics extension)
* ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``
* ``GET /monitor/drift[?refresh=true]``, ``GET /monitor/report[?refresh=true]``, ``POST /monitor/reset``
  (the drift monitor, through the monitor hook)
* ``GET /openapi.json``, ``GET /docs`` (Swagger UI with its assets served here: it works offline)

Every error is an :class:`~fabric.serve.protocol.ErrorResponse` JSON body with its status; the answering
version is in the ``x-fabric-model-version`` header and the body's ``model_version``. Every request has an id:
the ``x-request-id`` header Serve's ingress sets (or one made here), answered in the same header; an
unexpected failure anywhere is a 500 with that id in its body (``request_id``) and in the replica's log line.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fabric.serve.docs import offline_docs
from fabric.serve.openapi import declare_everywhere, json_error_bodies
from fabric.serve.protocol import (
    VERSION_HEADER,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ProtocolError,
    ReadyResponse,
    RecordsRequest,
    ServerMetadataResponse,
)
from fabric.serve.service import TabularService

JSON = "application/json"
log = logging.getLogger("fabric.serve")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
REQUEST_ID_HEADER = "x-request-id"
_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
_ERROR_TEXT = {
    400: "The body is not JSON, or its Content-Length is not a number",
    404: "Unknown model or version",
    409: "No drift report yet (nothing computed)",
    413: "The body is larger than serve.max_body_bytes",
    422: "Wrong shape, datatype, missing feature, forbidden value or parameter",
    503: "The drift monitor is unavailable",
}
_MONITOR_OFF = "Unknown route: the drift monitor is off (monitor.enabled=false)"


def _errors(*statuses: int, **texts: str) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route: each status with its ErrorResponse body (``texts``: ``s404="..."``
    replaces a status' description)."""
    return {s: {"model": ErrorResponse, "description": texts.get(f"s{s}", _ERROR_TEXT[s])} for s in statuses}


_INTERNAL = "An unexpected failure; `request_id` names it, as the `x-request-id` header and the replica's log do"
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/InferenceRequest"},
                        {"$ref": "#/components/schemas/RecordsRequest"},
                    ]
                }
            }
        },
    }
}


def error_response(e: ProtocolError, headers: dict[str, str] | None = None) -> Response:
    """The JSON error body of a ProtocolError with its status."""
    return Response(e.body(), status_code=e.status, media_type=JSON, headers=headers)


def internal_error(e: BaseException, request_id: str) -> ProtocolError:
    """The 500 of an unexpected failure, logged with the request's id (which its body carries too)."""
    log.error("request %s failed: %s: %s", request_id, type(e).__name__, e, exc_info=e)
    return ProtocolError(500, f"internal error: {type(e).__name__}: {e}", "internal", request_id=request_id)


def request_id(scope: Scope) -> tuple[str, bool]:
    """The request's ``x-request-id`` (set by Serve's ingress, which also answers it in the response header),
    or a new one written into the scope's headers; and whether it is new."""
    key = REQUEST_ID_HEADER.encode()
    for k, v in scope.get("headers", ()):
        if k.lower() == key and v:
            return v.decode("latin-1"), False
    rid = str(uuid.uuid4())
    scope["headers"] = [*scope.get("headers", ()), (key, rid.encode())]
    return rid, True


def check_content_length(declared: str, limit: int) -> None:
    """400 for a Content-Length that is not a number, 413 for one over ``limit`` bytes."""
    try:
        size = int(declared)
    except ValueError:
        raise ProtocolError(400, f"invalid Content-Length {declared!r}", "invalid_request", "content-length") from None
    if size > limit:
        raise ProtocolError(
            413,
            f"request body is {size} bytes; the limit is {limit} (serve.max_body_bytes)",
            "body_too_large",
            "content-length",
        )


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over ``limit`` bytes before or while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        check_content_length(declared, limit)
        return await request.body()
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ProtocolError(
                413, f"request body exceeds the limit of {limit} bytes (serve.max_body_bytes)", "body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def make_api(service: TabularService, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving ``service`` (used by the Serve deployment and by the bare benchmark server)."""
    from fabric import __version__

    app = FastAPI(
        title="fabric model server",
        version=__version__,
        description="Open Inference Protocol v2 (KServe, Triton, Seldon) for fabric's tabular models. "
        "Send encoded features as one tensor [rows, features] or named columns (OIP inputs per column, or "
        "`instances` records); the `x-fabric-model-version` header names the version that answered.",
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        text = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(ProtocolError(exc.status_code, text, kind), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(ProtocolError(422, f"{loc}: {first.get('msg')}", "invalid_request", loc))

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> Response:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception) -> Response:
        # Starlette calls this for any exception no other handler took, then re-raises it (InferFastPath
        # sees the response was sent and lets it go).
        return error_response(internal_error(exc, request.headers.get(REQUEST_ID_HEADER) or "-"))

    async def infer(name: str, version: str | None, request: Request) -> Response:
        try:
            chosen, body = await service.infer(
                name, version, request.headers, lambda: read_limited(request, max_body_bytes)
            )
        except ProtocolError as e:
            return error_response(e)
        return Response(body, media_type=JSON, headers={VERSION_HEADER: chosen})

    infer_doc: dict[str, Any] = {
        "response_model": InferenceResponse,
        "responses": _errors(400, 404, 413, 422),
        "openapi_extra": _INFER_BODY,
    }

    @app.post("/v2/models/{name}/infer", summary="Infer (the traffic split picks the version)", **infer_doc)
    async def infer_split(name: str, request: Request) -> Response:
        return await infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", summary="Infer with a pinned version", **infer_doc)
    async def infer_pinned(name: str, version: str, request: Request) -> Response:
        return await infer(name, version, request)

    found = _errors(404, 422)  # 422: FastAPI's check of the path's parameters, never failed by a string
    ready_503 = "Not ready: no version loaded"

    @app.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=found, summary="Model metadata")
    async def model_metadata(name: str) -> dict[str, Any]:
        return service.model_metadata(name)

    @app.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadataResponse,
        responses=found,
        summary="Version metadata",
    )
    async def version_metadata(name: str, version: str) -> dict[str, Any]:
        return service.model_metadata(name, version)

    @app.get(
        "/v2/models/{name}/ready",
        response_model=ModelReadyResponse,
        responses={**found, 503: {"model": ModelReadyResponse, "description": ready_503}},
        summary="Model readiness",
    )
    async def model_ready(name: str) -> Response:
        service.check_model(name)
        return JSONResponse({"name": name, "ready": service.ready()}, status_code=200 if service.ready() else 503)

    @app.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReadyResponse,
        responses=found,
        summary="Version readiness",
    )
    async def version_ready(name: str, version: str) -> dict[str, Any]:
        service.check_model(name, version)
        return {"name": name, "version": version, "ready": True}

    @app.get("/v2/models/{name}/stats", responses=found, summary="Batching statistics of the answering replica")
    async def model_stats(name: str) -> dict[str, Any]:
        return service.statistics(name)

    @app.get("/v2", response_model=ServerMetadataResponse, summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return service.server_metadata()

    @app.get("/v2/health/live", response_model=LiveResponse, summary="Liveness")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": ready_503}},
        summary="Readiness",
    )
    async def ready() -> Response:
        ok = service.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    # Drift monitor mount points: answered by the monitor hook (404 when monitoring is off).
    @app.get(
        "/monitor/drift",
        responses=_errors(404, 422, 503, s404=_MONITOR_OFF),
        summary="Drift of the served inputs against the training reference",
        description="The last result (scheduled every monitor.interval_s), or one computed now with "
        "`refresh=true`; `computed_at`, `computed_at_utc` and `age_s` say when, `window_size` over how many rows.",
    )
    async def monitor_drift(refresh: bool = False) -> dict[str, Any]:
        return await service.monitor.drift(refresh)

    @app.get(
        "/monitor/report",
        response_class=HTMLResponse,
        responses=_errors(404, 409, 422, 503, s404=_MONITOR_OFF),
        summary="The HTML drift report",
        description="The report of the same result `GET /monitor/drift` gives (`refresh=true`: computed now).",
    )
    async def monitor_report(refresh: bool = False) -> HTMLResponse:
        return HTMLResponse(await service.monitor.report(refresh))

    @app.post(
        "/monitor/reset",
        responses=_errors(404, 503, s404=_MONITOR_OFF),
        summary="Empty the drift monitor's window and last result",
    )
    async def monitor_reset() -> dict[str, Any]:
        return await service.monitor.reset()

    def openapi() -> dict[str, Any]:
        # The infer routes read the raw body (for the size limit and our own 4xx bodies), so their request
        # schemas are added here from the pydantic models; and the errors FastAPI's declarations cannot say.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (InferenceRequest, RecordsRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            json_error_bodies(schema)
            internal = {"$ref": "#/components/schemas/ErrorResponse"}
            declare_everywhere(schema, 500, _INTERNAL, internal, headers={REQUEST_ID_HEADER: "The request's id"})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    offline_docs(app)
    return app


class _Headers:
    """Case-insensitive ``get`` over raw ASGI headers (all the traffic split needs)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self._raw:
            if k.lower() == key:
                return v.decode("latin-1")
        return default


class InferFastPath:
    """The ASGI app a replica serves: inference requests straight to the service, the rest to FastAPI.

    Inference is the hot path; FastAPI's routing, dependency solving and middleware stack cost about a
    fifth of a cheap request's CPU, so ``POST .../infer`` is answered here, by the same service and with
    the same bodies and errors as the FastAPI routes (which stay registered for the OpenAPI document).
    """

    def __init__(self, api: FastAPI, service: TabularService, max_body_bytes: int) -> None:
        self.api = api
        self.service = service
        self.max_body_bytes = max_body_bytes

    def __getattr__(self, name: str) -> Any:  # docs_url, add_exception_handler... as FastAPI's
        return getattr(self.api, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        rid, made_here = request_id(scope)
        started = False

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if made_here:  # Serve answers the id it gave in the header itself
                    headers = [*message.get("headers", ()), (REQUEST_ID_HEADER.encode(), rid.encode())]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            if scope["method"] == "POST":
                path = scope["path"]
                root = scope.get("root_path") or ""
                if root and path.startswith(root):
                    path = path[len(root) :]
                m = _INFER_PATH.fullmatch(path)
                if m is not None:
                    await self._infer(m["name"], m["version"], scope, receive, send_with_id, rid)
                    return
            await self.api(scope, receive, send_with_id)
        except Exception as e:  # the last resort: a JSON 500 naming the request, never Starlette's text/plain
            if started:  # answered (and logged) by FastAPI's handler, which re-raises
                return
            await self._send(send_with_id, 500, internal_error(e, rid).body(), [])

    @staticmethod
    async def _send(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                check_content_length(v.decode("latin-1"), limit)
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProtocolError(400, "client disconnected before sending the whole body", "invalid_request")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise ProtocolError(
                    413, f"request body exceeds the limit of {limit} bytes (serve.max_body_bytes)", "body_too_large"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(
        self, name: str, version: str | None, scope: Scope, receive: Receive, send: Send, rid: str
    ) -> None:
        headers = _Headers(scope["headers"])
        try:
            chosen, body = await self.service.infer(name, version, headers, lambda: self._read(scope, receive))
            status, extra = 200, [(VERSION_HEADER.encode(), chosen.encode())]
        except ProtocolError as e:
            status, body, extra = e.status, e.body(), []
        except Exception as e:  # an engine failure or a bug, not bad input: a JSON 500; the replica stays up
            status, body, extra = 500, internal_error(e, rid).body(), []
        await self._send(send, status, body, extra)


def make_asgi(service: TabularService, max_body_bytes: int = 1 << 20) -> InferFastPath:
    """What a replica (or the bare benchmark server) serves: :func:`make_api` behind the inference fast path."""
    return InferFastPath(make_api(service, max_body_bytes), service, max_body_bytes)
