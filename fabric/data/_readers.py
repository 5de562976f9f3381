"""Ray Data readers for parquet, CSV, JSON lines and text, from local paths or pyarrow URIs.

The source is listed once with pyarrow's filesystems (local, s3://, gs://, hdfs://, file://), the
format is taken from the file extensions when ``format: auto``, and the listed files are handed to
the Ray Data reader with that filesystem, so what is read is exactly what was listed. When a read
fails on a malformed file, ``diagnose`` re-reads the files in Ray tasks (streaming, file by file)
to count the bad rows and show a few, instead of surfacing Arrow's first message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.config._base import is_uri
from fabric.config.data import BUILTIN_PREFIX
from fabric.errors import ConfigError, ConfigProblem, DataValidationError

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.data

FORMATS = ("parquet", "csv", "json", "text")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".parq": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".txt": "text",
    ".text": "text",
}
_COMPRESSION = (".gz", ".bz2", ".zst", ".zstd", ".br", ".lz4")
_MAX_EXAMPLES = 5
_MIN_BLOCK_BYTES = 8 * 1024 * 1024
_V1_PARQUET_MAX_FILES = 256


def format_of(path: str) -> str | None:
    """The format a file's extension names (compression suffixes skipped), or None."""
    name = path.rsplit("/", 1)[-1].lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    dot = name.rfind(".")
    return _EXTENSIONS.get(name[dot:]) if dot > 0 else None


def _hidden(rel: str) -> bool:
    # Spark/Hadoop markers (_SUCCESS, _metadata), dotfiles and checksum files are never data.
    return any(part.startswith((".", "_")) for part in rel.split("/")) or rel.endswith(".crc")


@dataclass
class Source:
    """A listed data source: the filesystem, the files to read and their format."""

    location: str
    format: str
    filesystem: pyarrow.fs.FileSystem | None = None
    files: list[str] = field(default_factory=list)
    builtin: str | None = None
    root: str = ""
    """The listed folder (a file's parent): hive partitions (``key=value/``) are parsed below it only."""
    nbytes: int = 0
    """Total size of the files on storage."""

    @property
    def uris(self) -> list[str]:
        """The files as URIs (for readers that resolve the filesystem themselves)."""
        if not is_uri(self.location):
            return list(self.files)
        scheme = self.location.split("://", 1)[0]
        return [f"{scheme}://{f.lstrip('/') if scheme != 'file' else f}" for f in self.files]

    def describe(self) -> str:
        if self.builtin:
            return f"builtin:{self.builtin}"
        n = len(self.files)
        return f"{self.location} ({self.format}, {n} file{'s' if n != 1 else ''})"


def resolve(location: str, fmt: str = "auto") -> Source:
    """List ``location`` (a file, a folder, a URI or ``builtin:<name>``) and settle its format.

    Raises:
        DataValidationError: nothing is there, no data files are there, or their formats are mixed.
    """
    if location.startswith(BUILTIN_PREFIX):
        return Source(location, "builtin", builtin=location[len(BUILTIN_PREFIX) :])
    import pyarrow.fs as pafs

    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(location)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for bad or unreachable URIs
            raise DataValidationError(f"cannot open {location}: {e}") from None
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataValidationError(f"no data at {location}")
    if info.type == pafs.FileType.File:
        sizes, root = {path: info.size or 0}, path.rsplit("/", 1)[0]
    else:
        root = path
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        sizes = {
            i.path: i.size or 0
            for i in listing
            if i.type == pafs.FileType.File and not _hidden(i.path[len(path) :].lstrip("/"))
        }
    files = sorted(sizes)
    if fmt == "auto":
        found = {f: format_of(f) for f in files}
        kinds = {k for k in found.values() if k}
        if not kinds:
            raise DataValidationError(
                f"no parquet, csv, json or text files at {location}; set data.format if the extensions are unusual"
            )
        if len(kinds) > 1:
            raise DataValidationError(
                f"{location} holds several formats ({', '.join(sorted(kinds))}); point data.source at one of them"
            )
        fmt = kinds.pop()
        files = [f for f, k in found.items() if k == fmt]
    elif not files:
        raise DataValidationError(f"no files at {location}")
    return Source(location, fmt, fs, files, root=root, nbytes=sum(sizes[f] for f in files))


def _cluster_resources() -> dict[str, float]:
    """CPUs and object-store bytes of the connected cluster (this machine's when not connected yet)."""
    import os

    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    return {"CPU": float(os.cpu_count() or 1)}


def _cluster_cpus() -> int:
    return max(1, int(_cluster_resources().get("CPU", 1)))


def _block_budget(source: Source, default: int | None) -> int | None:
    """Bytes per block: small enough to stream through the object store, enough blocks for every CPU.

    Ray Data's default (128 MiB) suits clusters; a single 100 MiB file would then be one block, read
    by one task on one CPU, and one block larger than a small object store.
    """
    if default is None:
        return None
    cpus = _cluster_cpus()
    store = int(_cluster_resources().get("object_store_memory", default * 8))
    want = min(source.nbytes // (4 * cpus) if source.nbytes else default, store // 8)
    return int(min(default, max(_MIN_BLOCK_BYTES, want)))


def data_context(source: Source) -> ray.data.DataContext:
    """Ray Data settings for reading ``source``: use it as ``with DataContext.current(ctx):`` around
    both building and executing the datasets (Ray plans read parallelism at execution time from the
    current context), so other Ray Data work in the process keeps its own settings."""
    from ray.data import DataContext

    ctx = DataContext.get_current().copy()
    if source.builtin is not None:
        return ctx
    ctx.target_max_block_size = _block_budget(source, ctx.target_max_block_size)
    # Ray Data aims at >= 200 read blocks; on a small cluster that makes ~1 MB blocks whose per-task
    # overhead dwarfs the work. A few blocks per CPU keeps every CPU busy (block size caps the rest).
    ctx.read_op_min_num_blocks = 4 * _cluster_cpus()
    if source.format == "parquet" and len(source.files) <= _V1_PARQUET_MAX_FILES:
        # Ray Data 2.60's DataSourceV2 parquet reader starts footer-reader actors on every execution:
        # seconds of fixed cost per pass (most of an ingestion of a few files). It pays off only
        # for many files; the file-task reader is faster below that.
        ctx.use_datasource_v2 = False
    return ctx


def read(source: Source, csv_string_columns: tuple[str, ...] = ()) -> ray.data.Dataset:
    """A lazy Ray Dataset over ``source`` (nothing is read until it executes)."""
    import ray.data

    if source.builtin is not None:
        from fabric.data._builtin import load_builtin

        df = load_builtin(source.builtin)
        # A few blocks, so that even the small builtin datasets exercise parallel scans.
        step = max(1, -(-len(df) // 4))
        return ray.data.from_pandas([df.iloc[i : i + step] for i in range(0, len(df), step)])
    return _read(source, csv_string_columns)


def _read(source: Source, csv_string_columns: tuple[str, ...]) -> ray.data.Dataset:
    import ray.data
    from ray.data.datasource import Partitioning

    common: dict[str, Any] = {
        "filesystem": source.filesystem,
        "file_extensions": None,
        "partitioning": Partitioning("hive", base_dir=source.root, filesystem=source.filesystem),
    }
    if source.format == "parquet":
        return ray.data.read_parquet(source.files, **common)
    if source.format == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in csv_string_columns})
        return ray.data.read_csv(source.files, convert_options=convert, **common)
    if source.format == "json":
        # The streaming JSON-lines reader (pandas, chunked) resolves filesystems itself.
        return ray.data.read_json(source.uris, lines=True, **{**common, "filesystem": None})
    if source.format == "text":
        return ray.data.read_text(source.files, **{**common, "partitioning": None})
    raise ConfigError([ConfigProblem("data.format", f"unknown format {source.format!r}; one of {', '.join(FORMATS)}")])


def read_text(location: str) -> ray.data.Dataset:
    """Text files as a Dataset with one ``text`` row per non-empty line (for language models)."""
    from ray.data import DataContext

    source = resolve(location, "text")
    with DataContext.current(data_context(source)):
        return read(source)


# --------------------------------------------------------------------------- diagnosing a failed read


@dataclass
class FileProblems:
    """What re-reading one file found: malformed rows, or the column a value failed to convert in."""

    path: str
    malformed: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    conversion_column: str | None = None
    error: str | None = None


_CONVERSION = re.compile(r"In CSV column #(\d+): .*CSV conversion error")


def _csv_file_problems(fs: pyarrow.fs.FileSystem, path: str, string_columns: tuple[str, ...]) -> FileProblems:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    out = FileProblems(path)

    def on_invalid(row: Any) -> str:
        out.malformed += 1
        if len(out.examples) < _MAX_EXAMPLES:
            out.examples.append(
                {
                    "file": path,
                    "line": row.number,
                    "expected_columns": row.expected_columns,
                    "actual_columns": row.actual_columns,
                    "text": row.text[:200],
                }
            )
        return "skip"

    names: list[str] = []
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns}),
            )
            names = reader.schema.names
            for _ in reader:
                pass
    except pa.ArrowInvalid as e:
        out.error = str(e)
        m = _CONVERSION.search(str(e))
        if m and int(m.group(1)) < len(names):
            out.conversion_column = names[int(m.group(1))]
    return out


def _json_file_problems(fs: pyarrow.fs.FileSystem, path: str) -> FileProblems:
    out = FileProblems(path)
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            for number, raw in enumerate(_lines(f), start=1):
                text = raw.strip()
                if not text:
                    continue
                try:
                    value = json.loads(text)
                    problem = None if isinstance(value, dict) else "not a JSON object"
                except ValueError as e:
                    problem = str(e)
                if problem:
                    out.malformed += 1
                    if len(out.examples) < _MAX_EXAMPLES:
                        out.examples.append({"file": path, "line": number, "error": problem, "text": text[:200]})
    except OSError as e:
        out.error = str(e)
    return out


def _lines(f: Any) -> Any:
    buf = b""
    while chunk := f.read(1 << 20):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


def diagnose(source: Source, csv_string_columns: tuple[str, ...] = ()) -> FileProblems | None:
    """Re-read the files in Ray tasks after a failed read; None when no file shows a problem.

    Returns the merged findings: the malformed-row count over all files (with examples), or the first
    column that failed type conversion.
    """
    if source.format not in ("csv", "json") or not source.files:
        return None
    import ray

    if source.format == "csv":
        task = ray.remote(num_cpus=1)(_csv_file_problems)
        refs = [task.remote(source.filesystem, p, csv_string_columns) for p in source.files]
    else:
        task = ray.remote(num_cpus=1)(_json_file_problems)
        refs = [task.remote(source.filesystem, p) for p in source.files]
    found = ray.get(refs)
    merged = FileProblems(source.location)
    for fp in found:
        merged.malformed += fp.malformed
        merged.examples.extend(fp.examples[: _MAX_EXAMPLES - len(merged.examples)])
        merged.conversion_column = merged.conversion_column or fp.conversion_column
        if fp.error and not merged.error:
            merged.error = f"{fp.path}: {fp.error}"
    if merged.malformed or merged.conversion_column or merged.error:
        return merged
    return None


def read_error(source: Source, error: BaseException, problems: FileProblems | None) -> DataValidationError:
    """The DataValidationError for a read that failed; ``problems`` from ``diagnose`` when it found any."""
    if problems is not None and problems.malformed:
        kind = (
            "CSV rows with the wrong number of fields" if source.format == "csv" else "lines that are not JSON objects"
        )
        return DataValidationError(
            f"{source.describe()}: {problems.malformed} malformed row(s) ({kind})",
            column=None,
            rows=problems.malformed,
            examples=problems.examples,
        )
    detail = problems.error if problems is not None and problems.error else _first_line(error)
    return DataValidationError(f"could not read {source.describe()}: {detail}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("ValueError:", "ArrowInvalid:", "pyarrow.lib.ArrowInvalid:", "OSError:")):
            return line
    return text.splitlines()[0] if text else type(error).__name__
