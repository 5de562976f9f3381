"""The engine-facing OpenAI logic: from a validated request to engine sequences and back to OpenAI's answers.

Builds prompts (the tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE`), resolves
``model="<base>:<adapter>"``, checks the context, fans ``n`` choices and several prompts out as separate
sequences (so the engine batches them), and assembles plain or streamed (SSE) responses with ``usage`` and,
when asked, log probabilities (and ``echo``: the prompt's text and scores first).
Each answered request feeds the drift monitor one row per choice: ``prompt_tokens``, ``completion_tokens``,
``latency_ms``; observing never blocks or fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from fabric.serve.llm.engine import GenerationOutput, GenerationRequest, LLMEngine, SamplingParams, TokenLogprob
from fabric.serve.llm.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    TopLogprob,
    Usage,
    bad_request,
)

if TYPE_CHECKING:
    from fabric.config.llm_serve import LLMServeConfig
    from fabric.serve.monitor_hook import MonitorHook

log = logging.getLogger("fabric.serve.llm")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The chat template of tokenizers that have none (the one fine-tuning writes): each message as
``<|{role}|>\\n{content}\\n``, and ``<|assistant|>\\n`` to prompt the answer."""
DONE = "data: [DONE]\n\n"


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt of a conversation: the tokenizer's chat template (or the default) with a generation prompt."""
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
    )


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event: ``data: {json}`` and a blank line."""
    import json

    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


async def merge(
    streams: Sequence[AsyncIterator[GenerationOutput]],
) -> AsyncIterator[list[tuple[int, GenerationOutput]]]:
    """Interleave several sequences' outputs as they come, tagged with the sequence's index.

    Yields every output that is ready at once as one list, so that a busy server sends fewer, larger
    stream messages. Leaving early (or one sequence failing) cancels the others, which frees their rows in
    the engine.
    """
    queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            ready = [await queue.get()]
            while not queue.empty():
                ready.append(queue.get_nowait())
            outputs: list[tuple[int, GenerationOutput]] = []
            for i, item in ready:
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    outputs.append((i, item))
            if outputs:
                yield outputs
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Plan:
    """A request turned into engine sequences: one per (prompt, choice)."""

    def __init__(
        self,
        request_id: str,
        prompt_lengths: list[int],
        sequences: list[GenerationRequest],
        n: int,
        started: float,
        logprobs: int | None = None,
        echo: bool = False,
    ) -> None:
        self.id = request_id
        self.prompt_lengths = prompt_lengths
        self.sequences = sequences
        self.n = n
        self.started = started
        self.logprobs = logprobs
        """Alternatives per token when scores are asked for; None: not asked."""
        self.echo = echo
        self.texts = [""] * len(sequences)
        self.finish: list[str | None] = [None] * len(sequences)
        self.tokens = [0] * len(sequences)
        self.scores: list[list[TokenLogprob]] = [[] for _ in sequences]
        self.prompt_scores: list[list[TokenLogprob]] = [[] for _ in sequences]
        self.offsets = [0] * len(sequences)
        """Where each choice's next streamed token starts (the ``text_offset`` rule, the echoed prompt included)."""
        self.opened = [False] * len(sequences)
        """Whether each choice's first part was streamed."""

    def add(self, i: int, out: GenerationOutput) -> None:
        self.texts[i] += out.text
        self.tokens[i] = out.completion_tokens
        if out.finish_reason is not None:
            self.finish[i] = out.finish_reason
        if out.logprobs:
            self.scores[i] += out.logprobs
        if out.prompt_logprobs:
            self.prompt_scores[i] = out.prompt_logprobs

    def usage(self) -> Usage:
        prompt, completion = sum(self.prompt_lengths), sum(self.tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class OpenAIServing:
    """Answers OpenAI requests with an :class:`LLMEngine` (started).

    Args:
        engine: the started engine.
        cfg: the serving config (limits, adapters).
        monitor: the drift monitor hook; None: not observed.
        clock: seconds, for latencies (injected in tests).
    """

    def __init__(
        self,
        engine: LLMEngine,
        cfg: LLMServeConfig,
        monitor: MonitorHook | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.monitor = monitor
        self.clock = clock
        self.info = engine.info()
        self.name = self.info.name
        self.counters = {"requests": 0, "streamed": 0, "choices": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._monitor_warned = False
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------------ models

    def models(self) -> ModelList:
        """The base model and one entry per adapter (``<base>:<adapter>``)."""
        context = self.info.max_model_len
        cards = [ModelCard(id=self.name, root=self.info.path, max_model_len=context)]
        cards += [
            ModelCard(id=f"{self.name}:{a}", root=path, parent=self.name, max_model_len=context)
            for a, path in sorted(self.info.adapters.items())
        ]
        return ModelList(data=cards)

    def model(self, model_id: str) -> ModelCard:
        """One model's card (404 when it is not served)."""
        for card in self.models().data:
            if card.id == model_id:
                return card
        raise self._not_found(model_id)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base).

        Raises:
            OpenAIError: 404 when no served model or adapter has that id.
        """
        if model == self.name:
            return None
        base, sep, adapter = model.rpartition(":")
        if sep and base == self.name and adapter in self.info.adapters:
            return adapter
        raise self._not_found(model)

    def _not_found(self, model: str) -> OpenAIError:
        known = ", ".join(c.id for c in self.models().data)
        return OpenAIError(
            404, f"The model {model!r} does not exist; served: {known}", "not_found_error", "model", "model_not_found"
        )

    # ------------------------------------------------------------------ requests

    def _plan(
        self,
        request: CompletionRequest | ChatCompletionRequest,
        prompts: Sequence[str | list[int]],
        max_tokens: int | None,
        field: str,
        logprobs: int | None = None,
        echo: bool = False,
    ) -> _Plan:
        """The request's sequences: one per (prompt, choice); ``logprobs`` (None: not) scores the generated tokens,
        and the prompt's too with ``echo``.

        Raises:
            OpenAIError: 400 (bad parameters, token ids outside the vocabulary, context overflow) or 404.
        """
        request.check()
        cfg = self.cfg
        adapter = self.resolve(request.model)
        if request.n > cfg.max_n:
            raise bad_request(f"n is {request.n}; this server allows at most {cfg.max_n}", "n")
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise bad_request(
                f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_limit}", "max_tokens"
            )
        context = self.info.max_model_len
        tokenizer = self.engine.tokenizer
        special = field == "prompt"  # a chat template writes its own special tokens
        sequences: list[GenerationRequest] = []
        lengths: list[int] = []
        request_id = f"{'cmpl' if field == 'prompt' else 'chatcmpl'}-{uuid.uuid4().hex}"
        stops = tuple(request.stop_list())
        vocab = len(tokenizer)
        for p_index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
            else:  # token ids (a client that tokenizes itself)
                ids = list(prompt)
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise bad_request(f"{field}: token id {bad} is not in the vocabulary (0..{vocab - 1})", field)
                prompt = tokenizer.decode(ids)
            if not ids:
                raise bad_request(f"{field} is empty: there is nothing to continue", field)
            wanted = max_tokens if max_tokens is not None else min(cfg.default_max_tokens, context - len(ids))
            asked = wanted if max_tokens == 0 else max(wanted, 1)  # 0: only score the prompt (echo)
            if len(ids) + asked > context:
                raise bad_request(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{len(ids) + asked} tokens ({len(ids)} in the {field}, {asked} for the "
                    "completion). Please reduce the length of the prompt or the completion.",
                    field,
                    "context_length_exceeded",
                )
            lengths.append(len(ids))
            for choice in range(request.n):
                # Each choice samples its own stream: seeded ones stay reproducible and still differ.
                seed = None if request.seed is None else request.seed + choice
                params = SamplingParams(
                    wanted, request.temperature, request.top_p, seed, stops, logprobs, logprobs if echo else None
                )
                rid = f"{request_id}-{p_index}-{choice}"
                sequences.append(GenerationRequest(rid, prompt, ids, params, adapter))
        return _Plan(request_id, lengths, sequences, request.n, self.clock(), logprobs, echo)

    # ------------------------------------------------------------------ log probabilities

    def _token(self, token_id: int) -> str:
        """One token as text (a piece of a multi-byte character shows as U+FFFD, as vLLM shows it)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.engine.tokenizer.decode([token_id])
        return text

    def _completion_logprobs(self, first: int | None, scores: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        """OpenAI's completion logprobs: ``first`` (an echoed prompt's first token, which nothing scores; None: no
        echo here), then ``scores``. Each place's ``top_logprobs`` holds its token and the most likely ones;
        ``text_offset`` counts from ``offset``, adding each token's text length (vLLM's rule)."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        if first is not None:
            out.tokens.append(self._token(first))
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(out.tokens[-1])
        for s in scores:
            token = self._token(s.token_id)
            top = {token: s.logprob}
            for t, v in s.top:
                top.setdefault(self._token(t), v)
            out.tokens.append(token)
            out.token_logprobs.append(s.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def _chat_logprobs(self, scores: list[TokenLogprob]) -> ChatLogprobs:
        """OpenAI's chat logprobs: each generated token with its UTF-8 bytes and the most likely ones at its place."""

        def entry(token_id: int, logprob: float) -> TopLogprob:
            token = self._token(token_id)
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **entry(s.token_id, s.logprob).model_dump(), top_logprobs=[entry(t, v) for t, v in s.top]
                )
                for s in scores
            ]
        )

    def _choice(self, plan: _Plan, i: int, out: GenerationOutput | None = None) -> CompletionChoice:
        """Choice ``i`` of a completion: whole (``out`` None), or one streamed output's part of it; the echoed
        prompt (text, and scores when asked) comes first, in the first part."""
        seq = plan.sequences[i]
        if out is None:
            text, scores, first_part = plan.texts[i], plan.scores[i], True
            finish, offset = plan.finish[i], 0
        else:
            text, scores, first_part = out.text, out.logprobs or [], not plan.opened[i]
            finish, offset = out.finish_reason, plan.offsets[i]
        first = None
        if plan.echo and first_part:
            text = seq.prompt + text
            first = seq.prompt_ids[0]
            scores = plan.prompt_scores[i] + scores
        logprobs = None if plan.logprobs is None else self._completion_logprobs(first, scores, offset)
        if out is not None:
            plan.opened[i] = True
            if logprobs is not None and logprobs.tokens:
                plan.offsets[i] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]

    def _streams(self, plan: _Plan) -> AsyncIterator[list[tuple[int, GenerationOutput]]]:
        return merge([self.engine.generate(s) for s in plan.sequences])

    async def _collect(self, plan: _Plan) -> None:
        async for ready in self._streams(plan):
            for i, out in ready:
                plan.add(i, out)

    def _done(self, plan: _Plan, streamed: bool) -> None:
        c = self.counters
        c["requests"] += 1
        c["streamed"] += int(streamed)
        c["choices"] += len(plan.sequences)
        c["prompt_tokens"] += sum(plan.prompt_lengths)
        c["completion_tokens"] += sum(plan.tokens)
        self.observe(plan)

    def observe(self, plan: _Plan) -> None:
        """Hand the request's rows to the drift monitor; never raises."""
        if self.monitor is None:
            return
        latency_ms = (self.clock() - plan.started) * 1000.0
        rows = [
            {"prompt_tokens": plan.prompt_lengths[i // plan.n], "completion_tokens": tokens, "latency_ms": latency_ms}
            for i, tokens in enumerate(plan.tokens)
        ]
        try:
            self.monitor.observe(self.name, rows, [r["completion_tokens"] for r in rows])
        except Exception as e:  # the monitor must never fail a request
            if not self._monitor_warned:
                log.warning("drift monitor observe failed (further failures not logged): %s", e)
                self._monitor_warned = True

    async def completions(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Answer ``POST /v1/completions``: a response, or (``stream``) an iterator of SSE lines.

        Raises:
            OpenAIError: 400 (bad parameters, context overflow) or 404 (unknown model), before any output.
        """
        plan = self._plan(request, request.prompts(), request.max_tokens, "prompt", request.logprobs, request.echo)
        if request.stream:
            return self._stream_completions(plan, request)
        await self._collect(plan)
        self._done(plan, streamed=False)
        choices = [self._choice(plan, i) for i in range(len(plan.sequences))]
        return CompletionResponse(id=plan.id, model=request.model, choices=choices, usage=plan.usage())

    async def _stream_completions(self, plan: _Plan, request: CompletionRequest) -> AsyncIterator[str]:
        created = int(time.time())
        try:
            async for ready in self._streams(plan):
                events = []
                for i, out in ready:
                    plan.add(i, out)
                    scored = plan.logprobs is not None and bool(out.logprobs)
                    if out.text or out.finish_reason or scored or (plan.echo and not plan.opened[i]):
                        choice = self._choice(plan, i, out)
                        events.append(
                            sse(CompletionResponse(id=plan.id, created=created, model=request.model, choices=[choice]))
                        )
                if events:
                    yield "".join(events)
        except Exception as e:  # the status line is sent: report in-band, as OpenAI does
            yield sse(_stream_error(e))
            yield DONE
            return
        self._done(plan, streamed=True)
        if request.include_usage():
            yield sse(
                CompletionResponse(id=plan.id, created=created, model=request.model, choices=[], usage=plan.usage())
            )
        yield DONE

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Answer ``POST /v1/chat/completions``: a response, or (``stream``) an iterator of SSE lines.

        Raises:
            OpenAIError: 400 (bad parameters, a template that fails, context overflow) or 404 (unknown model).
        """
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            prompt = render_chat(self.engine.tokenizer, messages)
        except Exception as e:  # a template that raises on these messages (e.g. roles it does not allow)
            raise bad_request(f"messages: the chat template cannot render them: {e}", "messages") from None
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        plan = self._plan(request, [prompt], request.token_limit(), "messages", logprobs)
        if request.stream:
            return self._stream_chat(plan, request)
        await self._collect(plan)
        self._done(plan, streamed=False)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=plan.texts[i]),
                finish_reason=plan.finish[i],  # type: ignore[arg-type]
                logprobs=None if logprobs is None else self._chat_logprobs(plan.scores[i]),
            )
            for i in range(len(plan.sequences))
        ]
        return ChatCompletionResponse(id=plan.id, model=request.model, choices=choices, usage=plan.usage())

    async def _stream_chat(self, plan: _Plan, request: ChatCompletionRequest) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(id=plan.id, created=created, model=request.model, choices=choices, usage=usage)
            )

        for i in range(len(plan.sequences)):  # OpenAI opens each choice with the role
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        try:
            async for ready in self._streams(plan):
                events = []
                for i, out in ready:
                    plan.add(i, out)
                    scored = None if plan.logprobs is None or not out.logprobs else self._chat_logprobs(out.logprobs)
                    if out.text or scored:
                        delta = DeltaMessage(content=out.text)
                        events.append(chunk([ChatChunkChoice(index=i, delta=delta, logprobs=scored)]))
                    if out.finish_reason:
                        events.append(
                            chunk([ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=out.finish_reason)])
                        )
                if events:
                    yield "".join(events)
        except Exception as e:
            yield sse(_stream_error(e))
            yield DONE
            return
        self._done(plan, streamed=True)
        if request.include_usage():
            yield chunk([], plan.usage())
        yield DONE

    # ------------------------------------------------------------------ the tokenizer (vLLM's routes)

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Answer ``POST /tokenize``: the prompt's token ids (404 for a ``model`` not served)."""
        if request.model is not None:
            self.resolve(request.model)
        ids = list(self.engine.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"])
        return TokenizeResponse(count=len(ids), max_model_len=self.info.max_model_len, tokens=ids)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """Answer ``POST /detokenize``: the ids' text (400 naming ``tokens`` for an id outside the vocabulary)."""
        if request.model is not None:
            self.resolve(request.model)
        vocab = len(self.engine.tokenizer)
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"tokens: token id {bad} is not in the vocabulary (0..{vocab - 1})", "tokens")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(request.tokens))

    def tokenizer_info(self) -> TokenizerInfoResponse:
        """Answer ``GET /tokenizer_info``: the special tokens, the chat template (or the default) and the context."""
        tok = self.engine.tokenizer
        return TokenizerInfoResponse(
            tokenizer_class=type(tok).__name__,
            eos_token=tok.eos_token,
            bos_token=tok.bos_token,
            pad_token=tok.pad_token,
            chat_template=getattr(tok, "chat_template", None) or DEFAULT_CHAT_TEMPLATE,
            model_max_length=self.info.max_model_len,
        )

    def stats(self) -> dict[str, Any]:
        """Request counters and the engine's (``GET /stats``)."""
        return {"model": self.name, **self.counters, "engine": self.engine.stats()}


def _stream_error(e: Exception) -> dict[str, Any]:
    log.error("generation failed mid-stream: %r", e)
    if isinstance(e, OpenAIError):
        return e.payload()
    return OpenAIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error").payload()
