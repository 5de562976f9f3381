"""The whole lifecycle from one PipelineConfig: each stage's public `run(cfg)`, in order.

ingest → tune → train → register → export (→ monitor → serve, when ``serve.enabled``). The search's best
hyperparameters replace the train section's before training. Export and serving need a champion: when the
model registry has none (the first model did not beat the trivial baseline), the pipeline stops there.

``run_dir`` may be a local folder or a filesystem URI (``s3://bucket/prefix``): see :mod:`fabric.storage`.

Step caching: ingest, tune and export each have a key (their config section, the content digests of their
inputs, fabric's version); when ``<run_dir>/steps/<stage>.json`` holds the same key and the stage's outputs are
still as it left them, the stage is skipped and says so. Training and registration key their runs themselves
(a rerun of the same config on the same data trains and registers nothing new), so every stage of a repeated
run is cheap, and a changed input re-runs exactly the stages downstream of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fabric import storage
from fabric.config import PipelineConfig, with_params
from fabric.runtime import connect

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHED_STAGES = ("ingest", "tune", "export")
"""Stages the step cache may skip (``--force`` takes these names)."""


@dataclass
class PipelineResult:
    """What each stage returned, by stage name, and how long each took."""

    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _stage(result: PipelineResult, name: str, fn: Callable[[], T]) -> T:
    log.info(f"\n== {name}")
    start = time.perf_counter()
    out = fn()
    result.seconds[name] = time.perf_counter() - start
    result.stages[name] = out
    return out


@dataclass
class StepCache:
    """The step records of a run_dir: ``<run_dir>/steps/<stage>.json`` = the stage's key, a stamp of its outputs
    and its result, written only after the stage finished (a half-written stage is never taken as cached)."""

    run_dir: str | Path
    """A local folder or a filesystem URI."""
    enabled: bool = True
    force: Collection[str] = ()

    def _path(self, stage: str) -> str:
        return storage.join(self.run_dir, "steps", f"{stage}.json")

    def get(self, stage: str, key: str, stamp: str, kind: type[T]) -> T | None:
        """The recorded result of ``stage`` when its key and its outputs' stamp match; None otherwise."""
        if not self.enabled or stage in self.force:
            return None
        try:
            record = json.loads(storage.read_text(self._path(stage)))
        except (OSError, ValueError):
            return None
        if record.get("key") != key or record.get("stamp") != stamp or not stamp:
            return None
        try:
            return _from_json(kind, record["result"])
        except (KeyError, TypeError, ValueError):
            return None  # a record of an older fabric: run the stage

    def put(self, stage: str, key: str, stamp: str, result: Any) -> None:
        """Record a finished stage (atomically: a crash leaves the old record or none)."""
        storage.write_text(
            self._path(stage), json.dumps({"key": key, "stamp": stamp, "result": _to_json(result)}, indent=2)
        )


def _to_json(result: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}


def _from_json(kind: type[T], values: dict[str, Any]) -> T:
    paths = {f.name for f in dataclasses.fields(kind) if "Path" in str(f.type)}  # type: ignore[arg-type]
    return kind(**{k: (Path(v) if k in paths and v is not None else v) for k, v in values.items()})


def _stamp(*files: str | Path) -> str:
    """What a stage's outputs look like now (size and mtime of its key files); "" when one is missing."""
    return storage.stamp(*files)


def _cached_stage(
    result: PipelineResult,
    cache: StepCache,
    name: str,
    key: str,
    outputs: Callable[[], list[str]],
    kind: type[T],
    fn: Callable[[], T],
) -> T:
    """Run stage ``name`` unless the cache holds it under ``key`` with ``outputs`` unchanged; record it after."""
    hit = cache.get(name, key, _stamp(*outputs()), kind)
    if hit is not None:
        log.info(f"\n== {name}: cached (key {key}; {cache._path(name)})")
        result.seconds[name] = 0.0
        result.stages[name] = hit
        return hit
    out = _stage(result, name, fn)
    cache.put(name, key, _stamp(*outputs()), out)
    return out


def stage_key(stage: str, cfg: PipelineConfig, **inputs: str) -> str:
    """The step-cache key of ``stage``: the config sections that shape its output, the digests of its inputs and
    fabric's version."""
    from fabric import __version__
    from fabric.tracking import run_key

    sections = {"ingest": ("data", "seed"), "tune": ("tune", "train"), "export": ("export",)}[stage]
    settings = {s: getattr(cfg, s).model_dump(mode="json") if s != "seed" else cfg.seed for s in sections}
    return run_key({**settings, "fabric": __version__}, dict(inputs))


def _code_digests(cfg: PipelineConfig) -> dict[str, str]:
    """Digests of the user's own model builder and loop (``train.model``, ``train.loop``): an edit re-runs the search."""
    from fabric.models import code_digest

    paths = [p for p in (cfg.train.model if cfg.train.model != "mlp" else None, cfg.train.loop) if p]
    return {f"code:{p}": code_digest(p) for p in paths}


def run(cfg: PipelineConfig, *, cache: bool = True, force: Collection[str] = ()) -> PipelineResult:
    """Run every stage the config enables, in lifecycle order, on the current Ray.

    Args:
        cfg: the pipeline config.
        cache: skip ingest, tune and export when their step records match (see the module docstring).
        force: stages to run even when cached (names from :data:`CACHED_STAGES`).
    """
    from fabric import data, export, tracking, train, tune
    from fabric.data import IngestResult
    from fabric.export import ExportResult
    from fabric.tracking import digest_splits, source_digest
    from fabric.tune import TuneResult

    storage.check(cfg.run_dir)  # an unreachable or unauthorised bucket fails here, before any work
    if cfg.serve.enabled:
        from fabric.serve.control import connect as serve_connect

        serve_connect(cfg)  # a local Ray started here gets the Serve fast path's environment
    else:
        connect(cfg.cluster)
    result = PipelineResult()
    root = cfg.run_dir if storage.is_uri(cfg.run_dir) else storage.local_root(cfg.run_dir)
    steps = StepCache(root, cache, tuple(force))
    meta = storage.join(root, "data", "meta.json")
    key = stage_key("ingest", cfg, source=source_digest(cfg.data.source))
    _cached_stage(result, steps, "ingest", key, lambda: [meta], IngestResult, lambda: data.run(cfg))
    splits = digest_splits(tracking.data_dir(cfg.run_dir))
    if cfg.tune.enabled:
        key = stage_key("tune", cfg, data=splits, **_code_digests(cfg))
        best = _cached_stage(
            result,
            steps,
            "tune",
            key,
            lambda: [storage.join(root, "tune", cfg.name, "best_config.json")],
            TuneResult,
            lambda: tune.run(cfg),
        )
        tuned = type(cfg.train).model_validate(with_params(cfg.train.model_dump(), best.best_config))
        cfg = cfg.model_copy(update={"train": tuned})
    trained = _stage(result, "train", lambda: train.run(cfg))
    registered = _stage(result, "register", lambda: tracking.run(cfg, trained))
    if registered is not None and not registered.champion_version:
        log.info(
            f"\n{registered.model_name} has no {tracking.CHAMPION} to export or serve: v{registered.version} "
            "does not beat the trivial baseline (see the registry line above)"
        )
        return _done(cfg, result)
    if cfg.export.enabled:
        model = registered.model_uri if registered is not None else trained.model_path
        which = f"{registered.model_name}/{registered.champion_version}" if registered is not None else str(model)
        key = stage_key("export", cfg, model=which, train=trained.run_key, data=splits)
        _cached_stage(
            result,
            steps,
            "export",
            key,
            lambda: [storage.join(root, "export", name) for name in ("export.json", "model.onnx")],
            ExportResult,
            lambda: export.run(cfg, model),
        )
    if cfg.serve.enabled:
        serve_stages(cfg, result)
    return _done(cfg, result)


def _done(cfg: PipelineConfig, result: PipelineResult) -> PipelineResult:
    """Say how long each stage took, and return the result."""
    summary = ", ".join(f"{n} {s:.0f}s" for n, s in result.seconds.items())
    log.info(f"\n== pipeline {cfg.name} done ({summary}); outputs under {cfg.run_dir}/")
    return result


def serve_stages(cfg: PipelineConfig, result: PipelineResult | None = None) -> PipelineResult:
    """The last stages on the current Ray: the drift monitor over ingestion's reference, then the Serve app.

    The monitor starts first (when ``monitor.enabled`` and ``<run_dir>/data/reference.parquet`` exists), so
    the replicas find it by name as they start; the app then answers at the returned ``stages["serve"].url``.
    """
    from fabric import serve

    result = result if result is not None else PipelineResult()
    if cfg.monitor.enabled and storage.exists(storage.join(cfg.run_dir, "data", "reference.parquet")):
        from fabric import monitor

        _stage(result, "monitor", lambda: monitor.run(cfg))
    elif cfg.monitor.enabled:
        log.info(f"no reference sample under {cfg.run_dir}/data: the drift monitor is not started")
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
            llm = storage.join(cfg.run_dir, "llm")  # a bucket's, as every replica reads it on its own node
            s = s.model_copy(
                update={
                    "model_path": storage.join(llm, "base"),
                    "adapters": {"finetuned": storage.join(llm, "adapter")},
                    "served_name": s.served_name or cfg.llm.finetune.model_name,
                }
            )
            cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"serve": s})})
        url = cfg.llm.eval.url
        if not url:
            from fabric.serve.llm import deploy

            url = deploy(cfg)
        log.info(evaluate.run(cfg, url).report())
    return result
