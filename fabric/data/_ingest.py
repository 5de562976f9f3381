"""The ingestion stage: read → check → fit on train → write splits and the drift monitor's reference.

Two streaming Ray Data passes over the source, neither of which holds the dataset in memory or in
the object store as a whole (so data larger than the object store goes through):

1. **scan** — every block is checked (schema, types, expectations) and summarised (split sizes,
   training-split statistics, the smallest reference-sample keys); only these small summaries reach
   the driver, which merges them and either raises one DataValidationError or fits the
   preprocessor. Nothing is written before this succeeds.
2. **write** — every block is split, encoded with the fitted preprocessor and written as parquet,
   partitioned by split; the same tasks set aside the raw training rows whose seeded sample key is
   among the smallest ``reference_sample_size`` (known from the scan), which become the reference
   sample: uniform, reproducible, and drawn without a shuffle or a third pass.
"""

from __future__ import annotations

import logging
import json
import math
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fabric.data._checks import BatchScan, Plan, ScanSpec, evaluate, scan_batch
from fabric.data._preprocess import Preprocessor, category_keys, numeric_values
from fabric.data._readers import Source, data_context, diagnose, read, read_error, resolve
from fabric.data._split import SPLITS, TRAIN, assign, row_hash, unit_interval
from fabric import storage
from fabric.errors import ConfigError, ConfigProblem, DataValidationError, FabricError
from fabric.runtime import connect
from fabric.tracking import source_digest, split_digests

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from fabric.config import DataConfig, PipelineConfig

FORMAT_VERSION = 1
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
_SAMPLE_KEY = "__fabric_sample_key"


@dataclass
class IngestResult:
    """Where ingestion wrote its outputs and what the training stage needs to know about them."""

    out_dir: Path
    """``<run_dir>/data`` (absolute; a URI run_dir's local copy): train/, val/, test/, meta.json,
    preprocessor.json, reference.*"""
    feature_names: list[str]
    """Encoded feature columns of the split parquet files, in order."""
    num_classes: int | None
    """Number of classes (labels are 0..k-1), None for regression."""
    rows: dict[str, int]
    """Rows per split: ``{"train": ..., "val": ..., "test": ...}``."""
    task: str = "classification"
    target: str = "target"
    class_names: list[str] | None = None
    input_columns: list[str] | None = None
    """Raw columns the preprocessor reads (what a serving request must carry)."""
    categorical: list[str] | None = None
    source: str = ""

    @property
    def preprocessor_path(self) -> Path:
        return self.out_dir / "preprocessor.json"

    @property
    def reference_path(self) -> Path:
        return self.out_dir / "reference.parquet"

    @property
    def reference_stats_path(self) -> Path:
        return self.out_dir / "reference_stats.json"


# --------------------------------------------------------------------------- helpers run in Ray tasks


def _pandas(block: Any) -> pd.DataFrame:
    """A block as pandas with numpy dtypes (the representation every pure function here expects)."""
    if isinstance(block, pd.DataFrame):
        if any(isinstance(t, pd.ArrowDtype) for t in block.dtypes):
            import pyarrow as pa

            return pa.Table.from_pandas(block, preserve_index=False).to_pandas()
        return block
    return block.to_pandas()


def _scan_block(block: Any, spec: ScanSpec) -> pa.Table:
    import pyarrow as pa

    return pa.table({"scan": pa.array([pickle.dumps(scan_batch(_pandas(block), spec))], type=pa.binary())})


def _encode_labels(df: pd.DataFrame, target: str, classes: list[str] | None) -> np.ndarray:
    if classes is None:
        return numeric_values(df[target])[0].astype(np.float32)
    codes = pd.Categorical(category_keys(df[target]), categories=classes).codes.astype(np.int64)
    if (codes < 0).any():  # the scan saw every label, so this only happens if the source changed under us
        raise DataValidationError("a label outside the scanned classes appeared during the write", column=target)
    return codes


def _write_block(
    block: Any,
    spec: ScanSpec,
    pre: Preprocessor,
    classes: list[str] | None,
    kinds: dict[str, str],
    threshold: float,
    sample_dir: str,
) -> pa.Table:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    df = _pandas(block)
    hashes = row_hash(df, spec.columns)
    codes = assign(unit_interval(hashes, spec.seed), spec.train, spec.val)
    x = pre.transform(df)
    cols: dict[str, Any] = {name: pa.array(x[:, i]) for i, name in enumerate(pre.feature_names)}
    cols["label"] = pa.array(_encode_labels(df, spec.target, classes))
    cols["split"] = pa.array(np.asarray(SPLITS, dtype=object)[codes].tolist(), type=pa.string())

    keys = unit_interval(hashes, spec.seed, stream=1)
    chosen = (codes == TRAIN) & (keys <= threshold)
    if chosen.any():
        sub = df.loc[chosen]
        raw = {c: _raw_column(sub[c], kinds[c]) for c in spec.columns}
        raw[_SAMPLE_KEY] = pa.array(keys[chosen])
        # Named by content, so a retried task overwrites its own file instead of adding rows.
        name = hashlib.sha1(np.sort(keys[chosen]).tobytes()).hexdigest()
        pq.write_table(pa.table(raw), f"{sample_dir}/{name}.parquet")
    return pa.table(cols)


def _raw_column(s: pd.Series, kind: str) -> pa.Array:
    """Raw values with one type per kind, so sample blocks from differently-typed reads concatenate."""
    import pyarrow as pa

    if kind == "numeric":
        return pa.array(numeric_values(s)[0], type=pa.float64(), from_pandas=True)
    return pa.array(category_keys(s).tolist(), type=pa.string())


# --------------------------------------------------------------------------- the stage


def build_spec(data: DataConfig, columns: list[str]) -> ScanSpec:
    """The scan spec from the config and the columns the source actually has."""
    features = list(data.features) if data.features is not None else [c for c in columns if c != data.target]
    if not features:
        raise DataValidationError(
            f"no feature columns: the data has only {columns}", column=data.target, rows=None, examples=[]
        )
    e = data.expectations
    return ScanSpec(
        features=tuple(features),
        target=data.target,
        task=data.task,
        categorical=frozenset(data.categorical),
        not_null=tuple(e.not_null),
        ranges=tuple((c, r.min, r.max) for c, r in e.ranges.items()),
        allowed=tuple((c, frozenset(category_keys(pd.Series(v, dtype=object)).tolist())) for c, v in e.allowed.items()),
        min_rows=e.min_rows,
        train=data.split.train,
        val=data.split.val,
        test=data.split.test,
        seed=data.split.seed,
        sample_size=data.reference_sample_size,
    )


def _schema_names(ds: ray.data.Dataset) -> list[str]:
    schema = ds.schema()
    return list(schema.names) if schema is not None else []


def _scan(ds: ray.data.Dataset, spec: ScanSpec) -> BatchScan:
    scans = ds.map_batches(_scan_block, batch_format=None, batch_size=None, fn_kwargs={"spec": spec})
    total = BatchScan()
    for batch in scans.iter_batches(batch_size=None, batch_format="pyarrow"):
        for blob in batch.column("scan").to_pylist():
            total = total.merge(pickle.loads(blob))
    return total


def _scan_source(source: Source, data: DataConfig) -> tuple[ray.data.Dataset, ScanSpec, Plan]:
    """Pass 1, with recovery from CSV type inference: a column Arrow typed from its first block and that
    later holds a non-number is re-read as text, so the type check can name it, count and show the rows."""
    string_columns: tuple[str, ...] = ()
    while True:
        try:
            ds = read(source, string_columns)
            columns = _schema_names(ds)
            spec = build_spec(data, columns)
            scan = _scan(ds, spec)  # a configured column missing from the data is one of its violations
        except FabricError:
            raise
        except Exception as e:  # Ray wraps reader failures (ArrowInvalid, ValueError) in RayTaskError
            # Arrow's own message does not survive Ray's wrapping: re-read the files to find the rows.
            problems = diagnose(source, string_columns)
            col = problems.conversion_column if problems is not None else None
            if problems is not None and not problems.malformed and col and col not in string_columns:
                string_columns += (col,)
                continue
            if problems is None and not _is_read_failure(e):
                raise  # not the data: a bug, or the cluster; keep the original error
            raise read_error(source, e, problems) from None
        return ds, spec, evaluate(scan, spec)


_READ_FAILURES = ("Failed to read", "ArrowInvalid", "ArrowTypeError", "ArrowNotImplementedError", "Empty CSV file")


def _is_read_failure(e: BaseException) -> bool:
    """True when a Ray Data failure came from a reader (bad files), not from a bug in a map function."""
    import pyarrow as pa

    return isinstance(e, pa.ArrowException) or any(marker in str(e) for marker in _READ_FAILURES)


def _column_kinds(spec: ScanSpec, plan: Plan) -> dict[str, str]:
    kinds: dict[str, str] = dict(plan.kinds)
    kinds[spec.target] = "label" if plan.classes is not None else "numeric"
    return kinds


def _write_splits(
    ds: ray.data.Dataset, spec: ScanSpec, pre: Preprocessor, plan: Plan, out_dir: Path, run_dir: str | Path
) -> pd.DataFrame:
    """Pass 2: encode and write every split in one streaming pass, then move them into place.

    The tasks write where the run_dir is: a local run_dir's ``data`` folder, or a URI run_dir's ``data`` folder
    in the bucket (tasks on any node, no shared disk), whose splits are then copied down to the local copy
    ``out_dir`` (the driver digests them).

    Returns the reference sample: raw training rows (features and target) set aside by the same tasks.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = storage.join(run_dir, "data")
    staging, sample_dir = f"{root}/_staging", f"{root}/_sample"
    storage.makedirs(sample_dir)
    encoded = ds.map_batches(
        _write_block,
        batch_format=None,
        batch_size=None,
        fn_kwargs={
            "spec": spec,
            "pre": pre,
            "classes": plan.classes,
            "kinds": _column_kinds(spec, plan),
            "threshold": plan.sample_threshold,
            "sample_dir": sample_dir,
        },
    )
    encoded.write_parquet(staging, partition_cols=["split"])
    label_type = pa.int64() if plan.classes is not None else pa.float32()
    schema = pa.schema([(n, pa.float32()) for n in pre.feature_names] + [("label", label_type)])
    filesys, _ = storage.filesystem(root)
    for name in SPLITS:
        part = f"{staging}/split={name}"
        if storage.exists(part):
            storage.move(part, f"{root}/{name}")
        else:  # an empty split (fraction 0) still reads as a dataset with the right columns
            storage.makedirs(f"{root}/{name}")
            empty = storage.filesystem(f"{root}/{name}/empty.parquet")[1]
            pq.write_table(schema.empty_table(), empty, filesystem=filesys)
        if storage.is_uri(run_dir):
            storage.download(f"{root}/{name}", out_dir / name)
    storage.delete(staging)

    parts = [pq.read_table(f, filesystem=filesys) for f in storage.files(sample_dir)]
    storage.delete(sample_dir)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in spec.columns})
    sample = pa.concat_tables(parts).to_pandas().sort_values(_SAMPLE_KEY, kind="stable")
    sample = sample.head(spec.sample_size).drop(columns=[_SAMPLE_KEY]).reset_index(drop=True)
    if plan.classes is not None and all(_is_int(c) for c in plan.classes):
        sample[spec.target] = sample[spec.target].astype("int64")
    return sample


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def reference_stats(spec: ScanSpec, plan: Plan, sample: pd.DataFrame) -> dict[str, Any]:
    """Per-column summary of the raw training split (exact moments and counts; quantiles from the sample)."""
    columns: dict[str, Any] = {}
    for c in spec.columns:
        st = plan.train.get(c)
        if st is None:
            continue
        base = {"count": st.rows, "nulls": st.nulls, "null_fraction": st.nulls / st.rows if st.rows else 0.0}
        kind = plan.kinds.get(c) or ("categorical" if plan.classes is not None else "numeric")
        if c == spec.target:
            base["role"] = "target"
        if kind == "categorical":
            counts = st.counts or {}
            total = sum(counts.values()) or 1
            base.update(
                kind="categorical",
                categories=len(counts),
                frequencies={k: counts[k] / total for k in sorted(counts, key=lambda k: -counts[k])},
            )
        else:
            values = sample[c].to_numpy(dtype=np.float64) if c in sample.columns and len(sample) else np.array([])
            values = values[~np.isnan(values)]
            base.update(
                kind="numeric",
                mean=_finite(st.mean) if st.count else None,
                std=_finite(st.std),
                min=_finite(st.min),
                max=_finite(st.max),
                quantiles={str(q): float(np.quantile(values, q)) for q in QUANTILES} if len(values) else {},
            )
        columns[c] = base
    return {
        "format_version": FORMAT_VERSION,
        "split": "train",
        "rows": plan.rows["train"],
        "target": spec.target,
        "columns": columns,
        "reference_sample": {"path": "reference.parquet", "rows": len(sample)},
        "quantiles_from": "reference_sample",
    }


def run(cfg: PipelineConfig) -> IngestResult:
    """Ingest ``cfg.data`` with Ray Data: check it, split it, fit preprocessing on train, write the splits.

    Writes under ``<cfg.run_dir>/data``: ``train/``, ``val/``, ``test/`` (parquet: one float32 column per
    encoded feature plus ``label``), ``meta.json``, ``preprocessor.json``, ``reference.parquet`` and
    ``reference_stats.json``. Nothing is written when a check fails.

    Raises:
        DataValidationError: the data is unreadable, or breaks the schema or an expectation; the error
            names the column, the number of rows and shows a few of them.
        ConfigError: ``data.format`` is ``text`` (that is for language-model data, see ``read_text``).
    """
    storage.check(cfg.run_dir)
    connect(cfg.cluster)
    data = cfg.data
    if data.format == "text":
        raise ConfigError(
            [
                ConfigProblem(
                    "data.format", "text is for language-model data; tabular ingestion reads parquet, csv, json"
                )
            ]
        )
    started = time.monotonic()
    out_dir = storage.local_root(cfg.run_dir) / "data"  # a URI run_dir's local copy, published at the end
    source = resolve(data.source, data.format)

    from ray.data import DataContext

    with DataContext.current(data_context(source)):
        ds, spec, plan = _scan_source(source, data)
        pre = Preprocessor.fit(
            plan.numeric_stats(),
            plan.categories(),
            list(spec.features),
            data.scaling,
            nullable=plan.nullable(list(spec.features)),
        )
        if out_dir.exists():  # a previous run's outputs: replaced as a whole, never mixed with these
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        if storage.is_uri(cfg.run_dir):
            storage.delete(storage.join(cfg.run_dir, "data"))  # meta.json first gone: never taken as done
        sample = _write_splits(ds, spec, pre, plan, out_dir, cfg.run_dir)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(sample, preserve_index=False), out_dir / "reference.parquet")
    (out_dir / "reference_stats.json").write_text(json.dumps(reference_stats(spec, plan, sample), indent=2))
    pre.save(out_dir / "preprocessor.json")
    categorical = [c for c, k in plan.kinds.items() if k == "categorical"]
    meta = {
        "format_version": FORMAT_VERSION,
        "task": data.task,
        "target": spec.target,
        "feature_names": pre.feature_names,
        "num_classes": len(plan.classes) if plan.classes is not None else None,
        "class_names": plan.classes,
        "rows": plan.rows,
        "input_columns": list(spec.features),
        "column_kinds": plan.kinds,
        "categorical": categorical,
        "inferred_categorical": plan.inferred_categorical,
        "label_dtype": "int64" if plan.classes is not None else "float32",
        "scaling": data.scaling,
        "split": {"train": spec.train, "val": spec.val, "test": spec.test, "seed": spec.seed},
        "source": source.describe(),
        # lineage: what the registry records with each model version (the splits' digests are cached beside)
        "source_uri": data.source if ":" in data.source else str(Path(data.source).expanduser().resolve()),
        "source_digest": source_digest(data.source),
        "files": {
            "splits": {s: s for s in SPLITS},
            "preprocessor": "preprocessor.json",
            "reference": "reference.parquet",
            "reference_stats": "reference_stats.json",
        },
    }
    # Written last: its presence means the whole stage finished.
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    split_digests(out_dir)  # each split's content digest, cached for training's run key and the registry
    storage.publish(cfg.run_dir, "data", last="meta.json", written=SPLITS)

    result = IngestResult(
        out_dir=out_dir,
        feature_names=pre.feature_names,
        num_classes=meta["num_classes"],
        rows=dict(plan.rows),
        task=data.task,
        target=spec.target,
        class_names=plan.classes,
        input_columns=list(spec.features),
        categorical=categorical,
        source=source.describe(),
    )
    where = storage.join(cfg.run_dir, "data") if storage.is_uri(cfg.run_dir) else str(out_dir)
    _print_summary(result, plan, len(sample), time.monotonic() - started, where)
    return result


def _print_summary(r: IngestResult, plan: Plan, sample_rows: int, seconds: float, where: str) -> None:
    total = sum(r.rows.values())
    n_inputs = len(r.input_columns or [])
    cats = r.categorical or []
    kinds = f"{n_inputs - len(cats)} numeric, {len(cats)} categorical"
    if cats:
        inferred = ": inferred from text values" if set(cats) == set(plan.inferred_categorical) else ""
        kinds += f" ({', '.join(cats)}{inferred})"
    label = (
        f"classification, {r.num_classes} classes: {', '.join(r.class_names or [])}" if r.num_classes else "regression"
    )
    lines = [
        f"ingested {r.source}: {total:,} rows in {seconds:.1f}s",
        "  splits    " + " | ".join(f"{k} {v:,}" for k, v in r.rows.items()),
        f"  features  {len(r.feature_names)} encoded from {n_inputs} columns: {kinds}",
        f"  target    {r.target} ({label})",
        f"  wrote     {where}/",
        "            train/ val/ test/ (parquet), meta.json, preprocessor.json,",
        f"            reference.parquet ({sample_rows:,} raw training rows), reference_stats.json",
    ]
    log.info("\n".join(lines))


# --------------------------------------------------------------------------- reading the outputs back


def read_split(out_dir: str | Path, name: str) -> ray.data.Dataset:
    """One written split (``train``, ``val`` or ``test``) as a Ray Dataset of float32 features and ``label``.

    ``out_dir`` may be a URI (a URI run_dir's ``data`` folder): each read task then reads the bucket from its
    own node, so no node needs the driver's local copy.
    """
    if name not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
    location = storage.join(out_dir, name)
    if not storage.exists(location):
        raise DataValidationError(f"no {name} split under {out_dir}: run the ingestion stage first")
    import ray.data
    from ray.data import DataContext

    # Made under ingestion's reader settings (see data_context): training re-reads splits every epoch.
    with DataContext.current(data_context(resolve(location, "parquet"))):
        return ray.data.read_parquet(location, partitioning=None)


def load_meta(out_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of an ingestion output folder (task, target, feature names, classes, rows...)."""
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise DataValidationError(f"no meta.json under {out_dir}: run the ingestion stage first")
    return json.loads(path.read_text())
