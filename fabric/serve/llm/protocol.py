"""The OpenAI wire format: requests and responses of ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, streaming chunks, and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

Requests accept (and ignore) OpenAI fields that do not change the result (``user``, ``frequency_penalty: 0``...);
a field asking for something this server does not do (``tools``, ``response_format``, ``suffix``...) is a 400
naming it. Log probabilities follow OpenAI's (and vLLM's) shapes: a completion's
``{tokens, token_logprobs, top_logprobs, text_offset}``, a chat message's ``{content: [{token, logprob, bytes,
top_logprobs}]}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fabric.errors import FabricError

# Fields the OpenAI API has that change a result in ways this server does not implement: a request setting
# one (to anything but its neutral value) is refused rather than answered differently than asked.
UNSUPPORTED = ("echo", "suffix", "tools", "functions", "logit_bias", "response_format")
MAX_LOGPROBS = 20
"""Most alternatives per token a request may ask for (``logprobs``, ``top_logprobs``): vLLM's default."""
NEUTRAL: dict[str, Any] = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0}
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "list[int]"})


# --------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    """What went wrong: OpenAI's error object."""

    message: str
    type: str
    """``invalid_request_error``, ``authentication_error``, ``not_found_error``, ``server_error``..."""
    param: str | None = None
    """The request field at fault (``messages.0.content``, ``max_tokens``), or None."""
    code: str | None = None
    """A stable machine-readable kind: ``context_length_exceeded``, ``model_not_found``, ``invalid_api_key``..."""


class ErrorResponse(BaseModel):
    """Every error body."""

    error: ErrorDetail


class OpenAIError(FabricError):
    """A request the server cannot serve, with its HTTP status; renders as :class:`ErrorResponse`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        super().__init__(message)

    def payload(self) -> dict[str, Any]:
        """The error body as a dict."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        """The JSON error body."""
        return json.dumps(self.payload()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """A 400 ``invalid_request_error``."""
    return OpenAIError(400, message, "invalid_request_error", param, code)


def from_validation_errors(errors: Sequence[Any]) -> OpenAIError:
    """A 400 naming the first invalid field of pydantic's (or FastAPI's) ``errors()``."""
    if not errors:
        return bad_request("invalid request")
    first = dict(errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    # A union's branch names (`str`, `list[str]`) are not fields: keep the request's own path only.
    loc = [p for p in loc if p not in _TYPE_TAGS and not any(ch in p for ch in "[]()")]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        msg = "a required field is missing"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"{param}: {msg}{more}" if param else msg + more, param)


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    include_usage: bool = False
    """Send one last chunk, before ``[DONE]``, with the request's ``usage`` (its ``choices`` empty)."""


class _Sampling(BaseModel):
    """What every generation request shares."""

    model_config = ConfigDict(extra="allow")

    model: str
    """The served model's id, or ``<model>:<adapter>`` for one of its LoRA adapters."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate per choice; None: the server's ``default_max_tokens``."""
    temperature: float = Field(default=1.0, ge=0, le=2)
    """0 decodes greedily; higher samples more freely."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to ``top_p``."""
    stop: str | list[str] | None = None
    """Up to 4 sequences where generation stops (not included in the text)."""
    seed: int | None = None
    """Seeds the sampling, so that the same request gives the same text."""
    n: int = Field(default=1, ge=1)
    """Choices to generate per prompt."""
    stream: bool = False
    """Send the text as server-sent events while it is generated."""
    stream_options: StreamOptions | None = None

    def check(self) -> None:
        """Refuse what the schema cannot say: unsupported OpenAI fields, bad stop sequences.

        Raises:
            OpenAIError: 400 naming the field.
        """
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0, [], {}):
                raise bad_request(f"{name} is not supported by this server", name, "unsupported_parameter")
        for name, neutral in NEUTRAL.items():
            if extra.get(name) not in (None, neutral):
                raise bad_request(
                    f"{name} is not supported by this server (only {neutral})", name, "unsupported_parameter"
                )
        stops = self.stop_list()
        if len(stops) > 4:
            raise bad_request(f"stop takes at most 4 sequences, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise bad_request("stop sequences must not be empty", "stop")

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: continue one prompt, or several."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    """The text to continue, or its token ids; a list of them gives each its own choices (``index`` counts across
    prompts)."""
    max_tokens: int | None = Field(default=None, ge=0)
    """Most tokens to generate per choice (0 only with ``echo``: score the prompt); None: ``default_max_tokens``."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Return each token's log probability and those of the ``logprobs`` most likely tokens at its place."""
    echo: bool = False
    """Prepend the prompt to the text (and, with ``logprobs``, its tokens' log probabilities, the first null)."""

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens: 0 is allowed only with echo (to score the prompt)", "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: texts, or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    """A text part of a message's content (images and audio are not supported)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the assistant's next message in a conversation."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The newer name of ``max_tokens`` (takes precedence)."""
    logprobs: bool = False
    """Return each generated token's log probability (``choices[i].logprobs.content``)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """With ``logprobs``: also the log probabilities of this many most likely tokens at each place."""

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")

    def token_limit(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): a text's token ids, as the served model's tokenizer gives them."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[int]


# --------------------------------------------------------------------------- responses


FinishReason = Literal["stop", "length"]


def now() -> int:
    """Seconds since the epoch (OpenAI's ``created``)."""
    return int(time.time())


class Usage(BaseModel):
    """Token counts of a request (every choice's completion tokens summed)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """A completion choice's log probabilities, token by token (the prompt's first with ``echo``)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    """Each token's log probability (null for a prompt's first token: nothing predicts it)."""
    top_logprobs: list[dict[str, float] | None]
    """At each place: the chosen token and the ``logprobs`` most likely ones, token -> log probability."""
    text_offset: list[int]
    """Where each token starts in the text (characters)."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    """The token's UTF-8 bytes."""


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    """The ``top_logprobs`` most likely tokens at this place, most likely first."""


class ChatLogprobs(BaseModel):
    """A chat choice's log probabilities, one entry per generated token."""

    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "fabric"
    root: str | None = None
    """The model folder (or adapter folder) it is served from."""
    parent: str | None = None
    """For an adapter: the base model's id."""
    max_model_len: int | None = None
    """Most tokens per sequence, prompt and completion together (as vLLM's cards say)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """``GET /tokenizer_info`` (vLLM's): what a client that tokenizes through the server needs (lm-eval's)."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    engine: str
