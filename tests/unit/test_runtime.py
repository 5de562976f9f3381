"""Upload-size check, excludes and job entrypoints (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.errors import UsageError
from fabric.runtime import DEFAULT_EXCLUDES, check_working_dir, job_main, walk_working_dir


def _tree(root: Path) -> None:
    for rel, size in {
        "jobs/train.py": 100,
        "fabric/x.py": 200,
        ".venv/lib/big.so": 5000,
        ".git/objects/pack": 4000,
        "runs/smoke/model.pt": 3000,
        "fabric/__pycache__/x.cpython-311.pyc": 300,
        "data/big.parquet": 10_000,
    }.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"0" * size)


def test_upload_leaves_out_envs_vcs_caches_and_run_outputs(tmp_path: Path) -> None:
    _tree(tmp_path)
    files = dict(walk_working_dir(tmp_path, DEFAULT_EXCLUDES))
    assert set(files) == {"jobs/train.py", "fabric/x.py", "data/big.parquet"}
    files = dict(walk_working_dir(tmp_path, [*DEFAULT_EXCLUDES, "data/"]))
    assert set(files) == {"jobs/train.py", "fabric/x.py"}


def test_oversized_upload_names_what_to_exclude(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert check_working_dir(tmp_path, DEFAULT_EXCLUDES, limit=20_000) == 10_300
    with pytest.raises(UsageError) as info:
        check_working_dir(tmp_path, DEFAULT_EXCLUDES, limit=1000)
    msg = str(info.value)
    assert "data (9.8 KiB)" in msg and "--exclude" in msg


def test_job_main_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    seen = []

    def stage(cfg: object) -> None:
        seen.append(cfg)

    assert job_main(stage, ["train.epochs=3"]) == 0
    assert seen[0].train.epochs == 3  # type: ignore[attr-defined]
    assert job_main(stage, ["train.epochs=0"]) == 2
    assert "train.epochs" in capsys.readouterr().err

    def failing(cfg: object) -> None:
        from fabric.errors import DataValidationError

        raise DataValidationError("column 'age' has 3 nulls", column="age", rows=3)

    assert job_main(failing, []) == 1
    err = capsys.readouterr().err
    assert "DataValidationError: column 'age' has 3 nulls" in err and "Traceback" not in err
