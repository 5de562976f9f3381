"""Listing a source and settling its format (pyarrow filesystems, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fabric.data._readers import format_of, resolve
from fabric.errors import DataValidationError


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.parquet", "parquet"),
        ("part-0.pq", "parquet"),
        ("x.csv", "csv"),
        ("x.csv.gz", "csv"),
        ("x.jsonl", "json"),
        ("x.ndjson.zst", "json"),
        ("x.json", "json"),
        ("notes.txt", "text"),
        ("README", None),
        ("x.xlsx", None),
    ],
)
def test_format_of(name: str, fmt: str | None) -> None:
    assert format_of(f"/data/{name}") == fmt


def _write(d: Path, name: str) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"a": [1, 2]}).to_csv(p, index=False)
    return p


def test_a_folder_skips_markers_and_hidden_files(tmp_path: Path) -> None:
    _write(tmp_path, "b.csv")
    _write(tmp_path, "sub/a.csv")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".a.csv.crc").write_text("")
    _write(tmp_path, "_tmp/x.csv")
    src = resolve(str(tmp_path))
    assert src.format == "csv"
    assert [Path(f).name for f in src.files] == ["b.csv", "a.csv"]


def test_mixed_formats_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "a.csv")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataValidationError, match="several formats"):
        resolve(str(tmp_path))
    assert resolve(str(tmp_path / "b.parquet")).format == "parquet"


def test_an_explicit_format_reads_unusual_extensions(tmp_path: Path) -> None:
    p = _write(tmp_path, "export.dat")
    with pytest.raises(DataValidationError, match="data.format"):
        resolve(str(p))
    assert resolve(str(p), "csv").files == [str(p)]


def test_file_uris_resolve_through_pyarrow(tmp_path: Path) -> None:
    p = _write(tmp_path, "a.csv")
    src = resolve(p.as_uri())
    assert src.format == "csv" and src.files == [str(p)] and src.uris == [p.as_uri()]


def test_nothing_there(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="no data at"):
        resolve(str(tmp_path / "nope.csv"))
