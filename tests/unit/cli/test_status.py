"""`fabric status`'s node table: host readings from Ray's node metrics, the dashboard's summary where a node's
metrics port did not answer (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.cli.status import GIB, node_rows
from fabric.monitor.resources import GpuReading, NodeReading

SUMMARY = [
    {
        "ip": "10.0.0.1",
        "cpu": 12.0,
        "mem": [16 * GIB, 12 * GIB, 25.0, 4 * GIB],
        "raylet": {"nodeId": "head", "state": "ALIVE", "isHeadNode": True, "resourcesTotal": {"CPU": 4.0}},
    },
    {
        "ip": "10.0.0.2",
        "cpu": 50.0,
        "mem": [32 * GIB, 16 * GIB, 50.0, 16 * GIB],
        "raylet": {"nodeId": "late", "state": "ALIVE", "resourcesTotal": {"CPU": 8.0, "GPU": 1.0}},
    },
]


def test_rows_take_ray_node_metrics_and_fall_back_to_the_summary() -> None:
    readings = {
        "late": NodeReading(
            node_id="late",
            ip="10.0.0.2",
            metrics_url="http://10.0.0.2:8080/metrics",
            cpu_percent=87.0,
            memory_used_bytes=20 * GIB,
            memory_total_bytes=32 * GIB,
            gpus=[GpuReading("0", "L4", 65.0, 3 * GIB, 24 * GIB)],
        ),
        "head": NodeReading(node_id="head", ip="10.0.0.1", metrics_url="-", error="no metrics at ..."),
    }
    header, head, late = node_rows(SUMMARY, None, readings)
    assert header[4:] == ("HOST CPU", "HOST MEM used/total", "GPUS")
    assert late[0] == "10.0.0.2" and late[4:] == ("87%", "20.0/32.0 GiB", "L4 65% 3.0/24.0GiB")
    assert head[0] == "10.0.0.1 (head)" and head[4:] == ("12%", "4.0/16.0 GiB", "-")  # the dashboard's reading


def test_with_a_config_status_shows_the_champion_and_the_data_that_made_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real MLflow store (sqlite) with a champion carrying lineage tags and a candidate without: the registry
    section names each, with the source, its digest and the splits' digests; no dashboard is needed for it."""
    from mlflow import MlflowClient

    from fabric.cli import main
    from fabric.config import PipelineConfig
    from fabric.tracking import data_lineage, tracking_uri

    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path / "run"), "track": {"model_name": "wine"}})
    assert data_lineage(cfg) == []  # no store yet: looking creates none
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri(cfg))
    client.create_registered_model("wine")
    tags = {
        "fabric.data.source": "s3://bucket/wine.csv",
        "fabric.data.source_digest": "0123456789abcdef0123",
        **{f"fabric.data.{s}_digest": f"{s}-digest-0123456789" for s in ("train", "val", "test")},
    }
    client.create_model_version("wine", str(tmp_path / "m1"), tags=tags)
    client.create_model_version("wine", str(tmp_path / "m2"))
    client.set_registered_model_alias("wine", "champion", "1")
    client.set_registered_model_alias("wine", "candidate", "2")

    champion, candidate = data_lineage(cfg)
    assert (champion["alias"], champion["version"]) == ("champion", "1")
    assert champion["data"]["source"] == tags["fabric.data.source"]
    assert (candidate["alias"], candidate["version"], candidate["data"]) == ("candidate", "2", {})

    code = main(["status", f"run_dir={tmp_path / 'run'}", "track.model_name=wine", "--address", "http://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 1  # no dashboard there: the cluster part fails after the registry part
    assert "wine@champion  v1" in out and "data    s3://bucket/wine.csv  digest 0123456789abcdef" in out
    assert "splits  train train-digest-012, val val-digest-01234, test test-digest-0123" in out
    assert "wine@candidate  v2" in out and "data: not recorded" in out
