"""Argument handling of the `fabric` CLI (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fabric.cli import main
from fabric.cli.submit import build_entrypoint

ROOT = Path(__file__).resolve().parents[3]


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "fabric.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("up", "down", "status", "submit", "jobs", "validate", "run"):
        assert f"    {cmd}" in out.stdout


def test_validate_ok_and_overrides_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(ROOT / "jobs/configs/pipeline_smoke.yaml")
    assert main(["validate", cfg, "train.epochs=2", "--print", "tune.num_samples=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "num_samples: 3" in out and out.rstrip().endswith(": OK")


def test_validate_bad_config_exit_2_one_line_per_problem(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(ROOT / "jobs/configs/pipeline_smoke.yaml")
    assert main(["validate", cfg, "train.epochs=-1", "serve.port=99999"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert any(line.strip().startswith("train.epochs:") for line in err)
    assert any(line.strip().startswith("serve.port:") for line in err)


def test_unknown_arguments_and_commands_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["status", "train.epochs=2"])  # status takes no overrides
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err


def test_submit_refuses_missing_script_and_outside_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "c.yaml"
    outside.write_text("train: {epochs: 1}\n")
    assert main(["submit", "jobs/nope.py", f"--working-dir={ROOT}"]) == 2
    assert "script: file not found" in capsys.readouterr().err
    assert main(["submit", str(ROOT / "jobs/pipeline.py"), "--config", str(outside), f"--working-dir={ROOT}"]) == 2
    assert "outside the working dir" in capsys.readouterr().err


def test_entrypoint_is_what_ray_job_submit_would_run() -> None:
    cmd = build_entrypoint("jobs/train.py", "jobs/configs/a b.yaml", ["train.lr=0.1", "data.source=s3://b/k"])
    assert cmd == "python jobs/train.py --config 'jobs/configs/a b.yaml' train.lr=0.1 data.source=s3://b/k"
