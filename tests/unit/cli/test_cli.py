"""Argument handling of the `fabric` CLI (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fabric.cli import main
from fabric.cli.submit import STAGED, build_entrypoint, staged_config

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
        main(["down", "train.epochs=2"])  # down takes no overrides
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err


def test_submit_refuses_a_missing_script_or_one_outside_the_working_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "jobs/nope.py", f"--working-dir={ROOT}"]) == 2
    assert "script: file not found" in capsys.readouterr().err
    (tmp_path / "job.py").write_text("")
    assert main(["submit", str(tmp_path / "job.py"), f"--working-dir={ROOT}"]) == 2
    err = capsys.readouterr().err
    assert "outside the working dir" in err and "pass --working-dir" in err


def test_a_config_from_elsewhere_is_staged_in_the_working_dir_for_the_upload_only(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    config = elsewhere / "my.yaml"
    config.write_text("train: {epochs: 1}\n")
    with staged_config(config, root) as staged:
        assert staged is not None and staged.startswith(f"{STAGED}/my-") and staged.endswith(".yaml")
        assert (root / staged).read_text() == config.read_text()  # what the upload carries
    assert not (root / STAGED).exists()  # gone once submitted
    inside = root / "jobs.yaml"
    inside.write_text("{}\n")
    with staged_config(inside, root) as staged:
        assert staged == "jobs.yaml" and sorted(p.name for p in root.iterdir()) == ["jobs.yaml"]
    with staged_config(None, root) as staged:
        assert staged is None


def test_entrypoint_is_what_ray_job_submit_would_run() -> None:
    cmd = build_entrypoint("jobs/train.py", "jobs/configs/a b.yaml", ["train.lr=0.1", "data.source=s3://b/k"])
    assert cmd == "python jobs/train.py --config 'jobs/configs/a b.yaml' train.lr=0.1 data.source=s3://b/k"
