"""Record a training run in MLflow, register its model as the ``candidate``, promote it to ``champion``.

Promotion first scores the candidate against the trivial baseline (the training split's majority class or
mean) on the test split: a model that does not beat it stays a candidate and is never made champion. Then
it pairs candidate and champion on the test split: the same rows through both models, a one-sided paired
t-test on per-row losses and a bootstrap CI of the mean difference. The candidate is promoted unless it is
significantly worse; the decision and its numbers go to the run (metrics, tags), to the model version
(tags) and to stdout.

Each version is tagged with the run key of the training it came from (``fabric.run_key``): a rerun of the
same config on the same data registers nothing new.
"""

from __future__ import annotations

import logging
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fabric import storage
from fabric.errors import FabricError, UsageError, require
from fabric.tracking._baseline import beats, fit_baseline
from fabric.tracking._loggers import MLflowLogger, WandbLogger, numeric, quiet_mlflow, tracking_uri
from fabric.tracking._predict import data_dir, per_row_loss, read_split, score
from fabric.tracking._promotion import Decision, compare, decide
from fabric.tracking._rank import on_rank_zero

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd

    from fabric.config import PipelineConfig
    from fabric.tracking._pyfunc import FabricModel

CANDIDATE = "candidate"
CHAMPION = "champion"
RUN_KEY_TAG = "fabric.run_key"
"""Model version and run tag: the run key of the training a version came from."""
MODEL_ARTIFACT = "model_dir"
"""Name of the model folder among the pyfunc model's artifacts."""


class TrainOutput(Protocol):
    """What the registry needs from the training stage's result."""

    model_path: Path
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    run_key: str
    """Digest of the train settings and data (``""``: not keyed, always registered)."""


@dataclass
class RegistryResult:
    """The registered version, where the aliases point and why."""

    model_name: str
    version: str
    aliases: list[str]
    """This version's aliases after promotion (``candidate``, plus ``champion`` when promoted)."""
    promoted: bool
    """This version is champion (promoted now, or earlier when nothing new was registered)."""
    decision: str
    """One line: the verdict and the numbers behind it."""
    numbers: dict[str, float]
    """Test-split scores of the candidate (``test.*``) and the comparison (``promotion.*``)."""
    champion_version: str
    """The champion after this stage (this version when promoted; ``""`` when there is none)."""
    run_id: str
    tracking_uri: str
    candidate_uri: str
    """``models:/<name>/<version>``: this version."""
    model_uri: str
    """``models:/<name>@champion``: what serving and export load."""
    registered: bool = True
    """False when a version of the same run key was there already: nothing new was logged or registered."""


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[Any]:
    """Point MLflow's fluent API (log_model, load_model, downloads) at ``uri`` for a block, then restore."""
    mlflow = require("mlflow", "track")
    quiet_mlflow()
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


def _client(uri: str) -> Any:
    return require("mlflow", "track").MlflowClient(uri)


def version_of_run(client: Any, name: str, key: str) -> Any | None:
    """The latest version of ``name`` registered from the training of run key ``key``, or None."""
    if not key:
        return None
    found = client.search_model_versions(f"name='{name}' and tags.`{RUN_KEY_TAG}` = '{key}'")
    return max(found, key=lambda mv: int(mv.version)) if found else None


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None (no such alias, or no such model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def data_lineage(cfg: PipelineConfig, aliases: tuple[str, ...] = (CHAMPION, CANDIDATE)) -> list[dict[str, Any]]:
    """For each alias of ``track.model_name`` that points at a version: the version and the data that made it
    (its ``fabric.data.*`` tags: source URI, source digest, each split's digest). [] when there is no registry
    or no such model yet (looking never creates a store)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []
    client = _client(uri)
    out = []
    for alias in aliases:
        version = alias_version(client, cfg.track.model_name, alias)
        if version is None:
            continue
        mv = client.get_model_version(cfg.track.model_name, version)
        prefix = f"{LINEAGE_TAG}."
        data = {k.removeprefix(prefix): v for k, v in (mv.tags or {}).items() if k.startswith(prefix)}
        out.append({"alias": alias, "name": cfg.track.model_name, "version": version, "data": data})
    return out


def stage_model_folder(model_dir: Path, data: Path, into: Path) -> Path:
    """A copy of the training artifact folder carrying the ingestion stage's ``preprocessor.json``."""
    from fabric.tracking._pyfunc import PREPROCESSOR_FILE

    if not (model_dir / "model.json").is_file():
        raise FabricError(f"{model_dir} is not a model folder (no model.json)")
    out = into / "model"
    shutil.copytree(model_dir, out)
    if not (out / PREPROCESSOR_FILE).is_file() and (data / PREPROCESSOR_FILE).is_file():
        shutil.copy2(data / PREPROCESSOR_FILE, out / PREPROCESSOR_FILE)
    return out


def log_model(
    cfg: PipelineConfig,
    model_dir: Path,
    run_id: str,
    *,
    model_loader: str,
    preprocessor_loader: str,
) -> str:
    """Log ``model_dir`` as a pyfunc model of run ``run_id``, register it, point ``candidate`` at it.

    Returns:
        The new version of ``cfg.track.model_name``.
    """
    from mlflow.models import infer_signature

    from fabric.tracking import _mlflow_model
    from fabric.tracking._pyfunc import FabricModel

    uri = tracking_uri(cfg)
    data = data_dir(cfg.run_dir)
    config = {"model_loader": model_loader, "preprocessor_loader": preprocessor_loader}
    with tempfile.TemporaryDirectory() as tmp, using_tracking_uri(uri) as mlflow:
        staged = stage_model_folder(Path(model_dir), data, Path(tmp))
        framework = str(json.loads((staged / "model.json").read_text()).get("framework", "torch"))
        local = FabricModel().load(staged, model_loader, preprocessor_loader)
        example = input_example(data, local)
        signature = None
        if example is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "integer column" hints
                signature = infer_signature(example, local.predict(None, example))
        else:
            log.info("registry: no raw sample (data/reference.parquet) to infer the input signature from")
        # MLflow prints "Successfully registered model …" / "Created version …" to stderr itself; fabric's registry
        # line says the same, so they show only with -v (FABRIC_VERBOSE=1) or outside fabric's entry points.
        quiet = os.environ.get("FABRIC_VERBOSE") == "0"
        with mlflow.start_run(run_id=run_id), redirect_stderr(io.StringIO()) if quiet else nullcontext():
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=_mlflow_model.__file__,  # models from code: nothing pickled
                artifacts={MODEL_ARTIFACT: str(staged)},
                model_config=config,
                signature=signature,
                input_example=example.head(2) if example is not None else None,
                registered_model_name=cfg.track.model_name,
                pip_requirements=_requirements(framework),
            )
            if framework in NATIVE_FLAVOURS:
                log_native(mlflow, staged, framework)
    version = str(info.registered_model_version)
    _client(uri).set_registered_model_alias(cfg.track.model_name, CANDIDATE, version)
    return version


LINEAGE_TAG = "fabric.data"
"""Model-version tags ``fabric.data.source``, ``fabric.data.source_digest``, ``fabric.data.<split>_digest``."""


def log_lineage(uri: str, run_id: str, data: Path) -> dict[str, str]:
    """Record which data made the run's model: the ingested source and each split as MLflow dataset inputs of
    run ``run_id`` (source URI, content digest, schema), and return them as model-version tags.

    Returns:
        ``{}`` when the data folder predates lineage (no ``source_digest`` in its ``meta.json``).
    """
    import pyarrow.dataset as pads
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.utils import _infer_schema

    from fabric.tracking._lineage import split_digests

    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").is_file() else {}
    if not meta.get("source_digest"):
        return {}
    location = str(meta["source_uri"])
    if location.startswith("builtin:"):
        source: Any = CodeDatasetSource(tags={"builtin": location.removeprefix("builtin:")})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "resolving a dataset source by URI is deprecated"-style notices
            source = resolve_dataset_source(location)
    splits = [s for s in ("train", "val", "test") if (data / s).exists()]
    digests = split_digests(data, tuple(splits))
    tags = {f"{LINEAGE_TAG}.source": location, f"{LINEAGE_TAG}.source_digest": str(meta["source_digest"])}
    with using_tracking_uri(uri) as mlflow, mlflow.start_run(run_id=run_id):
        mlflow.log_input(MetaDataset(source, name="source", digest=str(meta["source_digest"])[:36]), context="source")
        for split in splits:
            sample = pads.dataset(data / split, format="parquet").head(1).to_pandas()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "integer column" hints: the label column
                schema = _infer_schema(sample)
            dataset = MetaDataset(source, name=split, digest=digests[split][:36], schema=schema)
            context = {"train": "training", "val": "validation", "test": "testing"}[split]
            mlflow.log_input(dataset, context=context)
            tags[f"{LINEAGE_TAG}.{split}_digest"] = digests[split]
    return tags


def input_example(data: Path, model: FabricModel) -> pd.DataFrame | None:
    """A few rows of what a client sends: raw columns from ingestion's ``reference.parquet`` when the model
    carries a preprocessor, else the model's feature columns from the test split. None when neither is there.
    """
    import pandas as pd

    if model.preprocessor is not None:
        ref = data / "reference.parquet"
        if not ref.is_file():
            return None
        raw = pd.read_parquet(ref).head(5)
        columns = getattr(model.preprocessor, "input_columns", None) or list(raw.columns)
        return raw[list(columns)].reset_index(drop=True)
    names = model.feature_names or None
    try:
        x, _, names = read_split(data, "test", names)
    except FabricError:
        if not names:
            return None
        x = [[0.0] * len(names)]
    return pd.DataFrame(x[:5], columns=names).astype("float32")


def log_native(mlflow: Any, folder: Path, framework: str) -> None:
    """Log a tree model folder's booster with its library's own MLflow flavour too (artifact ``<framework>``
    of the run), for users who load it with ``mlflow.xgboost`` / ``mlflow.lightgbm``; the registered model
    stays fabric's pyfunc."""
    from fabric.tracking._pyfunc import load_entry

    spec = json.loads((folder / "model.json").read_text())
    booster = load_entry("fabric.models.trees:load_booster")(framework, folder / spec["booster_file"])
    flavour = getattr(mlflow, framework)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if framework == "xgboost":
            flavour.log_model(booster, name=framework, model_format="ubj", pip_requirements=_requirements(framework))
        else:
            flavour.log_model(booster, name=framework, pip_requirements=_requirements(framework))


NATIVE_FLAVOURS = ("xgboost", "lightgbm")
"""Tree frameworks whose boosters are also logged with MLflow's own flavour."""


def _requirements(framework: str = "torch") -> list[str]:
    """Pin what the served model imports (MLflow's own inference would miss the lazy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    # xgboost's CPU-only wheel (the gbdt extra's) is the distribution xgboost-cpu; whichever is installed is pinned
    trees = {"xgboost": ("xgboost", "xgboost-cpu"), "lightgbm": ("lightgbm",)}.get(framework, ())
    for dist in ("mlflow", "torch", "numpy", "pandas", "pyarrow", "scikit-learn", *trees):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


def load_registered(uri: str, model_uri: str) -> FabricModel:
    """Load a registered fabric model (``models:/name/3``, ``models:/name@champion``) with its loaders."""
    with using_tracking_uri(uri) as mlflow:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()  # type: ignore[no-any-return]


@dataclass
class Promotion:
    """The outcome of :func:`promote`."""

    decision: Decision
    numbers: dict[str, float]
    """``test.*`` (the candidate's scores), ``test.champion_*`` and ``promotion.*`` (the comparison)."""
    champion_version: str
    """Where ``champion`` points afterwards (``""``: nowhere yet)."""


def promote(cfg: PipelineConfig, version: str) -> Promotion:
    """Compare ``version`` with the trivial baseline and the champion on the test split; move ``champion``
    to it unless it does not beat the baseline or is significantly worse than the champion.

    The models score the same test rows (the data folder's encoded features); the decision is recorded
    as tags on the model version.
    """
    name = cfg.track.model_name
    uri = tracking_uri(cfg)
    client = _client(uri)
    champion = alias_version(client, name, CHAMPION)
    numbers: dict[str, float] = {}
    candidate = load_registered(uri, f"models:/{name}/{version}")
    data = data_dir(cfg.run_dir)
    task = candidate.task
    try:
        x, y, _ = read_split(data, "test", candidate.feature_names or None)
    except FabricError:
        if champion is not None:
            raise
        x = y = None  # first model and no data folder: nothing to score, nothing to compare
    cand_out = None
    below_baseline = None
    if x is not None:
        cand_out = candidate.outputs(x)
        scores = score(cand_out, y, task)  # type: ignore[arg-type]
        numbers.update({f"test.{k}": v for k, v in scores.items()})
        below_baseline = _versus_baseline(data, task, scores, y, numbers)  # type: ignore[arg-type]

    if champion is None:
        decision = decide(None)
    else:
        incumbent = load_registered(uri, f"models:/{name}/{champion}")
        if incumbent.task != task or (incumbent.feature_names and incumbent.feature_names != candidate.feature_names):
            # The data's encoding (or the task) changed: the champion cannot be scored on this test split.
            decision = Decision(True, f"champion v{champion} reads other features or solves another task; replaced")
        else:
            champ_out = incumbent.outputs(x)  # type: ignore[arg-type]
            numbers.update({f"test.champion_{k}": v for k, v in score(champ_out, y, task).items()})  # type: ignore[arg-type]
            comparison = compare(
                per_row_loss(cand_out, y, task),  # type: ignore[arg-type]
                per_row_loss(champ_out, y, task),  # type: ignore[arg-type]
                alpha=cfg.track.promotion.alpha,
                bootstrap_samples=cfg.track.promotion.bootstrap_samples,
                seed=cfg.seed,
            )
            decision = decide(comparison)
    if below_baseline is not None:  # whatever the champion comparison says (its numbers are still recorded)
        versus = f"; versus champion v{champion}: {decision.reason}" if decision.comparison is not None else ""
        decision = Decision(False, below_baseline + versus, decision.comparison)
    numbers.update({f"promotion.{k}": v for k, v in decision.numbers().items()})
    numbers["promotion.promoted"] = float(decision.promote)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        champion = version
    for key, value in {"promotion.decision": decision.label, "promotion.reason": decision.reason[:5000]}.items():
        client.set_model_version_tag(name, version, key, value)
    return Promotion(decision, numbers, str(champion or ""))


def _versus_baseline(data: Path, task: Any, scores: dict[str, float], y: Any, numbers: dict[str, float]) -> str | None:
    """Score the trivial baseline on the test labels into ``numbers`` (``test.baseline_*``, ``baseline.beaten``);
    the reason the candidate can never be champion when it does not beat it, else None (also when there is
    no training split to fit the baseline on, or no test row)."""
    if not len(y) or not (data / "train").exists():
        return None
    meta_file = data / "meta.json"
    num_classes = json.loads(meta_file.read_text()).get("num_classes") if meta_file.is_file() else None
    if task == "classification":
        num_classes = max(int(num_classes or 0), int(y.max()) + 1)
    baseline = fit_baseline(data, task, num_classes)
    base = baseline.scores(y)
    numbers.update({f"test.baseline_{k}": v for k, v in base.items()})
    beaten = beats(scores, base, task)
    numbers["baseline.beaten"] = float(beaten)
    if beaten:
        return None
    metric = "accuracy" if task == "classification" else "rmse"
    return (
        f"does not beat the trivial baseline of predicting {baseline.name}: test {metric} {scores[metric]:.4g} vs "
        f"{base[metric]:.4g} over {len(y)} rows; it stays a candidate and is never made champion"
    )


def _params(cfg: PipelineConfig) -> dict[str, Any]:
    """What a run is remembered by: the whole train section and the data settings that shape the model."""
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "train": cfg.train.model_dump(mode="json"),
        "data": {k: v for k, v in cfg.data.model_dump(mode="json").items() if k != "expectations"},
    }


@on_rank_zero
def run(
    cfg: PipelineConfig,
    train_result: TrainOutput,
    *,
    model_loader: str | None = None,
    preprocessor_loader: str | None = None,
) -> RegistryResult:
    """The registry stage: log the training run, register its model as ``candidate``, decide promotion.

    Args:
        cfg: the pipeline config (``track`` section; the test split is read from ``<run_dir>/data``).
        train_result: the training stage's result (``model_path``, ``history``, ``metrics``).
        model_loader: ``"module:function"`` the served model loads its torch module with
            (default ``fabric.models:load_model``).
        preprocessor_loader: ``"module:function"`` reading ``preprocessor.json``
            (default ``fabric.data:load_preprocessor``).

    Returns:
        The new version, its aliases, the decision and its numbers; None off rank 0.

    Raises:
        MissingExtraError: mlflow/scipy (``track``) or, with W&B enabled, wandb (``wandb``) is missing.
        FabricError: the model folder or (with a champion to compare against) the test split is missing.
    """
    from fabric.config import dump_config
    from fabric.tracking._pyfunc import DEFAULT_MODEL_LOADER, DEFAULT_PREPROCESSOR_LOADER

    require("scipy", "track")
    uri = tracking_uri(cfg)
    name = cfg.track.model_name
    key = getattr(train_result, "run_key", "")
    existing = version_of_run(_client(uri), name, key)
    if existing is not None:
        return _already_registered(uri, name, key, existing)
    tags = {"fabric.stage": "train", **({RUN_KEY_TAG: key} if key else {})}
    mlf = MLflowLogger.from_config(cfg, tags=tags)
    loggers: list[Any] = [mlf]
    if cfg.track.wandb.enabled and cfg.track.wandb.mode != "disabled":
        loggers.append(WandbLogger.from_config(cfg))
    status = "failed"
    try:
        params = _params(cfg)
        for lg in loggers:
            lg.log_params(params)
        for i, row in enumerate(train_result.history):
            step = int(row.get("epoch", i))
            metrics = {k: v for k, v in numeric(row).items() if k != "epoch"}
            for lg in loggers:
                lg.log_metrics(metrics, step=step)
        final = numeric(train_result.metrics or {})
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / "config.yaml"
            cfg_file.write_text(dump_config(cfg))
            mlf.log_artifact(cfg_file)

        version = log_model(
            cfg,
            Path(train_result.model_path),
            mlf.run_id,  # type: ignore[arg-type]
            model_loader=model_loader or DEFAULT_MODEL_LOADER,
            preprocessor_loader=preprocessor_loader or DEFAULT_PREPROCESSOR_LOADER,
        )
        lineage = log_lineage(uri, mlf.run_id, data_dir(cfg.run_dir))  # type: ignore[arg-type]
        for tag, value in {**lineage, **({RUN_KEY_TAG: key} if key else {})}.items():
            _client(uri).set_model_version_tag(name, version, tag, value)
        outcome = promote(cfg, version)
        decision, numbers, champion = outcome.decision, outcome.numbers, outcome.champion_version
        summary = {**{f"final.{k}": v for k, v in final.items()}, **numbers}
        last_step = int(train_result.history[-1].get("epoch", len(train_result.history) - 1)) if train_result.history else 0
        for lg in loggers:
            lg.log_metrics(summary, step=last_step)
        mlf.set_tags({
            "promotion.decision": decision.label,
            "promotion.reason": decision.reason[:5000],
            "registry.model": name,
            "registry.version": version,
        })  # fmt: skip
        aliases = sorted(_client(uri).get_model_version(name, version).aliases)
        status = "success"
    finally:
        for lg in loggers:
            lg.finish(status)  # type: ignore[arg-type]
    remains = f"{CHAMPION} remains v{champion}" if champion else f"no {CHAMPION} yet"
    verdict = f"-> {CHAMPION}" if decision.promote else f"stays {CANDIDATE}; {remains}"
    log.info(f"registry: {name} v{version} {decision.label} ({verdict}): {decision.reason}")
    return RegistryResult(
        model_name=name,
        version=version,
        aliases=aliases,
        promoted=decision.promote,
        decision=decision.reason,
        numbers=numbers,
        champion_version=champion,
        run_id=str(mlf.run_id),
        tracking_uri=uri,
        candidate_uri=f"models:/{name}/{version}",
        model_uri=f"models:/{name}@{CHAMPION}",
    )


def _already_registered(uri: str, name: str, key: str, mv: Any) -> RegistryResult:
    """The result of a rerun whose training is registered already: nothing logged, nothing registered."""
    champion = alias_version(_client(uri), name, CHAMPION)
    aliases = sorted(mv.aliases)
    reason = (
        f"nothing new to register: v{mv.version} holds the model of this training (run key {key}), "
        f"registered by run {mv.run_id}"
    )
    state = f"{CHAMPION} is v{champion}" if champion else f"no {CHAMPION} yet"
    log.info(f"registry: {name}: {reason}; {state}")
    return RegistryResult(
        model_name=name,
        version=str(mv.version),
        aliases=aliases,
        promoted=CHAMPION in aliases,
        decision=reason,
        numbers={},
        champion_version=str(champion or ""),
        run_id=str(mv.run_id),
        tracking_uri=uri,
        candidate_uri=f"models:/{name}/{mv.version}",
        model_uri=f"models:/{name}@{CHAMPION}",
        registered=False,
    )


# --------------------------------------------------------------------------- resolving a model for serving

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


def _model_folder(mlflow_model: Path) -> Path:
    """The fabric model folder inside a downloaded pyfunc model."""
    from mlflow.models import Model

    flavor = Model.load(str(mlflow_model)).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(MODEL_ARTIFACT)
    if not entry:
        raise UsageError(f"{mlflow_model} is an MLflow model but not one fabric registered (no {MODEL_ARTIFACT!r})")
    return mlflow_model / entry["path"]


def _is_bucket_model(uri: str) -> bool:
    """Whether ``uri`` is a fabric model folder (with ``model.json``) that pyarrow reads; False for an MLflow artifact
    URI such as ``mlflow-artifacts://…``, MLflow's to resolve."""
    try:
        return storage.exists(storage.join(uri, "model.json"))
    except (OSError, FabricError):
        return False


def resolve_model(uri_or_path: str | Path, cfg: PipelineConfig) -> Path:
    """A local model folder (``model.pt``, ``model.json``, ``preprocessor.json``) for a path or a registry URI.

    Args:
        uri_or_path: a model folder (local, or a URI such as ``s3://bucket/run/train/model``), a downloaded
            MLflow model folder, ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or any other MLflow
            model URI.
        cfg: where the registry is (``track.tracking_uri`` or the run folder's store) and where downloads
            are cached (``<run_dir>/registry/``, in a URI run_dir's local copy; one folder per resolved version).

    Raises:
        UsageError: nothing at the path, an unknown alias or version, or an MLflow model fabric did not log.
    """
    text = str(uri_or_path)
    if "://" not in text and not text.startswith(("models:/", "runs:/")):
        path = Path(text)
        if (path / "model.json").is_file():
            return path
        if (path / "MLmodel").is_file():
            return _model_folder(path)
        raise UsageError(f"no model at {path} (expected a folder with model.json, or an MLflow model)")
    if storage.is_uri(text) and _is_bucket_model(text):
        # A fabric model folder in a bucket (e.g. a URI run_dir's ``train/model``), as a replica on any node reads
        # it: downloaded unless this machine's copy is of the bucket's current files (one download per node).
        return storage.localize(text)

    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    client = _client(uri)
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    try:
        if m := _ALIAS.match(text):
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
            key = f"{m['name']}/v{mv.version}"
        elif m := _VERSION.match(text):
            mv = client.get_model_version(m["name"], m["version"])
            key = f"{m['name']}/v{mv.version}"
    except MlflowException as e:
        raise UsageError(f"cannot resolve {text} at {uri}: {e.message}") from None
    cache = storage.local_root(cfg.run_dir) / "registry" / key
    if not (cache / "MLmodel").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".download-"))
        try:
            with using_tracking_uri(uri) as mlflow:
                mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(staging))
            try:
                staging.rename(cache)  # atomic: replicas resolving at once never see a half-written folder
            except OSError:
                if not (cache / "MLmodel").is_file():
                    raise
        except MlflowException as e:
            raise UsageError(f"cannot download {text} from {uri}: {e.message}") from None
        except (OSError, ValueError) as e:  # an artifact store MLflow cannot read there (a bad URL, no access)
            raise UsageError(f"cannot download {text}: {e}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _model_folder(cache)
