"""The GPU engine: vLLM's asynchronous engine (``AsyncLLM``, V1) behind the :class:`LLMEngine` seam.

vLLM does the batching (continuous batching over a paged KV cache), sampling, stop sequences and multi-LoRA
itself; this class maps fabric's requests onto ``SamplingParams`` (delta outputs) and ``LoRARequest`` and
vLLM's outputs back. vLLM is imported only in :meth:`VLLMEngine.start` (``pip install 'fabric[gpu]'``), so
this module imports on machines without it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fabric.errors import UsageError, require
from fabric.serve.llm.engine import GenerationOutput, GenerationRequest, LLMEngine, ModelInfo

log = logging.getLogger("fabric.serve.llm")


class VLLMEngine(LLMEngine):
    """vLLM on the replica's GPUs, with ``tensor_parallel_size``, memory share, context and LoRA from config."""

    kind = "vllm"

    def __init__(self, cfg: Any, name: str) -> None:
        super().__init__(cfg, name)
        self.engine: Any = None
        self.max_model_len = 0
        self._lora_ids = {adapter: i + 1 for i, adapter in enumerate(sorted(cfg.adapters))}  # vLLM ids start at 1
        self.counters = {"requests": 0, "generated_tokens": 0, "aborted": 0}

    def engine_args(self) -> Any:
        """vLLM's ``AsyncEngineArgs`` from the config."""
        vllm = require("vllm", "gpu")
        s = self.cfg
        kwargs: dict[str, Any] = {
            "model": str(s.model_path),
            "served_model_name": self.name,
            "tensor_parallel_size": s.tensor_parallel_size,
            "gpu_memory_utilization": s.gpu_memory_utilization,
            "dtype": s.dtype,
            "max_num_seqs": max(s.max_batch_size, s.max_ongoing_requests),
        }
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if s.adapters:
            kwargs.update(
                enable_lora=True,
                max_lora_rank=s.max_lora_rank,
                max_loras=min(s.max_loaded_adapters, len(s.adapters)),
                max_cpu_loras=max(s.max_loaded_adapters, len(s.adapters)),
            )
        return vllm.AsyncEngineArgs(**kwargs)

    def start(self) -> None:
        """Start vLLM's engine (it loads the model onto the GPUs and profiles memory: tens of seconds)."""
        require("vllm", "gpu")
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        path = Path(str(self.cfg.model_path))
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a Hugging Face model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.engine = AsyncLLM.from_engine_args(self.engine_args())
        self.max_model_len = int(self.engine.model_config.max_model_len)
        log.info("vLLM engine up: %s, context %d, tp %d", path, self.max_model_len, self.cfg.tensor_parallel_size)

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, str(self.cfg.model_path), self.max_model_len, dict(self.cfg.adapters))

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        if adapter not in self._lora_ids:
            raise UsageError(f"unknown adapter {adapter!r}")
        # vLLM loads an adapter on its first request and evicts the least recently used beyond max_loras.
        return LoRARequest(adapter, self._lora_ids[adapter], self.cfg.adapters[adapter])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        params = SamplingParams(
            n=1,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
            stop=list(p.stop) or None,
            output_kind=RequestOutputKind.DELTA,
        )
        self.counters["requests"] += 1
        completion = 0
        finished = False
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
                params,
                request.request_id,
                lora_request=self._lora(request.adapter),
            ):
                choice = out.outputs[0]
                completion += len(choice.token_ids)
                self.counters["generated_tokens"] += len(choice.token_ids)
                finished = out.finished
                # vLLM says "stop" for the end-of-sequence token and stop strings alike, "length" at max_tokens
                finish = None if not finished else ("length" if choice.finish_reason == "length" else "stop")
                yield GenerationOutput(choice.text, list(choice.token_ids), completion, finish)
        finally:
            if not finished:  # the client left: free the sequence's KV blocks now
                self.counters["aborted"] += 1
                await self.engine.abort(request.request_id)

    async def check_health(self) -> None:
        if self.engine is None:
            raise UsageError("the vLLM engine is not started")
        await self.engine.check_health()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def stats(self) -> dict[str, Any]:
        return {"engine": self.kind, **self.counters, "tensor_parallel_size": self.cfg.tensor_parallel_size}
