"""LoRA fine-tuning of a causal LM on Ray Train: data, base model and tokenizer, the TorchTrainer, outputs.

Everything lands under ``<run_dir>/llm/`` (the contract the serving side reads)::

    base/              HF folder of the base model + tokenizer (also when built from a config)
    adapter/           peft adapter folder + tokenizer
    merged/            the base with the adapter merged in + tokenizer (``llm.finetune.merge``)
    metrics.json       {"perplexity_before", "perplexity_after", ..., "run_key"}
    reference.parquet  one row per held-out record: prompt_tokens, completion_tokens (drift reference)
    train/<name>-<run key>/  Ray Train's run: checkpoints of the adapter (not the base), with the history

With a URI ``run_dir`` (``s3://bucket/prefix``) the stage writes on the driver's local copy
(:func:`fabric.storage.local_root`) and publishes to the bucket: the base before training (the workers read it
from there, on whichever node they run), the other outputs after, ``metrics.json`` last and the old one deleted
first, so a half-published stage is never taken as done. Ray Train's workers upload their checkpoints to
``<run_dir>/llm/train`` themselves. A rerun on a machine without the local copy finds the run done in the bucket.

The run key digests the settings that shape the adapter and the contents of the data (and of the model and
tokenizer folders when given): a rerun of the same config on the same data has nothing to do and
registers nothing, an interrupted one resumes, and changed settings or data fine-tune a new run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import storage
from fabric.config import LMModelConfig, PipelineConfig
from fabric.data import pack, read_text_records, token_counts
from fabric.errors import ConfigError, ConfigProblem, DataValidationError, FabricError, require
from fabric.models.causal_lm import (
    build_causal_lm,
    context_length,
    has_tokenizer,
    load_causal_lm,
    load_tokenizer,
    merge_and_save,
    save_pretrained,
    train_tokenizer,
)
from fabric.runtime import connect
from fabric.tracking import AdapterRegistration, digest_source, log_finetune, run_key
from fabric.train._lm_loop import ADAPTER, lm_loop_per_worker
from fabric.train._trainer import (
    OPERATIONAL,
    _warn_if_short,
    fit,
    last_checkpoint,
    resolve_use_gpu,
    worker_group_trainer,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fabric.data import TextSplits

METRICS = "metrics.json"
"""The stage's summary, and its done-marker: written (and published) last."""
REFERENCE = "reference.parquet"
OUTPUTS = ("base", "adapter", "merged", REFERENCE, METRICS)
"""What the stage leaves under ``llm/`` besides Ray Train's runs, in publishing order."""


@dataclass
class FinetuneResult:
    """What fine-tuning leaves behind (the folders of the output contract, and the numbers; with a URI run_dir, the
    driver's local copy of what the bucket holds)."""

    llm_dir: Path
    base_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    """None when ``llm.finetune.merge`` is off."""
    metrics: dict[str, Any]
    """What ``metrics.json`` holds: perplexity before and after, record and block counts, settings."""
    history: list[dict[str, Any]]
    """Every epoch's metrics, in order (a resumed run's included)."""
    checkpoint_dir: Path
    registration: AdapterRegistration | None = field(default=None)
    """The MLflow run and the registered adapter version."""


def llm_dir(cfg: PipelineConfig) -> Path:
    """``<run_dir>/llm`` on this machine: where fine-tuning writes (a URI run_dir's local copy, published to it)."""
    return storage.local_root(cfg.run_dir) / "llm"


def finetune_storage(cfg: PipelineConfig) -> str:
    """Where Ray Train keeps the fine-tuning runs (RunConfig storage_path): ``<run_dir>/llm/train``, a local path or a
    URI (each worker uploads its checkpoints there itself)."""
    return storage.join(cfg.run_dir, "llm", "train")


def _folder(location: str, field: str) -> Path:
    """The folder at ``location`` on this machine: itself, or for a URI this node's copy (:func:`storage.localize`).

    Raises:
        ConfigError: naming ``field``, when the bucket holds no files there or cannot be read.
    """
    try:
        return storage.localize(location)
    except FabricError as e:  # names the location
        raise ConfigError([ConfigProblem(field, str(e))]) from None
    except OSError as e:  # no endpoint, wrong keys
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError([ConfigProblem(field, f"cannot read {location}: {cause}")]) from None


def _tokenizer(model: LMModelConfig, splits: TextSplits) -> PreTrainedTokenizerBase:
    """``tokenizer_path``'s tokenizer, else the model folder's, else one trained on the training texts."""
    if model.tokenizer_path:
        return load_tokenizer(_folder(model.tokenizer_path, "llm.model.tokenizer_path"))
    if model.path and has_tokenizer(folder := _folder(model.path, "llm.model.path")):
        return load_tokenizer(folder, field="llm.model.path")
    texts = (row["prompt"] + row["completion"] for row in splits.train.iter_rows())
    tokenizer = train_tokenizer(texts, model.vocab_size)
    log.info(f"trained a byte-level BPE tokenizer of {len(tokenizer)} tokens on the training records")
    return tokenizer


def _base(cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Load or build the base model, check it against the data and tokenizer, save it to ``out``."""
    m = cfg.llm.model
    model = load_causal_lm(_folder(m.path, "llm.model.path")) if m.path else build_causal_lm(m, tokenizer, seed=cfg.seed)
    problems = []
    seq_len, context = cfg.llm.data.seq_len, context_length(model)
    if seq_len > context:
        problems.append(ConfigProblem("llm.data.seq_len", f"{seq_len} exceeds the model's context ({context})"))
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        message = f"the tokenizer has {len(tokenizer)} tokens, the model embeds {vocab}"
        problems.append(ConfigProblem("llm.model.tokenizer_path", message))
    if problems:
        raise ConfigError(problems)
    return save_pretrained(model, tokenizer, out)


def _packed(cfg: PipelineConfig, splits: TextSplits, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The packed train and held-out datasets, materialized: small next to the text, and Ray Train's
    workers hold every CPU of a small cluster, so lazy tokenization would wait for a CPU that never frees."""
    seq_len, workers = cfg.llm.data.seq_len, cfg.llm.finetune.num_workers
    out = {
        "train": pack(splits.train, tokenizer, seq_len).materialize(),
        "val": pack(splits.heldout, tokenizer, seq_len).materialize(),
    }
    for name, ds in out.items():
        ds.context.enable_progress_bars = False
        blocks = ds.count()
        if blocks < workers:
            what = "training" if name == "train" else "held-out"
            raise DataValidationError(
                f"{splits.source}: the {what} records make {blocks} sequence(s) of {seq_len} tokens, fewer than "
                f"the {workers} workers; add data, lower llm.data.seq_len or raise llm.data.heldout_fraction",
                rows=blocks,
            )
    return out


def _loop_config(cfg: PipelineConfig, base: str) -> dict[str, Any]:
    """The workers' loop config; ``base``: the base model folder as they reach it (a local path or a URI)."""
    f = cfg.llm.finetune
    return {
        "base_dir": base,
        "lora": cfg.llm.lora.model_dump(mode="json"),
        "epochs": f.epochs,
        "batch_size": f.batch_size,
        "lr": f.lr,
        "weight_decay": f.weight_decay,
        "seed": cfg.seed,
        "strategy": f.strategy,
        "zero_stage": f.deepspeed.zero_stage,
        "offload_optimizer": f.deepspeed.offload_optimizer,
        "checkpoint_every": f.checkpoint_every,
    }


def finetune_key(cfg: PipelineConfig) -> str:
    """The run key of ``cfg``'s fine-tuning: the ``llm`` settings that shape the adapter (not serving, merging,
    the registered name or :data:`OPERATIONAL` fields), the seed, and the content digests of the records and
    of the base model and tokenizer folders when given."""
    llm = cfg.llm
    settings = {
        "llm": llm.model_dump(mode="json", exclude={"serve": True, "finetune": {*OPERATIONAL, "merge", "model_name"}}),
        "seed": cfg.seed,
    }
    inputs = {"data": digest_source(llm.data.path)}
    for what, path in (("model", llm.model.path), ("tokenizer", llm.model.tokenizer_path)):
        if path:
            inputs[what] = digest_source(path)
    return run_key(settings, inputs)


def _unchanged(cfg: PipelineConfig, out: Path, key: str) -> FinetuneResult | None:
    """The outputs of a finished run of this key when they are all in place (nothing to do), else None. With a URI
    run_dir they are the bucket's (pulled into the local copy when it differs)."""
    f = cfg.llm.finetune
    run_path = storage.join(finetune_storage(cfg), f"{cfg.name}-{key}")
    previous = last_checkpoint(run_path)
    if previous is None or not previous[1] or int(previous[1][-1]["epoch"]) < f.epochs:
        return None
    where = storage.join(cfg.run_dir, "llm")
    try:
        text = storage.read_text(storage.join(where, METRICS))
        metrics = json.loads(text)
    except (OSError, ValueError):
        return None
    folders = ["base", "adapter", *(["merged"] if f.merge else [])]
    if metrics.get("run_key") != key or not all(storage.exists(storage.join(where, d)) for d in folders):
        return None
    _pull(cfg, out, text)
    metrics_file = out / METRICS
    merged = out / "merged" if f.merge else None
    log.info(
        f"fine-tuning: nothing to do: run {run_path} trained all {f.epochs} epoch(s) of this config on this data "
        f"(run key {key}) and its outputs are under {out}"
    )
    checkpoint_dir, history = previous
    # Registers the adapter only if an earlier attempt stopped before it did (else says it is there).
    summary = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    registration = log_finetune(cfg, history, summary, out / "adapter", files=[metrics_file], run_key=key)
    return FinetuneResult(out, out / "base", out / "adapter", merged, metrics, history, checkpoint_dir, registration)


def _pull(cfg: PipelineConfig, out: Path, metrics: str) -> None:
    """Make the local copy of a URI run_dir's outputs the bucket's when its ``metrics.json`` differs from the
    bucket's text ``metrics`` (another machine fine-tuned them, or there is no local copy); ``metrics.json`` last."""
    mine = out / METRICS
    if not storage.is_uri(cfg.run_dir) or (mine.is_file() and mine.read_text() == metrics):
        return
    mine.unlink(missing_ok=True)
    for name in OUTPUTS:
        remote = storage.join(cfg.run_dir, "llm", name)
        if storage.exists(remote):
            storage.download(remote, out / name)
        else:
            storage.delete(out / name)
    log.info(f"fine-tuning: pulled the outputs of {storage.join(cfg.run_dir, 'llm')} into {out}")


def _publish(cfg: PipelineConfig, names: tuple[str, ...]) -> None:
    """Upload the local copy's outputs ``names`` to a URI run_dir (those the local copy lacks are deleted there)."""
    for name in names:
        if (storage.local_root(cfg.run_dir) / "llm" / name).exists():
            storage.publish(cfg.run_dir, f"llm/{name}")
        else:
            storage.delete(storage.join(cfg.run_dir, "llm", name))


def finetune(cfg: PipelineConfig, *, loop_overrides: dict[str, Any] | None = None) -> FinetuneResult:
    """Fine-tune a LoRA adapter on ``cfg.llm``'s model and data with Ray Train, and write the outputs.

    Reads and checks the JSON-lines records (Ray Data), holds out ``llm.data.heldout_fraction`` of them,
    loads the base (or builds it from ``llm.model``) and its tokenizer (or trains one on the data), packs
    the tokens into ``llm.data.seq_len`` blocks, and trains the adapter on ``llm.finetune.num_workers``
    workers with DDP or DeepSpeed ZeRO, checkpointing the adapter every ``checkpoint_every`` epochs (a failed
    worker group restarts up to ``max_failures`` times from the last one). Held-out perplexity is measured
    before and after; the run goes to MLflow with the adapter registered as ``llm.finetune.model_name``.
    Outputs land under ``<run_dir>/llm/``, a local folder or a bucket (see this module's docstring). A rerun with
    the same run key trains and registers nothing; a finished run whose outputs were replaced writes them again.

    Args:
        cfg: the pipeline config (``llm`` section, ``track``, ``cluster``, ``run_dir``, ``seed``).
        loop_overrides: keys merged into the workers' loop config (``fault_injection`` in tests).

    Raises:
        ConfigError: a model or tokenizer folder that does not load, or sizes that do not fit.
        DataValidationError: bad records, or too little data for the workers.
        FabricError: training failed after its restarts, or a URI run_dir that cannot be written (one line).
    """
    require("transformers", "llm")
    f = cfg.llm.finetune
    if f.strategy == "deepspeed":
        require("deepspeed", "deepspeed")  # before reading any data
    storage.check(cfg.run_dir)  # an unreachable or unauthorised bucket fails here, before any work
    connect(cfg.cluster)
    out = llm_dir(cfg)
    runs = finetune_storage(cfg)
    key = finetune_key(cfg)
    name = f"{cfg.name}-{key}"
    if (unchanged := _unchanged(cfg, out, key)) is not None:
        return unchanged

    splits = read_text_records(cfg.llm.data, cfg.seed)
    log.info(
        f"text: {splits.train_records} training and {splits.heldout_records} held-out records from {splits.source}"
    )
    tokenizer = _tokenizer(cfg.llm.model, splits)
    base_dir = _base(cfg, tokenizer, out / "base")
    if storage.is_uri(cfg.run_dir):
        storage.delete(storage.join(cfg.run_dir, "llm", METRICS))  # the done-marker goes before any output changes
        _publish(cfg, ("base",))  # where the workers read it
    datasets = _packed(cfg, splits, tokenizer)

    how = f"DeepSpeed ZeRO-{f.deepspeed.zero_stage}" if f.strategy == "deepspeed" else "DDP"
    where = storage.join(runs, name)
    previous = last_checkpoint(where)
    before = int(previous[1][-1]["epoch"]) if previous and previous[1] else 0
    if previous is not None and before >= f.epochs:
        checkpoint_dir, history = previous
        log.info(f"fine-tuning: run {where} trained all {f.epochs} epoch(s) already; writing its outputs")
    else:
        use_gpu = resolve_use_gpu(f.use_gpu)
        _warn_if_short(f.num_workers, use_gpu)
        loop_config = {**_loop_config(cfg, storage.join(cfg.run_dir, "llm", "base")), **(loop_overrides or {})}
        trainer = worker_group_trainer(lm_loop_per_worker, loop_config, f, datasets, name=name, storage=runs)
        resume = f"; resuming the interrupted run from its checkpoint of epoch {before}" if before else ""
        log.info(
            f"fine-tuning a LoRA adapter (r={cfg.llm.lora.r}) with {how} on {f.num_workers} "
            f"{'GPU' if use_gpu else 'CPU'} worker(s) for {f.epochs} epoch(s); run key {key}, checkpoints every "
            f"{f.checkpoint_every} epoch(s) under {where}{resume}"
        )
        _, checkpoint_dir, history = fit(trainer, "fine-tuning", f.max_failures, where)
    last = history[-1]

    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(checkpoint_dir / ADAPTER, adapter_dir)
    tokenizer.save_pretrained(str(adapter_dir))
    merged_dir = merge_and_save(base_dir, adapter_dir, out / "merged") if f.merge else None
    if merged_dir is None:
        storage.delete(out / "merged")  # an earlier run's: never served in place of this run's base and adapter

    metrics = {
        "perplexity_before": float(last["perplexity_before"]),
        "perplexity_after": float(last["val_perplexity"]),
        "val_loss": float(last["val_loss"]),
        "train_loss": float(last["train_loss"]),
        "epochs": int(last["epoch"]),
        "train_records": splits.train_records,
        "heldout_records": splits.heldout_records,
        "train_sequences": datasets["train"].count(),
        "heldout_sequences": datasets["val"].count(),
        "seq_len": cfg.llm.data.seq_len,
        "vocab_size": len(tokenizer),
        "strategy": how,
        "num_workers": f.num_workers,
        "run_key": key,
    }
    token_counts(splits.heldout, tokenizer).to_pandas().to_parquet(out / REFERENCE, index=False)
    (out / METRICS).write_text(json.dumps(metrics, indent=2))
    if storage.is_uri(cfg.run_dir):
        _publish(cfg, OUTPUTS[1:])  # metrics.json last

    if not math.isfinite(metrics["perplexity_after"]):
        raise FabricError(
            f"fine-tuning diverged (held-out perplexity {metrics['perplexity_after']}); lower llm.finetune.lr"
        )
    summary = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    registration = log_finetune(cfg, history, summary, adapter_dir, files=[out / METRICS], run_key=key)
    log.info(
        f"fine-tuned: held-out perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f}; "
        f"adapter: {adapter_dir}" + (f"; merged: {merged_dir}" if merged_dir else "")
    )
    return FinetuneResult(out, base_dir, adapter_dir, merged_dir, metrics, history, checkpoint_dir, registration)
