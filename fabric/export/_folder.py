"""The ONNX file of a model folder, exported once next to it: what serving replicas and batch scoring load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ONNX_FILE = "model.onnx"


def export_folder(folder: str | Path, path: str | Path, opset: int = 18) -> Path:
    """Write the ONNX model of a model folder to ``path``: a torch module through torch's exporter, an
    XGBoost or LightGBM booster through onnxmltools (``model.json``'s ``framework`` says which).

    Input ``features`` (float32 ``[N, n_features]``), output ``output`` (logits or log-probabilities, or values).
    """
    from fabric.export._onnx import export_onnx
    from fabric.models import read_spec

    spec = read_spec(folder)
    if spec.get("framework", "torch") != "torch":
        from fabric.export._trees import export_trees

        return export_trees(folder, path, opset)
    from fabric.export._stage import input_width
    from fabric.models import load_model

    module, _ = load_model(folder)
    return export_onnx(module, input_width(spec), path, opset)


def onnx_for(folder: str | Path, opset: int = 18) -> Path:
    """The model folder's ``model.onnx``, exported from its artifact first when missing (into a temp folder
    when the model folder is read-only).

    Processes that start together (replicas, batch-scoring actors) may both export; each writes a private
    file and renames it into place, so readers never see half a file.
    """
    folder = Path(folder)
    target = folder / ONNX_FILE
    if target.is_file():
        return target
    if not os.access(folder, os.W_OK):
        target = Path(tempfile.mkdtemp(prefix="fabric-onnx-")) / ONNX_FILE
    tmp = target.with_name(f".{ONNX_FILE}.{os.getpid()}")
    export_folder(folder, tmp, opset)
    os.replace(tmp, target)
    return target
