"""vLLM (its CPU build) behind fabric's language-model app on a real local Ray Serve, on Serve's fast path.

One app for the module: a tiny Llama that ``fabric finetune`` trains here, served by vLLM with the LoRA adapter
fine-tuning wrote, an API key and the drift monitor; driven by the official ``openai`` client (logprobs, echo,
token-id prompts, JSON schema output, a named tool call, ``n``, streams) and by raw HTTP (401s, 400s,
tokenize, the monitor). Each vLLM start costs tens of seconds here: everything that needs the app is here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric.config import load_config
from fabric.runtime import free_port
from tests.unit.serve.serving import local_ray

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make install has it)"),
]
openai = pytest.importorskip("openai")
KEY_ENV = "FABRIC_TEST_VLLM_KEY"
KEY = "sk-vllm-test"
MODEL = "tiny"
TINY_LLAMA = [  # a Llama (vLLM has LoRA for it, not for GPT-2) with vLLM's CPU head size (64)
    "llm.model.arch=llama", "llm.model.n_layer=2", "llm.model.n_embd=128", "llm.model.n_head=2",
    "llm.model.context_length=256", "llm.model.vocab_size=400", "llm.data.seq_len=64", "llm.lora.dropout=0.0",
    "llm.finetune.epochs=1", "llm.finetune.batch_size=8", "llm.finetune.lr=0.01", "llm.finetune.num_workers=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def vllm_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``fabric finetune`` of a tiny Llama with ``llm.eval.after_finetune`` (which deploys the base and the new
    adapter on vLLM through fabric's app and evaluates both); the tests then use that app."""
    from fabric.pipeline import finetune
    from fabric.serve.llm import deploy

    root = tmp_path_factory.mktemp("vllm")
    run_dir = root / "runs"
    with local_ray(root / "home", fast_path=True, env={KEY_ENV: KEY}):  # its end ends Serve and the monitor
        vllm = {
            "enforce_eager": True,  # no graph compilation: a start in seconds for a model this small
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            "enable_auto_tool_choice": True,
            "tool_call_parser": "hermes",
        }
        common = [
            f"run_dir={run_dir}",
            "name=tiny",
            "track.experiment=vllm",
            f"llm.finetune.model_name={MODEL}",
            f"llm.serve.port={free_port()}",
            f"llm.serve.api_key_env={KEY_ENV}",
            "llm.serve.kv_cache_gb=0.25",
            "llm.serve.replica_cpus=0",
            f"llm.serve.vllm={json.dumps(vllm)}",
            "monitor.min_samples=5",
            "monitor.detached=false",
            *TINY_LLAMA,
        ]
        after = ["llm.eval.after_finetune=true", "llm.eval.tasks=[fabric_arithmetic]", "llm.eval.limit=2"]
        finetune(load_config(None, [*common, *after]))
        # the app the evaluation deployed: the base and the adapter as `finetuned` (this config is the same app)
        cfg = load_config(
            None,
            [
                *common,
                f"llm.serve.model_path={run_dir / 'llm' / 'base'}",
                f"llm.serve.adapters={{finetuned: {run_dir / 'llm' / 'adapter'}}}",
                f"llm.serve.served_name={MODEL}",
            ],
        )
        assert cfg.llm.serve.engine == "auto"  # vLLM because it is installed: no GPU asked for
        url = deploy(cfg, timeout_s=400)
        yield {"url": url, "cfg": cfg, "run_dir": Path(run_dir)}


@pytest.fixture(scope="module")
def client(vllm_app: dict[str, Any]) -> Any:  # noqa: F811
    return openai.OpenAI(base_url=vllm_app["url"] + "/v1", api_key=KEY, timeout=120, max_retries=0)


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def test_models_list_the_base_and_the_finetuned_adapter(client: Any, vllm_app: dict[str, Any]) -> None:  # noqa: F811
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, f"{MODEL}:finetuned"}
    assert cards[f"{MODEL}:finetuned"].parent == MODEL  # type: ignore[attr-defined]
    health = httpx.get(vllm_app["url"] + "/health", timeout=10)  # probes need no key
    assert health.json() == {"status": "ok", "model": MODEL, "engine": "vllm"}


def test_every_route_but_probes_needs_the_key(vllm_app: dict[str, Any]) -> None:  # noqa: F811
    url = vllm_app["url"]
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize"), ("GET", "/stats")):
        r = httpx.request(method, url + path, json={"model": MODEL, "prompt": "x"}, timeout=10)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(url + "/monitor/reset", headers={"authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_docs_load_offline_without_the_key(vllm_app: dict[str, Any]) -> None:  # noqa: F811
    """vLLM's /docs page loads Swagger UI from a CDN; fabric's serves it from the app, and a browser needs no key."""
    from tests.unit.serve.test_docs_offline import _EXTERNAL, loaded_urls

    url = vllm_app["url"]
    page = httpx.get(url + "/docs", timeout=10)
    assert page.status_code == 200 and not _EXTERNAL.findall(page.text), _EXTERNAL.findall(page.text)
    assets = [u for u in loaded_urls(page.text) if not u.startswith("data:")]
    assert any(u.endswith("swagger-ui-bundle.js") for u in assets)
    for asset in assets:
        assert httpx.get(url + asset, timeout=10).status_code == 200, asset


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(client: Any, vllm_app: dict[str, Any]) -> None:
    # lm-evaluation-harness' loglikelihood request: the prompt echoed with each token's logprob, one new token
    prompt = "the cat sat on a mat"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens + 1
    # the same prompt as token ids (from the app's /tokenize) scores the same
    ids = httpx.post(
        vllm_app["url"] + "/tokenize", json={"model": MODEL, "prompt": prompt}, headers=_auth(), timeout=30
    ).json()["tokens"]
    assert len(ids) == r.usage.prompt_tokens
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1)
    scored = by_ids.choices[0].logprobs.token_logprobs[1 : len(ids)]  # the prompt's (the new token is sampled)
    assert scored == pytest.approx(lp.token_logprobs[1 : len(ids)], abs=1e-3)


def test_the_adapter_changes_the_scores(client: Any) -> None:
    kw = {"prompt": "what is the capital of hungary", "max_tokens": 1, "echo": True, "logprobs": 1}
    base = client.completions.create(model=MODEL, **kw).choices[0].logprobs.token_logprobs[1:]
    tuned = client.completions.create(model=f"{MODEL}:finetuned", **kw).choices[0].logprobs.token_logprobs[1:]
    assert len(base) == len(tuned) and base != pytest.approx(tuned, abs=1e-4)


def test_chat_logprobs_n_and_a_stream_equal_to_the_plain_answer(client: Any) -> None:
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "where is the red apple"}], "max_tokens": 8}
    plain = client.chat.completions.create(**kw, temperature=0, logprobs=True, top_logprobs=2)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    chunks = list(client.chat.completions.create(**kw, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    several = client.chat.completions.create(**kw, temperature=1.0, n=3, seed=5)
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = client.chat.completions.create(**kw, temperature=1.0, n=3, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]


def test_json_schema_output_is_valid_json_of_the_schema(client: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "answer in json"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def _no_whitespace_runs(run_dir: Path) -> dict[str, int]:
    """A ``logit_bias`` banning whitespace-only tokens: a random tiny model in a tool call's grammar (which allows
    whitespace between JSON tokens, as vLLM's hermes format does) would otherwise pick them until max_tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "llm" / "base")
    texts = {i: tok.decode([i]) for i in tok.get_vocab().values()}
    return {str(i): -100 for i, text in texts.items() if text and not text.strip()}


def test_a_named_tool_call(client: Any, vllm_app: dict[str, Any]) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Budapest"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in budapest?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=160,  # the tiny tokenizer spends ~75 tokens on the call
        temperature=0,
        logit_bias=_no_whitespace_runs(vllm_app["run_dir"]),
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Budapest")


def test_bad_fields_are_400s_naming_them_and_unknown_models_404(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):  # prompt + max_tokens past the context
        client.completions.create(model=MODEL, prompt="the cat " * 40, max_tokens=10_000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_tokenize_and_detokenize_round_trip(vllm_app: dict[str, Any]) -> None:  # noqa: F811
    url = vllm_app["url"]
    ids = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "seven red apples"}, headers=_auth(), timeout=30)
    assert ids.status_code == 200
    back = httpx.post(
        url + "/detokenize", json={"model": MODEL, "tokens": ids.json()["tokens"]}, headers=_auth(), timeout=30
    )
    assert back.json()["prompt"].endswith("seven red apples")


def test_served_requests_reach_stats_and_the_drift_monitor(client: Any, vllm_app: dict[str, Any]) -> None:  # noqa: F811
    url = vllm_app["url"]
    before = httpx.get(url + "/stats", headers=_auth(), timeout=10).json()
    for i in range(6):
        client.completions.create(model=MODEL, prompt=f"the dog ran {i}", max_tokens=4 + i, temperature=0)
    stats = httpx.get(url + "/stats", headers=_auth(), timeout=10).json()
    assert stats["engine"] == "vllm"
    assert stats["requests"] - before["requests"] == 6
    assert stats["completion_tokens"] - before["completion_tokens"] == sum(4 + i for i in range(6))
    drift = httpx.get(url + "/monitor/drift", params={"refresh": "true"}, timeout=60)
    assert drift.status_code == 200, drift.text
    assert drift.json()["monitor"]["received"] >= 6


def test_lm_eval_scores_base_and_adapter_and_logs_them_to_the_adapters_run(vllm_app: dict[str, Any]) -> None:
    """lm-evaluation-harness' own client (local-completions) on fabric's shipped log-likelihood and generation
    tasks, through ``fabric.evaluate`` (what ``fabric eval-llm`` runs)."""
    import mlflow

    from fabric import evaluate
    from fabric.tracking import CHAMPION, alias_version, tracking_uri

    cfg = vllm_app["cfg"].model_copy(deep=True)
    cfg.llm.eval.limit = 8
    cfg.llm.eval.promote_metric = "fabric_capitals/acc"
    result = evaluate.run(cfg, vllm_app["url"])
    assert set(result.scores) == {MODEL, f"{MODEL}:finetuned"} and result.base == MODEL
    for scores in result.scores.values():
        assert set(scores) == {"fabric_capitals/acc", "fabric_arithmetic/exact_match"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    table = result.table()
    assert "fabric_capitals/acc" in table and f"{MODEL}:finetuned" in table
    assert result.report().splitlines()[0] == f"eval-llm: fabric_arithmetic, fabric_capitals at {vllm_app['url']}"
    assert result.report().splitlines()[-1].startswith("promotion: ")
    client = mlflow.MlflowClient(tracking_uri(cfg))
    # fine-tuning evaluated its adapter already (llm.eval.after_finetune, in the fixture): the same run has both
    assert len(client.get_metric_history(result.run_id, "eval/finetuned/fabric_arithmetic/exact_match")) == 2
    logged = client.get_run(result.run_id).data.metrics
    assert logged["eval/base/fabric_capitals/acc"] == result.scores[MODEL]["fabric_capitals/acc"]
    assert logged["eval/finetuned/fabric_arithmetic/exact_match"] == result.scores[f"{MODEL}:finetuned"]["fabric_arithmetic/exact_match"]
    # the promotion rule: champion exactly when the adapter is not worse than the base on the metric
    ok = result.scores[f"{MODEL}:finetuned"]["fabric_capitals/acc"] >= result.scores[MODEL]["fabric_capitals/acc"]
    assert (result.promoted is not None) == ok
    assert (alias_version(client, MODEL, CHAMPION) is not None) == ok


def test_fabric_generate_names_a_bad_record_by_its_line_before_any_work(
    vllm_app: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    """(A generation itself, with its ids, runs in test_llm_object_storage: prompts and model from a bucket.)"""
    from fabric.cli import main

    cfg = vllm_app["cfg"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": null}\nnot json\n')
    args = [f"run_dir={cfg.run_dir}", "llm.serve.kv_cache_gb=0.25", "llm.generate.max_tokens=6"]
    assert main(["generate", "--input", str(bad), "--output", str(tmp_path / "x.parquet"), *args]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3: not JSON" in err and "x.parquet" not in os.listdir(tmp_path)


def test_vllms_metrics_reach_rays_prometheus_endpoint(client: Any) -> None:
    """TTFT, time per output token, queue depth and KV-cache use, for Grafana's LLM panels."""
    import re
    import urllib.request

    import ray

    from tests.unit.serve.serving import wait_for

    client.completions.create(model=MODEL, prompt="the river", max_tokens=4)
    port = ray._private.worker.global_worker.node.metrics_export_port  # this node's Prometheus endpoint
    wanted = ("time_to_first_token_seconds", "request_time_per_output_token_seconds", "num_requests_waiting", "kv_cache_usage_perc")

    def scraped() -> bool:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return all(re.search(rf"^ray_vllm_{w}\w*{{", text, re.M) for w in wanted)

    wait_for(scraped, 90, "vLLM's metrics in Ray's Prometheus export")
