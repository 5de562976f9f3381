"""Config of the language-model half of the lifecycle: the model, its text data, LoRA fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fabric.config._base import Section, is_uri
from fabric.config.llm_eval import LLMEvalConfig, LLMGenerateConfig
from fabric.config.llm_serve import LLMServeConfig
from fabric.config.train import WorkerGroupConfig


def _local_path_exists(v: str | None) -> str | None:
    # URIs are resolved by the reader on the cluster; a local path can be checked before anything runs.
    if v is not None and not is_uri(v) and not Path(v).expanduser().exists():
        raise ValueError(f"not found: {v!r}")
    return v


class LMModelConfig(Section):
    """The base causal language model: a Hugging Face folder (local or in a bucket), or a small one built from a
    config."""

    path: str | None = None
    """A Hugging Face model folder (``from_pretrained``; never from a hub): a local path, or a URI such as
    ``s3://bucket/models/base`` copied to the driver's node cache first. None builds a model from ``arch`` and the
    sizes below, with freshly initialised weights (laptops and tests)."""
    arch: Literal["gpt2", "llama"] = "gpt2"
    """Architecture of a model built from this config (ignored when ``path`` is set)."""
    n_layer: int = Field(default=2, ge=1)
    """Transformer blocks of a built model."""
    n_embd: int = Field(default=64, ge=8)
    """Hidden size of a built model."""
    n_head: int = Field(default=2, ge=1)
    """Attention heads of a built model (must divide ``n_embd``)."""
    context_length: int = Field(default=256, ge=16)
    """Most tokens the model attends over (prompt plus generated tokens)."""
    tokenizer_path: str | None = None
    """A tokenizer folder (a local path or a URI); None: the model folder's tokenizer, or one trained on the data
    (HF ``tokenizers``)."""
    vocab_size: int = Field(default=2000, ge=64)
    """Vocabulary of a tokenizer trained on the data (when there is none to load)."""

    _paths_exist = field_validator("path", "tokenizer_path")(_local_path_exists)

    @model_validator(mode="after")
    def _heads(self) -> LMModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class LMDataConfig(Section):
    """Text data as JSON lines: instruction records or plain text."""

    path: str | None = None
    """A ``.jsonl`` file or folder (local path or pyarrow URI); None: the embedded demo corpus."""
    format: Literal["instruction", "text"] = "instruction"
    """``instruction``: ``{"instruction", "input"?, "output"}`` records; ``text``: ``{"text"}`` records."""
    text_field: str = "text"
    """The field holding the text of ``text`` records."""
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of records held out to measure perplexity before and after fine-tuning."""
    seq_len: int = Field(default=128, ge=8)
    """Tokens per packed training sequence (must fit the model's context)."""

    _path_exists = field_validator("path")(_local_path_exists)


class LoRAConfig(Section):
    """peft LoRA adapter settings."""

    r: int = Field(default=8, ge=1)
    """Rank of the low-rank update matrices."""
    alpha: int = Field(default=16, ge=1)
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """Module names to adapt; None: the architecture's attention projections (``c_attn`` for GPT-2,
    ``q_proj``/``v_proj`` for Llama)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter, e.g. ``[wte, lm_head]`` (GPT-2) or
    ``[embed_tokens, lm_head]`` (Llama) for a base built from a config, whose random embeddings LoRA
    alone cannot fix. Costs vocabulary x hidden size parameters each; None: only the LoRA matrices train."""


class FinetuneConfig(WorkerGroupConfig):
    """How the adapter is trained (Ray Train TorchTrainer: DDP or DeepSpeed ZeRO); the worker-group fields are
    ``train``'s."""

    epochs: int = Field(default=2, ge=1)
    """Passes over the training split."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per worker per step."""
    merge: bool = True
    """Also write the base with the adapter merged in (for single-model serving)."""
    model_name: str = "fabric-lm"
    """Registry name of the adapter in MLflow."""


class LLMConfig(Section):
    """Language models: base model, text data, LoRA fine-tuning, OpenAI-compatible serving, evaluation, batch
    generation."""

    model: LMModelConfig = Field(default_factory=LMModelConfig)
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    serve: LLMServeConfig = Field(default_factory=LLMServeConfig)
    eval: LLMEvalConfig = Field(default_factory=LLMEvalConfig)
    generate: LLMGenerateConfig = Field(default_factory=LLMGenerateConfig)

    @model_validator(mode="after")
    def _fits_context(self) -> LLMConfig:
        # Only checkable here for a built model; a loaded model's context is checked when it is loaded.
        if self.model.path is None and self.data.seq_len > self.model.context_length:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.context_length ({self.model.context_length})"
            )
        return self
