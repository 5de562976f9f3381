"""vLLM's CUDA build through fabric's OpenAI app on a GPU replica (needs the `gpu` extra and a CUDA GPU; skipped
elsewhere, saying why). Its CPU twin, on vLLM's CPU build, is tests/integration/test_llm_vllm.py."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.config import load_config
from fabric.runtime import free_port
from tests.llm_fixtures import tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install 'fabric[gpu]')"
    ),
]
openai = pytest.importorskip("openai")




@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import ray

    from fabric.serve.llm import deploy

    root = tmp_path_factory.mktemp("vllm")
    run_dir = tiny_llama(root / "runs")
    os.environ["FABRIC_HOME"] = str(root / "home")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"llm.serve.port={free_port()}",
            "llm.serve.served_name=tiny",
            f"llm.serve.adapters={{a: {run_dir / 'llm' / 'adapter'}}}",
            "llm.serve.engine=vllm",
            "llm.serve.gpu_memory_utilization=0.3",
            "llm.serve.dtype=float32",
            "llm.serve.replica_gpus=1",
            "llm.serve.fast_path=false",
            "llm.serve.monitor=false",
        ],
    )
    try:
        url = deploy(cfg, timeout_s=600)
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        ray.shutdown()


def test_vllm_answers_completions_chat_and_streams(client: Any) -> None:
    r = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    kw = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "seed": 1,
    }
    plain = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices
    )
    assert streamed == plain


def test_vllm_serves_the_lora_adapter(client: Any) -> None:
    kw = {"prompt": "the quiet river", "max_tokens": 8, "temperature": 0}
    base = client.completions.create(model="tiny", **kw).choices[0].text
    assert client.completions.create(model="tiny:a", **kw).choices[0].text != base


def test_vllm_refuses_context_overflow(client: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="the cat " * 40, max_tokens=100_000)
