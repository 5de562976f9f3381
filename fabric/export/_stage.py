"""The export stage: ONNX model, parity with the model (torch, or the XGBoost / LightGBM booster), optional int8
model (torch models only), numbers in export.json."""

from __future__ import annotations

import logging
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric import storage
from fabric.errors import FabricError, MissingExtraError
from fabric.export._onnx import check_parity, export_onnx, ort_outputs, quantize, session
from fabric.tracking import CHAMPION, alias_version, data_dir, headline, read_split, resolve_model, score, tracking_uri

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fabric.config import PipelineConfig

PARITY_RANDOM_ROWS = 256


@dataclass
class ExportResult:
    """Where the ONNX files are and how they compare with torch and with each other."""

    model_dir: Path
    onnx_path: Path
    int8_path: Path | None
    report_path: Path
    providers: list[str]
    max_abs_diff: float
    tolerance: float
    parity_rows: int
    parity_data: str
    """``test split`` or ``random rows`` (no data folder next to the model)."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """``fp32`` (and ``int8``) scores on the test split."""
    int8_change: float | None = None
    """int8 minus fp32 in the headline metric (accuracy, or RMSE for regression)."""
    headline: str = "accuracy"
    int8_max_abs_diff: float | None = None
    sizes: dict[str, int] = field(default_factory=dict)


def input_width(meta: dict[str, Any]) -> int:
    """Feature count of a model from its ``model.json``: the builder's ``input_dim``, else its feature names."""
    for section in ("kwargs", "arch"):
        width = (meta.get(section) or {}).get("input_dim")
        if width:
            return int(width)
    names = meta.get("feature_names") or []
    if not names:
        raise FabricError("model.json names neither input_dim nor feature_names: cannot shape the ONNX input")
    return len(names)


def _features(cfg: PipelineConfig, meta: dict[str, Any], input_dim: int, seed: int) -> tuple[Any, Any, str]:
    """Test-split features and labels, or seeded random rows when the run has no data folder."""
    import numpy as np

    try:
        x, y, _ = read_split(data_dir(cfg.run_dir), "test", meta.get("feature_names") or None)
        return x, y, "test split"
    except FabricError as e:
        log.info(f"export: {e}; checking parity on {PARITY_RANDOM_ROWS} random rows instead")
        rng = np.random.default_rng(seed)
        return rng.standard_normal((PARITY_RANDOM_ROWS, input_dim), dtype=np.float32), None, "random rows"


def default_model(cfg: PipelineConfig) -> str | Path:
    """The registry's champion (``models:/<name>@champion``) when there is one, else the training
    stage's artifact ``<run_dir>/train/model`` (a URI run_dir's: pulled to its local copy)."""
    trained = storage.pull(cfg.run_dir, "train/model", "model.json")
    # Only look in a registry that exists: opening the default sqlite URI would create an empty store.
    if cfg.track.tracking_uri or (storage.local_root(cfg.run_dir) / "mlflow.db").is_file():
        try:
            from mlflow import MlflowClient

            if alias_version(MlflowClient(tracking_uri(cfg)), cfg.track.model_name, CHAMPION) is not None:
                return f"models:/{cfg.track.model_name}@{CHAMPION}"
        except (ImportError, MissingExtraError):
            pass
    return trained


def run(cfg: PipelineConfig, model_dir: str | Path | None = None) -> ExportResult:
    """Export a model to ONNX under ``<run_dir>/export``, check parity with the model, quantize if asked.

    With a URI run_dir the files are written in its local copy, then uploaded (``export.json`` last).

    A torch module goes through torch's exporter; an XGBoost or LightGBM booster through onnxmltools (its
    parity is checked against the booster's own predictions; int8 quantization does not apply to trees and
    is skipped with a note).

    Args:
        cfg: the pipeline config (``export`` section; parity runs on ``<run_dir>/data``'s test split).
        model_dir: a model folder (``model.pt`` + ``model.json``) or a registry URI such as
            ``models:/<name>@champion`` (resolved with :func:`fabric.tracking.resolve_model`);
            None exports :func:`default_model` (the champion, else the trained model).

    Returns:
        The files written and the numbers (also in ``export/export.json``).

    Raises:
        ParityError: ONNX Runtime differs from the model by more than ``cfg.export.tolerance``.
        MissingExtraError: onnx, onnxscript or onnxruntime (extra ``export``), or for trees onnxmltools
            (extra ``gbdt``), is not installed.
    """
    from fabric.models import load_model

    storage.check(cfg.run_dir)
    folder = resolve_model(model_dir if model_dir is not None else default_model(cfg), cfg)
    module, meta = load_model(folder)
    module.eval()
    input_dim = input_width(meta)
    task = meta.get("task", "classification")
    framework = meta.get("framework", "torch")
    out = storage.local_root(cfg.run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    opset = cfg.export.opset
    if framework == "torch":
        onnx_path = export_onnx(module, input_dim, out / "model.onnx", opset)
    else:
        from fabric.export._trees import MAX_CONVERTER_OPSET, export_trees

        onnx_path = export_trees(folder, out / "model.onnx", opset)
        opset = min(opset, MAX_CONVERTER_OPSET)
    sess = session(onnx_path)
    x, y, parity_data = _features(cfg, meta, input_dim, cfg.seed)
    if framework == "torch":
        diff = check_parity(module, sess, x, cfg.export.tolerance, str(onnx_path))
    else:
        from fabric.export._trees import check_tree_parity

        diff = check_tree_parity(module, sess, x, cfg.export.tolerance, task, str(onnx_path))
    fp32_out = ort_outputs(sess, x)
    metric, _ = headline(task)
    result = ExportResult(
        model_dir=folder,
        onnx_path=onnx_path,
        int8_path=None,
        report_path=out / "export.json",
        providers=list(sess.get_providers()),
        max_abs_diff=diff,
        tolerance=cfg.export.tolerance,
        parity_rows=len(x),
        parity_data=parity_data,
        headline=metric,
    )
    if y is not None:
        result.metrics["fp32"] = score(fp32_out, y, task)
    log.info(
        f"export: {onnx_path} (opset {opset}, {result.providers[0]}); parity vs {framework} on "
        f"{len(x)} rows ({parity_data}): max abs diff {diff:.3g} <= tolerance {cfg.export.tolerance:g}"
    )

    if cfg.export.quantize and framework != "torch":
        log.info(f"export: int8 quantization skipped: it applies to torch models, not {framework} trees")
    elif cfg.export.quantize:
        int8_path = quantize(onnx_path, out / "model.int8.onnx")
        int8_out = ort_outputs(session(int8_path), x)
        result.int8_path = int8_path
        result.int8_max_abs_diff = float(abs(int8_out.astype("float64") - fp32_out).max()) if len(x) else 0.0
        line = f"export: int8 {int8_path}: max abs diff vs fp32 {result.int8_max_abs_diff:.3g}"
        if y is not None:
            result.metrics["int8"] = score(int8_out, y, task)
            result.int8_change = result.metrics["int8"][metric] - result.metrics["fp32"][metric]
            line += (
                f"; test {metric} {result.metrics['fp32'][metric]:.4f} (fp32) -> "
                f"{result.metrics['int8'][metric]:.4f} (int8), change {result.int8_change:+.4f}"
            )
        log.info(line)

    result.sizes = {p.name: p.stat().st_size for p in (onnx_path, result.int8_path) if p is not None}
    report = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    report.update(opset=opset, task=task, framework=framework, seconds=round(time.perf_counter() - start, 3))
    result.report_path.write_text(json.dumps(report, indent=2))
    storage.publish(cfg.run_dir, "export", last="export.json")
    return result
