"""Export: ONNX export of a trained model (a torch module, or an XGBoost / LightGBM booster through
onnxmltools), ONNX Runtime sessions (CUDA provider when present), parity with the model, and dynamic int8
quantization with its accuracy change.

Importing this package loads neither torch nor onnx nor onnxruntime; they load when a function runs.
"""

from fabric.export._onnx import (
    CPU as CPU_PROVIDER,
    CUDA as CUDA_PROVIDER,
    ParityError,
    check_parity,
    choose_providers,
    export_onnx,
    max_abs_diff,
    onnx_ops,
    ort_outputs,
    quantize,
    session,
    torch_outputs,
)
from fabric.export._folder import ONNX_FILE, export_folder, onnx_for
from fabric.export._stage import ExportResult, default_model, run

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "ExportResult",
    "ONNX_FILE",
    "ParityError",
    "check_parity",
    "choose_providers",
    "default_model",
    "export_folder",
    "export_onnx",
    "max_abs_diff",
    "onnx_for",
    "onnx_ops",
    "ort_outputs",
    "quantize",
    "run",
    "session",
    "torch_outputs",
]
