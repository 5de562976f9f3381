"""Config of the OpenAI-compatible language-model endpoint (Ray Serve; vLLM or transformers engines)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fabric.config._base import Section
from fabric.config.serve import Autoscaling


class LLMServeConfig(Section):
    """How a language model is served over the OpenAI API."""

    model_path: str | None = None
    """A Hugging Face model folder (base or merged, with its tokenizer); None: ``{run_dir}/llm/merged`` when
    fine-tuning wrote it, else ``{run_dir}/llm/base``."""
    served_name: str | None = None
    """The model id in ``/v1/models`` and requests; None: the folder's name."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters by name (a peft folder each), picked per request with ``model="<base>:<name>"``."""
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """``auto``: vLLM wherever it is installed (its CPU build comes with ``make install``; ``fabric[gpu]`` has the
    CUDA build), else the batching transformers CPU engine."""
    host: str = "127.0.0.1"
    """Bind address of Serve's HTTP proxy (shared with other Serve apps of the cluster: the first one started
    sets it)."""
    port: int = Field(default=8000, ge=1, le=65535)
    app_name: str = Field(default="fabric-llm", pattern=r"^[A-Za-z0-9_.-]+$")
    route_prefix: str = "/"
    """Where the app answers (clients use ``base_url=http://host:port{route_prefix}v1``); give it its own
    prefix when a tabular app on the same Serve already holds ``/``."""
    api_key_env: str | None = None
    """Environment variable holding the API key; when set (and non-empty) requests need
    ``Authorization: Bearer <key>``, others get 401."""

    # --- requests
    default_max_tokens: int = Field(default=64, ge=1)
    """``max_tokens`` of a request that gives none (cut to what the context has left)."""
    max_tokens_limit: int = Field(default=1024, ge=1)
    """Largest ``max_tokens`` a request may ask for (more is a 400)."""
    max_n: int = Field(default=8, ge=1)
    """Largest ``n`` (choices per prompt) a request may ask for."""

    # --- the transformers CPU engine
    max_batch_size: int = Field(default=16, ge=1)
    """Most sequences decoded together in one forward pass (requests of one adapter share a batch)."""
    batch_wait_s: float = Field(default=0.01, ge=0)
    """How long an idle engine waits for more requests before starting a batch (more rows per step)."""
    max_loaded_adapters: int = Field(default=4, ge=1)
    """LoRA adapters held in memory at once; loading one more evicts the least recently used. The CPU engine
    mixes up to this many adapters (and the base) in one batch."""
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads of the CPU engine; None: one per CPU reserved for the replica."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype: ``auto`` is float32 on CPU, and the checkpoint's dtype on vLLM."""

    # --- the vLLM engine (GPU or CPU)
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs one replica shards the model over (vLLM tensor parallelism); the replica reserves that many."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of each GPU's memory vLLM may take (weights plus KV cache)."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Context length vLLM plans its KV cache for; None: the model's own."""
    kv_cache_gb: float | None = Field(default=None, gt=0)
    """vLLM's KV cache size in GiB; None: vLLM's own sizing on GPUs (``gpu_memory_utilization``) and 2 GiB on a
    CPU (vLLM's CPU build would otherwise want 90% of the machine's memory free)."""
    max_lora_rank: int = Field(default=16, ge=1)
    """Largest LoRA rank vLLM reserves room for (adapters of a higher rank fail to load)."""
    vllm: dict[str, Any] = Field(default_factory=dict)
    """Any other vLLM server argument by name, passed to vLLM as ``vllm serve --<name> <value>`` would be, e.g.
    ``{enable_auto_tool_choice: true, tool_call_parser: hermes}`` (auto tool parsing) or
    ``{structured_outputs_config: {backend: xgrammar}}``; checked by vLLM's own parser when a replica starts."""

    # --- Serve deployment
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: Autoscaling | None = None
    """Ray Serve autoscaling of the replicas (replaces ``num_replicas``); ``target_ongoing_requests`` defaults to
    ``max_batch_size`` (each replica has one engine, which batches that many sequences)."""
    replica_cpus: float = Field(default=1.0, ge=0)
    """CPUs Ray reserves per replica."""
    replica_gpus: float | None = Field(default=None, ge=0)
    """GPUs per replica; None: ``tensor_parallel_size`` for the vLLM engine, 0 for the transformers engine."""
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests a replica holds at once (generating or queued in its engine); more wait in Serve's queue."""
    fast_path: bool = True
    """Serve's HAProxy ingress and gRPC data plane when fabric starts Ray here (see ``serve.fast_path``)."""

    # --- drift monitor
    monitor: bool = True
    """Feed each answered request's prompt tokens, completion tokens and latency to a drift monitor (when
    ``monitor.enabled`` too); its reference is ``{run_dir}/llm/reference.parquet`` from fine-tuning."""
    monitor_actor: str = "fabric-llm-drift-monitor"
    """Name of the language-model stream's monitor actor (apart from the tabular one: other columns)."""

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {v!r}")
        return v

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [name for name in v if not name or ":" in name or "/" in name]
        if bad:
            raise ValueError(f"adapter names must be non-empty without ':' or '/': {', '.join(map(repr, bad))}")
        return v

    @model_validator(mode="after")
    def _limits(self) -> LLMServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_limit ({self.max_tokens_limit})"
            )
        return self
