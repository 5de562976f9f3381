"""ONNX export, ONNX Runtime sessions, parity with torch and int8 quantization, on real files."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fabric.config import PipelineConfig, load_config
from fabric.export import (
    ParityError,
    check_parity,
    choose_providers,
    export_onnx,
    onnx_ops,
    ort_outputs,
    run,
    session,
)
from tests.unit.tracking import fixtures as fx


@dataclass
class Setup:
    cfg: PipelineConfig
    data: fx.Dataset
    model_dir: Path


def _cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    return load_config(None, [f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("export")
    cfg = _cfg(root / "run", "export.quantize=true")
    data = fx.make_data(cfg.run_dir)
    return Setup(cfg, data, fx.make_model(root / "model", data, steps=120, hidden_size=32))


def _module(model_dir: Path) -> torch.nn.Module:
    module, _ = fx.load_model(model_dir)
    return module


def test_export_has_dynamic_batch_and_matches_torch_on_cpu(setup: Setup, tmp_path: Path) -> None:
    module = _module(setup.model_dir)
    path = export_onnx(module, len(setup.data.feature_names), tmp_path / "m.onnx")
    sess = session(path)
    assert sess.get_providers() == ["CPUExecutionProvider"]  # no CUDA provider on this machine
    assert sess.get_inputs()[0].name == "features" and sess.get_inputs()[0].shape[0] == "batch"
    for rows in (1, 64, len(setup.data.x["test"])):
        x = setup.data.x["test"][:rows]
        assert ort_outputs(sess, x).shape == (rows, 2)
        assert check_parity(module, sess, x, tolerance=1e-4) < 1e-4


def test_provider_choice() -> None:
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert choose_providers() == ["CPUExecutionProvider"]


def test_broken_parity_raises(setup: Setup, tmp_path: Path) -> None:
    module = _module(setup.model_dir)
    sess = session(export_onnx(module, len(setup.data.feature_names), tmp_path / "m.onnx"))
    drifted = copy.deepcopy(module)
    with torch.no_grad():
        next(drifted.parameters()).add_(0.05)  # torch no longer computes what the ONNX file does
    with pytest.raises(ParityError) as err:
        check_parity(drifted, sess, setup.data.x["test"], tolerance=1e-4, path="m.onnx")
    e = err.value
    assert e.max_abs_diff > 1e-4 and e.tolerance == 1e-4 and e.rows == len(setup.data.x["test"])
    assert "max abs diff" in str(e) and "m.onnx" in str(e)
    assert pickle.loads(pickle.dumps(e)).max_abs_diff == e.max_abs_diff  # crosses Ray boundaries intact


def test_run_exports_quantizes_and_reports(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    r = run(setup.cfg, setup.model_dir)
    out_dir = Path(setup.cfg.run_dir) / "export"
    assert r.onnx_path == out_dir / "model.onnx" and r.int8_path == out_dir / "model.int8.onnx"
    assert r.onnx_path.is_file() and r.int8_path.is_file()
    assert r.providers == ["CPUExecutionProvider"]
    assert r.parity_data == "test split" and r.parity_rows == len(setup.data.x["test"])
    assert r.max_abs_diff <= setup.cfg.export.tolerance
    assert "MatMulInteger" in onnx_ops(r.int8_path) and "MatMulInteger" not in onnx_ops(r.onnx_path)
    assert r.sizes["model.int8.onnx"] < r.sizes["model.onnx"]
    fp32, int8 = r.metrics["fp32"]["accuracy"], r.metrics["int8"]["accuracy"]
    assert fp32 > 0.85 and r.int8_change == pytest.approx(int8 - fp32) and abs(r.int8_change) < 0.1
    report = json.loads(r.report_path.read_text())
    assert report["max_abs_diff"] == r.max_abs_diff and report["int8_change"] == r.int8_change
    assert report["opset"] == setup.cfg.export.opset and report["headline"] == "accuracy"
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "change" in printed


def test_run_raises_when_parity_breaks(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fabric.export._stage as stage

    real = stage.export_onnx

    def export_a_drifted_copy(module: torch.nn.Module, *args, **kwargs) -> Path:
        drifted = copy.deepcopy(module)
        with torch.no_grad():
            next(drifted.parameters()).mul_(1.5)
        return real(drifted, *args, **kwargs)

    monkeypatch.setattr(stage, "export_onnx", export_a_drifted_copy)
    cfg = _cfg(tmp_path / "run")
    fx.make_data(cfg.run_dir)
    with pytest.raises(ParityError):
        run(cfg, setup.model_dir)
    assert not (Path(cfg.run_dir) / "export" / "export.json").exists()


def test_regression_reports_rmse_change(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", "export.quantize=true", "data.task=regression")
    data = fx.make_data(cfg.run_dir, task="regression")
    r = run(cfg, fx.make_model(tmp_path / "model", data, steps=80))
    assert r.headline == "rmse" and set(r.metrics["int8"]) == {"rmse", "mae"}
    assert r.int8_change == pytest.approx(r.metrics["int8"]["rmse"] - r.metrics["fp32"]["rmse"])


def test_without_a_data_folder_parity_uses_random_rows(setup: Setup, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", "export.quantize=true")
    r = run(cfg, setup.model_dir)
    assert r.parity_data == "random rows" and r.parity_rows == 256
    assert r.metrics == {} and r.int8_change is None and r.int8_max_abs_diff is not None
    assert np.isfinite(r.max_abs_diff)


def test_export_job_exports_the_registry_champion(tmp_path: Path, project_root: Path) -> None:
    import importlib.util

    from fabric import tracking
    from fabric.export import default_model

    overrides = [f"run_dir={tmp_path / 'run'}", "track.model_name=exp-test", "export.quantize=true"]
    cfg = _cfg(tmp_path / "run", *overrides[1:])
    data = fx.make_data(cfg.run_dir)
    assert default_model(cfg) == Path(cfg.run_dir) / "train" / "model"  # no registry yet: the trained model
    assert not (Path(cfg.run_dir) / "mlflow.db").exists()  # and looking did not create one
    reg = tracking.run(cfg, fx.train_result(fx.make_model(tmp_path / "model", data, steps=60)), model_loader=fx.MODEL_LOADER)
    assert default_model(cfg) == reg.model_uri == "models:/exp-test@champion"

    r = run(cfg, reg.model_uri)
    assert r.model_dir == tracking.resolve_model(reg.model_uri, cfg)
    assert (r.model_dir / "preprocessor.json").is_file() and r.max_abs_diff <= cfg.export.tolerance

    spec = importlib.util.spec_from_file_location("export_job", project_root / "jobs" / "export.py")
    job = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(job)  # type: ignore[union-attr]
    assert job.main(overrides) == 0
    report = json.loads((Path(cfg.run_dir) / "export" / "export.json").read_text())
    assert report["model_dir"] == str(r.model_dir) and report["int8_path"].endswith("model.int8.onnx")
    assert job.main([f"run_dir={tmp_path / 'empty'}"]) == 1  # nothing trained there: one error line, exit 1
