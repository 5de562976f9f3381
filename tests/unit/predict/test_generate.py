"""Batch generation's input checks: every bad record is named by its line (or row) before any work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fabric.errors import DataValidationError, UsageError
from fabric.predict import check_input
from tests.moto_s3 import moto_s3

BUCKET = "generate-unit"


def test_good_jsonl_counts_its_records(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "b"}\n')
    assert check_input(str(f), "prompt", ["id"]) == 2


def test_bad_jsonl_lines_are_named(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1, "prompt": "a"}\n{"prompt": "b"}\n[1]\n{"id": 4, "prompt": 7}\n{oops\n')
    with pytest.raises(DataValidationError) as e:
        check_input(str(f), "prompt", ["id"])
    msg = str(e.value)
    assert "line 2: id column 'id' is missing" in msg and "line 3: not a JSON object" in msg
    assert "line 4: 'prompt' must be a non-empty string, got int" in msg and "line 5: not JSON" in msg


def test_parquet_and_csv_name_missing_columns_and_empty_prompts(tmp_path: Path) -> None:
    pq = tmp_path / "p.parquet"
    pd.DataFrame({"id": [1, 2, 3], "prompt": ["a", None, ""]}).to_parquet(pq)
    with pytest.raises(DataValidationError, match=r"row 2: 'prompt' is empty or null; row 3"):
        check_input(str(pq), "prompt", ["id"])
    csv = tmp_path / "p.csv"
    pd.DataFrame({"key": [1], "prompt": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(DataValidationError, match=r"no column \['id'\]"):
        check_input(str(csv), "prompt", ["id"])
    assert check_input(str(csv), "prompt", ["key"]) == 1


def test_missing_or_unknown_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no file"):
        check_input(str(tmp_path / "nope.jsonl"), "prompt", [])
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(UsageError, match="not .jsonl"):
        check_input(str(tmp_path / "p.txt"), "prompt", [])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with moto_s3(BUCKET, cache_dir=tmp_path_factory.mktemp("cache")) as client:
        yield client


def test_a_prompts_file_in_a_bucket_is_checked_there(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="in/p.jsonl", Body=b'{"id": 1, "prompt": "a"}\n{"id": 2}\n')
    with pytest.raises(DataValidationError, match=f"s3://{BUCKET}/in/p.jsonl: bad input records: line 2: 'prompt'"):
        check_input(f"s3://{BUCKET}/in/p.jsonl", "prompt", ["id"])
    table = pd.DataFrame({"id": [1, 2], "prompt": ["a", "b"]}).to_parquet()
    s3.put_object(Bucket=BUCKET, Key="in/p.parquet", Body=table)
    assert check_input(f"s3://{BUCKET}/in/p.parquet", "prompt", ["id"]) == 2
    with pytest.raises(UsageError, match=f"--input: no file at s3://{BUCKET}/in/none.csv"):
        check_input(f"s3://{BUCKET}/in/none.csv", "prompt", [])
