"""The user's own PyTorch module and own training loop through the whole lifecycle, on a real local Ray,
MLflow and Serve HTTP on 127.0.0.1, from the shipped examples (jobs/examples/own_module, own_loop, own_inputs).

One Ray (Serve's fast path) for the module. The own module (wine, 3 classes): ingest, a 2-trial search over
``model_args.width``, train, register, export with parity, serve; the served model answers an OIP v2 call and
``mlflow.pyfunc.load_model("models:/<name>@champion")`` in a fresh process elsewhere (the user's module is not
on its path: it travels in the model folder) predicts the same. The own loop (diabetes, regression): ingest,
a one-trial search and the training run the user's ``train_func``, register; the registry's pyfunc predicts
what the trained model does. The own module with an input signature (jobs/examples/own_inputs: category ids into
embeddings; Fair data, binary): train, register, export with parity, served beside the first app on the same
port. One fresh process loads the three registered models (one Python and MLflow start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from fabric import pipeline
from fabric.config import load_config
from fabric.runtime import free_port
from tests.unit.serve.serving import local_ray

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "jobs" / "examples"

PYFUNC = """
import json, sys
import mlflow, pandas as pd
out = []
for uri, model, rows in json.loads(sys.argv[1]):
    mlflow.set_tracking_uri(uri)
    out.append(mlflow.pyfunc.load_model(model).predict(pd.read_parquet(rows)).to_dict(orient="list"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("own-model")
    with local_ray(root / "home", fast_path=True):
        yield root


@pytest.fixture(scope="module")
def serve_port() -> int:
    """The one HTTP port of this Ray's Serve: each served app has its own route prefix on it."""
    return free_port()


def _pipeline(example: str, config: str, run_dir: Path, overrides: list[str]) -> pipeline.PipelineResult:
    """Run the shipped example's config from its folder (the working dir its import paths resolve in)."""
    folder = EXAMPLES / example
    cwd, path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    try:
        cfg = load_config(folder / config, [f"run_dir={run_dir}", *overrides])
        return pipeline.run(cfg)
    finally:
        os.chdir(cwd)
        sys.path[:] = path


def _raw_rows(run_dir: Path, n: int = 6) -> pd.DataFrame:
    """Rows as a client sends them: raw feature columns of ingestion's reference sample."""
    return pd.read_parquet(run_dir / "data" / "reference.parquet").drop(columns=["target"]).head(n)


def _pyfunc(calls: list[tuple[str, str, pd.DataFrame]], cwd: Path) -> list[dict[str, list[Any]]]:
    """``mlflow.pyfunc.load_model(model).predict(rows)`` for each ``(tracking uri, model, rows)``, in one fresh
    process in ``cwd``."""
    cwd.mkdir(exist_ok=True)
    jobs = []
    for i, (uri, model, rows) in enumerate(calls):
        rows.to_parquet(cwd / f"rows-{i}.parquet")  # the columns' types as they are (JSON would turn 365.0 into 365)
        jobs.append([uri, model, str(cwd / f"rows-{i}.parquet")])
    out = subprocess.run(
        [sys.executable, "-c", PYFUNC, json.dumps(jobs)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},  # neither the repo's examples nor the test's path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _served_probabilities(served: Any, rows: pd.DataFrame) -> np.ndarray:
    """The class probabilities an OIP v2 call of the served model gives for ``rows``."""
    r = httpx.post(
        f"{served.url}/v2/models/{served.model_name}/infer", json={"instances": rows.to_dict("records")}, timeout=60
    )
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    return np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(outputs["probabilities"]["shape"])


@pytest.fixture(scope="module")
def own_module(ray_serve: Path, serve_port: int) -> tuple[Path, pipeline.PipelineResult]:
    run_dir = ray_serve / "module-run"
    overrides = [
        "tune.num_samples=2",
        "tune.epochs_per_trial=3",
        "train.epochs=12",
        "train.num_workers=2",
        "serve.enabled=true",
        f"serve.port={serve_port}",
        "serve.replica_cpus=0",
        "monitor.enabled=false",
        "export.quantize=false",
        "track.model_name=own-module-test",
    ]
    return run_dir, _pipeline("own_module", "own_module_smoke.yaml", run_dir, overrides)


def test_own_module_is_searched_trained_and_its_model_json_names_it(
    own_module: tuple[Path, pipeline.PipelineResult],
) -> None:
    run_dir, result = own_module
    tuned = result.stages["tune"]
    assert set(tuned.best_config) == {"lr", "model_args.width"}
    trained = result.stages["train"]
    spec = json.loads((trained.model_path / "model.json").read_text())
    assert spec["builder"] == "my_models:build" and spec["num_classes"] == 3
    # the search's width reached the trained module; the rest of model_args are the config's
    assert spec["kwargs"] == {
        "input_dim": 13, "output_dim": 3, "width": tuned.best_config["model_args.width"], "blocks": 1, "dropout": 0.0
    }  # fmt: skip
    assert (trained.model_path / "code" / "my_models.py").is_file()
    assert trained.metrics["test_accuracy"] > 0.8 > trained.metrics["baseline_test_accuracy"]
    registered = result.stages["register"]
    assert registered.promoted and registered.champion_version == registered.version
    exported = result.stages["export"]
    assert exported.onnx_path.is_file() and exported.max_abs_diff <= exported.tolerance


@pytest.fixture(scope="module")
def own_loop(ray_serve: Path) -> tuple[Path, pipeline.PipelineResult]:
    run_dir = ray_serve / "loop-run"
    overrides = [
        "tune.enabled=true",  # one trial: the user's loop in a Tune trial's process
        "tune.num_samples=1",
        "tune.epochs_per_trial=2",
        "tune.scheduler.type=none",
        "tune.search_space={hidden_size: {type: choice, values: [16, 32]}}",
        "train.epochs=6",
        "train.num_workers=2",
        "export.enabled=false",
        "track.model_name=own-loop-test",
    ]
    return run_dir, _pipeline("own_loop", "own_loop_smoke.yaml", run_dir, overrides)


@pytest.fixture(scope="module")
def own_inputs(ray_serve: Path, serve_port: int) -> tuple[Path, pipeline.PipelineResult]:
    """The own module with an input signature (category ids into embeddings, beside the numbers), served."""
    run_dir = ray_serve / "inputs-run"
    overrides = [
        "train.epochs=3",
        "serve.enabled=true",
        f"serve.port={serve_port}",
        "serve.app_name=own-inputs",
        "serve.route_prefix=/inputs",
        "serve.replica_cpus=0",
        "monitor.enabled=false",
        "export.quantize=false",
        "track.model_name=own-inputs-test",
    ]
    return run_dir, _pipeline("own_inputs", "own_inputs_smoke.yaml", run_dir, overrides)


@pytest.fixture(scope="module")
def elsewhere(
    ray_serve: Path,
    own_module: tuple[Path, pipeline.PipelineResult],
    own_loop: tuple[Path, pipeline.PipelineResult],
    own_inputs: tuple[Path, pipeline.PipelineResult],
) -> dict[str, dict[str, list[Any]]]:
    """What the registry's pyfunc predicts, in a fresh process elsewhere, for the own modules' champions and the
    own loop's registered version, each on its run's raw rows."""
    module_reg = own_module[1].stages["register"]
    loop_reg = own_loop[1].stages["register"]
    inputs_reg = own_inputs[1].stages["register"]
    module, loop, inputs = _pyfunc(
        [
            (module_reg.tracking_uri, "models:/own-module-test@champion", _raw_rows(own_module[0])),
            (loop_reg.tracking_uri, f"models:/own-loop-test/{loop_reg.version}", _raw_rows(own_loop[0])),
            (inputs_reg.tracking_uri, "models:/own-inputs-test@champion", _raw_rows(own_inputs[0])),
        ],
        ray_serve / "elsewhere",
    )
    return {"module": module, "loop": loop, "inputs": inputs}


def test_own_module_served_and_from_the_registry_elsewhere_predict_the_same(
    own_module: tuple[Path, pipeline.PipelineResult], elsewhere: dict[str, dict[str, list[Any]]]
) -> None:
    run_dir, result = own_module
    served = result.stages["serve"]
    rows = _raw_rows(run_dir)
    probs = _served_probabilities(served, rows)
    assert probs.shape == (len(rows), 3)
    pyfunc = elsewhere["module"]
    np.testing.assert_allclose(np.stack([pyfunc[f"proba_{k}"] for k in range(3)], axis=1), probs, atol=1e-4)
    assert pyfunc["prediction"] == probs.argmax(axis=1).tolist()


def test_own_loop_trains_registers_and_the_registry_predicts_as_trained(
    own_loop: tuple[Path, pipeline.PipelineResult], elsewhere: dict[str, dict[str, list[Any]]]
) -> None:
    import torch

    from fabric.data import load_preprocessor
    from fabric.models import load_model

    run_dir, result = own_loop
    tuned = result.stages["tune"]
    assert tuned.num_trials == 1 and tuned.best_metrics["val_rmse"] > 0
    trained = result.stages["train"]
    assert json.loads((trained.model_path / "model.json").read_text())["kwargs"]["hidden_size"] in (16, 32)
    assert [h["epoch"] for h in trained.history] == [1, 2, 3, 4, 5, 6]
    assert trained.history[-1]["world_size"] == 2 and trained.history[-1]["val_rmse"] < trained.history[0]["val_rmse"]
    assert json.loads((trained.model_path / "model.json").read_text())["builder"] == "mlp"
    assert result.stages["register"].version
    rows = _raw_rows(run_dir)
    model, _ = load_model(trained.model_path)
    x = load_preprocessor(run_dir / "data" / "preprocessor.json").transform(rows)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(x, dtype=np.float32)))[:, 0].numpy()
    np.testing.assert_allclose(elsewhere["loop"]["prediction"], expected, rtol=1e-5, atol=1e-4)


def test_own_input_signature_is_trained_exported_served_and_loaded_elsewhere_alike(
    own_inputs: tuple[Path, pipeline.PipelineResult], elsewhere: dict[str, dict[str, list[Any]]]
) -> None:
    from fabric.models import load_model

    run_dir, result = own_inputs
    trained = result.stages["train"]
    assert trained.metrics["test_accuracy"] > trained.metrics["baseline_test_accuracy"]
    model, spec = load_model(trained.model_path)
    # the module took category ids for the two text columns of the Fair data, the numbers beside them
    assert model.net.input_signature["ids"] == {"columns": ["occupation", "occupation_husb"], "as": "ids"}
    assert spec["categorical"] == ["occupation", "occupation_husb"] and "columns" not in spec["kwargs"]
    exported = result.stages["export"]
    assert exported.max_abs_diff <= exported.tolerance
    served = result.stages["serve"]
    assert served.url.endswith("/inputs")
    rows = _raw_rows(run_dir)
    rows.loc[rows.index[0], "occupation"] = "astronaut"  # a category training never saw: id 0
    probs = _served_probabilities(served, rows)
    assert probs.shape == (len(rows), 2)
    pyfunc = elsewhere["inputs"]  # on the reference rows, the unseen category aside
    np.testing.assert_allclose(np.stack([pyfunc[f"proba_{k}"] for k in range(2)], axis=1)[1:], probs[1:], atol=1e-4)
