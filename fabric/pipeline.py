"""The whole lifecycle from one PipelineConfig: each stage's public `run(cfg)`, in order.

ingest → tune → train → register → export (→ monitor → serve, when ``serve.enabled``). The search's best
hyperparameters replace the train section's before training. Export and serving need a champion: when the
model registry has none (the first model did not beat the trivial baseline), the pipeline stops there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fabric.config import PipelineConfig, with_params
from fabric.runtime import connect

T = TypeVar("T")


@dataclass
class PipelineResult:
    """What each stage returned, by stage name, and how long each took."""

    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _stage(result: PipelineResult, name: str, fn: Callable[[], T]) -> T:
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    out = fn()
    result.seconds[name] = time.perf_counter() - start
    result.stages[name] = out
    return out


def run(cfg: PipelineConfig) -> PipelineResult:
    """Run every stage the config enables, in lifecycle order, on the current Ray."""
    from fabric import data, export, tracking, train, tune

    if cfg.serve.enabled:
        from fabric.serve.control import connect as serve_connect

        serve_connect(cfg)  # a local Ray started here gets the Serve fast path's environment
    else:
        connect(cfg.cluster)
    result = PipelineResult()
    _stage(result, "ingest", lambda: data.run(cfg))
    if cfg.tune.enabled:
        best = _stage(result, "tune", lambda: tune.run(cfg))
        tuned = type(cfg.train).model_validate(with_params(cfg.train.model_dump(), best.best_config))
        cfg = cfg.model_copy(update={"train": tuned})
    trained = _stage(result, "train", lambda: train.run(cfg))
    registered = _stage(result, "register", lambda: tracking.run(cfg, trained))
    if registered is not None and not registered.champion_version:
        print(
            f"\n{registered.model_name} has no {tracking.CHAMPION} to export or serve: v{registered.version} "
            "does not beat the trivial baseline (see the registry line above)",
            flush=True,
        )
        return _done(cfg, result)
    if cfg.export.enabled:
        model = registered.model_uri if registered is not None else trained.model_path
        _stage(result, "export", lambda: export.run(cfg, model))
    if cfg.serve.enabled:
        serve_stages(cfg, result)
    return _done(cfg, result)


def _done(cfg: PipelineConfig, result: PipelineResult) -> PipelineResult:
    """Say how long each stage took, and return the result."""
    summary = ", ".join(f"{n} {s:.0f}s" for n, s in result.seconds.items())
    print(f"\n== pipeline {cfg.name} done ({summary}); outputs under {cfg.run_dir}/", flush=True)
    return result


def serve_stages(cfg: PipelineConfig, result: PipelineResult | None = None) -> PipelineResult:
    """The last stages on the current Ray: the drift monitor over ingestion's reference, then the Serve app.

    The monitor starts first (when ``monitor.enabled`` and ``<run_dir>/data/reference.parquet`` exists), so
    the replicas find it by name as they start; the app then answers at the returned ``stages["serve"].url``.
    """
    from fabric import serve

    result = result if result is not None else PipelineResult()
    if cfg.monitor.enabled and (Path(cfg.run_dir) / "data" / "reference.parquet").is_file():
        from fabric import monitor

        _stage(result, "monitor", lambda: monitor.run(cfg))
    elif cfg.monitor.enabled:
        print(f"no reference sample under {cfg.run_dir}/data: the drift monitor is not started", flush=True)
    _stage(result, "serve", lambda: serve.run(cfg))
    return result


def finetune(cfg: PipelineConfig) -> Any:
    """LoRA fine-tuning (``fabric.train.finetune``), then, with ``llm.eval.after_finetune``, the evaluation of the
    base and the new adapter side by side (``fabric.evaluate``, on ``llm.eval.url`` or an app deployed here).

    Returns:
        The fine-tuning's ``FinetuneResult``.
    """
    from fabric import evaluate
    from fabric.train import finetune as train_adapter

    result = train_adapter(cfg)
    if cfg.llm.eval.after_finetune:
        s = cfg.llm.serve
        if s.model_path is None and not s.adapters:  # the base and the adapter just trained, side by side
            s = s.model_copy(
                update={
                    "model_path": str(result.base_dir),
                    "adapters": {"finetuned": str(result.adapter_dir)},
                    "served_name": s.served_name or cfg.llm.finetune.model_name,
                }
            )
            cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"serve": s})})
        url = cfg.llm.eval.url
        if not url:
            from fabric.serve.llm import deploy

            url = deploy(cfg)
        print(evaluate.run(cfg, url).report(), flush=True)
    return result
