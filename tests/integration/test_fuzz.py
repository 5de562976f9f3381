"""The OpenAI-compatible LLM app (fabric.serve.llm) on real Serve at 127.0.0.1 with an API key set: every route
of its OpenAPI document refuses requests without the key, every operation fuzzed (schemathesis, valid and
invalid requests, with the key) gets answers that conform to that document (status, content type, body
schema; invalid requests refused; no 5xx, no hung request), and the endpoint listens on loopback only.

The tabular app's fuzzing is in tests/integration/test_reliability.py (it shares that module's deployment).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from fabric import runtime
from fabric.config import load_config
from tests.integration.fuzzing import fuzz
from tests.llm_fixtures import tiny_llm
from tests.unit.serve.serving import local_ray

pytestmark = pytest.mark.integration

KEY_ENV = "FABRIC_FUZZ_LLM_KEY"
KEY = "sk-fuzz-51c9"
MODEL = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Ray and the LLM app (CPU engine, tiny model, an API key) on a free port; ended with Ray."""
    from fabric.serve.llm import deploy

    root = tmp_path_factory.mktemp("llm-fuzz")
    run_dir = tiny_llm(root / "runs")
    # Serve's Python proxy: these tests are about the API; the fast path is served in test_cluster_serve.py
    with local_ray(root / "home", fast_path=False, env={KEY_ENV: KEY}):
        port = runtime.free_port()
        cfg = load_config(
            None,
            [
                f"run_dir={run_dir}",
                f"llm.serve.port={port}",
                f"llm.serve.served_name={MODEL}",
                f"llm.serve.api_key_env={KEY_ENV}",
                # fabric's own OpenAI layer (the transformers engine): on vLLM the OpenAI routes are vLLM's own app
                "llm.serve.engine=transformers",
                "llm.serve.replica_cpus=0",
                "llm.serve.fast_path=false",
                "monitor.enabled=false",
            ],
        )
        url = deploy(cfg, timeout_s=240)
        yield {"url": url.rstrip("/"), "port": port}


@pytest.fixture(scope="module")
def openapi(served: dict[str, Any]) -> dict[str, Any]:
    return httpx.get(served["url"] + "/openapi.json", timeout=30).json()


def test_every_protected_route_refuses_requests_without_the_key(
    served: dict[str, Any], openapi: dict[str, Any]
) -> None:
    routes = [
        (method.upper(), path)
        for path, ops in openapi["paths"].items()
        for method in ops
        if path.startswith(("/v1/", "/stats"))
    ]
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= set(routes)
    for method, path in routes:
        concrete = path.replace("{model}", MODEL).replace("{model_id}", MODEL)
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": KEY}):  # the last: no scheme
            r = httpx.request(method, served["url"] + concrete, headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.json()["error"]["type"] == "authentication_error"
    # and the same routes answer with it
    ok = httpx.get(served["url"] + "/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL


# Requests naming the served model (generated ones do not guess it), streamed ones among them: their answers
# are validated too.
_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "seven"}], "max_tokens": 3}
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "GET /v1/models/{model}": [{"path_parameters": {"model": MODEL}}],
    "POST /v1/completions": [
        {"body": {"model": MODEL, "prompt": "seven", "max_tokens": 3, "logprobs": 2}},
        {"body": {"model": MODEL, "prompt": "seven", "max_tokens": 3, "stream": True}},
    ],
    "POST /v1/chat/completions": [{"body": _CHAT}, {"body": {**_CHAT, "stream": True}}],
    "POST /tokenize": [{"body": {"model": MODEL, "prompt": "seven"}}],
    "POST /detokenize": [{"body": {"model": MODEL, "tokens": [1, 2, 3]}}],
}


def test_every_operation_fuzzed_with_the_key_gets_answers_conforming_to_openapi(served: dict[str, Any]) -> None:
    # generation is bounded by the tiny model's context; a hung request times out at 60 s
    auth = {"authorization": f"Bearer {KEY}"}
    result = fuzz(served["url"], max_examples=20, timeout_s=60, headers=auth, examples=EXAMPLES)
    seen = result.statuses
    print(f"\nLLM fuzz: {len(seen)} requests over {len(result.operations)} operations, statuses {sorted(set(seen))}")
    assert not result.problems, "\n".join(result.problems[:20])
    assert 200 in seen and any(400 <= code < 500 for code in seen)


def test_the_llm_endpoint_listens_on_loopback_only(served: dict[str, Any]) -> None:
    conns = psutil.net_connections("tcp")
    listening = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == served["port"]}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
