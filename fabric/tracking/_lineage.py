"""Run keys: what a stage's output depends on, as one short digest.

A run key hashes a config section (the settings that shape the output) together with the content digests
of the stage's inputs. Equal keys mean the same work: the training stages keep one Ray Train run per key
(``<name>-<key>``), say "nothing to do" when that run finished, and the registry tags each version with the
key it came from so a rerun registers nothing new. Step caching builds on the same digests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

KEY_LENGTH = 12
_DIGEST_CACHE = ".digest.json"
"""Kept in a data folder: its digest, valid while ``meta.json`` (written last by ingestion) is unchanged."""


def digest_json(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys): equal settings give equal digests."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_key(settings: dict[str, Any], inputs: dict[str, str]) -> str:
    """The key of a run: a short digest of its ``settings`` and its inputs' content digests."""
    return digest_json({"settings": settings, "inputs": inputs})[:KEY_LENGTH]


def digest_splits(folder: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> str:
    """Content digest of an ingestion output's parquet splits together (see :func:`split_digests`)."""
    return digest_json(split_digests(folder, splits))


def split_digests(folder: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, str]:
    """Content digest of each parquet split of an ingestion output: the rows, not the files.

    Ray Data names its files afresh and may order rows differently on every write, so each row is hashed
    on its own and the row hashes are combined in an order-free way (their count, sum and xor, 64-bit),
    streamed batch by batch so a split never has to fit in memory, with the column names and types. The
    digests are cached in the folder next to ``meta.json`` (ingestion rewrites the folder as a whole and
    writes ``meta.json`` last), so the training, registry and pipeline stages read each split once.
    """
    meta = folder / "meta.json"
    stamp = f"{meta.stat().st_mtime_ns}:{meta.stat().st_size}" if meta.is_file() else None
    cache = folder / _DIGEST_CACHE
    known: dict[str, str] = {}
    if stamp and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except ValueError:
            cached = {}
        if cached.get("meta") == stamp and isinstance(cached.get("splits"), dict):
            known = dict(cached["splits"])
    missing = [s for s in splits if s not in known]
    for split in missing:
        known[split] = _digest_split(folder / split)
    if stamp and missing:
        cache.write_text(json.dumps({"meta": stamp, "splits": known}))
    return {s: known[s] for s in splits}


def _digest_split(path: Path) -> str:
    import numpy as np
    import pandas as pd
    import pyarrow.dataset as pads

    if not path.exists():
        return digest_json("absent")
    data = pads.dataset(path, format="parquet")
    names = sorted(data.schema.names)
    rows = total = xor = 0
    for batch in data.to_batches(columns=names):
        hashes = pd.util.hash_pandas_object(batch.to_pandas(), index=False).to_numpy()
        rows += len(hashes)
        total = (total + int(hashes.sum(dtype=np.uint64))) % (1 << 64)
        xor ^= int(np.bitwise_xor.reduce(hashes)) if len(hashes) else 0
    columns = [(n, str(data.schema.field(n).type)) for n in names]
    return hashlib.sha256(f"{columns};{rows};{total};{xor}".encode()).hexdigest()


def source_digest(location: str) -> str:
    """The content digest of a ``data.source``: :func:`digest_source` of a path or URI; a ``builtin:<name>``
    dataset (shipped by an installed package) digests as its name."""
    from fabric.config.data import BUILTIN_PREFIX

    return digest_json(location) if location.startswith(BUILTIN_PREFIX) else digest_source(location)


def digest_source(path: str | None) -> str:
    """Content digest of a data source: a local file, or a folder's files (names and bytes).

    A URI is digested by its files' names, sizes and modification times (reading remote bytes to hash them
    would cost a full download); None (an embedded demo set) digests as such.
    """
    if path is None:
        return digest_json("embedded")
    if "://" in path:
        from pyarrow import fs

        filesystem, root = fs.FileSystem.from_uri(path)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File:
            infos = [info]
        else:
            infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        return digest_json(sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == fs.FileType.File))
    local = Path(path).expanduser().resolve()
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(local) if f != local else f.name}\0".encode())
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
