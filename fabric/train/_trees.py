"""Gradient-boosted trees on Ray Train: XGBoostTrainer / LightGBMTrainer over the ingested splits.

Each worker boosts on its Ray Data shard of ``train`` (XGBoost's and LightGBM's own data-parallel training:
histograms all-reduced between the workers); every worker evaluates the whole ``val`` split, so the
per-round metrics and early stopping agree on every worker. The library's Ray report callback reports
each round under fabric's metric names (``train_loss``, ``val_loss``, ``val_accuracy`` or ``val_rmse``) and
checkpoints every ``checkpoint_every`` rounds (booster file + ``history.json``); the last checkpoint is the
model kept (the best round when early stopping cut the run), with its ``model.json``, and becomes
``<run_dir>/train/model/``.

The same worker function runs a Ray Tune trial in the trial's own process (``session: tune``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fabric import storage
from fabric.errors import FabricError, require
from fabric.models import read_spec, write_spec
from fabric.models.trees import BOOSTER_FILES, load_booster
from fabric.train._checkpoint import read_history, write_history
from fabric.train._data import data_dir, local_shard, read_meta, read_split, splits_location

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fabric.config import PipelineConfig
    from fabric.train._trainer import TrainResult

LOSSES = {"logloss", "mlogloss", "binary_logloss", "multi_logloss", "l2"}
"""Library metric names that are fabric's ``loss`` (log loss, or mean squared error)."""
ERRORS = {"error", "merror", "binary_error", "multi_error"}
"""Library metric names that are ``1 - accuracy``."""
_CLASSIFIERS = {"xgboost": ("binary:logistic", "multi:softprob"), "lightgbm": ("binary", "multiclass")}
"""The classification objectives whose predictions are class probabilities (what fabric serves)."""


def library_params(
    framework: str, task: str, num_classes: int | None, params: dict[str, Any], seed: int, threads: int
) -> dict[str, Any]:
    """The library's params: the objective and eval metrics that follow the task, a seed and a thread count,
    then the config's ``params`` on top (they win).

    The eval metrics are ordered so that early stopping watches the loss: XGBoost stops on the last
    metric, LightGBM (``first_metric_only``) on the first.

    Raises:
        FabricError: a classification objective that does not give class probabilities.
    """
    k = int(num_classes or 2)
    if framework == "xgboost":
        if task == "regression":
            base: dict[str, Any] = {"objective": "reg:squarederror", "eval_metric": ["rmse"]}
        elif k == 2:
            base = {"objective": "binary:logistic", "eval_metric": ["error", "logloss"]}
        else:
            base = {"objective": "multi:softprob", "num_class": k, "eval_metric": ["merror", "mlogloss"]}
        base.update(tree_method="hist", seed=seed, nthread=threads)
    elif framework == "lightgbm":
        if task == "regression":
            base = {"objective": "regression", "metric": ["rmse"]}
        elif k == 2:
            base = {"objective": "binary", "metric": ["binary_logloss", "binary_error"]}
        else:
            base = {"objective": "multiclass", "num_class": k, "metric": ["multi_logloss", "multi_error"]}
        base.update(seed=seed, num_threads=threads, verbosity=-1)
    else:
        raise FabricError(f"unknown tree framework {framework!r}: xgboost or lightgbm")
    out = {**base, **params}
    if task == "classification" and out["objective"] not in _CLASSIFIERS[framework]:
        raise FabricError(
            f"train.{framework}.objective {out['objective']!r} does not give class probabilities; for "
            f"classification use {' or '.join(_CLASSIFIERS[framework])} (or leave it out: fabric picks it)"
        )
    return out


def fabric_metrics(raw: dict[str, float]) -> dict[str, float]:
    """A round's library metrics (``val-mlogloss``, ``train-rmse``...) under fabric's names: ``<split>_loss``
    (log loss, or squared error), ``<split>_accuracy`` (from an error rate), ``<split>_rmse``, and any
    other metric as ``<split>_<name>``."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        split, _, name = key.partition("-")
        v = float(value)
        if name in LOSSES:
            out[f"{split}_loss"] = v
        elif name in ERRORS:
            out[f"{split}_accuracy"] = 1.0 - v
        elif name == "rmse":
            out[f"{split}_rmse"] = v
            out.setdefault(f"{split}_loss", v * v)
        else:
            out[f"{split}_{re.sub(r'[^0-9A-Za-z_]+', '_', name)}"] = v
    return out


_MAXIMIZED = ("auc", "aucpr", "map", "ndcg", "pre")
"""Library metric names (prefixes) where higher is better, as XGBoost's early stopping reads them."""


def tree_spec(config: dict[str, Any], params: dict[str, Any], best_iteration: int, rounds: int) -> dict[str, Any]:
    """The ``model.json`` of a tree model (``fabric.models.load_model`` reads it)."""
    framework, task = config["framework"], config["task"]
    classification = task == "classification"
    names = list(config["feature_names"])
    return {
        "format_version": 1,
        "framework": framework,
        "booster_file": BOOSTER_FILES[framework],
        "task": task,
        "target": config.get("target"),
        "feature_names": names,
        "num_classes": int(config["num_classes"]) if classification else None,
        # input/output widths as torch models record them (serving and export read these)
        "kwargs": {"input_dim": len(names), "output_dim": int(config["num_classes"]) if classification else 1},
        "params": params,
        "best_iteration": best_iteration,
        "num_boost_round": rounds,
    }


class _Rounds:
    """The run's per-round history: renames each round's metrics (the callbacks' ``results_postprocessing_fn``),
    numbers it, prints a line every tenth of the run on rank 0, and decides early stopping (``patience``)."""

    def __init__(
        self,
        history: list[dict[str, Any]],
        total: int,
        rank: int,
        say: bool,
        crash: dict[str, Any] | None = None,
        patience: int | None = None,
        watch_first: bool = False,
    ) -> None:
        self.history = history
        self.patience = patience
        self.watch_first = watch_first
        """Early stopping watches the val split's first metric (LightGBM's rule) rather than its last (XGBoost's)."""
        self.watched: tuple[str, bool] | None = None
        """The fabric metric early stopping watches, and whether higher is better."""
        self.best: tuple[int, float] | None = None
        """The best round so far and its value of the watched metric."""
        self.stop: int | None = None
        """The round to keep once ``patience`` rounds after the best brought no improvement."""
        self.total = total
        self.rank = rank
        self.say = say
        self.crash = crash
        self.began = time.perf_counter()
        self.start = self.done
        """The round this attempt started from (0: from scratch; a restart resumes from its checkpoint's)."""

    @property
    def done(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else 0

    def add(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.crash:
            _maybe_crash(self.crash, self.done + 1, self.rank)
        now = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": self.done + 1,
            **fabric_metrics(raw),
            "round_s": now - self.began,
            "resumed_from_round": self.start,
        }
        self.began = now
        self.history.append(row)
        if self.patience:
            self._early_stopping(raw)
        every = max(1, self.total // 10)
        if self.say and self.rank == 0 and (row["epoch"] % every == 0 or row["epoch"] in (1, self.total)):
            keys = ("train_loss", "val_loss", "val_accuracy", "val_rmse")
            shown = " ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
            log.info(f"round {row['epoch']}/{self.total}  {shown}")
        return row

    def _early_stopping(self, raw: dict[str, Any]) -> None:
        """Track the best round and stop ``patience`` rounds after it. The history holds every round of the run,
        those before a resume included (read once, on the first round), so a restart keeps the patience."""
        rows = self.history[-1:]
        if self.watched is None:
            keys = [k for k in raw if k.startswith("val-")]
            if not keys:
                return
            key = keys[0] if self.watch_first else keys[-1]
            name = key.partition("-")[2]
            metric = next(iter(fabric_metrics({key: 0.0})))
            self.watched = (metric, metric.endswith("_accuracy") or name.startswith(_MAXIMIZED))
            rows = self.history
        metric, maximize = self.watched
        for r in rows:
            if metric in r:
                value = float(r[metric])
                if self.best is None or (value > self.best[1] if maximize else value < self.best[1]):
                    self.best = (int(r["epoch"]), value)
        if self.best is not None and self.done - self.best[0] >= int(self.patience or 0):
            self.stop = self.best[0]


def _maybe_crash(spec: dict[str, Any], round_: int, rank: int) -> None:
    """Fault injection for recovery tests: exit this worker process once, when it reports round
    ``spec["round"]`` on rank ``spec["rank"]``; the file ``spec["marker"]`` makes it happen once across restarts."""
    marker = Path(spec["marker"])
    if round_ != spec["round"] or rank != spec.get("rank", 0) or marker.exists():
        return
    import ray.train

    # Let Ray Train register the checkpoints reported so far first, so that the restart resumes from the last.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    marker.write_text(f"worker rank {rank} exited at round {round_}\n")
    os._exit(1)  # like a killed process: no exception, no cleanup


def _reporter(framework: str, tune: bool, rounds: _Rounds, frequency: int) -> Any:
    """The library's Ray report callback (Ray Train's, or Ray Tune's in a trial) reporting fabric's metric
    names, with the history in each checkpoint it writes."""
    if framework == "xgboost":
        if tune:
            from ray.tune.integration.xgboost import TuneReportCheckpointCallback as Base
        else:
            from ray.train.xgboost import RayTrainReportCallback as Base
    elif tune:
        from ray.tune.integration.lightgbm import TuneReportCheckpointCallback as Base
    else:
        from ray.train.lightgbm import RayTrainReportCallback as Base

    class Report(Base):  # type: ignore[misc, valid-type]
        if framework == "xgboost":

            def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
                super().after_iteration(model, epoch, evals_log)
                return rounds.stop is not None  # True ends XGBoost's training

        else:

            def __call__(self, env: Any) -> None:
                super().__call__(env)
                if rounds.stop is not None:
                    import lightgbm

                    # LightGBM keeps iteration best_iteration + 1 (counted over the whole run, a resume included)
                    raise lightgbm.callback.EarlyStopException(rounds.stop - 1, [])

        @contextmanager
        def _get_checkpoint(self, model: Any) -> Iterator[Any]:
            with super()._get_checkpoint(model) as checkpoint:
                if checkpoint is not None:
                    write_history(Path(checkpoint.path), rounds.history)
                yield checkpoint

    # The end-of-training checkpoint is written by the worker function: LightGBM's early stopping ends
    # training before the callback's last-round checkpoint.
    return Report(frequency=frequency, checkpoint_at_end=False, results_postprocessing_fn=rounds.add)


def _arrays(config: dict[str, Any], split: str, tune: bool) -> tuple[np.ndarray, np.ndarray]:
    """This worker's features and labels of a split: its Ray Data shard, or (a Tune trial) the whole split."""
    features = list(config["feature_names"])
    if tune:
        columns = local_shard(config["data_dir"], split, features, 0, 1)
    else:
        import ray.train

        parts: dict[str, list[np.ndarray]] = {c: [] for c in [*features, "label"]}
        for batch in ray.train.get_dataset_shard(split).iter_batches(batch_size=65536, batch_format="numpy"):
            for c in parts:
                parts[c].append(np.asarray(batch[c]))
        columns = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    x = np.stack([np.asarray(columns[f], dtype=np.float32) for f in features], axis=1)
    y = np.asarray(columns["label"], dtype=np.float32 if config["task"] == "regression" else np.int64)
    return x, y


def tree_loop_per_worker(config: dict[str, Any]) -> None:
    """Boost on this worker's shard, reporting every round and checkpointing every ``checkpoint_every`` rounds
    and at the end (the kept model: the best round's when early stopping ended the run).

    Used by the training stage's XGBoostTrainer / LightGBMTrainer and, with ``session: tune``, by the Tune
    stage's one-process trials (the whole splits, reports to Tune, no checkpoints). Resumes from the last
    checkpoint after a worker failure; early stopping's patience counts the rounds before the restart too.

    Args:
        config: :func:`tree_config` plus the trial's hyperparameters. Keys: framework, data_dir, task,
            feature_names, num_classes, target, params, num_boost_round, early_stopping_rounds, seed,
            threads, checkpoint_every, session, fault_injection (tests only: ``{"round", "rank", "marker"}``).
    """
    tune = config.get("session") == "tune"
    framework, task = config["framework"], config["task"]
    total = int(config["num_boost_round"])
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Reporting training result" line per round
    if tune:
        rank, world = 0, 1
        checkpoint = None
    else:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        checkpoint = ray.train.get_checkpoint()
    params = library_params(
        framework, task, config.get("num_classes"), dict(config.get("params") or {}), int(config["seed"]),
        int(config.get("threads") or 1),
    )  # fmt: skip
    booster_file = BOOSTER_FILES[framework]
    start_model, history = None, []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            history = read_history(Path(folder))
            start_model = load_booster(framework, Path(folder) / booster_file)
    x, y = _arrays(config, "train", tune)
    xv, yv = _arrays(config, "val", tune)
    stop = config.get("early_stopping_rounds")
    rounds = _Rounds(
        history, total, rank, say=not tune, crash=config.get("fault_injection"), patience=stop,
        watch_first=framework == "lightgbm",
    )  # fmt: skip
    remaining = total - rounds.done
    if rank == 0 and not tune and rounds.done:
        log.info(f"resumed from the checkpoint of round {rounds.done} of {total}")
    report = _reporter(framework, tune, rounds, 0 if tune else int(config.get("checkpoint_every") or 0))
    if framework == "xgboost":
        xgboost = require("xgboost", "gbdt")
        dtrain, dval = xgboost.DMatrix(x, label=y), xgboost.DMatrix(xv, label=yv)
        booster = xgboost.train(
            params, dtrain, num_boost_round=max(remaining, 0), evals=[(dtrain, "train"), (dval, "val")],
            callbacks=[report], xgb_model=start_model, verbose_eval=False,
        )  # fmt: skip
        best = int(booster.num_boosted_rounds())
        if rounds.stop is not None and rounds.stop < best:
            booster, best = booster[: rounds.stop], rounds.stop  # keep the rounds up to the best
    else:
        lightgbm = require("lightgbm", "gbdt")
        if world > 1:
            import ray.train.lightgbm

            # LightGBM sets up its network (and logs each step at Info) before it reads `verbosity` from the
            # params: a throwaway dataset applies the params' log level first.
            lightgbm.Dataset(np.zeros((1, 1)), params={"verbosity": params.get("verbosity", -1)}).construct()
            params = {
                "tree_learner": "data_parallel", "pre_partition": True,
                **ray.train.lightgbm.get_network_params(), **params,
            }  # fmt: skip
        train_set = lightgbm.Dataset(x, label=y, free_raw_data=False)
        val_set = lightgbm.Dataset(xv, label=yv, reference=train_set, free_raw_data=False)
        booster = lightgbm.train(
            params, train_set, num_boost_round=max(remaining, 0), valid_sets=[train_set, val_set],
            valid_names=["train", "val"], callbacks=[report], init_model=start_model,
        )  # fmt: skip
        best = int(booster.best_iteration or booster.current_iteration())
    if tune:
        return
    # The kept model: its history row is the best round's (the last one without early stopping).
    final = next((r for r in rounds.history if int(r["epoch"]) == best), rounds.history[-1] if rounds.history else {})
    with tempfile.TemporaryDirectory(prefix="fabric-trees-") as tmp:
        folder = None
        if rank == 0:
            folder = Path(tmp)
            if framework == "xgboost":
                booster.save_model(str(folder / booster_file))
            else:
                booster.save_model(str(folder / booster_file), num_iteration=best)
            write_history(folder, rounds.history)
            write_spec(folder, tree_spec(config, params_for_spec(params), best, total))
        _report_final(final, str(folder) if folder else None)


def params_for_spec(params: dict[str, Any]) -> dict[str, Any]:
    """The params a model records: the network settings of one run's worker group left out."""
    skip = {"machines", "local_listen_port", "num_machines", "pre_partition", "tree_learner"}
    return {k: v for k, v in params.items() if k not in skip}


def _report_final(metrics: dict[str, Any], folder: str | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
    ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name="final" if checkpoint else None)


def tree_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The worker config of ``cfg``'s tree training (the Tune stage adds its hyperparameters with
    :func:`with_trial`). Reads the ingestion stage's ``meta.json``; FabricError when it is missing."""
    folder = data_dir(cfg.run_dir)
    meta = read_meta(folder)
    t = cfg.train
    return {
        "framework": t.framework,
        "data_dir": splits_location(cfg.run_dir),
        "task": meta["task"],
        "target": meta.get("target"),
        "feature_names": list(meta["feature_names"]),
        "num_classes": meta.get("num_classes"),
        "params": dict(getattr(t, t.framework)),
        "num_boost_round": t.num_boost_round,
        "early_stopping_rounds": t.early_stopping_rounds,
        "seed": t.seed,
        "threads": 1,
        "checkpoint_every": t.checkpoint_every,
    }


def with_trial(base: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """``base`` (:func:`tree_config`) with a trial's hyperparameters: ``num_boost_round``, and
    ``<framework>.<param>`` into the library params."""
    out = {**base, "params": dict(base.get("params") or {})}
    for key, value in trial.items():
        group, dot, name = key.partition(".")
        if dot:
            if group != base["framework"]:
                raise FabricError(f"search key {key!r} does not apply to framework {base['framework']}")
            out["params"][name] = value.item() if isinstance(value, np.generic) else value
        else:
            out[key] = int(value) if key == "num_boost_round" else value
    return out


def _datasets(folder: str) -> dict[str, Any]:
    """The train/val splits, read once into the object store (the boosters hold their data in memory anyway)."""
    out = {}
    for split in ("train", "val"):
        ds = read_split(folder, split)
        ds.context.enable_progress_bars = False
        out[split] = ds.materialize()
    return out


def build_tree_trainer(
    cfg: PipelineConfig, name: str, storage_path: str | Path, use_gpu: bool, overrides: dict[str, Any] | None = None
) -> Any:
    """An XGBoostTrainer / LightGBMTrainer running :func:`tree_loop_per_worker` on ``train.num_workers``
    workers; ``train`` is split between them, ``val`` goes whole to each. ``overrides`` go into the workers'
    config last."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    t = cfg.train
    config = {**tree_config(cfg), **(overrides or {})}
    if t.framework == "xgboost":
        from ray.train.xgboost import XGBoostTrainer as Trainer

        if use_gpu:
            config["params"] = {"device": "cuda", **config["params"]}
    else:
        from ray.train.lightgbm import LightGBMTrainer as Trainer

        use_gpu = False  # LightGBM's pip build boosts on CPU
    return Trainer(
        tree_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=use_gpu, placement_strategy=t.placement_strategy
        ),
        datasets=_datasets(config["data_dir"]),
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
    )


def finished(checkpoint: Path) -> bool:
    """Is this the end-of-training checkpoint (it carries ``model.json``)?"""
    return (checkpoint / "model.json").is_file()


def to_artifact(checkpoint: Path, out: Path) -> Path:
    """Copy the final checkpoint's ``model.json`` and booster file into the model folder ``out``."""
    spec = read_spec(checkpoint)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(checkpoint / spec["booster_file"], out / spec["booster_file"])
    write_spec(out, spec)
    return out


def run(cfg: PipelineConfig, *, loop_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train ``cfg.train``'s XGBoost or LightGBM model with Ray Train and write the model folder.

    The run key, the run folder, "nothing to do" on a rerun and resuming an interrupted run are the torch
    path's (``fabric.train.run``); the summary compares the model with the trivial baseline on ``test``.

    Args:
        cfg: the pipeline config; the ingestion stage must have written ``<run_dir>/data``.
        loop_overrides: keys merged into the workers' config (``fault_injection`` in tests).
    """
    from fabric.runtime import connect
    from fabric.train._trainer import (
        TrainResult,
        _summary,
        _versus_baseline,
        _warn_if_short,
        fit,
        last_checkpoint,
        resolve_use_gpu,
        run_name,
        train_dir,
        train_key,
        train_storage,
    )

    storage.check(cfg.run_dir)
    connect(cfg.cluster)
    t = cfg.train
    runs = train_storage(cfg)
    storage.makedirs(runs)
    key = train_key(cfg)
    name = run_name(cfg, key)
    where = storage.join(runs, name)
    previous = last_checkpoint(where)
    if previous is not None and finished(previous[0]):
        checkpoint_dir, history = previous
        log.info(
            f"training: nothing to do: run {where} boosted this {t.framework} config on this data "
            f"(run key {key}); using its model"
        )
        trained = 0
    else:
        use_gpu = resolve_use_gpu(t.use_gpu)
        _warn_if_short(t.num_workers, use_gpu and t.framework == "xgboost")
        trainer = build_tree_trainer(cfg, name, runs, use_gpu, loop_overrides)
        before = int(previous[1][-1]["epoch"]) if previous and previous[1] else 0
        resume = f"; resuming the interrupted run from its checkpoint of round {before}" if before else ""
        patience = t.early_stopping_rounds
        stop = f", early stopping after {patience} rounds without progress on val" if patience else ""
        log.info(
            f"training {t.framework} on {t.num_workers} worker(s) for up to {t.num_boost_round} rounds{stop}; "
            f"run key {key}, checkpoints every {t.checkpoint_every} round(s) under {where}{resume}"
        )
        _, checkpoint_dir, history = fit(trainer, "training", t.max_failures, where)
        if not finished(checkpoint_dir):
            raise FabricError(f"training at {where} ended without its final checkpoint")
        trained = int(history[-1]["epoch"]) - before if history else 0
    model_path = to_artifact(checkpoint_dir, train_dir(cfg) / "model")
    storage.publish(cfg.run_dir, "train/model")
    spec = read_spec(model_path)
    best = int(spec["best_iteration"])
    row = next((r for r in history if int(r["epoch"]) == best), history[-1] if history else {})
    metrics = {**row, "best_iteration": best, "rounds": len(history), **_versus_baseline(cfg, model_path)}
    if history and best < len(history):
        log.info(f"early stopping: best round {best} of {len(history)} boosted")
    log.info(f"trained: {_summary(metrics)}; model: {model_path}")
    return TrainResult(checkpoint_dir, metrics, history, model_path, run_key=key, trained_epochs=trained)

