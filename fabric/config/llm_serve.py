"""Config of the OpenAI-compatible language-model endpoint (Ray Serve; vLLM or transformers engines)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fabric.config._base import Section


class LLMServeConfig(Section):
    """How a language model is served over the OpenAI API."""

    model_path: str | None = None
    """A Hugging Face model folder (base or merged); None: what fine-tuning wrote under ``run_dir``."""
    served_name: str | None = None
    """The model id in ``/v1/models`` and requests; None: the folder's name."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters by name (a peft folder each), picked per request with ``model="<base>:<name>"``."""
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """``auto``: vLLM when it is installed and a GPU is present, else the batching transformers CPU engine."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    app_name: str = Field(default="fabric-llm", pattern=r"^[A-Za-z0-9_.-]+$")
    api_key_env: str | None = None
    """Environment variable holding the API key; when set (and non-empty) requests need
    ``Authorization: Bearer <key>``, others get 401."""
