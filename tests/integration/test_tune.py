"""The search stage on a real local Ray: Optuna + ASHA, results, plot, and resuming an interrupted search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fabric.config import load_config
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SMOKE = ROOT / "jobs/configs/pipeline_smoke.yaml"
# Sequential trials make the seeded TPE proposals and ASHA's decisions reproducible. Two epochs a trial: ASHA's
# one rung (epoch 1, grace period 1, reduction factor 2) stops the worse trials there, the others run to epoch 2.
EPOCHS = 2
SEARCH = ["tune.num_samples=3", f"tune.epochs_per_trial={EPOCHS}", "tune.max_concurrent_trials=1", "tune.seed=3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    from fabric import data

    d = tmp_path_factory.mktemp("tune-run")
    data.run(load_config(SMOKE, [f"run_dir={d}"]))
    return d


@pytest.fixture(scope="module")
def searched(run_dir: Path):  # type: ignore[no-untyped-def]
    from fabric.tune import run

    return run(load_config(SMOKE, [f"run_dir={run_dir}", "name=search", *SEARCH]))


def _configs(table: pd.DataFrame) -> list[tuple[float, int, float]]:
    return sorted((round(r.lr, 10), int(r.hidden_size), round(r.dropout, 10)) for r in table.itertuples())


def test_search_writes_table_best_config_and_curves(searched) -> None:  # type: ignore[no-untyped-def]
    result = searched
    table = pd.read_csv(result.table_path)
    assert len(table) == 3 and result.num_trials == 3
    assert set(result.best_config) == {"lr", "hidden_size", "dropout"}
    assert result.best_metrics["val_loss"] == pytest.approx(table["best_val_loss"].min())
    # ASHA cut the clearly worse trials at an early rung; the best ran every epoch.
    assert (table["status"] == "stopped early").any()
    assert table.iloc[0]["epochs"] == EPOCHS
    saved = json.loads((result.out_dir / "best_config.json").read_text())
    assert saved["config"] == result.best_config
    png = result.plot_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("trial", [1, 2, 3], ids=["first-trial", "middle", "last-trial"])
def test_interrupted_search_resumes_with_optuna_state(run_dir: Path, searched, trial: int) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C as trial ``trial`` of 3 starts (sent by the driver itself, so the moment is the same on every run):
    exit 1 with the resume hint, and --resume finishes the search with the proposals of an uninterrupted one."""
    reference = pd.read_csv(searched.table_path)
    name = f"resumable-{trial}"
    args = ["tune", str(SMOKE), f"run_dir={run_dir}", f"name={name}", *SEARCH]
    # Both commands attach to the module's Ray (as inside a Ray job) instead of each starting one of its own.
    import ray

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    interrupted = subprocess.run(
        [sys.executable, "-m", "tests.integration.interrupting_tune", str(trial), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = interrupted.stdout + interrupted.stderr
    assert f"interrupting at the start of trial {trial}" in out, out[-3000:]
    assert interrupted.returncode == 1, out[-3000:]
    assert f"interrupted after {trial - 1} of 3 trials" in out and "--resume" in out, out[-3000:]
    experiment = run_dir / "tune" / name
    partial = pd.read_csv(experiment / "results.csv")
    assert len(partial) == trial and (partial["status"] == "interrupted").sum() == 1, partial

    resumed = subprocess.run(
        [sys.executable, "-m", "fabric.cli", *args, "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 3 and set(table["status"]) <= {"completed", "stopped early"}
    # The restored TPE sampler proposed exactly what an uninterrupted search with the same seed did.
    assert _configs(table) == _configs(reference)


def test_resume_without_a_search_says_so(run_dir: Path) -> None:
    from fabric.errors import FabricError
    from fabric.tune import run

    with pytest.raises(FabricError, match="no interrupted search to resume"):
        run(load_config(SMOKE, [f"run_dir={run_dir}", "name=never-ran"]), resume=True)
