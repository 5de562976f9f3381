"""Step caching on a real local Ray and MLflow: a repeated `fabric run` skips every stage, a changed export
section re-runs only export, a changed data source re-runs everything, and --force re-runs the stage named.
(Records whose outputs changed or vanished are covered without Ray in tests/unit/pipeline.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import pipeline
from fabric.config import PipelineConfig

pytestmark = pytest.mark.integration


def _cfg(run_dir: Path, **sections: dict[str, object]) -> PipelineConfig:
    doc: dict[str, object] = {
        "name": "sc",
        "run_dir": str(run_dir),
        "data": {"source": "builtin:wine"},
        # The smallest stages there are: what is proven is which of them run, not how well they train.
        "tune": {"num_samples": 1, "max_concurrent_trials": 1, "epochs_per_trial": 1},
        "train": {"epochs": 1, "num_workers": 1, "lr": 0.01},
        "track": {"model_name": "sc", "promotion": {"bootstrap_samples": 100}},
        "export": {"quantize": False},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}  # type: ignore[dict-item]
    return PipelineConfig.model_validate(doc)


def _ran(out: str) -> dict[str, bool]:
    """Which stages ran (True) or were cached (False), from the pipeline's output."""
    return {
        stage: f"== {stage}: cached" not in out
        for stage in pipeline.CACHED_STAGES
        if f"== {stage}" in out
    }


def _assert_lineage(uri: str, data: Path) -> None:
    """The registered version names the data that made it; its run lists the source and splits as dataset inputs."""
    from mlflow import MlflowClient

    from fabric.tracking import source_digest, split_digests

    client = MlflowClient(uri)
    version = client.get_model_version("sc", "1")
    digests = split_digests(data)
    assert version.tags["fabric.data.source"] == "builtin:wine"
    assert version.tags["fabric.data.source_digest"] == source_digest("builtin:wine")
    assert {s: version.tags[f"fabric.data.{s}_digest"] for s in digests} == digests
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    logged = {i.dataset.name: (i.dataset.digest, [t.value for t in i.tags]) for i in inputs}
    assert logged["train"] == (digests["train"][:36], ["training"]) and logged["test"][1] == ["testing"]
    assert "label" in inputs[-1].dataset.schema  # each split's columns, as MLflow's schema


def test_repeated_runs_skip_what_did_not_change(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = pipeline.run(_cfg(tmp_path))
    assert _ran(capsys.readouterr().out) == {"ingest": True, "tune": True, "export": True}
    assert first.stages["register"].version == "1"
    _assert_lineage(first.stages["register"].tracking_uri, tmp_path / "data")

    again = pipeline.run(_cfg(tmp_path))
    out = capsys.readouterr().out
    assert _ran(out) == {"ingest": False, "tune": False, "export": False}
    assert "training: nothing to do" in out
    assert again.stages["register"].registered is False and again.stages["register"].version == "1"
    # The cached results are the recorded ones, paths included.
    assert again.stages["ingest"] == first.stages["ingest"]
    assert again.stages["tune"].best_config == first.stages["tune"].best_config
    assert again.stages["export"].onnx_path == first.stages["export"].onnx_path

    pipeline.run(_cfg(tmp_path, export={"quantize": True}))  # only the export section changed
    out = capsys.readouterr().out
    assert _ran(out) == {"ingest": False, "tune": False, "export": True}
    assert "training: nothing to do" in out

    pipeline.run(_cfg(tmp_path, export={"quantize": True}), force=("ingest",))
    out = capsys.readouterr().out
    # Ingestion re-ran and wrote the same rows: everything downstream is still cached.
    assert _ran(out) == {"ingest": True, "tune": False, "export": False}

    # Other data (another model name: the wine champion cannot score breast-cancer rows).
    changed = pipeline.run(_cfg(tmp_path, data={"source": "builtin:breast_cancer"}, track={"model_name": "sc2"}))
    out = capsys.readouterr().out
    assert _ran(out) == {"ingest": True, "tune": True, "export": True}
    assert "training: nothing to do" not in out
    assert changed.stages["train"].run_key != first.stages["train"].run_key
