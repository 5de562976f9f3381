"""Tuner(OptunaSearch, ASHAScheduler): each trial is a Ray Train run of `fabric.train.train_loop_per_worker`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.config import Param, PipelineConfig
from fabric.errors import FabricError
from fabric.runtime import connect


@dataclass
class TuneResult:
    """The search's outcome: best hyperparameters and where the table and plot are."""

    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    num_trials: int
    out_dir: Path
    table_path: Path
    plot_path: Path


def build_param_space(space: dict[str, Param]) -> dict[str, Any]:
    """Turn the YAML search space into Ray Tune sampling domains (``int`` bounds are inclusive)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.type == "loguniform":
            out[name] = tune.loguniform(p.low, p.high)
        elif p.type == "uniform":
            out[name] = tune.uniform(p.low, p.high)
        elif p.type == "int":
            out[name] = tune.randint(int(p.low), int(p.high) + 1)  # type: ignore[arg-type]
        else:
            out[name] = tune.choice(list(p.values or []))
    return out


def _trial_in_process(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One single-worker trial: train's loop in the trial's own process, reporting to Tune each epoch.

    Spares each trial a Ray Train run's start-up and tear-down (tens of seconds on a laptop).
    """
    from fabric.train import train_loop_per_worker

    train_loop_per_worker({**base, **config, "session": "tune"})


def _trial(config: dict[str, Any], base: dict[str, Any], workers: int, use_gpu: bool, storage: str) -> None:
    """One multi-worker (or DeepSpeed) trial: a TorchTrainer over train's loop, its reports forwarded to Tune."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from fabric.train import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**base, **config},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"{ray.tune.get_context().get_trial_id()}",
            storage_path=storage,
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _tuner(cfg: PipelineConfig, storage: Path, resume: bool) -> Any:
    import ray
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from fabric.train import loop_config

    t = cfg.tune
    use_gpu = cfg.train.use_gpu is True or (cfg.train.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    base = {**loop_config(cfg), "epochs": t.epochs_per_trial}
    if t.workers_per_trial == 1 and cfg.train.strategy == "ddp":
        trainable = tune.with_resources(
            tune.with_parameters(_trial_in_process, base=base), {"cpu": 1, "gpu": 1 if use_gpu else 0}
        )
    else:
        trainable = tune.with_parameters(
            _trial, base=base, workers=t.workers_per_trial, use_gpu=use_gpu, storage=str(storage / "trials")
        )
        # The trial function only drives a TorchTrainer: it holds no CPU (the Train workers hold the CPUs
        # and GPUs), and a memory reservation keeps its placement group non-empty.
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 256 * 2**20})
    path = storage / cfg.name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FabricError(f"no interrupted search to resume at {path}; run without --resume first")
        print(f"Resuming the search at {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, restart_errored=True)
    scheduler = (
        ASHAScheduler(
            max_t=t.epochs_per_trial,
            grace_period=t.scheduler.grace_period,
            reduction_factor=t.scheduler.reduction_factor,
        )
        if t.scheduler.type == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=build_param_space(t.search_space),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=OptunaSearch(sampler=TPESampler(seed=t.seed)),
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(storage), verbose=1),
    )


def run(cfg: PipelineConfig, resume: bool = False) -> TuneResult:
    """Search ``cfg.tune.search_space`` and write results.csv, best_config.json and learning_curves.png.

    Args:
        cfg: the pipeline config; ingestion must have run (its data folder is the trials' input).
        resume: continue an interrupted search of the same name (Optuna's state included).
    """
    from fabric.tune._report import learning_curves_png, results_table, saved_trial_states

    connect(cfg.cluster)
    storage = (Path(cfg.run_dir) / "tune").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    out = storage / cfg.name
    grid = _tuner(cfg, storage, resume).fit()
    # Ctrl-C ends fit() without an exception: what the saved state left to run says whether it was interrupted
    # (at any trial, the last included).
    states = saved_trial_states(out)
    unfinished = [t for t in states.values() if t not in ("TERMINATED", "ERROR")]
    if grid.num_errors:
        first = next(r.error for r in grid if r.error)
        if grid.num_errors == len(grid):
            raise FabricError(f"every trial of the search failed; first error: {first}")
        print(f"warning: {grid.num_errors} of {len(grid)} trials failed; first error: {first}", flush=True)
    table = results_table(grid, cfg.tune.search_space, cfg.tune.metric, cfg.tune.mode, states)
    table_path = out / "results.csv"
    table.to_csv(table_path, index=False)
    plot_path = learning_curves_png(grid, cfg.tune.metric, out / "learning_curves.png")
    print(table.to_string(index=False), flush=True)
    if unfinished or len(states) < cfg.tune.num_samples:
        raise FabricError(
            f"the search was interrupted after {len(states) - len(unfinished)} of {cfg.tune.num_samples} trials "
            f"(partial results in {out}); continue it with: fabric tune <config> --resume"
        )
    best = grid.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="all")
    best_config = {k: v for k, v in best.config.items() if k in cfg.tune.search_space}
    # scope="all" ranks trials by their best epoch: report that epoch's numbers, not the trial's last.
    history = best.metrics_dataframe
    if history is not None and cfg.tune.metric in history and len(history):
        column = history[cfg.tune.metric]
        row = history.loc[column.idxmin() if cfg.tune.mode == "min" else column.idxmax()].to_dict()
    else:
        row = dict(best.metrics or {})
    best_metrics = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    (out / "best_config.json").write_text(json.dumps({"config": best_config, "metrics": best_metrics}, indent=2))
    print(f"best {cfg.tune.metric}: {best_metrics.get(cfg.tune.metric)} with {best_config}", flush=True)
    print(f"results: {table_path}  curves: {plot_path}", flush=True)
    return TuneResult(best_config, best_metrics, len(grid), out, table_path, plot_path)
