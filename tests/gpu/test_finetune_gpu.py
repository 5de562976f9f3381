"""LoRA fine-tuning on CUDA: DDP over NCCL, and DeepSpeed ZeRO-3 (the adapter gathered from its partitions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fabric.config import PipelineConfig, load_config
from fabric.models import load_causal_lm
from fabric.train import FinetuneResult, finetune

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    workers = min(2, torch.cuda.device_count())
    return load_config(
        None,
        [f"run_dir={run_dir}", "name=gpu-lm", "llm.model.n_embd=128", "llm.model.n_head=4", "llm.model.vocab_size=512",
         "llm.data.seq_len=64", "llm.finetune.epochs=3", "llm.finetune.lr=0.01", f"llm.finetune.num_workers={workers}",
         "llm.finetune.use_gpu=auto", *overrides],
    )  # fmt: skip


def _check(result: FinetuneResult) -> None:
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.metrics["perplexity_after"] < result.metrics["perplexity_before"]
    # The merged model loads on CPU, without Ray or DeepSpeed, and differs from the base.
    merged, base = load_causal_lm(result.merged_dir).eval(), load_causal_lm(result.base_dir).eval()  # type: ignore[arg-type]
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)


def test_ddp_over_nccl(ray_local: None, tmp_path: Path) -> None:
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1, "use_gpu=auto needs Ray to see the GPU"
    result = finetune(_cfg(tmp_path))
    _check(result)
    assert (result.checkpoint_dir / "train_state.pt").is_file()


def test_deepspeed_zero3(ray_local: None, tmp_path: Path) -> None:
    result = finetune(_cfg(tmp_path, "llm.finetune.strategy=deepspeed", "llm.finetune.deepspeed.zero_stage=3"))
    _check(result)
    assert (result.checkpoint_dir / "deepspeed").is_dir()
    # ZeRO-3 partitions the adapter: what rank 0 saved must be the whole of it, not empty shards.
    from safetensors.torch import load_file

    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())
