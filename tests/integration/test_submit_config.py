"""`fabric submit --config <a yaml outside the working dir>`: the config travels with the job.

One head of its own (ports and FABRIC_HOME apart from any other Ray here) runs one ingestion job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.test_cli_cluster import fabric

pytestmark = pytest.mark.integration

GCS_PORT = 6489
DASH_PORT = 8375


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("fabric-home")
    env = {**os.environ, "FABRIC_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    up = fabric(env, "up", f"--port={GCS_PORT}", f"--dashboard-port={DASH_PORT}", "--num-cpus=2")
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    fabric(env, "down")


def test_a_config_from_outside_the_working_dir_travels_with_the_job(head: dict[str, str], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = elsewhere / "my.yaml"
    run_dir = tmp_path / "run"  # absolute: the job writes where this config says, whatever its cwd
    config.write_text(f"name: travelled\nrun_dir: {run_dir}\ndata:\n  source: builtin:breast_cancer\n")
    address = f"http://127.0.0.1:{DASH_PORT}"
    done = fabric(head, "submit", "jobs/ingest.py", "--config", str(config), "--address", address, "data.split.seed=3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"config: {config} travels with the job as fabric-submitted-configs/my-" in done.stdout
    assert "python jobs/ingest.py --config fabric-submitted-configs/my-" in done.stdout
    meta = json.loads((run_dir / "data" / "meta.json").read_text())  # the job read this config...
    assert meta["split"]["seed"] == 3  # ...with the override on top
    assert not (ROOT / "fabric-submitted-configs").exists()  # the staged copy is gone after the upload
