"""The training stage: a TorchTrainer (DDP or DeepSpeed) over the ingested splits, and its artifact."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import storage
from fabric.config import PipelineConfig, TrainConfig, WorkerGroupConfig
from fabric.errors import ConfigError, ConfigProblem, FabricError, require
from fabric.models import check_loop, check_model, code_digest, code_root, load_model
from fabric.runtime import connect
from fabric.tracking import beats, digest_splits, fit_baseline, run_key, score
from fabric.tracking import read_split as read_labelled
from fabric.train._checkpoint import read_history, to_artifact
from fabric.train._data import SPLITS, data_dir, read_meta, read_split, splits_location
from fabric.train._loop import train_loop_per_worker

log = logging.getLogger(__name__)

REPORT_POLL_S = "0.05"
"""Ray Train's controller collects a report from the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
(2 s by default) and a worker's next report waits for that: every epoch (every boosting round) and the end of
every run would wait up to 2 s. fabric's runs poll this often instead (unless the variable is set)."""
OPERATIONAL = {"max_failures", "placement_strategy", "checkpoint_every", "keep_checkpoints"}
"""Worker-group settings that say how a run is carried out, not what it computes: left out of its key."""

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.train.torch import TorchTrainer


@dataclass
class TrainResult:
    """What the training stage leaves behind.

    Attributes:
        checkpoint_dir: the run's last checkpoint (Ray Train's folder: DDP or DeepSpeed format; its local copy when
            ``run_dir`` is a URI).
        metrics: the last epoch's metrics, the model's test scores (``test_accuracy``, ``test_log_loss`` or
            ``test_rmse``, ``test_mae``) and the trivial baseline's (``baseline_val_*``, ``baseline_test_*``).
        history: every epoch's metrics, in order (resumed runs included: epochs keep counting).
        model_path: the self-contained artifact folder (``model.pt`` + ``model.json``) that
            ``fabric.models.load_model`` reads without Ray.
        run_key: the digest of the train settings and the data splits the run is kept (and registered) by.
        trained_epochs: epochs this call trained; 0 when the run had finished before (nothing to do).
    """

    checkpoint_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model_path: Path
    run_key: str = ""
    trained_epochs: int = 0


def train_dir(cfg: PipelineConfig) -> Path:
    """The local folder of the stage's artifact (``model/``; a URI run_dir's local copy, published to the URI)."""
    return storage.local_root(cfg.run_dir) / "train"


def train_storage(cfg: PipelineConfig) -> str:
    """Where Ray Train keeps the stage's runs (RunConfig storage_path): ``<run_dir>/train``, a URI or a local path.
    With a URI each worker uploads its checkpoints there itself."""
    return storage.join(cfg.run_dir, "train")


def train_key(cfg: PipelineConfig) -> str:
    """The run key of ``cfg``'s training: its train settings (less :data:`OPERATIONAL`) and the content
    digest of the ingested splits. Reads ``<run_dir>/data``; FabricError when ingestion has not run."""
    folder = data_dir(cfg.run_dir)
    read_meta(folder)
    settings = cfg.train.model_dump(mode="json", exclude=OPERATIONAL)
    code = {p: code_digest(p) for p in _user_paths(cfg.train)}
    if any(code.values()):  # an edit of the user's module is a new run (installed code: its version is in the path)
        settings["code"] = code
    return run_key({"train": settings}, {"data": digest_splits(folder, SPLITS)})


def _user_paths(t: TrainConfig) -> list[str]:
    """The import paths of the user's code a train config names (its own model builder and loop)."""
    return [p for p in (t.model if t.model != "mlp" else None, t.loop) if p]


def check_code(cfg: PipelineConfig, meta: dict[str, Any] | None = None) -> list[str]:
    """Resolve the user's own model builder and loop of ``cfg.train`` before any work starts: the builder
    is built once and run on two rows of zeros (input_dim from the ingested features); the loop must take
    the config. Returns the folders of that code (for the workers' ``sys.path`` on a local cluster).

    Raises:
        ConfigError: naming ``train.model`` or ``train.loop``: not found, not callable, wrong signature, not
            an ``nn.Module``, wrong output shape; or ``tune.search_space``: ``model_args.*`` keys for the MLP.
    """
    t = cfg.train
    searched = sorted(k for k in cfg.tune.search_space if k.startswith("model_args."))
    if t.framework == "torch" and t.model == "mlp" and searched and cfg.tune.enabled:
        problem = f"{', '.join(searched)} vary an own train.model's arguments; train.model is fabric's mlp"
        raise ConfigError([ConfigProblem("tune.search_space", problem)])
    if t.framework != "torch" or not _user_paths(t):
        return []
    meta = meta if meta is not None else read_meta(data_dir(cfg.run_dir))
    if t.loop:
        check_loop(t.loop)
    if t.model != "mlp":
        classes = int(meta["num_classes"]) if meta["task"] == "classification" else 1
        check_model(t.model, t.model_args, list(meta["feature_names"]), list(meta.get("categorical") or []), classes)
    return sorted({str(root) for p in _user_paths(t) if (root := code_root(p)) is not None})


def run_name(cfg: PipelineConfig, key: str) -> str:
    """The Ray Train run (folder under :func:`train_storage`) of a config: its name and run key."""
    return f"{cfg.name}-{key}"


def resolve_use_gpu(setting: bool | str) -> bool:
    """``auto`` means: GPUs when the connected cluster has any."""
    if setting == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def loop_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``train_loop_config`` of ``train_loop_per_worker`` for this config (the Tune stage adds its
    hyperparameters on top). Reads the ingestion stage's ``meta.json``; FabricError when it is missing.
    Checks the user's own model and loop (:func:`check_code`); ConfigError when they do not fit."""
    folder = data_dir(cfg.run_dir)
    meta = read_meta(folder)
    t = cfg.train
    return {
        "model": t.model,
        "model_args": dict(t.model_args),
        "loop": t.loop,
        "code_dirs": check_code(cfg, meta),
        "data_dir": splits_location(cfg.run_dir),
        "task": meta["task"],
        "target": meta.get("target"),
        "feature_names": list(meta["feature_names"]),
        "categorical": list(meta.get("categorical") or []),
        "num_classes": meta.get("num_classes"),
        "hidden_size": t.hidden_size,
        "num_layers": t.num_layers,
        "dropout": t.dropout,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "seed": t.seed,
        "strategy": t.strategy,
        "zero_stage": t.deepspeed.zero_stage,
        "offload_optimizer": t.deepspeed.offload_optimizer,
        "checkpoint_every": t.checkpoint_every,
    }


def build_trainer(
    cfg: PipelineConfig, loop_overrides: dict[str, Any] | None = None, name: str | None = None
) -> TorchTrainer:
    """A TorchTrainer over ``train_loop_per_worker`` with the train/val splits streamed as Ray Data shards.

    Args:
        cfg: the pipeline config (``cfg.train`` shapes the run); Ray must be connected.
        loop_overrides: keys merged into the loop config last (the benchmark and tests use this).
        name: the Ray Train run's name (default: :func:`run_name` of the config's run key).
    """
    t = cfg.train
    config = {**loop_config(cfg), **(loop_overrides or {}), "ray_data_shards": True}
    where = train_storage(cfg)
    storage.makedirs(where)
    name = name or run_name(cfg, train_key(cfg))
    return worker_group_trainer(
        train_loop_per_worker, config, t, _datasets(config["data_dir"], t.num_workers), name=name, storage=where
    )


def worker_group_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    group: WorkerGroupConfig,
    datasets: dict[str, Any],
    name: str,
    storage: str | Path,
) -> TorchTrainer:
    """A TorchTrainer running ``loop`` as ``group`` says: workers, GPUs (NCCL) or CPUs (gloo), placement, restarts,
    and the latest ``keep_checkpoints`` checkpoints kept (each carries the run's history so far).

    Raises:
        FabricError: DeepSpeed is asked for and not installed (here, not in every worker).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if group.strategy == "deepspeed":
        require("deepspeed", "deepspeed")
    use_gpu = resolve_use_gpu(group.use_gpu)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=group.num_workers, use_gpu=use_gpu, placement_strategy=group.placement_strategy
        ),
        datasets=datasets,
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=group.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=group.keep_checkpoints),
        ),
    )


def _datasets(folder: str, num_workers: int) -> dict[str, Any]:
    """The train/val splits the workers stream their shards of, read once into the object store when
    that is cheap or necessary, else re-read from parquet every epoch.

    Re-reading costs a Ray Data execution per epoch, seconds even for small splits, so a split that
    takes under a tenth of the object store is read once. And Ray Data may only use the CPUs Ray Train
    leaves (one per worker is reserved): with none to spare (2 workers on a 2-core laptop) a per-epoch
    read would wait forever, so then the splits are read once whatever their size (spilling to disk).
    """
    import ray

    spare_cpus = ray.cluster_resources().get("CPU", 0) - num_workers
    store = ray.cluster_resources().get("object_store_memory", 0)
    out = {}
    for split in ("train", "val"):
        ds = read_split(folder, split)
        ds.context.enable_progress_bars = False  # per-epoch shard bars would bury the epoch lines
        on_disk = storage.size(storage.join(folder, split))
        out[split] = ds if spare_cpus >= 1 and on_disk > store / 10 else ds.materialize()
    return out


def last_checkpoint(run_path: str | Path) -> tuple[Path, list[dict[str, Any]]] | None:
    """The latest checkpoint of the Ray Train run at ``run_path`` (a local path or a URI) and the history it
    carries; None when there is no such run or it has no checkpoint yet. A remote checkpoint is downloaded."""
    if not storage.exists(storage.join(run_path, "checkpoint_manager_snapshot.json")):
        return None
    from ray.train import Result

    latest = Result.from_path(str(run_path)).checkpoint
    if latest is None:
        return None
    folder = local_checkpoint(latest)
    return folder, read_history(folder)


def local_checkpoint(checkpoint: Checkpoint) -> Path:
    """The folder of ``checkpoint`` on this machine: its own on a local filesystem, else a copy (cached: a
    checkpoint never changes once reported)."""
    from pyarrow import fs

    if isinstance(checkpoint.filesystem, fs.LocalFileSystem):
        return Path(checkpoint.path)
    local = storage.cache_path(f"{checkpoint.filesystem.type_name}://{checkpoint.path}")
    if not local.is_dir():
        staging = local.with_name(f".{local.name}.{os.getpid()}")
        checkpoint.to_directory(str(staging))
        staging.rename(local)
    return local


@contextmanager
def frequent_reports() -> Iterator[None]:
    """Let the Ray Train run started in this block collect the workers' reports every :data:`REPORT_POLL_S`
    (Ray passes ``RAY_TRAIN_*`` variables on to its controller), unless the variable is set already."""
    name = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if name in os.environ:
        yield
        return
    os.environ[name] = REPORT_POLL_S
    try:
        yield
    finally:
        os.environ.pop(name, None)


def fit(
    trainer: TorchTrainer, what: str, max_failures: int, where: str | Path
) -> tuple[Any, Path, list[dict[str, Any]]]:
    """Run ``trainer`` and return its Result, last checkpoint folder (local: see :func:`local_checkpoint`) and
    every epoch's metrics (the history the last checkpoint carries).

    Raises:
        FabricError: the run failed after its restarts, or reported no checkpoint.
    """
    from ray.train import TrainingFailedError

    try:
        with frequent_reports():
            result = trainer.fit()
    except TrainingFailedError as e:
        raise FabricError(f"{what} failed (after up to {max_failures} restart(s)): {e}") from e
    if result.checkpoint is None:
        raise FabricError(f"{what} at {where} reported no checkpoint")
    folder = local_checkpoint(result.checkpoint)
    return result, folder, read_history(folder)


def run(cfg: PipelineConfig, *, loop_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train ``cfg.train``'s model with Ray Train on the ingested data and write the model artifact.

    Runs DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO on ``cfg.train.num_workers`` workers,
    checkpointing every ``checkpoint_every`` epochs under ``<run_dir>/train/<name>-<run key>/``; a failed
    worker group restarts up to ``max_failures`` times from the last checkpoint. The run key digests the
    train settings and the data splits, so a rerun of the same config on the same data has nothing to do
    (it says so and trains nothing), a rerun of an interrupted one resumes it, and changed hyperparameters
    or data start a new run beside the old ones. The artifact goes to ``<run_dir>/train/model/``; the
    summary compares the model with the trivial baseline (majority class or training mean) on ``test``.

    Args:
        cfg: the pipeline config; the ingestion stage must have written ``<run_dir>/data``.
        loop_overrides: keys merged into the workers' loop config (e.g. ``fault_injection`` in tests).
    """
    if cfg.train.framework != "torch":
        from fabric.train._trees import run as run_trees

        return run_trees(cfg, loop_overrides=loop_overrides)
    storage.check(cfg.run_dir)
    check_code(cfg)  # the user's module and loop fail here, before Ray starts anything
    connect(cfg.cluster)
    key = train_key(cfg)
    name = run_name(cfg, key)
    where = storage.join(train_storage(cfg), name)
    t = cfg.train
    previous = last_checkpoint(where)
    before = int(previous[1][-1]["epoch"]) if previous and previous[1] else 0
    if previous is not None and before >= t.epochs:
        checkpoint_dir, history = previous
        log.info(
            f"training: nothing to do: run {where} trained all {t.epochs} epoch(s) of this config "
            f"on this data (run key {key}); using its model"
        )
        trained = 0
    else:
        use_gpu = resolve_use_gpu(t.use_gpu)
        _warn_if_short(t.num_workers, use_gpu)
        trainer = build_trainer(cfg, loop_overrides, name)
        how = f"DeepSpeed ZeRO-{t.deepspeed.zero_stage}" if t.strategy == "deepspeed" else "DDP"
        resume = f"; resuming the interrupted run from its checkpoint of epoch {before}" if before else ""
        log.info(
            f"training {how} on {t.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s) for {t.epochs} epoch(s); "
            f"run key {key}, checkpoints every {t.checkpoint_every} epoch(s) under {where}{resume}"
        )
        _, checkpoint_dir, history = fit(trainer, "training", t.max_failures, where)
        trained = int(history[-1]["epoch"]) - before
    model_path = to_artifact(checkpoint_dir, train_dir(cfg) / "model")
    storage.publish(cfg.run_dir, "train/model")
    metrics = {**history[-1], **_versus_baseline(cfg, model_path)} if history else {}
    log.info(f"trained: {_summary(metrics)}; model: {model_path}")
    return TrainResult(checkpoint_dir, metrics, history, model_path, run_key=key, trained_epochs=trained)


def _versus_baseline(cfg: PipelineConfig, model_path: Path) -> dict[str, float]:
    """The model's test scores (``test_<metric>``) and the trivial baseline's on val and test
    (``baseline_val_<metric>``, ``baseline_test_<metric>``); splits without rows are left out."""
    import torch

    folder = data_dir(cfg.run_dir)
    meta = read_meta(folder)
    task = meta["task"]
    baseline = fit_baseline(folder, task, meta.get("num_classes"))
    model, spec = load_model(model_path)
    out: dict[str, float] = {}
    for split in ("val", "test"):
        try:
            x, y, _ = read_labelled(folder, split, list(spec["feature_names"]))
        except FabricError:
            continue
        if not len(y):
            continue
        out.update({f"baseline_{split}_{k}": v for k, v in baseline.scores(y).items()})
        if split == "test":
            with torch.no_grad():
                outputs = model(torch.from_numpy(x.copy())).numpy()  # a writable copy: torch warns on read-only arrays
            out.update({f"test_{k}": v for k, v in score(outputs, y, task).items()})
    return out


def _warn_if_short(num_workers: int, use_gpu: bool) -> None:
    """Ray Train waits (for an autoscaler) until every worker has its CPU and GPU: say so up front."""
    import ray

    have = ray.cluster_resources()
    for resource in ("CPU", "GPU") if use_gpu else ("CPU",):
        if have.get(resource, 0) < num_workers:
            log.warning(
                f"{num_workers} workers need {num_workers} {resource}s and the cluster has "
                f"{have.get(resource, 0):g} now; training waits until they are added (lower train.num_workers?)"
            )


def _summary(metrics: dict[str, Any]) -> str:
    """The last epoch's numbers, then the test split's against the trivial baseline's."""
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_rmse")
    line = ", ".join(
        f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys if k in metrics
    )
    task = "classification" if "val_accuracy" in metrics else "regression"
    metric = "accuracy" if task == "classification" else "rmse"
    split = "test" if f"test_{metric}" in metrics else "val"
    base = metrics.get(f"baseline_{split}_{metric}")
    if base is None or f"{split}_{metric}" not in metrics:
        return line
    model = {k.removeprefix(f"{split}_"): v for k, v in metrics.items() if k.startswith(f"{split}_")}
    prefix = f"baseline_{split}_"
    baseline = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
    if task == "classification" and "log_loss" not in model:
        model["log_loss"] = metrics["val_loss"]  # the loop's cross-entropy is the log loss
    verdict = "beats" if beats(model, baseline, task) else "does NOT beat"
    what = "majority class" if task == "classification" else "training mean"
    return (
        f"{line}; {split} {metric} {metrics[f'{split}_{metric}']:.4g} {verdict} the trivial baseline "
        f"({what}: {base:.4g})"
    )
