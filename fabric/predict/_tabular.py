"""Batch scoring of tabular rows: a file or URI through a registered model's ONNX graph on Ray Data, to files.

One streaming pass: Ray Data reads the input (the ingestion stage's readers) and hands each block to a scoring
task, which checks it batch by batch against the model's input schema and the config's data expectations (on
pyarrow columns), applies the saved preprocessing, runs an ONNX Runtime session and writes the predictions as
one file into a hidden staging folder beside the output, renamed into place only when the whole input has been
scored. Predictions never pass through the object store. Each Ray worker process keeps the run's session, built
on its first block, so later blocks (and, on a running cluster, the worker's warm imports) cost no start. The
model is framework-independent here: every fabric model folder has ``model.json``, usually ``preprocessor.json``,
and an ONNX export (``fabric.export.onnx_for``) with input ``features`` and output ``output`` (logits or values).

A batch that fails its checks stops the run; the input is then re-read file by file (Ray tasks, streaming)
to report the bad rows by file and row number, and nothing is written."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fabric.data._preprocess import NumericColumn, Preprocessor, category_keys, json_value
from fabric.errors import DataValidationError, UsageError, require
from fabric.predict._columns import ArrowColumn, Column, PandasColumn, features

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

    from fabric.config import PipelineConfig
    from fabric.config.data import Expectations
    from fabric.config.predict import PredictConfig
    from fabric.data._readers import Source

log = logging.getLogger("fabric.predict")

_DIAGNOSE_ROWS = 65_536
_READ_FAILURES = ("Failed to read", "ArrowInvalid", "ArrowTypeError", "CSV conversion", "Empty CSV file")


@dataclass
class ScoreResult:
    """What a batch-scoring run wrote."""

    output: str
    rows: int
    model_name: str
    model_version: str
    format: str
    seconds: float

    def summary(self) -> str:
        """One line for the CLI and the job's log."""
        rate = self.rows / max(self.seconds, 1e-9)
        return (
            f"predict: {self.rows} rows -> {self.output} ({self.format}; {self.model_name} v{self.model_version}, "
            f"{self.seconds:.1f} s, {rate:,.0f} rows/s)"
        )


# --------------------------------------------------------------------------- choices (pure)


def output_format(path: str, setting: str = "auto") -> str:
    """``parquet`` or ``csv``: the setting, or with ``auto`` the output's extension (csv only for ``.csv``)."""
    if setting != "auto":
        return setting
    return "csv" if path.rstrip("/").lower().endswith(".csv") else "parquet"


def task_size(concurrency: int | None, cpus: int) -> tuple[int, int]:
    """Scoring tasks at a time, and the CPUs (ONNX Runtime threads) each takes, on a cluster of ``cpus`` CPUs.

    Tasks, unlike actors, hand their CPUs back after each block, so the reads always find one in between.
    """
    cpus = max(1, cpus)
    n = concurrency or cpus
    return n, max(1, cpus // n)


# --------------------------------------------------------------------------- input checks (pure)


@dataclass(frozen=True)
class InputRules:
    """What every input row must satisfy: the model's columns and types, and the config's expectations."""

    columns: tuple[str, ...]
    """Raw columns the model reads (the preprocessor's inputs, or the encoded features)."""
    keep: tuple[str, ...] = ()
    numeric: frozenset[str] = frozenset()
    nullable: frozenset[str] | None = None
    """Columns that may be null; None: any (``predict.impute_nulls``)."""
    not_null: tuple[str, ...] = ()
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()
    allowed: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def required(self) -> list[str]:
        """Columns the input must have."""
        return list(dict.fromkeys([*self.columns, *self.keep]))

    @property
    def checked(self) -> list[str]:
        """Columns the checks read (an expectation's column is checked only where the input has it)."""
        named = [*self.not_null, *(c for c, _, _ in self.ranges), *(c for c, _ in self.allowed)]
        return list(dict.fromkeys([*self.columns, *named]))


def input_rules(
    pre: Preprocessor | None, feature_names: list[str], p: PredictConfig, expectations: Expectations
) -> InputRules:
    """The rules for a model (its preprocessor, or its encoded features) and the config."""
    if pre is not None:
        columns = pre.input_columns
        numeric = frozenset(c.name for c in pre.columns if isinstance(c, NumericColumn))
        nullable = frozenset(pre.nullable or ())  # not recorded: the training data is not known to hold nulls
    else:
        columns, numeric, nullable = list(feature_names), frozenset(feature_names), frozenset()
    allowed = tuple(
        (c, frozenset(k for k in category_keys(pd.Series(v, dtype=object)).tolist() if k is not None))
        for c, v in expectations.allowed.items()
    )
    return InputRules(
        columns=tuple(columns),
        keep=tuple(p.keep_columns),
        numeric=numeric,
        nullable=None if p.impute_nulls else nullable,
        not_null=tuple(expectations.not_null),
        ranges=tuple((c, r.min, r.max) for c, r in expectations.ranges.items()),
        allowed=allowed,
    )


def missing_columns(names: list[str], rules: InputRules) -> list[str]:
    """Required columns that ``names`` lacks."""
    have = set(names)
    return [c for c in rules.required if c not in have]


@dataclass
class Finding:
    """One failed check on one column of a batch: the rows (``mask``) and why."""

    column: str
    why: str
    mask: np.ndarray


def _bound(v: float | None, open_end: str) -> str:
    return open_end if v is None else f"{v:g}"


def check_frame(df: pd.DataFrame, rules: InputRules) -> list[Finding]:
    """Check raw rows against ``rules``; an empty list when every row passes."""
    return check_columns({str(c): PandasColumn(df[c]) for c in df.columns}, len(df), rules)


def check_columns(columns: dict[str, Column], n: int, rules: InputRules) -> list[Finding]:
    """Check the ``n`` rows whose columns are ``columns`` (pandas or pyarrow views) against ``rules``."""
    out: list[Finding] = []

    def flag(column: str, mask: np.ndarray, why: str) -> None:
        if mask.any():
            out.append(Finding(column, why, mask))

    for c in rules.not_null:
        if c in columns:
            flag(c, columns[c].isna(), "null (data.expectations.not_null)")
    if rules.nullable is not None:
        for c in rules.columns:
            if c in columns and c not in rules.nullable and c not in rules.not_null:
                why = "null, and the training data had none in this column (predict.impute_nulls=true fills it)"
                flag(c, columns[c].isna(), why)
    for c in rules.columns:
        if c in columns and c in rules.numeric:
            flag(c, columns[c].numbers[1], "not a number (the column is numeric in training)")
    for c, lo, hi in rules.ranges:
        if c in columns:
            x, other = columns[c].numbers
            with np.errstate(invalid="ignore"):
                outside = (x < (lo if lo is not None else -np.inf)) | (x > (hi if hi is not None else np.inf))
            if c not in rules.numeric or c not in rules.columns:
                outside = outside | other
            flag(c, outside, f"outside [{_bound(lo, '-inf')}, {_bound(hi, 'inf')}] (data.expectations.ranges)")
    for c, allowed in rules.allowed:
        if c in columns:
            col = columns[c]
            bad = ~col.isna() & (col.codes(sorted(allowed)) < 0)
            flag(c, bad, f"not in data.expectations.allowed {sorted(allowed)}")
    return out


@dataclass
class BadRows:
    """Bad rows found so far: counts per (column, why), distinct rows, the first few rows (mergeable)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    rows: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Files that could not be re-read to find the rows."""

    def add(
        self,
        df: pd.DataFrame,
        findings: list[Finding],
        keep: tuple[str, ...],
        limit: int,
        where: dict[str, Any] | None = None,
        offset: int | None = None,
    ) -> BadRows:
        """Record ``findings`` on ``df``; ``offset``: rows of the file before ``df`` (rows are numbered from 1)."""
        if not findings:
            return self
        any_bad = np.zeros(len(df), dtype=bool)
        for f in findings:
            key = (f.column, f.why)
            self.counts[key] = self.counts.get(key, 0) + int(f.mask.sum())
            any_bad |= f.mask
        self.rows += int(any_bad.sum())
        for i in np.flatnonzero(any_bad)[: max(0, limit - len(self.examples))]:
            first = next(f for f in findings if f.mask[i])
            row: dict[str, Any] = dict(where or {})
            if offset is not None:
                row["row"] = offset + int(i) + 1
            value = json_value(df[first.column].iloc[i])
            row.update(column=first.column, value=value, problem=first.why.split(" (")[0])
            row.update({c: json_value(df[c].iloc[i]) for c in keep if c in df.columns})
            self.examples.append(row)
        return self

    def merge(self, other: BadRows, limit: int) -> BadRows:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.rows += other.rows
        self.examples = (self.examples + other.examples)[:limit]
        self.errors += other.errors
        return self

    def error(self, source: str, output: str | None) -> DataValidationError:
        """One DataValidationError: the checks that failed with their row counts, and the first bad rows."""
        nothing = f"; nothing was written to {output}" if output else ""
        lines = [f"  - column {c!r}, {n} row(s): {why}" for (c, why), n in sorted(self.counts.items())]
        lines += [f"  - {e}" for e in self.errors]
        head = f"{source}: {self.rows} row(s) fail the model's input checks{nothing}"
        first = min(self.counts, default=(None, ""))[0]
        return DataValidationError("\n".join([head, *lines]), column=first, rows=self.rows, examples=self.examples)


# --------------------------------------------------------------------------- the model


@dataclass
class ScoringModel:
    """What a scoring task needs, picklable and free of paths (tasks may run on other nodes)."""

    name: str
    version: str
    task: str
    feature_names: list[str]
    onnx: bytes
    preprocessor: dict[str, Any] | None = None
    class_names: list[str] | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _run_data_file(cfg: PipelineConfig, name: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The run's data folder's ``name`` (JSON) when its feature names are the model's (else another run's)."""
    from fabric.tracking import data_dir

    content = _read_json(data_dir(cfg.run_dir) / name)
    if content and content.get("feature_names") and content["feature_names"] == spec.get("feature_names"):
        return content
    return None


def load_model(cfg: PipelineConfig, version: int | None = None, alias: str | None = None) -> ScoringModel:
    """The registry's version (or the version ``alias``, default ``champion``, points at) of ``track.model_name``,
    as the bytes of its ONNX graph (exported once if missing) and its preprocessor.

    Raises:
        UsageError: no such version or alias in the registry.
    """
    from fabric.export import onnx_for
    from fabric.tracking import CHAMPION, alias_version, resolve_model, tracking_uri

    name = cfg.track.model_name
    if version is None:
        wanted = alias or CHAMPION
        client = require("mlflow", "track").MlflowClient(tracking_uri(cfg))
        found = alias_version(client, name, wanted)
        if found is None:
            raise UsageError(
                f"no version of {name} has the alias {wanted!r} in the registry at {tracking_uri(cfg)} "
                "(the registry stage sets candidate and champion; or pass --version)"
            )
        version = int(found)
    folder = Path(resolve_model(f"models:/{name}/{version}", cfg))
    spec = _read_json(folder / "model.json")
    if spec is None:
        raise UsageError(f"{name} v{version}: no readable model.json in {folder}")
    pre = _read_json(folder / "preprocessor.json") or _run_data_file(cfg, "preprocessor.json", spec)
    classes = spec.get("class_names")
    if classes is None and spec.get("task", "classification") == "classification":
        meta = _run_data_file(cfg, "meta.json", spec) or {}
        classes = meta.get("class_names")
    if classes is not None and len(classes) != spec.get("num_classes"):
        classes = None
    return ScoringModel(
        name=name,
        version=str(version),
        task=str(spec.get("task", "classification")),
        feature_names=list(spec.get("feature_names") or []),
        onnx=onnx_for(folder).read_bytes(),
        preprocessor=pre,
        class_names=[str(c) for c in classes] if classes else None,
    )


class Scorer:
    """One ONNX Runtime session with the model's checks and preprocessing: scores batches, writes blocks."""

    def __init__(self, model: ScoringModel, rules: InputRules, threads: int, limit: int) -> None:
        import tempfile

        from fabric.export import session

        self.model, self.rules, self.limit = replace(model, onnx=b""), rules, limit  # the session holds the graph
        self.pre = Preprocessor.from_dict(model.preprocessor) if model.preprocessor else None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model.onnx)
            self.session = session(path, threads=threads)
        self.input = self.session.get_inputs()[0].name
        self._repeated: tuple[pa.Array, pa.Array] | None = None

    def write(self, block: pa.Table, staging: Staging, batch_size: int) -> pa.Table:
        """Score ``block`` batch by batch into one new file in ``staging``; returns its ``file`` and ``rows``."""
        import pyarrow as pa

        if block.num_rows == 0:
            return pa.table({"file": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
        writer = staging.writer()
        try:
            for start in range(0, block.num_rows, batch_size):
                writer.write(self.score(block.slice(start, batch_size)))
        finally:
            writer.close()
        return pa.table({"file": [writer.path], "rows": [block.num_rows]})

    def score(self, batch: pa.Table) -> pa.Table:
        """Check, preprocess and score one batch, all on its pyarrow columns (pandas only to report bad rows)."""
        import pyarrow as pa

        from fabric.tracking._predict import point_predictions, probabilities

        n = batch.num_rows
        names = set(batch.column_names)
        columns: dict[str, Column] = {c: ArrowColumn(batch.column(c)) for c in self.rules.checked if c in names}
        findings = check_columns(columns, n, self.rules)
        if findings:
            df = batch.to_pandas()
            raise BadRows().add(df, findings, self.rules.keep, self.limit).error("a batch of the input", None)
        if self.pre is not None:
            x = features(self.pre, columns, n)
        else:
            x = np.column_stack([columns[c].float32() for c in self.model.feature_names])
        out = np.asarray(self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0])
        cols: dict[str, Any] = {c: batch.column(c) for c in self.rules.keep}
        if self.model.task == "classification":
            proba = probabilities(out)
            prediction = proba.argmax(axis=1)
        else:
            proba, prediction = None, point_predictions(out, "regression")
        cols["prediction"] = pa.array(prediction)
        if self.model.class_names is not None:
            cols["label"] = pa.array(self.model.class_names, pa.string()).take(pa.array(prediction))
        if proba is not None:
            for k, p in enumerate(np.ascontiguousarray(proba.T)):
                cols[f"proba_{k}"] = pa.array(p)
        cols["model_name"], cols["model_version"] = self._constants(n)
        return pa.table(cols)

    def _constants(self, n: int) -> tuple[pa.Array, pa.Array]:
        """The model's name and version repeated ``n`` times (kept for the next batch of the same size)."""
        import pyarrow as pa

        if self._repeated is None or len(self._repeated[0]) != n:
            zeros = pa.array(np.zeros(n, dtype=np.int32))
            name, version = (pa.array([v], pa.string()).take(zeros) for v in (self.model.name, self.model.version))
            self._repeated = (name, version)
        return self._repeated


_SCORERS: dict[str, Scorer] = {}
"""This process's scorer of the latest run, by a digest of its arguments (a Ray worker keeps it: later blocks, and
later runs of the same model and checks, skip the session's start)."""


def score_block(block: pa.Table, *, key: str, scorer: Any, staging: Staging, batch_size: int) -> pa.Table:
    """A Ray Data task: score and write one block with this process's scorer ``key`` (built from ``scorer``,
    the keyword arguments of :class:`Scorer` or an object reference to them, when the process has none)."""
    found = _SCORERS.get(key)
    if found is None:
        import ray

        kwargs = ray.get(scorer) if isinstance(scorer, ray.ObjectRef) else scorer
        _SCORERS.clear()  # one model's session per process
        found = _SCORERS[key] = Scorer(**kwargs)
    return found.write(block, staging, batch_size)


# --------------------------------------------------------------------------- the output


@dataclass(frozen=True)
class Staging:
    """Where the scoring tasks write their files (picklable: the filesystem, the folder and the format)."""

    fs: Any
    folder: str
    format: str

    def writer(self) -> FileWriter:
        """A writer of one new file (a unique name) in the folder."""
        return FileWriter(self, f"{self.folder}/part-{uuid.uuid4().hex}.{'csv' if self.format == 'csv' else 'parquet'}")


class FileWriter:
    """Tables of one schema appended to one parquet file (a row group each) or CSV file (one header)."""

    def __init__(self, staging: Staging, path: str) -> None:
        self.staging, self.path = staging, path
        self._writer: Any = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            if self.staging.format == "csv":
                import pyarrow.csv as pacsv

                self._stream = self.staging.fs.open_output_stream(self.path)
                self._writer = pacsv.CSVWriter(self._stream, table.schema)
            else:
                import pyarrow.parquet as pq

                self._writer = pq.ParquetWriter(self.path, table.schema, filesystem=self.staging.fs)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if self.staging.format == "csv":
                self._stream.close()


class Output:
    """The output folder (local or URI) and its hidden staging sibling, moved into place on success."""

    def __init__(self, location: str) -> None:
        import pyarrow.fs as pafs

        from fabric.config._base import is_uri

        if is_uri(location):
            self.fs, self.path = pafs.FileSystem.from_uri(location)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
        self.location = location
        parent, _, name = self.path.rstrip("/").rpartition("/")
        self.staging = f"{parent}/.{name}.partial-{uuid.uuid4().hex[:8]}"

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self.fs.get_file_info(self.path).type != pafs.FileType.NotFound)

    def files(self) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.staging, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def keep_only(self, written: set[str]) -> None:
        """Delete staged files the run did not report (a retried block's first, partial attempt)."""
        for f in self.files():
            if f not in written:
                log.debug("predict: dropping %s (not reported by the run)", f)
                self.fs.delete_file(f)

    def publish(self, overwrite: bool) -> None:
        """Move the staged folder into place (replacing an existing output only when ``overwrite``)."""
        import pyarrow.fs as pafs

        if self.exists():
            if not overwrite:
                raise UsageError(f"{self.location} appeared while scoring (set predict.overwrite=true to replace it)")
            if self.fs.get_file_info(self.path).type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            else:
                self.fs.delete_file(self.path)
        try:
            self.fs.move(self.staging, self.path)  # a rename on local and HDFS filesystems
        except (OSError, NotImplementedError):  # object stores move files, not folders
            for f in self.files():
                self.fs.move(f, self.path + f[len(self.staging) :])
            self.fs.delete_dir(self.staging)

    def discard(self) -> None:
        try:
            self.fs.delete_dir(self.staging)
        except (OSError, FileNotFoundError):
            pass


# --------------------------------------------------------------------------- finding the bad rows


def _frames(fs: pyarrow.fs.FileSystem, path: str, fmt: str, columns: list[str], text: Sequence[str] = ()) -> Any:
    """A file's ``columns`` (parquet: those of them it has; CSV and JSON: all) in chunks of raw values; CSV
    reads the ``text`` columns as text, so that a stray string there is a value to report, not a read error."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(fs.open_input_file(path))
        present = [c for c in columns if c in f.schema_arrow.names]
        for batch in f.iter_batches(batch_size=_DIAGNOSE_ROWS, columns=present):
            yield batch.to_pandas()
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        with fs.open_input_stream(path, compression="detect") as stream:
            reader = pacsv.open_csv(
                stream,
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in text}, strings_can_be_null=True
                ),
            )
            for batch in reader:
                yield batch.to_pandas()
    elif fmt == "json":
        with fs.open_input_stream(path, compression="detect") as stream:
            yield from pd.read_json(stream, lines=True, chunksize=_DIAGNOSE_ROWS, dtype=False)
    else:
        raise UsageError(f"cannot score {fmt} files (parquet, CSV or JSON lines)")


def input_columns(source: Source) -> list[str]:
    """The columns of the input's first file, read on this process (a parquet footer, a CSV's first block)."""
    if source.builtin is not None:
        from fabric.data import load_builtin

        return list(load_builtin(source.builtin).columns)
    first = source.files[0]
    if source.format == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(source.filesystem.open_input_file(first)).schema_arrow.names)
    for df in _frames(source.filesystem, first, source.format, []):
        return [str(c) for c in df.columns]
    return []


def _file_bad_rows(fs: Any, path: str, fmt: str, rules: InputRules, limit: int) -> BadRows:
    found = BadRows()
    columns = list(dict.fromkeys([*rules.checked, *rules.keep]))
    offset = 0
    try:
        for df in _frames(fs, path, fmt, columns, rules.checked):
            found.add(df, check_frame(df, rules), rules.keep, limit, {"file": path.rsplit("/", 1)[-1]}, offset)
            offset += len(df)
    except Exception as e:  # a file that does not even parse: say so rather than lose the report
        found.errors.append(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return found


def find_bad_rows(source: Source, rules: InputRules, limit: int) -> BadRows:
    """Re-read the input file by file (Ray tasks, streaming) and number its bad rows."""
    if source.builtin is not None:
        from fabric.data import load_builtin

        df = load_builtin(source.builtin)
        return BadRows().add(df, check_frame(df, rules), rules.keep, limit, {"file": source.describe()}, 0)
    import ray

    task = ray.remote(num_cpus=1)(_file_bad_rows)
    found = BadRows()
    for part in ray.get([task.remote(source.filesystem, f, source.format, rules, limit) for f in source.files]):
        found.merge(part, limit)
    return found


def _causes(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        # RayTaskError keeps the remote exception in ``cause``
        cur = cur.__cause__ or getattr(cur, "cause", None) or cur.__context__
    return out


def _explain(e: Exception, source: Source, rules: InputRules, p: PredictConfig, output: str) -> Exception:
    """The error to raise for a failed run: the numbered bad rows when the input is to blame, else ``e``."""
    import pyarrow as pa

    chain = _causes(e)
    rejected = next((c for c in chain if isinstance(c, DataValidationError)), None)
    marker = f"{DataValidationError.__name__}: "
    if rejected is None and marker in str(e):  # the remote error only as text
        rejected = DataValidationError(str(e).split(marker, 1)[1].split("\n")[0])
    unreadable = any(isinstance(c, pa.ArrowException) for c in chain) or any(m in str(e) for m in _READ_FAILURES)
    if rejected is None and not unreadable:
        return e
    found = find_bad_rows(source, rules, p.max_reported)
    if found.rows or found.errors:
        return found.error(source.describe(), output)
    if rejected is not None:
        return DataValidationError(f"{source.describe()}: {rejected}; nothing was written to {output}")
    from fabric.data._readers import diagnose, read_error

    return read_error(source, e, diagnose(source))


# --------------------------------------------------------------------------- the stage


def score(
    cfg: PipelineConfig,
    input: str | None = None,
    output: str | None = None,
    version: int | None = None,
    alias: str | None = None,
) -> ScoreResult:
    """Score every row of ``input`` with a registered model and write the predictions to ``output``.

    The model is version ``version`` of ``track.model_name``, or the version ``alias`` points at (default
    ``champion``); the arguments default to ``predict.input``, ``output``, ``version`` and ``alias``. The
    output is a folder of parquet or CSV files: ``predict.keep_columns``, ``prediction`` (class index or
    value), ``label`` (the class, when the training data's classes are known) and ``proba_<k>`` per class,
    ``model_name`` and ``model_version``.

    Raises:
        UsageError: no input or output, an existing output (without ``predict.overwrite``), an unknown
            version or alias.
        DataValidationError: the input lacks a column, or rows fail the checks (which rows, which column,
            why); nothing is written.
    """
    import ray
    from ray.data import DataContext

    from fabric.data._readers import data_context, read, resolve
    from fabric.runtime import connect

    p = cfg.predict
    input = input or p.input
    output = output or p.output
    if version is None and alias is None:
        version, alias = p.version, p.alias
    if not input or not output:
        raise UsageError("nothing to score: give --input and --output (predict.input, predict.output)")
    if version is not None and alias is not None:
        raise UsageError("--version and --alias: choose one")
    fmt = output_format(output, p.output_format)
    target = Output(output)
    if target.exists() and not p.overwrite:
        raise UsageError(f"--output: {output} exists; choose another path or set predict.overwrite=true")
    source = resolve(input)
    started = time.monotonic()
    connect(cfg.cluster)
    model = load_model(cfg, version, alias)
    pre = Preprocessor.from_dict(model.preprocessor) if model.preprocessor else None
    rules = input_rules(pre, model.feature_names, p, cfg.data.expectations)
    names = input_columns(source)
    missing = missing_columns(names, rules)
    if missing:
        raise DataValidationError(
            f"{source.describe()} lacks column(s) {missing} (the model reads {list(rules.columns)}, "
            f"predict.keep_columns {list(rules.keep)}); its columns: {names[:30]}",
            column=missing[0],
        )
    text_columns = tuple(c.name for c in pre.columns if not isinstance(c, NumericColumn)) if pre else ()
    n, threads = task_size(p.concurrency, int(ray.cluster_resources().get("CPU", 1)))
    context = data_context(source)
    context.enable_progress_bars = True  # Ray Data's bar of the scoring: shown also when fabric runs quiet
    kwargs = {"model": model, "rules": rules, "threads": threads, "limit": p.max_reported}
    key = hashlib.sha256(pickle.dumps(kwargs)).hexdigest()  # the same model and checks: a worker's scorer serves
    scorer = ray.put(kwargs)
    with DataContext.current(context):
        ds = read(source, text_columns)
        scored = ds.map_batches(
            score_block,
            fn_kwargs={"key": key, "scorer": scorer, "batch_size": p.batch_size,
                       "staging": Staging(target.fs, target.staging, fmt)},
            batch_size=None,  # a block per task (blocks are sized to stream): one file each, scored batch by batch
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=n),
            num_cpus=threads,
        )  # fmt: skip
        try:
            target.fs.create_dir(target.staging)
            written: dict[str, int] = {}
            for part in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                written.update(zip(part.column("file").to_pylist(), part.column("rows").to_pylist(), strict=True))
            rows = sum(written.values())
            if rows:
                target.keep_only(set(written))
                target.publish(p.overwrite)
        except Exception as e:
            target.discard()
            raise _explain(e, source, rules, p, output) from None
        except BaseException:  # interrupted: no partial output left behind
            target.discard()
            raise
    if not rows:
        target.discard()
        raise DataValidationError(f"{source.describe()} holds no rows to score; nothing was written to {output}")
    result = ScoreResult(output, rows, model.name, model.version, fmt, time.monotonic() - started)
    log.info(result.summary())
    return result
