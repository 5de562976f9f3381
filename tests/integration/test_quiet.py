"""A healthy run prints fabric's lines, not Ray's chatter; ``-v`` brings Ray's own logs back.

One small pipeline (ingest → a 1-trial search → 2-worker training → register) as a user runs it: ``python
jobs/pipeline.py`` in a process of its own, with a local Ray it starts, in the environment a user has (not the
test suite's quieter one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SMOKE = "jobs/configs/pipeline_smoke.yaml"
# What a healthy run must not print (Ray Train's controller polling, Ray Data's CPU warning and progress,
# worker log prefixes, tracebacks, any Ray warning).
CHATTER = ("Failed", "hang", "Traceback", "WARNING", "pid=", "Running Dataset", "Execution plan", "DeprecationWarning")


def _job(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FABRIC_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DEDUP_LOGS", "FABRIC_VERBOSE"):
        env.pop(name, None)  # the suite quiets Ray its own way; a user's shell does not
    cmd = [sys.executable, script, "--config", SMOKE, f"run_dir={tmp_path / 'run'}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_healthy_run_prints_its_steps_and_epochs_and_no_chatter(tmp_path: Path) -> None:
    small = ("tune.num_samples=1", "tune.epochs_per_trial=1", "train.epochs=2", "export.enabled=false")
    proc = _job(tmp_path, "jobs/pipeline.py", *small)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    noisy = [line for line in out.splitlines() if any(word in line for word in CHATTER)]
    assert not noisy, "\n".join(noisy[:20])
    lines = out.splitlines()
    for stage in ("ingest", "tune", "train", "register"):
        assert f"== {stage}" in lines
    # rank 0's epoch lines, forwarded from the Ray Train worker as they are
    assert {"epoch 1/2", "epoch 2/2"} <= {line[:9] for line in lines}

    verbose = _job(tmp_path, "jobs/ingest.py", "-v")
    assert verbose.returncode == 0, (verbose.stdout + verbose.stderr)[-5000:]
    assert "Execution plan of Dataset" in verbose.stdout + verbose.stderr  # Ray Data's own INFO lines
