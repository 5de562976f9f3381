"""Real Ray Serve on 127.0.0.1 serving a tiny language model over the OpenAI API, driven by the `openai` client.

One deployment for the module (the CPU engine, two LoRA adapters, an API key, the drift monitor): models,
completions, chat, streaming, n > 1, stop sequences, adapter selection, the 4xx answers, batching under load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric.config import load_config
from fabric.runtime import free_port
from tests.llm_fixtures import CONTEXT, tiny_llm
from tests.unit.serve.serving import local_ray

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")
KEY_ENV = "FABRIC_TEST_LLM_KEY"
KEY = "sk-test-7f3a"
MODEL = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Ray, the LLM app on a free port and its drift monitor; ended with Ray."""
    from fabric.serve.llm import deploy

    root = tmp_path_factory.mktemp("llm-serve")
    run_dir = tiny_llm(root / "runs")
    # Serve's Python proxy: these tests are about the API; the fast path is served in test_cluster_serve.py
    with local_ray(root / "home", fast_path=False, env={KEY_ENV: KEY}):  # its end ends Serve and the monitor
        cfg = load_config(
            None,
            [
                f"run_dir={run_dir}",
                f"llm.serve.port={free_port()}",
                f"llm.serve.served_name={MODEL}",
                f"llm.serve.adapters={{a: {run_dir / 'llm' / 'adapter'}, b: {run_dir / 'llm' / 'adapter2'}}}",
                "llm.serve.max_loaded_adapters=1",
                f"llm.serve.api_key_env={KEY_ENV}",
                "llm.serve.engine=transformers",  # fabric's own OpenAI layer; vLLM: test_llm_vllm.py
                "llm.serve.replica_cpus=0",
                "llm.serve.fast_path=false",
                "llm.serve.batch_wait_s=0.05",
                "monitor.min_samples=5",
                "monitor.detached=false",
            ],
        )
        url = deploy(cfg, timeout_s=240)
        yield {"url": url, "cfg": cfg, "run_dir": Path(run_dir)}


@pytest.fixture(scope="module")
def client(served: dict[str, Any]) -> Any:
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, timeout=60, max_retries=0)


def test_models_lists_the_base_and_its_adapters(client: Any, served: dict[str, Any]) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, f"{MODEL}:a", f"{MODEL}:b"]
    assert client.models.retrieve(f"{MODEL}:a").parent == MODEL  # type: ignore[attr-defined]
    assert httpx.get(served["url"] + "/health", timeout=10).json() == {
        "status": "ok",
        "model": MODEL,
        "engine": "transformers",
    }


def test_completion_counts_usage_and_stops_at_max_tokens(client: Any) -> None:
    r = client.completions.create(model=MODEL, prompt="the cat sat on", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    again = client.completions.create(model=MODEL, prompt="the cat sat on", max_tokens=7, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_streamed_chat_equals_the_plain_answer_and_ends_with_done(client: Any, served: dict[str, Any]) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the red apple"}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "seed": 7}
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 12
    # the raw stream is server-sent events ending with [DONE]
    with httpx.stream(
        "POST",
        served["url"] + "/v1/chat/completions",
        json={**kw, "stream": True},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_seeded_sampling_and_n_choices(client: Any) -> None:
    kw = {"model": MODEL, "prompt": "seven red apples", "max_tokens": 10, "temperature": 1.0, "seed": 11, "n": 3}
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # each choice samples its own stream
    assert [c.text for c in client.completions.create(**kw).choices] == texts  # and the seed reproduces them
    assert r.usage.completion_tokens == 30


def test_stop_sequence_cuts_the_text_before_it(client: Any) -> None:
    full = client.completions.create(model=MODEL, prompt="the dog ran", max_tokens=16, temperature=0).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3 and stop in full
    r = client.completions.create(model=MODEL, prompt="the dog ran", max_tokens=16, temperature=0, stop=[stop, "§§"])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_adapter_selection_changes_the_output(client: Any, served: dict[str, Any]) -> None:
    kw = {"prompt": "the quiet river", "max_tokens": 10, "temperature": 0}
    base = client.completions.create(model=MODEL, **kw).choices[0].text
    a = client.completions.create(model=f"{MODEL}:a", **kw).choices[0].text
    b = client.completions.create(model=f"{MODEL}:b", **kw).choices[0].text
    assert len({base, a, b}) == 3
    # only one adapter fits (max_loaded_adapters=1): `a` comes back after an eviction, with the same output
    assert client.completions.create(model=f"{MODEL}:a", **kw).choices[0].text == a
    stats = httpx.get(served["url"] + "/stats", headers={"authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert stats["engine"]["adapter_evictions"] >= 2
    assert stats["engine"]["loaded_adapters"] == ["a"]


def test_the_api_key_is_required(served: dict[str, Any]) -> None:
    for key in (None, "sk-wrong"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(
            served["url"] + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers, timeout=10
        )
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=served["url"] + "/v1", api_key="sk-wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_bad_requests_are_4xx_in_openai_shape(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="the cat " * 40, max_tokens=CONTEXT)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and f"maximum context length is {CONTEXT}" in err["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model=f"{MODEL}:nope", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"


def test_concurrent_requests_are_batched_and_monitored(served: dict[str, Any]) -> None:
    url, headers = served["url"], {"authorization": f"Bearer {KEY}"}

    async def burst() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        rs = await asyncio.gather(
            *(
                aclient.completions.create(model=MODEL, prompt=f"apple {i}", max_tokens=8, temperature=0)
                for i in range(8)
            )
        )
        await aclient.close()
        return [r.choices[0].text for r in rs]

    texts = asyncio.run(burst())
    assert len(texts) == 8
    stats = httpx.get(url + "/stats", headers=headers, timeout=10).json()
    assert stats["engine"]["max_batch_rows"] >= 4  # no earlier test had more than 3 sequences at once
    # the drift monitor received the served stream (prompt and completion lengths) and compares it
    drift = httpx.get(url + "/monitor/drift", params={"refresh": "true"}, timeout=60)
    assert drift.status_code == 200, drift.text
    body = drift.json()
    assert body["status"] == "ok", body
    assert set(body["columns"]) == {"prompt_tokens", "completion_tokens"}
    assert body["monitor"]["received"] >= 8  # one row per answered choice
