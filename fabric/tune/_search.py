"""Tuner(OptunaSearch, ASHAScheduler): each trial is a Ray Train run of `fabric.train.train_loop_per_worker`, or
for gradient-boosted trees an XGBoost / LightGBM training in the trial's process, reporting every round."""

from __future__ import annotations

import logging
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric import storage
from fabric.config import Param, PipelineConfig
from fabric.config.tune import _default_space
from fabric.errors import ConfigError, ConfigProblem, FabricError
from fabric.runtime import connect

log = logging.getLogger(__name__)

TREE_SPACES: dict[str, dict[str, Param]] = {
    "xgboost": {
        "xgboost.max_depth": Param(type="int", low=2, high=8),
        "xgboost.eta": Param(type="loguniform", low=0.02, high=0.3),
        "xgboost.subsample": Param(type="uniform", low=0.6, high=1.0),
        "xgboost.colsample_bytree": Param(type="uniform", low=0.6, high=1.0),
    },
    "lightgbm": {
        "lightgbm.num_leaves": Param(type="int", low=7, high=63),
        "lightgbm.learning_rate": Param(type="loguniform", low=0.02, high=0.3),
        "lightgbm.feature_fraction": Param(type="uniform", low=0.6, high=1.0),
        "lightgbm.min_data_in_leaf": Param(type="int", low=5, high=40),
    },
}
"""What a tree search varies when the config keeps the MLP's default search space (whose keys mean nothing
to trees)."""


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


def search_space(cfg: PipelineConfig) -> dict[str, Param]:
    """The space the search samples: ``tune.search_space``, or for trees with the MLP's default space
    :data:`TREE_SPACES`.

    Raises:
        ConfigError: a tree search names keys that are not ``num_boost_round`` or ``<framework>.<param>``.
    """
    space = cfg.tune.search_space
    framework = cfg.train.framework
    if framework == "torch":
        return space
    if space == _default_space():
        return TREE_SPACES[framework]
    wrong = sorted(k for k in space if k != "num_boost_round" and not k.startswith(f"{framework}."))
    if wrong:
        raise ConfigError([
            ConfigProblem(
                f"tune.search_space.{k}",
                f"does not apply to train.framework {framework}: use num_boost_round or {framework}.<param>",
            )
            for k in wrong
        ])  # fmt: skip
    return space


def _tree_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """One tree trial: XGBoost / LightGBM on the whole splits in the trial's own process, reporting to Tune
    every boosting round (ASHA stops trials between rounds)."""
    from fabric.train._trees import tree_loop_per_worker, with_trial

    tree_loop_per_worker({**with_trial(base, config), "session": "tune"})


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
    from fabric.train._trainer import frequent_reports

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
    with frequent_reports():
        trainer.fit()


def _tree_trainable(cfg: PipelineConfig, space: dict[str, Param]) -> tuple[Any, int, int]:
    """The trials' function for trees, their longest run in rounds (ASHA's ``max_t``) and ASHA's grace period
    in rounds (``scheduler.grace_period``, at least a tenth of the rounds)."""
    from ray import tune

    from fabric.train._trees import tree_config

    threads = cfg.tune.workers_per_trial  # one process per trial: its workers are the library's threads
    base = {**tree_config(cfg), "threads": threads}
    rounds = space.get("num_boost_round")
    if rounds is None:
        max_t = cfg.train.num_boost_round
    elif rounds.type == "choice":
        max_t = int(max(rounds.values or [1]))
    else:
        max_t = int(rounds.high or 1)
    # One round says little about a booster: the first rung is at least a tenth of the rounds.
    grace = max(cfg.tune.scheduler.grace_period, max_t // 10)
    trainable = tune.with_resources(tune.with_parameters(_tree_trial, base=base), {"cpu": threads})
    return trainable, max_t, min(grace, max_t)


def _tuner(cfg: PipelineConfig, where: str, resume: bool, space: dict[str, Param]) -> Any:
    import ray
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from fabric.train import loop_config

    t = cfg.tune
    max_t, grace = t.epochs_per_trial, t.scheduler.grace_period
    use_gpu = cfg.train.use_gpu is True or (cfg.train.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if cfg.train.framework != "torch":
        trainable, max_t, grace = _tree_trainable(cfg, space)
    elif t.workers_per_trial == 1 and cfg.train.strategy == "ddp":
        base = {**loop_config(cfg), "epochs": t.epochs_per_trial}
        trainable = tune.with_resources(
            tune.with_parameters(_trial_in_process, base=base), {"cpu": 1, "gpu": 1 if use_gpu else 0}
        )
    else:
        base = {**loop_config(cfg), "epochs": t.epochs_per_trial}
        trainable = tune.with_parameters(
            _trial, base=base, workers=t.workers_per_trial, use_gpu=use_gpu, storage=storage.join(where, "trials")
        )
        # The trial function only drives a TorchTrainer: it holds no CPU (the Train workers hold the CPUs
        # and GPUs), and a memory reservation keeps its placement group non-empty.
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 256 * 2**20})
    path = storage.join(where, cfg.name)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FabricError(f"no interrupted search to resume at {path}; run without --resume first")
        log.info(f"Resuming the search at {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, restart_errored=True)
    scheduler = (
        ASHAScheduler(
            max_t=max_t,
            grace_period=grace,
            reduction_factor=t.scheduler.reduction_factor,
        )
        if t.scheduler.type == "asha"
        else FIFOScheduler()
    )
    if _quiet():
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created …"
    return tune.Tuner(
        trainable,
        param_space=build_param_space(space),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=OptunaSearch(sampler=TPESampler(seed=t.seed)),
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
        ),
        # Quiet (fabric's default, FABRIC_VERBOSE=0): no status tables; the trials' epoch lines and the results
        # table at the end say how the search went. -v brings Tune's tables back.
        run_config=tune.RunConfig(name=cfg.name, storage_path=where, verbose=0 if _quiet() else 1),
    )


def _quiet() -> bool:
    """fabric's entry points run quiet unless given -v (``FABRIC_VERBOSE``, see ``fabric.cli.verbosity``)."""
    return os.environ.get("FABRIC_VERBOSE") == "0"


def run(cfg: PipelineConfig, resume: bool = False) -> TuneResult:
    """Search ``cfg.tune.search_space`` and write results.csv, best_config.json and learning_curves.png.

    Tune's experiment state lives under ``<run_dir>/tune/<name>`` (a URI run_dir's included: a search resumes
    from there); the result files are written there too (and kept in the run_dir's local copy).

    Args:
        cfg: the pipeline config; ingestion must have run (its data folder is the trials' input).
        resume: continue an interrupted search of the same name (Optuna's state included).
    """
    from fabric.tune._report import learning_curves_png, results_table, saved_trial_states

    space = search_space(cfg)
    connect(cfg.cluster)
    storage.check(cfg.run_dir)
    where = storage.join(cfg.run_dir, "tune")
    storage.makedirs(where)
    out = storage.local_root(cfg.run_dir) / "tune" / cfg.name
    grid = _tuner(cfg, where, resume, space).fit()
    # Ctrl-C ends fit() without an exception: what the saved state left to run says whether it was interrupted
    # (at any trial, the last included).
    states = saved_trial_states(storage.join(where, cfg.name))
    out.mkdir(parents=True, exist_ok=True)
    unfinished = [t for t in states.values() if t not in ("TERMINATED", "ERROR")]
    if grid.num_errors:
        first = next(r.error for r in grid if r.error)
        if grid.num_errors == len(grid):
            raise FabricError(f"every trial of the search failed; first error: {first}")
        log.warning(f"{grid.num_errors} of {len(grid)} trials failed; first error: {first}")
    table = results_table(grid, space, cfg.tune.metric, cfg.tune.mode, states)
    table_path = out / "results.csv"
    table.to_csv(table_path, index=False)
    plot_path = learning_curves_png(grid, cfg.tune.metric, out / "learning_curves.png")
    for written in (table_path, plot_path):
        storage.publish(cfg.run_dir, f"tune/{cfg.name}/{written.name}")
    log.info(table.to_string(index=False))
    if unfinished or len(states) < cfg.tune.num_samples:
        raise FabricError(
            f"the search was interrupted after {len(states) - len(unfinished)} of {cfg.tune.num_samples} trials "
            f"(partial results in {out}); continue it with: fabric tune <config> --resume"
        )
    best = grid.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="all")
    best_config = {k: v for k, v in best.config.items() if k in space}
    # scope="all" ranks trials by their best epoch: report that epoch's numbers, not the trial's last.
    history = best.metrics_dataframe
    if history is not None and cfg.tune.metric in history and len(history):
        column = history[cfg.tune.metric]
        row = history.loc[column.idxmin() if cfg.tune.mode == "min" else column.idxmax()].to_dict()
    else:
        row = dict(best.metrics or {})
    best_metrics = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    (out / "best_config.json").write_text(json.dumps({"config": best_config, "metrics": best_metrics}, indent=2))
    storage.publish(cfg.run_dir, f"tune/{cfg.name}/best_config.json")
    log.info(f"best {cfg.tune.metric}: {best_metrics.get(cfg.tune.metric)} with {best_config}")
    log.info(f"results: {table_path}  curves: {plot_path}")
    return TuneResult(best_config, best_metrics, len(grid), out, table_path, plot_path)
