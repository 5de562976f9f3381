"""Ingestion with Ray Data: readers, schema and expectation checks, preprocessing, splits, drift reference.

``run(cfg)`` is the stage: it reads ``cfg.data.source`` (parquet, CSV, JSON lines; a local path, a
pyarrow URI such as ``s3://`` or ``gs://``, or ``builtin:<name>``), checks it, splits it with a seeded
content hash, fits scaling and one-hot encoding on the training split only and writes, under
``<run_dir>/data``::

    train/ val/ test/         parquet: one float32 column per encoded feature, plus ``label``
    meta.json                 task, target, feature names, classes, rows per split, input columns
    preprocessor.json         fitted parameters; ``load_preprocessor`` turns it back into a transformer
    reference.parquet         a raw sample of the training split (features and target), for drift
    reference_stats.json      per-column statistics of the raw training split, for drift

The training stage reads splits with ``read_split``; serving encodes raw requests with
``load_preprocessor(path).transform(df)``. Language-model fine-tuning reads JSON-lines text with
``read_text_records`` and tokenizes and packs it with ``pack``. Importing this package does not import Ray.
"""

from fabric.data._builtin import BUILTINS, load_builtin
from fabric.data._ingest import IngestResult, load_meta, read_split, run
from fabric.data._preprocess import Preprocessor, load_preprocessor
from fabric.data._readers import read_text
from fabric.data._text import (
    BUILTIN_CORPUS,
    TextSplits,
    pack,
    pack_ids,
    parse_lines,
    parse_record,
    read_text_records,
    render_prompt,
    token_counts,
)

__all__ = [
    "BUILTINS",
    "BUILTIN_CORPUS",
    "IngestResult",
    "Preprocessor",
    "TextSplits",
    "load_builtin",
    "load_meta",
    "load_preprocessor",
    "pack",
    "pack_ids",
    "parse_lines",
    "parse_record",
    "read_split",
    "read_text",
    "read_text_records",
    "render_prompt",
    "run",
    "token_counts",
]
