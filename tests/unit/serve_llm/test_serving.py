"""The OpenAI serving logic over a real engine: templates, SSE, n, stop, context checks, monitor rows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from fabric.serve.llm.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from fabric.serve.llm.serving import DEFAULT_CHAT_TEMPLATE, DONE, OpenAIServing, render_chat, sse
from fabric.serve.llm.transformers_engine import TransformersEngine
from tests.llm_fixtures import CHAT_TEMPLATE, CONTEXT


class RecordingMonitor:
    """A monitor hook that keeps what it is handed (``fail``: raises instead, as a broken monitor would)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.rows: list[Mapping[str, Any]] = []

    def observe(self, version: str, rows: Sequence[Mapping[str, Any]] | None, predictions: Sequence[Any]) -> None:
        if self.fail:
            raise RuntimeError("monitor down")
        self.rows += list(rows or [])


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 0.25
        return self.t


@pytest.fixture(scope="module")
def serving(engine: TransformersEngine) -> OpenAIServing:
    return OpenAIServing(engine, engine.cfg, RecordingMonitor(), FakeClock())


def _completion(serving: OpenAIServing, **body: Any) -> Any:
    return asyncio.run(serving.completions(CompletionRequest.model_validate({"model": "tiny", **body})))


def _events(serving: OpenAIServing, method: str, model: type, body: dict[str, Any]) -> list[str]:
    async def collect() -> list[str]:
        stream = await getattr(serving, method)(model.model_validate({"model": "tiny", "stream": True, **body}))
        assert isinstance(stream, AsyncIterator)
        return [piece async for piece in stream]

    # a piece may carry several events (outputs that were ready together): split them
    text = "".join(asyncio.run(collect()))
    assert text.endswith("\n\n")
    return [event + "\n\n" for event in text.split("\n\n")[:-1]]


def test_the_default_chat_template_is_the_fine_tuning_contract(engine: TransformersEngine) -> None:
    assert DEFAULT_CHAT_TEMPLATE == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert render_chat(engine.tokenizer, messages) == expected

    class NoTemplate:  # a tokenizer without a chat_template falls back to the default
        chat_template = None

        def apply_chat_template(self, messages: list, chat_template: str, **kw: Any) -> str:
            return engine.tokenizer.apply_chat_template(messages, chat_template=chat_template, **kw)

    assert render_chat(NoTemplate(), messages) == expected


def test_sse_lines() -> None:
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert DONE == "data: [DONE]\n\n"


def test_streamed_completion_equals_the_plain_one(serving: OpenAIServing) -> None:
    body = {"prompt": "the cat sat", "max_tokens": 9, "temperature": 0}
    plain = _completion(serving, **body)
    events = _events(serving, "completions", CompletionRequest, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == DONE and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain.choices[0].text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain.usage.model_dump()


def test_streamed_chat_opens_with_the_role_and_closes_each_choice(serving: OpenAIServing) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "n": 2}
    chunks = [json.loads(e[6:]) for e in _events(serving, "chat", ChatCompletionRequest, body)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1] and all(f["finish_reason"] == "length" for f in finals)


def test_n_and_several_prompts_index_across_prompts(serving: OpenAIServing) -> None:
    r = _completion(serving, prompt=["seven", "the dog"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text  # greedy: n copies
    assert r.usage.completion_tokens == 16
    prompt_tokens = sum(len(serving.engine.tokenizer(p)["input_ids"]) for p in ("seven", "the dog"))
    assert r.usage.prompt_tokens == prompt_tokens  # counted once per prompt, not per choice


def test_context_overflow_says_the_numbers(serving: OpenAIServing) -> None:
    prompt = "the cat sat on the mat " * 6
    n = len(serving.engine.tokenizer(prompt)["input_ids"])
    with pytest.raises(OpenAIError) as e:
        _completion(serving, prompt=prompt, max_tokens=CONTEXT)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in e.value.message
    assert f"{n + CONTEXT} tokens ({n} in the prompt, {CONTEXT} for the completion)" in e.value.message
    # without max_tokens the default is cut to what the context has left
    tok = serving.engine.tokenizer
    long_prompt = tok.decode(tok("the cat sat on the mat " * 30)["input_ids"][: CONTEXT - 3])
    r = _completion(serving, prompt=long_prompt, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT
    assert r.choices[0].finish_reason == "length"


def test_models_and_adapter_resolution(serving: OpenAIServing) -> None:
    assert [m.id for m in serving.models().data] == ["tiny", "tiny:a", "tiny:b"]
    assert serving.resolve("tiny") is None and serving.resolve("tiny:b") == "b"
    for unknown in ("other", "tiny:c", "other:a"):
        with pytest.raises(OpenAIError) as e:
            serving.resolve(unknown)
        assert e.value.status == 404 and e.value.code == "model_not_found"


def test_server_limits_name_the_field(serving: OpenAIServing) -> None:
    for body, param in (({"n": 50}, "n"), ({"max_tokens": 5000}, "max_tokens")):
        with pytest.raises(OpenAIError) as e:
            _completion(serving, prompt="x", **body)
        assert e.value.status == 400 and e.value.param == param


def test_each_answered_choice_feeds_the_monitor(engine: TransformersEngine) -> None:
    monitor = RecordingMonitor()
    serving = OpenAIServing(engine, engine.cfg, monitor, FakeClock())
    r = asyncio.run(
        serving.completions(CompletionRequest(model="tiny", prompt="seven", n=2, max_tokens=3, temperature=0))
    )
    p = r.usage.prompt_tokens
    # one row per choice; the fake clock advances 0.25 s per reading (start, end)
    assert monitor.rows == [{"prompt_tokens": p, "completion_tokens": 3, "latency_ms": 250.0}] * 2
    broken = OpenAIServing(engine, engine.cfg, RecordingMonitor(fail=True))
    assert asyncio.run(broken.completions(CompletionRequest(model="tiny", prompt="seven", max_tokens=2))).choices
