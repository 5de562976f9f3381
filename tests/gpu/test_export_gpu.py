"""ONNX Runtime on the CUDA provider (onnxruntime-gpu on a GPU node): session choice, parity, the stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.config import load_config
from fabric.export import CUDA_PROVIDER, check_parity, choose_providers, export_onnx, run, session
from tests.unit.tracking import fixtures as fx

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda_provider() -> None:
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (install fabric[gpu]: onnxruntime-gpu)")


def test_session_runs_on_cuda_and_matches_torch(tmp_path: Path) -> None:
    data = fx.make_data(tmp_path / "run")
    module, _ = fx.load_model(fx.make_model(tmp_path / "model", data, steps=60))
    assert choose_providers()[0] == CUDA_PROVIDER
    sess = session(export_onnx(module, len(data.feature_names), tmp_path / "m.onnx"))
    assert sess.get_providers()[0] == CUDA_PROVIDER
    # cuBLAS may reorder float sums: a looser bound than the CPU default, still far below any real drift
    assert check_parity(module, sess, data.x["test"], tolerance=1e-3) < 1e-3


def test_stage_reports_the_cuda_provider(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "export.tolerance=1e-3"])
    data = fx.make_data(cfg.run_dir)
    r = run(cfg, fx.make_model(tmp_path / "model", data, steps=60))
    assert r.providers[0] == CUDA_PROVIDER and r.max_abs_diff <= 1e-3
