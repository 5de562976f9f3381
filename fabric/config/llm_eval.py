"""Config of language-model evaluation (lm-evaluation-harness against the served model) and batch generation."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from fabric.config._base import Section


class LLMEvalConfig(Section):
    """lm-evaluation-harness over the OpenAI API of the served model: the base and each adapter, same tasks."""

    tasks: list[str] = Field(default_factory=lambda: ["fabric_capitals", "fabric_arithmetic"])
    """lm-evaluation-harness task names, from ``include_path`` (task YAMLs with their data; nothing comes from a
    hub). The defaults are fabric's own small tasks over its embedded corpus: a multiple-choice
    (log-likelihood) task and a generation task."""
    include_path: str | None = None
    """A folder of task YAMLs; ``data_files`` in them are relative to their YAML. None: fabric's shipped tasks
    (``fabric/evaluate/tasks``)."""
    models: list[str] | None = None
    """Served model ids to evaluate; None: the base and ``<base>:<adapter>`` for every ``llm.serve.adapters``."""
    url: str | None = None
    """Base URL of a running OpenAI app (``http://host:port``, no ``/v1``); None: deploy ``llm.serve``'s app
    first, as ``fabric serve-llm`` does."""
    limit: int | None = Field(default=None, ge=1)
    """Examples per task (None: all)."""
    num_concurrent: int = Field(default=4, ge=1)
    """Requests in flight per model (the server batches them)."""
    promote_metric: str | None = None
    """A score (``<task>/<metric>``, e.g. ``fabric_capitals/acc``) deciding promotion: the registered adapter gets
    alias ``champion`` only when its score is not worse than the base's. None: no promotion here."""
    after_finetune: bool = False
    """``fabric finetune`` (and ``jobs/finetune.py``) evaluate right after training."""

    @field_validator("include_path")
    @classmethod
    def _folder(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"not a folder: {v!r}")
        return v

    @field_validator("promote_metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v.count("/") != 1:
            raise ValueError(f"must be '<task>/<metric>', got {v!r}")
        return v


class LLMGenerateConfig(Section):
    """Batch generation: prompts from a file through vLLM on Ray Data, results to a file."""

    input: str | None = None
    """The prompts: a ``.jsonl``, ``.parquet`` or ``.csv`` file (``fabric generate --input`` sets it)."""
    output: str | None = None
    """Where the generations go: a ``.parquet``, ``.jsonl`` or ``.csv`` path, written as a folder of files by
    Ray Data (``fabric generate --output`` sets it)."""
    prompt_field: str = "prompt"
    """The input column holding each prompt (plain text; ``messages`` lists are rendered with the chat template)."""
    id_fields: list[str] = Field(default_factory=lambda: ["id"])
    """Input columns copied to the output beside each generation (missing ones are an error)."""
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    """0: greedy."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    adapter: str | None = None
    """A name of ``llm.serve.adapters`` to generate with (None: the base)."""
    batch_size: int = Field(default=64, ge=1)
    """Prompts per Ray Data batch handed to the engine."""
    concurrency: int = Field(default=1, ge=1)
    """Engine replicas (one vLLM engine each)."""
