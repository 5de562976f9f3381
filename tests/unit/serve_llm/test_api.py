"""The FastAPI layer in-process (httpx's ASGI transport): auth, error shapes, routes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fabric.serve.llm.api import make_asgi
from fabric.serve.llm.serving import OpenAIServing
from fabric.serve.llm.transformers_engine import TransformersEngine

KEY = "sk-unit"


def _call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, timeout=30, **kw)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def app(engine: TransformersEngine) -> Any:
    return make_asgi(OpenAIServing(engine, engine.cfg), api_key=KEY)


AUTH = {"authorization": f"Bearer {KEY}"}


def test_v1_routes_need_the_key_and_health_does_not(app: Any) -> None:
    for headers, code in (
        ({}, "missing_api_key"),
        ({"authorization": "Bearer nope"}, "invalid_api_key"),
        ({"authorization": f"Basic {KEY}"}, "invalid_api_key"),
    ):
        r = _call(app, "POST", "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == code
        assert r.headers["www-authenticate"] == "Bearer"
    assert _call(app, "GET", "/stats").status_code == 401
    assert _call(app, "GET", "/health").json() == {"status": "ok", "model": "tiny", "engine": "transformers"}
    assert _call(app, "GET", "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"


def test_errors_are_openai_shaped(app: Any) -> None:
    r = _call(
        app, "POST", "/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    r = _call(app, "GET", "/v1/models/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _call(app, "GET", "/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    # the monitor routes answer in the same shape when there is no monitor
    r = _call(app, "GET", "/monitor/drift")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openapi_declares_every_error_with_its_json_body(app: Any) -> None:
    spec = _call(app, "GET", "/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            answers = op["responses"]
            assert "422" not in answers, (method, path)  # FastAPI's validation errors are answered as 400s
            assert answers["500"]["content"]["application/json"]["schema"] == error, (method, path)
            guarded = path.startswith(("/v1/", "/tokeni", "/detokenize", "/stats", "/monitor/reset"))
            assert ("401" in answers) == guarded, (method, path)
            for status, answer in answers.items():
                if status[0] in "45":
                    assert answer["content"]["application/json"]["schema"] == error, (method, path, status)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["200"]["content"].keys() == {"application/json", "text/event-stream"}
    assert {"400", "401", "404"} <= set(chat)
    assert "503" in spec["paths"]["/health"]["get"]["responses"]


def test_a_completion_through_the_router(app: Any) -> None:
    r = _call(
        app, "POST", "/v1/completions", json={"model": "tiny:a", "prompt": "seven", "max_tokens": 3}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny:a" and body["usage"]["completion_tokens"] == 3
    assert "/v1/chat/completions" in _call(app, "GET", "/openapi.json").json()["paths"]


def test_an_unexpected_failure_is_a_json_500_carrying_the_request_id(
    engine: TransformersEngine, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(OpenAIServing):
        def models(self) -> Any:
            raise RuntimeError("boom")

    app = make_asgi(Broken(engine, engine.cfg), api_key=KEY)
    async def go() -> httpx.Response:  # Starlette re-raises after answering, as a server would log it
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/v1/models", headers={**AUTH, "x-request-id": "req-42"}, timeout=30)

    with caplog.at_level("ERROR", logger="fabric.serve.llm"):
        r = asyncio.run(go())
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "server_error" and "req-42" in r.json()["error"]["message"]
    assert r.headers["x-request-id"] == "req-42"
    assert any("req-42" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_tokenize_detokenize_and_tokenizer_info_as_vllm_answers_them(app: Any) -> None:
    ids = _call(app, "POST", "/tokenize", json={"model": "tiny", "prompt": "the cat sat"}, headers=AUTH).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    back = _call(app, "POST", "/detokenize", json={"model": "tiny", "tokens": ids["tokens"]}, headers=AUTH).json()
    assert back["prompt"].endswith("the cat sat")
    info = _call(app, "GET", "/tokenizer_info", headers=AUTH).json()
    assert info["eos_token"] and info["chat_template"]
    assert _call(app, "POST", "/tokenize", json={"prompt": "x"}).status_code == 401  # behind the key
