"""LoRA fine-tuning on a real local Ray (2 CPUs): DDP with a killed worker, DeepSpeed ZeRO-2, bad data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fabric.config import PipelineConfig  # noqa: E402
from fabric.models import load_causal_lm  # noqa: E402
from fabric.train import FinetuneResult, finetune  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "llm.model.n_layer=2", "llm.model.n_embd=64", "llm.model.n_head=2", "llm.model.context_length=64",
    "llm.model.vocab_size=400", "llm.data.seq_len=64", "llm.lora.dropout=0.0", "llm.finetune.batch_size=8",
    "llm.finetune.lr=0.01", "llm.finetune.num_workers=2", "llm.lora.modules_to_save=[wte,lm_head]",
]  # fmt: skip


def _jobs_finetune_main():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("jobs_finetune", ROOT / "jobs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.main


def _cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    from fabric.config import load_config

    return load_config(None, [f"run_dir={run_dir}", "name=lm", "track.experiment=lm", *SMALL, *overrides])


@pytest.fixture(scope="module")
def ddp_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FinetuneResult]:
    """One 3-epoch DDP fine-tune on 2 workers in which rank 1's process exits at the start of epoch 2
    (once: a marker file guards it), shared by the tests below (a fit costs tens of seconds here)."""
    run_dir = tmp_path_factory.mktemp("lm")
    crash = {"fault_injection": {"epoch": 2, "rank": 1, "marker": str(run_dir / "crashed")}}
    cfg = _cfg(run_dir, "llm.finetune.epochs=3", "llm.finetune.max_failures=1", "llm.finetune.model_name=tiny-lm")
    return run_dir, finetune(cfg, loop_overrides=crash)


def test_ddp_finetune_lowers_heldout_perplexity_and_writes_the_contract(ddp_run: tuple[Path, FinetuneResult]) -> None:
    run_dir, result = ddp_run
    llm = (run_dir / "llm").resolve()
    assert result.llm_dir == llm and result.base_dir == llm / "base" and result.adapter_dir == llm / "adapter"
    metrics = json.loads((llm / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["perplexity_after"] < 0.5 * metrics["perplexity_before"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["val_perplexity"] < result.history[0]["val_perplexity"]
    for folder in ("base", "merged"):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (llm / folder).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (llm / "adapter").iterdir()
    }
    # Checkpoints hold the adapter and the optimizer state, never the base weights.
    assert sorted(p.name for p in result.checkpoint_dir.iterdir()) == ["adapter", "history.json", "train_state.pt"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    reference = pq.read_table(llm / "reference.parquet")
    assert reference.schema == pa.schema([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
    assert reference.num_rows == metrics["heldout_records"]
    assert pa.compute.min(reference["prompt_tokens"]).as_py() > 0
    assert pa.compute.min(reference["completion_tokens"]).as_py() > 0


def test_a_killed_worker_resumes_from_the_adapter_checkpoint(ddp_run: tuple[Path, FinetuneResult]) -> None:
    run_dir, result = ddp_run
    assert (run_dir / "crashed").is_file(), "the worker never exited: nothing was recovered"
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1, 1]
    # The perplexity before fine-tuning survives the restart (it came back from the checkpoint).
    assert len({h["perplexity_before"] for h in result.history}) == 1


def test_the_registered_adapter_loads_back_with_peft_and_matches_the_merged_model(
    ddp_run: tuple[Path, FinetuneResult],
) -> None:
    import mlflow
    from peft import PeftModel

    run_dir, result = ddp_run
    reg = result.registration
    assert reg is not None and reg.model_name == "tiny-lm" and reg.version == "1"
    client = mlflow.MlflowClient(reg.tracking_uri)
    assert str(client.get_model_version_by_alias("tiny-lm", "candidate").version) == "1"
    run = client.get_run(reg.run_id)
    assert run.data.metrics["perplexity_after"] == pytest.approx(result.metrics["perplexity_after"])
    assert run.data.params["llm.lora.r"] == "8"
    mlflow.set_tracking_uri(reg.tracking_uri)
    try:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=reg.model_uri, dst_path=str(run_dir / "dl"))
    finally:
        mlflow.set_tracking_uri(None)
    adapted = PeftModel.from_pretrained(load_causal_lm(result.base_dir), folder).eval()
    merged = load_causal_lm(result.merged_dir).eval()  # type: ignore[arg-type]
    base = load_causal_lm(result.base_dir).eval()
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def test_a_rerun_of_the_same_finetuning_trains_and_registers_nothing(
    ddp_run: tuple[Path, FinetuneResult], capsys  # type: ignore[no-untyped-def]
) -> None:
    run_dir, first = ddp_run
    cfg = _cfg(run_dir, "llm.finetune.epochs=3", "llm.finetune.max_failures=1", "llm.finetune.model_name=tiny-lm")
    again = finetune(cfg)
    out = capsys.readouterr().out
    assert "fine-tuning: nothing to do" in out and "nothing new to register: v1" in out
    assert again.registration is not None and again.registration.version == "1"
    assert again.checkpoint_dir == first.checkpoint_dir and again.metrics == first.metrics


def test_deepspeed_zero2_on_cpu_finetunes_from_the_same_config(ray_local: None, tmp_path: Path) -> None:
    overrides = [f"run_dir={tmp_path}", "name=ds", "track.experiment=ds", *SMALL]
    # The real job entrypoint, with overrides as a person would type them.
    code = _jobs_finetune_main()(
        [*overrides, "llm.finetune.strategy=deepspeed", "llm.finetune.deepspeed.zero_stage=2", "llm.finetune.epochs=2",
         "llm.finetune.merge=false", "llm.lora.modules_to_save=null"]
    )  # fmt: skip
    assert code == 0
    llm = tmp_path / "llm"
    metrics = json.loads((llm / "metrics.json").read_text())
    assert metrics["strategy"] == "DeepSpeed ZeRO-2" and metrics["perplexity_after"] < metrics["perplexity_before"]
    assert (llm / "adapter" / "adapter_model.safetensors").is_file() and not (llm / "merged").exists()
    (runs,) = (llm / "train").glob("ds-*")  # the run: its name and run key
    last = runs / "epoch_0002"
    shards = sorted(p.name for p in (last / "deepspeed").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # The frozen base stays out of the checkpoint (LoRA matrices only here): far smaller than the base.
    base_bytes = (llm / "base" / "model.safetensors").stat().st_size
    assert (last / "deepspeed" / "mp_rank_00_model_states.pt").stat().st_size < base_bytes / 2
    assert (last / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_records_fail_with_the_line_and_field(ray_local: None, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n')
    assert _jobs_finetune_main()([f"run_dir={tmp_path}", f"llm.data.path={data}"]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: field 'output' must be a string, got int 7" in err and "Traceback" not in err
    assert _jobs_finetune_main()([f"run_dir={tmp_path}", "llm.lora.r=0"]) == 2
