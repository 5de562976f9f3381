"""Record a LoRA fine-tuning run in MLflow and register its adapter (a peft folder) in the model registry."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.tracking._loggers import MLflowLogger, WandbLogger, numeric, tracking_uri
from fabric.tracking._rank import on_rank_zero
from fabric.tracking._registry import CANDIDATE, RUN_KEY_TAG, _client, version_of_run

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

ADAPTER_ARTIFACT = "adapter"
"""Where the adapter folder sits among the run's artifacts (and what a registered version points at)."""


@dataclass
class AdapterRegistration:
    """The MLflow run of a fine-tuning and the registered adapter version."""

    model_name: str
    version: str
    run_id: str
    tracking_uri: str
    model_uri: str
    """``models:/<name>/<version>``: download it to get the peft adapter folder."""


@on_rank_zero
def log_finetune(
    cfg: PipelineConfig,
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    adapter_dir: Path,
    files: list[Path] | None = None,
    run_key: str = "",
) -> AdapterRegistration:
    """Log a fine-tuning run (the ``llm`` settings, every epoch's metrics, the summary) and register the
    adapter folder as a new version of ``cfg.llm.finetune.model_name`` with alias ``candidate``; nothing
    when a version of the same ``run_key`` is registered already (a rerun of the same fine-tuning).

    Args:
        cfg: where to record (``track``) and what (the ``llm`` section).
        history: every epoch's metrics, in order.
        summary: the run's headline numbers (perplexity before and after...), logged at the last epoch
            and tagged on the model version.
        adapter_dir: the peft adapter folder (with its tokenizer).
        files: more files to attach to the run (metrics.json, the drift reference).
        run_key: the digest of the fine-tuning's settings and inputs, tagged on the run and the version.

    Returns:
        The run and the version (the existing one when nothing new was registered); None off rank 0.
    """
    from fabric.config import dump_config

    uri = tracking_uri(cfg)
    name = cfg.llm.finetune.model_name
    if (existing := registered_adapter(cfg, run_key)) is not None:
        return existing
    tags = {"fabric.stage": "finetune", **({RUN_KEY_TAG: run_key} if run_key else {})}
    mlf = MLflowLogger.from_config(cfg, run_name=f"{cfg.name}-finetune", tags=tags)
    loggers: list[Any] = [mlf]
    if cfg.track.wandb.enabled and cfg.track.wandb.mode != "disabled":
        loggers.append(WandbLogger.from_config(cfg, run_name=f"{cfg.name}-finetune"))
    status = "failed"
    try:
        llm = cfg.llm.model_dump(mode="json", exclude={"serve"})
        for lg in loggers:
            lg.log_params({"name": cfg.name, "seed": cfg.seed, "llm": llm})
        for i, row in enumerate(history):
            step = int(row.get("epoch", i + 1))
            for lg in loggers:
                lg.log_metrics({k: v for k, v in numeric(row).items() if k != "epoch"}, step=step)
        last = int(history[-1].get("epoch", len(history))) if history else 0
        for lg in loggers:
            lg.log_metrics(numeric(summary), step=last)
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / "config.yaml"
            cfg_file.write_text(dump_config(cfg))
            mlf.log_artifact(cfg_file)
        for f in files or []:
            mlf.log_artifact(f)
        mlf.log_artifact(adapter_dir, ADAPTER_ARTIFACT)
        version = _register(mlf, name, summary, run_key)
        status = "success"
    finally:
        for lg in loggers:
            lg.finish(status)  # type: ignore[arg-type]
    log.info(f"registry: {name} v{version} ({CANDIDATE}): the LoRA adapter of run {mlf.run_id}")
    return AdapterRegistration(name, version, str(mlf.run_id), uri, f"models:/{name}/{version}")


@on_rank_zero
def registered_adapter(cfg: PipelineConfig, run_key: str) -> AdapterRegistration | None:
    """The adapter version registered from the fine-tuning of ``run_key`` (saying so), or None."""
    uri = tracking_uri(cfg)
    name = cfg.llm.finetune.model_name
    mv = version_of_run(_client(uri), name, run_key)
    if mv is None:
        return None
    log.info(
        f"registry: {name}: nothing new to register: v{mv.version} holds this fine-tuning (run key {run_key})"
    )
    return AdapterRegistration(name, str(mv.version), str(mv.run_id), uri, f"models:/{name}/{mv.version}")


def _register(mlf: MLflowLogger, name: str, summary: dict[str, Any], run_key: str) -> str:
    """A new version of ``name`` pointing at the run's adapter folder, aliased ``candidate``."""
    from mlflow.exceptions import MlflowException

    client = _client(mlf.tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(mlf.run_id).info.artifact_uri}/{ADAPTER_ARTIFACT}"
    tags = {f"fabric.{k}": str(v) for k, v in numeric(summary).items()} | ({RUN_KEY_TAG: run_key} if run_key else {})
    mv = client.create_model_version(name, source=source, run_id=mlf.run_id, tags={"fabric.kind": "lora", **tags})
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    return str(mv.version)
