"""The thin HTTP layer: OpenAI routes over :class:`~fabric.serve.llm.serving.OpenAIServing`.

Routes:

* ``GET /v1/models``, ``GET /v1/models/{model}``
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: ``text/event-stream``)
* ``GET /health`` (no key needed: for probes), ``GET /stats`` (request and engine batching counters)
* ``GET /monitor/drift``, ``GET /monitor/report`` (the drift monitor, through the monitor hook)

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with its status: 400 for a bad
body (naming the field), 401 for a missing or wrong API key, 404 for an unknown model or route.
"""

from __future__ import annotations

import hmac
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
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    from_validation_errors,
)
from fabric.serve.llm.serving import OpenAIServing
from fabric.serve.protocol import ProtocolError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid body or parameters, or prompt + max_tokens over the context"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
}
_KIND = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 503: "server_error"}


def error_response(e: OpenAIError) -> JSONResponse:
    """The JSON error body of an OpenAIError with its status."""
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.payload(), status_code=e.status, headers=headers)


class RequireKey:
    """ASGI middleware: ``/v1/...`` and ``/stats`` need ``Authorization: Bearer <key>`` (401 otherwise).

    Checked before the body is read, so an unauthenticated client learns nothing about its request.
    """

    PROTECTED = ("/v1/", "/stats")

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
            if path.startswith(self.PROTECTED):
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

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> Response:  # from the monitor hook
        return error_response(
            OpenAIError(exc.status, exc.message, _KIND.get(exc.status, "invalid_request_error"), None, exc.type)
        )

    def answer(result: Any) -> Response:
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, summary="The served model and its adapters")
    async def models() -> ModelList:
        return serving.models()

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS, summary="One model")
    async def model(model: str) -> ModelCard:
        return serving.model(model)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS, summary="Complete a prompt")
    async def completions(body: CompletionRequest) -> Response:
        return answer(await serving.completions(body))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_ERRORS,
        summary="Answer a conversation",
    )
    async def chat(body: ChatCompletionRequest) -> Response:
        return answer(await serving.chat(body))

    @app.get("/health", response_model=HealthResponse, summary="The engine can generate")
    async def health() -> Response:
        try:
            await serving.engine.check_health()
        except Exception as e:
            return error_response(OpenAIError(503, f"engine unhealthy: {e}", "server_error"))
        return JSONResponse({"status": "ok", "model": serving.name, "engine": serving.engine.kind})

    @app.get("/stats", summary="Request counters and the engine's batching counters of the answering replica")
    async def stats() -> dict[str, Any]:
        return serving.stats()

    @app.get("/monitor/drift", responses=_ERRORS, summary="Drift of the served stream against fine-tuning's reference")
    async def monitor_drift(refresh: bool = False) -> dict[str, Any]:
        return await _hook(serving).drift(refresh)

    @app.get("/monitor/report", response_class=HTMLResponse, responses=_ERRORS, summary="The HTML drift report")
    async def monitor_report() -> HTMLResponse:
        return HTMLResponse(await _hook(serving).report())

    return app


def _hook(serving: OpenAIServing) -> Any:
    from fabric.serve.monitor_hook import NoMonitor

    return serving.monitor or NoMonitor()


def make_asgi(serving: OpenAIServing, api_key: str | None = None) -> Any:
    """What a replica serves: :func:`make_api`, behind :class:`RequireKey` when there is a key."""
    api = make_api(serving)
    return RequireKey(api, api_key) if api_key else api
