"""The training stage: a TorchTrainer (DDP or DeepSpeed) over the ingested splits, and its artifact."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.config import PipelineConfig, WorkerGroupConfig
from fabric.errors import FabricError, require
from fabric.models import read_spec
from fabric.runtime import connect
from fabric.train._checkpoint import kind, to_artifact
from fabric.train._data import data_dir, read_meta, read_split
from fabric.train._loop import DEFAULTS, spec_from_config, train_loop_per_worker

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer


@dataclass
class TrainResult:
    """What the training stage leaves behind.

    Attributes:
        checkpoint_dir: the run's last checkpoint (Ray Train's folder: DDP or DeepSpeed format).
        metrics: the last epoch's metrics.
        history: every epoch's metrics, in order (resumed runs included: epochs keep counting).
        model_path: the self-contained artifact folder (``model.pt`` + ``model.json``) that
            ``fabric.models.load_model`` reads without Ray.
    """

    checkpoint_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model_path: Path


def train_dir(cfg: PipelineConfig) -> Path:
    """Where the stage keeps Ray Train's runs (RunConfig storage_path) and the artifact."""
    return (Path(cfg.run_dir) / "train").resolve()


def resolve_use_gpu(setting: bool | str) -> bool:
    """``auto`` means: GPUs when the connected cluster has any."""
    if setting == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def loop_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``train_loop_config`` of ``train_loop_per_worker`` for this config (the Tune stage adds its
    hyperparameters on top). Reads the ingestion stage's ``meta.json``; FabricError when it is missing."""
    folder = data_dir(cfg.run_dir)
    meta = read_meta(folder)
    t = cfg.train
    return {
        "data_dir": str(folder),
        "task": meta["task"],
        "target": meta.get("target"),
        "feature_names": list(meta["feature_names"]),
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
    }


def build_trainer(cfg: PipelineConfig, loop_overrides: dict[str, Any] | None = None) -> TorchTrainer:
    """A TorchTrainer over ``train_loop_per_worker`` with the train/val splits streamed as Ray Data shards.

    Args:
        cfg: the pipeline config (``cfg.train`` shapes the run); Ray must be connected.
        loop_overrides: keys merged into the loop config last (the benchmark and tests use this).
    """
    t = cfg.train
    config = {**loop_config(cfg), **(loop_overrides or {}), "ray_data_shards": True}
    folder = Path(config["data_dir"])
    storage = train_dir(cfg)
    storage.mkdir(parents=True, exist_ok=True)
    return worker_group_trainer(
        train_loop_per_worker, config, t, _datasets(folder, t.num_workers), name=cfg.name, storage=storage
    )


def worker_group_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    group: WorkerGroupConfig,
    datasets: dict[str, Any],
    name: str,
    storage: Path,
) -> TorchTrainer:
    """A TorchTrainer running ``loop`` as ``group`` says: workers, GPUs (NCCL) or CPUs (gloo), placement, restarts.

    Every epoch's checkpoint is kept (tabular models and adapters are small; their metrics are the history).

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
            checkpoint_config=CheckpointConfig(),
        ),
    )


def _datasets(folder: Path, num_workers: int) -> dict[str, Any]:
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
        on_disk = sum(f.stat().st_size for f in (folder / split).rglob("*") if f.is_file())
        out[split] = ds if spare_cpus >= 1 and on_disk > store / 10 else ds.materialize()
    return out


def _check_previous_run(run_path: Path, config: dict[str, Any]) -> None:
    """A rerun of the same run continues it (Ray Train restores its checkpoints); refuse when the
    model or strategy changed, since its checkpoint cannot load into the new one."""
    if not (run_path / "checkpoint_manager_snapshot.json").is_file():
        return
    from ray.train import Result

    latest = Result.from_path(str(run_path)).checkpoint
    if latest is None:
        return
    folder = Path(latest.path)
    old = read_spec(folder)
    new = spec_from_config({**DEFAULTS, **config})
    old_strategy = kind(folder)
    if old.get("kwargs") != new["kwargs"] or old_strategy != config["strategy"]:
        raise FabricError(
            f"{run_path} holds a run of another model or strategy ({old_strategy}, {old.get('kwargs')}); "
            "choose another `name` or `run_dir`, or delete that folder to start over"
        )
    print(f"continuing the run at {run_path} from {folder.name}", flush=True)


def fit(trainer: TorchTrainer, what: str, max_failures: int, where: Path) -> tuple[Any, Path, list[dict[str, Any]]]:
    """Run ``trainer`` and return its Result, last checkpoint folder and per-checkpoint metrics.

    Raises:
        FabricError: the run failed after its restarts, or reported no checkpoint.
    """
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise FabricError(f"{what} failed (after up to {max_failures} restart(s)): {e}") from e
    if result.checkpoint is None:
        raise FabricError(f"{what} at {where} reported no checkpoint")
    return result, Path(result.checkpoint.path), [dict(m) for _, m in (result.best_checkpoints or [])]


def run(cfg: PipelineConfig, *, loop_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train ``cfg.train``'s model with Ray Train on the ingested data and write the model artifact.

    Runs DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO on ``cfg.train.num_workers`` workers,
    checkpointing every epoch under ``<run_dir>/train/<name>/``; a failed worker group restarts up to
    ``max_failures`` times from the last checkpoint. Rerunning the same ``name`` and ``run_dir``
    continues that run. The artifact goes to ``<run_dir>/train/model/``.

    Args:
        cfg: the pipeline config; the ingestion stage must have written ``<run_dir>/data``.
        loop_overrides: keys merged into the workers' loop config (e.g. ``fault_injection`` in tests).
    """
    connect(cfg.cluster)
    storage = train_dir(cfg)
    _check_previous_run(storage / cfg.name, {**loop_config(cfg), **(loop_overrides or {})})
    t = cfg.train
    use_gpu = resolve_use_gpu(t.use_gpu)
    _warn_if_short(t.num_workers, use_gpu)
    trainer = build_trainer(cfg, loop_overrides)
    how = f"DeepSpeed ZeRO-{t.deepspeed.zero_stage}" if t.strategy == "deepspeed" else "DDP"
    print(
        f"training {how} on {t.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s) for {t.epochs} epoch(s); "
        f"checkpoints under {storage / cfg.name}",
        flush=True,
    )
    result, checkpoint_dir, history = fit(trainer, "training", t.max_failures, storage / cfg.name)
    model_path = to_artifact(checkpoint_dir, storage / "model")
    metrics = dict(result.metrics or {})
    print(f"trained: {_summary(metrics)}; model: {model_path}", flush=True)
    return TrainResult(checkpoint_dir=checkpoint_dir, metrics=metrics, history=history, model_path=model_path)


def _warn_if_short(num_workers: int, use_gpu: bool) -> None:
    """Ray Train waits (for an autoscaler) until every worker has its CPU and GPU: say so up front."""
    import ray

    have = ray.cluster_resources()
    for resource in ("CPU", "GPU") if use_gpu else ("CPU",):
        if have.get(resource, 0) < num_workers:
            print(
                f"warning: {num_workers} workers need {num_workers} {resource}s and the cluster has "
                f"{have.get(resource, 0):g} now; training waits until they are added (lower train.num_workers?)",
                flush=True,
            )


def _summary(metrics: dict[str, Any]) -> str:
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_rmse")
    return ", ".join(
        f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}" for k in keys if k in metrics
    )
