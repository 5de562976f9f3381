"""lm-evaluation-harness' own OpenAI client (``local-completions``) against the transformers engine's app on a
real local HTTP server: its log-likelihoods (echo + logprobs, sent as token ids or as text) equal those of
lm-eval's own transformers backend on the same model folder."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric import runtime
from fabric.serve.llm.api import make_asgi
from fabric.serve.llm.serving import OpenAIServing
from fabric.serve.llm.transformers_engine import TransformersEngine

lm_eval = pytest.importorskip("lm_eval")
LIMIT = 4


@pytest.fixture(scope="module")
def url(engine: TransformersEngine) -> Iterator[str]:
    """The engine's app under uvicorn on 127.0.0.1 (lm-eval's client is aiohttp: it needs a real server)."""
    import uvicorn

    port = runtime.free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_asgi(OpenAIServing(engine, engine.cfg)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from lm_eval.tasks import TaskManager

    from fabric.evaluate._harness import task_folder

    return TaskManager(include_path=str(task_folder(None, tmp_path_factory.mktemp("tasks"))))


def _loglikelihoods(model: str, model_args: dict[str, Any], tasks: Any) -> list[tuple[float, bool]]:
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["fabric_capitals"],
        task_manager=tasks,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = out["samples"]["fabric_capitals"]
    assert len(samples) == LIMIT
    return [tuple(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]


def test_lm_eval_scores_through_the_server_as_it_scores_the_model(
    url: str, engine: TransformersEngine, tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = str(engine.cfg.model_path)
    reference = _loglikelihoods("hf", {"pretrained": folder, "device": "cpu", "dtype": "float32"}, tasks)
    assert len(reference) == LIMIT * 4  # four choices per question
    for tokenized in (True, False):  # token-id prompts, and text prompts
        served = _loglikelihoods(
            "local-completions",
            {
                "model": "tiny",
                "base_url": f"{url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": folder,
                "tokenized_requests": tokenized,
                "max_length": engine.max_model_len,
                "num_concurrent": 2,
            },
            tasks,
        )
        assert [greedy for _, greedy in served] == [greedy for _, greedy in reference]
        assert [ll for ll, _ in served] == pytest.approx([ll for ll, _ in reference], abs=1e-3)
