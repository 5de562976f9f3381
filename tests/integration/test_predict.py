"""`fabric predict` on a real local Ray and MLflow registry: the MLP (multi-class wine, trained and registered
by the pipeline's stages) and XGBoost (regression on diabetes) scored from CSV and parquet files.

Predictions equal the registry's pyfunc on the same rows; ids are kept; the champion is the default, and
``--version``/``--alias`` pick others; a file with bad rows names them and leaves no output. One Ray for the
module; two trainings (~20 s each on an idle machine).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fabric.cli import main
from fabric.config import PipelineConfig, load_config
from fabric.data import load_builtin

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Again:
    """A training result registered once more (no run key: a new version of the same model)."""

    model_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""


def _overrides(root: Path, name: str) -> list[str]:
    return [f"run_dir={root / name}", f"track.model_name={name}", f"track.experiment={name}", "tune.enabled=false"]


@pytest.fixture(scope="module")
def models(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``wine``: an MLP registered twice (v1, then v2 the champion); ``diabetes``: an XGBoost regressor (v1)."""
    from fabric import data, tracking, train

    root = tmp_path_factory.mktemp("predict")
    wine = load_config(
        None,
        [*_overrides(root, "wine"), "data.source=builtin:wine", "train.epochs=5", "train.batch_size=16",
         "train.lr=0.01", "train.num_workers=1"],
    )  # fmt: skip
    data.run(wine)
    trained = train.run(wine)
    first = tracking.run(wine, trained)
    second = tracking.run(wine, _Again(Path(trained.model_path)))
    assert (first.version, second.version, second.champion_version) == ("1", "2", "2"), second.decision

    out: dict[str, Any] = {"root": root, "wine": wine}
    if importlib.util.find_spec("xgboost") is not None:
        diabetes = load_config(
            None,
            [*_overrides(root, "diabetes"), "data.source=builtin:diabetes", "data.task=regression",
             "train.framework=xgboost", "train.num_workers=1", "train.num_boost_round=10"],
        )  # fmt: skip
        data.run(diabetes)
        tracking.run(diabetes, train.run(diabetes))
        out["diabetes"] = diabetes
    return out


def _rows(name: str) -> pd.DataFrame:
    df = load_builtin(name)
    df.insert(0, "id", np.arange(1000, 1000 + len(df)))
    return df


def _pyfunc(cfg: PipelineConfig, uri: str, rows: pd.DataFrame) -> pd.DataFrame:
    from fabric.tracking import tracking_uri
    from fabric.tracking._registry import using_tracking_uri

    with using_tracking_uri(tracking_uri(cfg)) as mlflow:
        return mlflow.pyfunc.load_model(uri).predict(rows)


def _cli(cfg: PipelineConfig, *args: str) -> int:
    return main(["predict", f"run_dir={cfg.run_dir}", f"track.model_name={cfg.track.model_name}", *args])


def test_csv_and_parquet_score_like_the_registered_model(
    models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, rows = models["wine"], _rows("wine")
    rows.to_csv(tmp_path / "wine.csv", index=False)
    rows.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "wine.parquet", index=False)
    expected = _pyfunc(cfg, "models:/wine@champion", rows.drop(columns=["id", "target"]))
    expected.index = rows["id"]

    assert _cli(cfg, "--input", str(tmp_path / "wine.csv"), "--output", str(tmp_path / "a.parquet"),
                "predict.keep_columns=[id]") == 0  # fmt: skip
    assert f"predict: {len(rows)} rows -> {tmp_path / 'a.parquet'} (parquet; wine v2," in capsys.readouterr().out
    from_csv = pd.read_parquet(tmp_path / "a.parquet")
    assert list(from_csv.columns) == [
        "id", "prediction", "label", "proba_0", "proba_1", "proba_2", "model_name", "model_version"
    ]  # fmt: skip
    # a CSV output, from parquet input, with the function the CLI calls
    from fabric.predict import score

    keep = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"keep_columns": ["id", "target"]})})
    result = score(keep, str(tmp_path / "wine.parquet"), str(tmp_path / "b.csv"))
    assert (result.rows, result.model_version, result.format) == (len(rows), "2", "csv")
    from_parquet = pd.concat(pd.read_csv(f) for f in sorted((tmp_path / "b.csv").iterdir()))

    for out in (from_csv, from_parquet):
        assert len(out) == len(rows) and sorted(out["id"]) == sorted(rows["id"])
        out = out.set_index("id").loc[rows["id"]]
        probs = out[["proba_0", "proba_1", "proba_2"]].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(probs, expected[["proba_0", "proba_1", "proba_2"]].to_numpy(), atol=1e-5)
        assert out["prediction"].tolist() == expected["prediction"].tolist()
        assert out["label"].astype(str).tolist() == expected["prediction"].astype(str).tolist()  # classes 0, 1, 2
        assert set(out["model_name"]) == {"wine"} and set(out["model_version"].astype(str)) == {"2"}
    assert from_parquet.set_index("id").loc[rows["id"], "target"].tolist() == rows["target"].tolist()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_version_and_alias_pick_the_model(
    models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = models["wine"]
    _rows("wine").head(20).to_parquet(tmp_path / "few.parquet", index=False)
    for flag, value, version in (("--version", "1", "1"), ("--alias", "candidate", "2")):
        out = tmp_path / f"by-{value}"
        assert _cli(cfg, "--input", str(tmp_path / "few.parquet"), "--output", str(out), flag, value) == 0
        assert set(pd.read_parquet(out)["model_version"]) == {version}
    capsys.readouterr()
    assert _cli(cfg, "--input", str(tmp_path / "few.parquet"), "--output", str(tmp_path / "x"), "--alias", "nope") == 2
    assert "no version of wine has the alias 'nope'" in capsys.readouterr().err
    assert _cli(cfg, "--input", str(tmp_path / "few.parquet"), "--output", str(tmp_path / "x"), "--version", "9") == 2
    assert not (tmp_path / "x").exists()


def test_bad_rows_are_named_and_nothing_is_written(
    models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, rows = models["wine"], _rows("wine")
    rows = rows.astype({"alcohol": object, "magnesium": object})
    rows.loc[5, "alcohol"] = None  # the training data had no nulls in it
    rows.loc[150, "magnesium"] = "lots"  # numeric in training; past the CSV reader's type inference
    rows.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "scored.parquet"
    assert _cli(cfg, "--input", str(tmp_path / "bad.csv"), "--output", str(out), "predict.keep_columns=[id]") == 2
    err = capsys.readouterr().err
    assert "2 row(s) fail the model's input checks; nothing was written to" in err
    assert "column 'alcohol', 1 row(s): null" in err and "column 'magnesium', 1 row(s): not a number" in err
    assert "'row': 6, 'column': 'alcohol'" in err and "'id': 1005" in err
    assert "'row': 151, 'column': 'magnesium', 'value': 'lots'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]  # no output, no staging folder


def test_xgboost_regression_through_the_job_entrypoint(models: dict[str, Any], tmp_path: Path) -> None:
    if "diabetes" not in models:
        pytest.skip("xgboost is not installed")
    cfg, rows = models["diabetes"], _rows("diabetes")
    rows.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    spec = importlib.util.spec_from_file_location("jobs_predict", ROOT / "jobs" / "predict.py")
    job = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(job)  # type: ignore[union-attr]
    out = tmp_path / "scored.parquet"
    argv = [f"run_dir={cfg.run_dir}", f"track.model_name={cfg.track.model_name}",
            f"predict.input={tmp_path / 'rows.jsonl'}", f"predict.output={out}", "predict.version=1",
            "predict.keep_columns=[id]"]  # fmt: skip
    assert job.main(argv) == 0
    scored = pd.read_parquet(out).set_index("id").loc[rows["id"]]
    assert list(scored.columns) == ["prediction", "model_name", "model_version"]
    expected = _pyfunc(cfg, "models:/diabetes/1", rows.drop(columns=["id", "target"]))
    np.testing.assert_allclose(scored["prediction"].to_numpy(), expected["prediction"].to_numpy(), rtol=1e-4, atol=1e-3)
