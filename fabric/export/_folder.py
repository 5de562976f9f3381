"""The ONNX file of a model folder, exported once next to it: what serving replicas and batch scoring load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ONNX_FILE = "model.onnx"


def onnx_for(folder: str | Path, opset: int = 18) -> Path:
    """The model folder's ``model.onnx``, exported from its artifact first when missing (into a temp folder
    when the model folder is read-only).

    Processes that start together (replicas, batch-scoring actors) may both export; each writes a private
    file and renames it into place, so readers never see half a file.
    """
    from fabric.export._onnx import export_onnx
    from fabric.models import load_model, read_spec

    folder = Path(folder)
    target = folder / ONNX_FILE
    if target.is_file():
        return target
    module, _ = load_model(folder)
    n = len(read_spec(folder).get("feature_names") or [])
    if not os.access(folder, os.W_OK):
        target = Path(tempfile.mkdtemp(prefix="fabric-onnx-")) / ONNX_FILE
    tmp = target.with_name(f".{ONNX_FILE}.{os.getpid()}")
    export_onnx(module, n, tmp, opset)
    os.replace(tmp, target)
    return target
