"""Log probabilities, echo and token-id prompts on the transformers engine: the engine's scores against a direct
forward pass, OpenAI's completion and chat shapes (plain and streamed), and the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric.serve.llm.engine import GenerationOutput, GenerationRequest, SamplingParams, TokenLogprob
from fabric.serve.llm.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
)
from fabric.serve.llm.serving import OpenAIServing
from fabric.serve.llm.transformers_engine import TransformersEngine

PROMPT = "the cat sat on"
CHAT = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def serving(engine: TransformersEngine) -> OpenAIServing:
    return OpenAIServing(engine, engine.cfg)


def _request(engine: TransformersEngine, prompt: str, max_tokens: int, **kw: Any) -> GenerationRequest:
    ids = engine.tokenizer(prompt)["input_ids"]
    return GenerationRequest(prompt, prompt, ids, SamplingParams(max_tokens, temperature=0.0, **kw))


async def _outputs(engine: TransformersEngine, request: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(request)]


def _direct(engine: TransformersEngine, ids: list[int]) -> Any:
    """log_softmax of one plain forward pass over ``ids`` (the base model): row j scores token j + 1."""
    import torch

    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _check_scores(scores: list[TokenLogprob], ids: list[int], direct: Any, first: int, k: int) -> None:
    """``scores`` are tokens ``ids[first:]`` scored as ``direct`` scores them, with their ``k`` most likely."""
    assert [s.token_id for s in scores] == ids[first:]
    for s, row in zip(scores, direct[first - 1 :], strict=False):
        assert s.logprob == pytest.approx(float(row[s.token_id]), abs=1e-4)
        top = row.topk(k)
        assert [t for t, _ in s.top] == top.indices.tolist()
        assert [v for _, v in s.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def _completion(serving: OpenAIServing, **body: Any) -> Any:
    return asyncio.run(serving.completions(CompletionRequest.model_validate({"model": "tiny", **body})))


def _chat(serving: OpenAIServing, **body: Any) -> Any:
    return asyncio.run(serving.chat(ChatCompletionRequest.model_validate({"model": "tiny", "messages": CHAT, **body})))


def _chunks(serving: OpenAIServing, method: str, model: type, body: dict[str, Any]) -> list[dict[str, Any]]:
    async def collect() -> str:
        stream = await getattr(serving, method)(model.model_validate({"model": "tiny", "stream": True, **body}))
        assert isinstance(stream, AsyncIterator)
        return "".join([piece async for piece in stream])

    events = asyncio.run(collect()).split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_scores_equal_a_direct_forward_pass(engine: TransformersEngine) -> None:
    request = _request(engine, PROMPT, 6, logprobs=3, prompt_logprobs=2)
    outs = asyncio.run(_outputs(engine, request))
    generated = [t for o in outs for t in o.token_ids]
    scores = [s for o in outs for s in o.logprobs or []]
    prompt_scores = outs[0].prompt_logprobs
    assert len(generated) == len(scores) == 6 and all(o.prompt_logprobs is None for o in outs[1:])
    ids = request.prompt_ids + generated
    direct = _direct(engine, ids)
    n = len(request.prompt_ids)
    assert prompt_scores is not None and len(prompt_scores) == n - 1  # nothing scores the first token
    _check_scores(prompt_scores, request.prompt_ids, direct, 1, 2)
    _check_scores(scores, ids, direct, n, 3)
    assert all(s.top[0][0] == s.token_id for s in scores)  # greedy: the chosen token is the most likely


def test_rows_that_ask_for_scores_share_a_batch_with_rows_that_do_not(engine: TransformersEngine) -> None:
    asking = _request(engine, PROMPT, 8, logprobs=1, prompt_logprobs=1)
    plain = _request(engine, "a dog ran over the green hills", 8)
    alone = [asyncio.run(_outputs(engine, r)) for r in (asking, plain)]
    rows_before = engine.stats()["max_batch_rows"]

    async def together() -> list[list[GenerationOutput]]:
        return await asyncio.gather(_outputs(engine, asking), _outputs(engine, plain))

    both = asyncio.run(together())
    assert rows_before == 1 and engine.stats()["max_batch_rows"] >= 2  # they did share a step
    for got, want in zip(both, alone, strict=True):
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert "".join(o.text for o in got) == "".join(o.text for o in want)
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in both[1])
    batched, single = ([s for o in outs for s in o.logprobs or []] for outs in (both[0], alone[0]))
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in single], abs=1e-4)
    assert [s.logprob for s in both[0][0].prompt_logprobs or []] == pytest.approx(
        [s.logprob for s in alone[0][0].prompt_logprobs or []], abs=1e-4
    )


def test_echo_returns_the_prompt_and_its_scores_first(serving: OpenAIServing) -> None:
    n = len(serving.engine.tokenizer(PROMPT)["input_ids"])
    plain = _completion(serving, prompt=PROMPT, max_tokens=4, temperature=0)
    r = _completion(serving, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text and plain.choices[0].logprobs is None
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 4)]
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert 2 <= len(top) <= 3 and top[token] == value  # the 2 most likely, and the token itself
    for value, top in zip(lp.token_logprobs[n:], lp.top_logprobs[n:], strict=True):
        assert value == max(top.values())  # greedy: the chosen token is the most likely
    # max_tokens 0 scores the prompt only (what a log-likelihood needs), identically
    scored = _completion(serving, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n], abs=1e-5)
    assert scored.choices[0].finish_reason == "length"
    # echo without logprobs: text only
    assert _completion(serving, prompt=PROMPT, max_tokens=2, temperature=0, echo=True).choices[0].logprobs is None


def test_token_id_prompts_answer_as_their_text(serving: OpenAIServing) -> None:
    ids = serving.engine.tokenizer(PROMPT)["input_ids"]
    text = _completion(serving, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = _completion(serving, prompt=[ids, ids[:2]], max_tokens=5, temperature=0, echo=True)
    assert by_ids.choices[0].text == PROMPT + text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) + 2
    assert _completion(serving, prompt=ids, max_tokens=5, temperature=0).choices[0].text == text.choices[0].text
    for bad in ([ids[0], len(serving.engine.tokenizer)], [-1], [[]]):
        with pytest.raises(OpenAIError) as e:
            _completion(serving, prompt=bad, max_tokens=1)
        assert e.value.status == 400 and e.value.param == "prompt"


def test_chat_logprobs_shape(serving: OpenAIServing) -> None:
    r = _chat(serving, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert _chat(serving, max_tokens=2, temperature=0, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    assert _chat(serving, max_tokens=2, temperature=0).choices[0].logprobs is None


def test_streamed_logprobs_add_up_to_the_plain_ones(serving: OpenAIServing) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 1}
    plain = _completion(serving, **body).choices[0]
    parts = [c["choices"][0] for c in _chunks(serving, "completions", CompletionRequest, body) if c["choices"]]
    assert "".join(p["text"] for p in parts) == plain.text
    assert parts[0]["text"].startswith(PROMPT)
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [v for p in parts for v in p["logprobs"][key]] == getattr(plain.logprobs, key)
    scored = _chunks(serving, "completions", CompletionRequest, {**body, "max_tokens": 0})  # the prompt alone
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in scored] == [(PROMPT, "length")]
    assert scored[0]["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(plain.logprobs.token_logprobs[:-6])
    chat = {"max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    whole = _chat(serving, **chat).choices[0].logprobs.model_dump()["content"]
    chunks = _chunks(serving, "chat", ChatCompletionRequest, {"messages": CHAT, **chat})
    assert [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]] == whole


def test_the_openai_client_parses_logprobs(serving: OpenAIServing) -> None:
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    from fabric.serve.llm.api import make_asgi

    async def ask() -> tuple[Any, Any, list[Any]]:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_asgi(serving)))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http) as client:
            done = await client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True
            )
            chat = await client.chat.completions.create(
                model="tiny",
                messages=CHAT,  # type: ignore[arg-type]
                max_tokens=3,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
            )
            stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, logprobs=1, stream=True)
            return done, chat, [c async for c in stream]

    done, chat, chunks = asyncio.run(ask())
    lp = done.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)
    assert done.choices[0].text.startswith(PROMPT) and all(isinstance(v, float) for v in lp.token_logprobs[1:])
    entry = chat.choices[0].logprobs.content[0]
    assert isinstance(entry.logprob, float) and len(entry.top_logprobs) == 2 and entry.bytes
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == 3


def test_the_tokenizer_answers_as_vllm_s_routes_do(serving: OpenAIServing) -> None:
    tok = serving.engine.tokenizer
    ids = tok(PROMPT)["input_ids"]
    r = serving.tokenize(TokenizeRequest(model="tiny:a", prompt=PROMPT, add_special_tokens=False))
    assert r.tokens == ids and r.count == len(ids) and r.max_model_len == serving.info.max_model_len
    assert serving.detokenize(DetokenizeRequest(tokens=ids)).prompt == PROMPT
    with pytest.raises(OpenAIError) as e:
        serving.tokenize(TokenizeRequest(model="other", prompt="x"))
    assert e.value.status == 404 and e.value.param == "model"
    with pytest.raises(OpenAIError) as e:
        serving.detokenize(DetokenizeRequest(tokens=[len(tok)]))
    assert e.value.status == 400 and e.value.param == "tokens"
    info = serving.tokenizer_info()
    assert info.eos_token == tok.eos_token and info.chat_template
    assert info.model_max_length == serving.info.max_model_len
