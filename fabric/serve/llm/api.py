"""The thin HTTP layer: fabric's additions around an OpenAI app, and the transformers engine's own routes.

On vLLM the OpenAI app is vLLM's own (:mod:`fabric.serve.llm.vllm_engine`); on the transformers engine it is
:func:`make_api` over :class:`~fabric.serve.llm.serving.OpenAIServing`. Either way :func:`wrap` adds:

* ``GET /stats`` (request counters of the answering replica), ``GET /monitor/drift``, ``GET /monitor/report``,
  ``POST /monitor/reset`` (the drift monitor, through the monitor hook);
* the API key: every route but probes, docs and the monitor's read routes needs ``Authorization: Bearer <key>``
  (401 otherwise, checked before the body is read);
* a last-resort handler (:func:`last_resort`): an unexpected failure is a 500 in OpenAI's error shape carrying
  the request id, which the replica's log line carries too (never a text/plain traceback);
* the OpenAPI document's errors (:func:`document_errors`): every status a route answers is declared with its body.

The transformers engine's routes: ``GET /v1/models[/{model}]``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true``: ``text/event-stream``), ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info`` (as vLLM's), ``GET /health``. Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with its status: 400 for a bad body (naming the field), 401
for a missing or wrong API key, 404 for an unknown model or route.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fabric.serve.llm.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    from_validation_errors,
)
from fabric.serve.llm.serving import OpenAIServing
from fabric.serve.docs import ASSETS_PATH
from fabric.serve.openapi import JSON, declare_everywhere, json_error_bodies, operations
from fabric.serve.protocol import ProtocolError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ERROR_TEXT = {
    400: "Invalid body or parameters, or prompt + max_tokens over the context",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    409: "No drift report yet (nothing computed)",
    503: "The drift monitor is unavailable",
}
_MONITOR_OFF = "Unknown route: the drift monitor is off (llm.serve.monitor=false or monitor.enabled=false)"
_INTERNAL = "An unexpected failure; its message and the `x-request-id` header name the request, as its log line does"
# `stream: true` answers server-sent events; the schema describes one event (OpenAPI before 3.2)
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A chunk object as JSON; the last event's is `[DONE]`"}},
}
_STREAM = {200: {"content": {"text/event-stream": {"schema": _EVENT}}}}
log = logging.getLogger("fabric.serve.llm")
_KIND = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 503: "server_error"}


def _errors(*statuses: int, **texts: str) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route: each status with its ErrorResponse body (``texts``: ``s404="..."``
    replaces a status' description)."""
    return {s: {"model": ErrorResponse, "description": texts.get(f"s{s}", _ERROR_TEXT[s])} for s in statuses}


def error_response(e: OpenAIError) -> JSONResponse:
    """The JSON error body of an OpenAIError with its status."""
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.payload(), status_code=e.status, headers=headers)


class RequireKey:
    """ASGI middleware: every route but :attr:`OPEN` needs ``Authorization: Bearer <key>`` (401 otherwise).

    Checked before the body is read, so an unauthenticated client learns nothing about its request.
    """

    OPEN = frozenset({"/health", "/ping", "/version", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
    OPEN_PREFIXES = ("/monitor/drift", "/monitor/report", ASSETS_PATH + "/")

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    def __getattr__(self, name: str) -> Any:  # docs_url, openapi... as FastAPI's
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root) :]
            if path not in self.OPEN and not path.startswith(self.OPEN_PREFIXES):
                problem = self._problem(dict(scope["headers"]).get(b"authorization"))
                if problem is not None:
                    await error_response(problem)(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _problem(self, header: bytes | None) -> OpenAIError | None:
        if not header:
            return OpenAIError(
                401,
                "No API key provided: send it as `Authorization: Bearer <key>`",
                "authentication_error",
                None,
                "missing_api_key",
            )
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return OpenAIError(401, "Incorrect API key provided", "authentication_error", None, "invalid_api_key")
        return None


def make_api(serving: OpenAIServing) -> FastAPI:
    """The FastAPI app answering OpenAI requests with ``serving``."""
    from fabric import __version__

    app = FastAPI(
        title="fabric language-model server",
        version=__version__,
        description="OpenAI-compatible completions and chat completions (streaming as server-sent events), "
        f'served by fabric\'s {serving.engine.kind} engine. Pick a LoRA adapter with `model="<model>:<adapter>"`.',
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        text = f"no route {request.method} {request.url.path}" if status == 404 else str(exc.detail)
        return error_response(OpenAIError(status, text, _KIND.get(status, "invalid_request_error")))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(from_validation_errors(exc.errors()))

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> Response:
        return error_response(exc)

    def answer(result: Any) -> Response:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401), summary="The served model, its adapters")
    async def models() -> ModelList:
        return serving.models()

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_errors(401, 404), summary="One model")
    async def model(model: str) -> ModelCard:
        return serving.model(model)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**_STREAM, **_errors(400, 401, 404)},
        summary="Complete a prompt",
    )
    async def completions(body: CompletionRequest) -> Response:
        return answer(await serving.completions(body))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_STREAM, **_errors(400, 401, 404)},
        summary="Answer a conversation",
    )
    async def chat(body: ChatCompletionRequest) -> Response:
        return answer(await serving.chat(body))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_errors(400, 401, 404), summary="Token ids")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_errors(400, 401, 404), summary="Ids' text")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving.detokenize(body)

    @app.get(
        "/tokenizer_info",
        response_model=TokenizerInfoResponse,
        responses=_errors(401),
        summary="The tokenizer's special tokens, chat template and context (lm-evaluation-harness' remote tokenizer)",
    )
    async def tokenizer_info() -> TokenizerInfoResponse:
        return serving.tokenizer_info()

    add_health(app, serving.engine.check_health, serving.name, serving.engine.kind)
    return app


def add_health(app: FastAPI, check: Callable[[], Awaitable[None]], model: str, engine: str) -> None:
    """``GET /health``: ``{"status": "ok", "model", "engine"}`` while ``check`` passes, else OpenAI's 503 JSON
    (replacing the app's own, e.g. vLLM's empty 200)."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]

    unhealthy = {503: {"model": ErrorResponse, "description": "The engine cannot generate"}}

    @app.get("/health", response_model=HealthResponse, responses=unhealthy, summary="The engine can generate")
    async def health() -> Response:
        try:
            await check()
        except Exception as e:
            return error_response(OpenAIError(503, f"engine unhealthy: {e}", "server_error"))
        return JSONResponse({"status": "ok", "model": model, "engine": engine})


async def last_resort(request: Request, exc: Exception) -> JSONResponse:
    """An exception nothing else answered: OpenAI's 500 JSON with a request id, logged with the same id.

    The id is Serve's request id (Serve returns it as ``x-request-id``) or the request's own ``x-request-id``,
    so a client's error leads to the replica's log line. Never a text/plain traceback.
    """
    request_id = _request_id(request)
    log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=exc)
    err = OpenAIError(500, f"internal error (request id {request_id}): {type(exc).__name__}", "server_error")
    return JSONResponse(err.payload(), status_code=500, headers={"x-request-id": request_id})


def _request_id(request: Request) -> str:
    if request.headers.get("x-request-id"):
        return request.headers["x-request-id"]
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
        if rid:
            return str(rid)
    except Exception:  # outside a Serve replica (unit tests)
        pass
    return uuid.uuid4().hex


def add_routes(app: FastAPI, stats: Callable[[], dict[str, Any]], monitor: Any) -> None:
    """fabric's routes on an OpenAI app (either engine's): ``/stats``, the drift monitor's, and ``/docs`` with
    Swagger UI served by the app itself (FastAPI's and vLLM's default pages load it from a CDN)."""
    from fabric.serve.docs import offline_docs
    from fabric.serve.monitor_hook import NoMonitor

    hook = monitor or NoMonitor()
    offline_docs(app)
    app.add_exception_handler(Exception, last_resort)
    app.middleware_stack = None  # vLLM's build_app built its stack already: rebuilt with the handler on first call

    @app.get(
        "/stats",
        responses=_errors(401),
        summary="Request counters of the answering replica (and the CPU engine's batching counters)",
    )
    async def stats_route() -> dict[str, Any]:
        return stats()

    @app.get(
        "/monitor/drift",
        responses=_errors(400, 404, 503, s404=_MONITOR_OFF),
        summary="Drift of the served stream against fine-tuning's reference",
    )
    async def monitor_drift(refresh: bool = False) -> Response:
        try:
            return JSONResponse(await hook.drift(refresh))
        except ProtocolError as e:
            return _protocol_error(e)

    @app.get(
        "/monitor/report",
        response_class=HTMLResponse,
        responses=_errors(400, 404, 409, 503, s404=_MONITOR_OFF),
        summary="The HTML drift report",
    )
    async def monitor_report(refresh: bool = False) -> Response:
        try:
            return HTMLResponse(await hook.report(refresh))
        except ProtocolError as e:
            return _protocol_error(e)

    @app.post(
        "/monitor/reset",
        responses=_errors(401, 404, 503, s404=_MONITOR_OFF),
        summary="Empty the drift monitor's window (needs the API key)",
    )
    async def monitor_reset() -> Response:
        try:
            return JSONResponse(await hook.reset())
        except ProtocolError as e:
            return _protocol_error(e)

    document_errors(app)


def document_errors(app: FastAPI) -> None:
    """Complete ``app``'s OpenAPI document with what its routes' declarations cannot say: every route may
    answer the last-resort 500, every route :class:`RequireKey` guards a 401, and a body FastAPI's validation
    refuses is a 400 (never the 422 FastAPI declares by itself); error bodies are JSON on HTML routes too."""
    generate = app.openapi

    def guarded(path: str) -> bool:
        return path not in RequireKey.OPEN and not path.startswith(RequireKey.OPEN_PREFIXES)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            # fabric's ErrorResponse under the name FastAPI gave it (a longer one beside vLLM's ErrorResponse)
            error = schema["paths"]["/stats"]["get"]["responses"]["401"]["content"][JSON]["schema"]
            for _, op in operations(schema):
                responses = op.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422", "")):
                    del responses["422"]
                    responses.setdefault("400", {"description": _ERROR_TEXT[400], "content": {JSON: {"schema": error}}})
            json_error_bodies(schema)
            declare_everywhere(schema, 401, _ERROR_TEXT[401], error, guarded)
            declare_everywhere(schema, 500, _INTERNAL, error, headers={"x-request-id": "The request's id"})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _protocol_error(exc: ProtocolError) -> JSONResponse:
    return error_response(
        OpenAIError(exc.status, exc.message, _KIND.get(exc.status, "invalid_request_error"), None, exc.type)
    )


def wrap(app: Any, api_key: str | None = None) -> Any:
    """What a replica serves: ``app``, behind :class:`RequireKey` when there is a key."""
    return RequireKey(app, api_key) if api_key else app


def make_asgi(serving: OpenAIServing, api_key: str | None = None) -> Any:
    """The transformers engine's app as a replica serves it: :func:`make_api`, fabric's routes, :func:`wrap`."""
    api = make_api(serving)
    add_routes(api, serving.stats, serving.monitor)
    return wrap(api, api_key)
