"""run_dir on object storage: the tabular pipeline against a real S3 API (moto's server on 127.0.0.1), reached
the standard way (AWS_ENDPOINT_URL and AWS keys in the environment, which the local Ray's workers inherit).

An interrupted training resumes from its checkpoint in the bucket, a repeated run on a machine without the
run's local copy finds every stage done in the bucket, a search keeps its state there and resumes from it, the
champion is served, monitored and batch-scored from the bucket alone, and a bad bucket fails before any work
with one line naming it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fabric import data, pipeline, storage, train, tune
from fabric.config import PipelineConfig
from fabric.errors import FabricError
from fabric.runtime import free_port
from tests.moto_s3 import forget_local_copy, keys, moto_s3
from tests.unit.serve.serving import local_ray

pytestmark = pytest.mark.integration

BUCKET = "fabric-test"
RUN_DIR = f"s3://{BUCKET}/run"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """moto's S3 server on a free loopback port, the AWS variables pointing at it, and an empty bucket."""
    with moto_s3(BUCKET, cache_dir=tmp_path_factory.mktemp("fabric-cache")) as client:
        yield client


@pytest.fixture(scope="module")
def ray_s3(s3: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Ray (with Serve's fast path) started after the AWS variables are set: its workers and replicas reach the
    bucket with them."""
    with local_ray(tmp_path_factory.mktemp("fabric-home")):
        yield


def _cfg(**sections: object) -> PipelineConfig:
    doc: dict[str, object] = {
        "name": "s3",
        "run_dir": RUN_DIR,
        "data": {"source": "builtin:wine"},
        "tune": {"enabled": False, "num_samples": 2, "max_concurrent_trials": 2, "epochs_per_trial": 1},
        "train": {"epochs": 2, "num_workers": 1, "lr": 0.01, "max_failures": 0},
        "track": {"model_name": "s3", "promotion": {"bootstrap_samples": 100}},
        "export": {"quantize": False},
    }
    doc.update(sections)
    return PipelineConfig.model_validate(doc)


def test_pipeline_on_s3_resumes_and_caches(
    ray_s3: None, s3: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg()
    data.run(cfg)
    crash = {"fault_injection": {"epoch": 2, "rank": 0, "marker": str(tmp_path / "crashed")}}
    with pytest.raises(FabricError, match="training failed"):
        train.run(cfg, loop_overrides=crash)  # interrupted at epoch 2, after epoch 1's checkpoint
    # The local copy goes (another machine): the checkpoint to resume from is the bucket's.
    shutil.rmtree(storage.local_root(RUN_DIR))
    capsys.readouterr()

    first = pipeline.run(cfg)
    out = capsys.readouterr().out
    assert "resuming the interrupted run from its checkpoint of epoch 1" in out
    assert first.stages["train"].trained_epochs == 1 and first.stages["register"].version == "1"
    found = keys(s3, BUCKET, "run/")
    key = first.stages["train"].run_key
    for expected in ("run/data/meta.json", "run/data/reference.parquet", "run/train/model/model.pt",
                     "run/export/model.onnx", "run/export/export.json",
                     "run/steps/ingest.json", "run/steps/export.json"):  # fmt: skip
        assert expected in found
    assert any(k.startswith("run/data/train/") and k.endswith(".parquet") for k in found)
    checkpoints = [k for k in found if k.startswith(f"run/train/s3-{key}/")]  # uploaded by the Ray Train worker
    assert f"run/train/s3-{key}/checkpoint_manager_snapshot.json" in checkpoints, checkpoints
    assert f"run/train/s3-{key}/epoch_0002/model.pt" in checkpoints, checkpoints
    assert any(k.startswith("run/mlartifacts/") and k.endswith("MLmodel") for k in found)  # MLflow's artifacts

    # A rerun whose local copy lost everything but the registry's database: each stage is found done in the bucket.
    root = forget_local_copy(RUN_DIR)
    again = pipeline.run(cfg)
    out = capsys.readouterr().out
    assert "== ingest: cached" in out and "== export: cached" in out
    assert "training: nothing to do" in out and again.stages["register"].registered is False
    assert (root / "data" / "meta.json").is_file()  # pulled from the bucket for the stages that read it


def test_served_monitored_and_scored_from_the_bucket(ray_s3: None, s3: object) -> None:
    import ray

    from fabric.monitor import get_actor
    from fabric.predict import score

    cfg = _cfg()
    pipeline.run(cfg)  # (done by the first test: found cached)
    rows = pd.read_parquet(storage.fetch(RUN_DIR, "data/reference.parquet")).drop(columns=["target"]).head(8)
    keyed = rows.assign(row=range(len(rows)))
    body = keyed.to_parquet(index=False)
    s3.put_object(Bucket=BUCKET, Key="in/rows.parquet", Body=body)  # type: ignore[attr-defined]
    root = forget_local_copy(RUN_DIR)

    served_cfg = _cfg(serve={"enabled": True, "port": free_port(), "replica_cpus": 0})
    result = pipeline.serve_stages(served_cfg)
    served = result.stages["serve"]
    r = httpx.post(
        f"{served.url}/v2/models/{served.model_name}/infer", json={"instances": rows.to_dict("records")}, timeout=60
    )
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    probs = np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(outputs["probabilities"]["shape"])
    assert (root / "export" / "export.json").is_file()  # the replica pulled the export stage's ONNX graph

    # The monitor read its reference from the bucket, saw the served rows and checkpoints into the bucket.
    actor = get_actor(served_cfg.monitor.actor_name)
    assert ray.get(actor.checkpoint.remote()) == f"{RUN_DIR}/monitor/state.pkl"
    assert "run/monitor/state.pkl" in keys(s3, BUCKET, "run/monitor/")

    forget_local_copy(RUN_DIR)
    keep = _cfg(predict={"keep_columns": ["row"]})
    scored = score(keep, f"s3://{BUCKET}/in/rows.parquet", f"s3://{BUCKET}/out/scored.parquet")
    assert scored.rows == len(rows)
    out = pq.read_table(f"s3://{BUCKET}/out/scored.parquet").to_pandas().sort_values("row")
    proba = out[sorted(c for c in out.columns if c.startswith("proba_"))].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(proba, probs, rtol=1e-4, atol=1e-5)  # the same champion, the same answers


def test_search_state_on_s3_resumes(ray_s3: None, s3: object) -> None:
    cfg = _cfg(name="s3tune", tune={"num_samples": 2, "max_concurrent_trials": 2, "epochs_per_trial": 1})
    if not storage.exists(f"{RUN_DIR}/data/meta.json"):
        data.run(cfg)
    done = tune.run(cfg)
    found = keys(s3, BUCKET, "run/tune/s3tune/")
    assert "run/tune/s3tune/best_config.json" in found and "run/tune/s3tune/results.csv" in found
    assert any(k.rsplit("/", 1)[-1].startswith("experiment_state") for k in found)  # Tune's own state
    resumed = tune.run(cfg, resume=True)  # restored from the bucket: every trial had finished
    assert resumed.best_config == done.best_config and resumed.num_trials == done.num_trials


def test_a_bad_bucket_fails_first_in_one_line(
    s3: object, project_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabric.cli.stage import job_main  # what jobs/pipeline.py runs

    smoke = str(project_root / "jobs" / "configs" / "pipeline_smoke.yaml")
    assert job_main(pipeline.run, ["--config", smoke, "run_dir=s3://no-such-bucket/run"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "s3://no-such-bucket/run" in err and "bucket does not exist" in err
