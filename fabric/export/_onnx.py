"""ONNX export of a torch model, ONNX Runtime sessions, the torch parity check and int8 quantization."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.errors import FabricError, require

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime
    import torch

INPUT = "features"
OUTPUT = "output"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ParityError(FabricError):
    """ONNX Runtime's outputs differ from torch's by more than the tolerance."""

    def __init__(self, max_abs_diff: float, tolerance: float, rows: int, path: str | None = None) -> None:
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.rows = rows
        self.path = path
        where = f" for {path}" if path else ""
        super().__init__(
            f"ONNX Runtime vs torch parity failed{where}: max abs diff {max_abs_diff:.3g} over {rows} rows "
            f"> tolerance {tolerance:.3g}"
        )


def choose_providers(available: list[str] | None = None) -> list[str]:
    """``[CUDA, CPU]`` when onnxruntime offers CUDA (onnxruntime-gpu on a GPU node), else ``[CPU]``."""
    if available is None:
        available = list(require("onnxruntime", "export").get_available_providers())
    return [CUDA, CPU] if CUDA in available else [CPU]


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notices that are not about this model (missing torchvision ops, tree-spec deprecations)."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def export_onnx(module: torch.nn.Module, input_dim: int, path: str | Path, opset: int = 18) -> Path:
    """Write ``module`` as a single-file ONNX model with a dynamic batch dimension.

    Input ``features`` (float32, ``[batch, input_dim]``), output ``output``. Uses torch's default
    (dynamo, onnxscript-based) exporter.

    Raises:
        MissingExtraError: onnx/onnxscript (extra ``export``) is not installed.
    """
    import torch

    require("onnx", "export")
    require("onnxscript", "export")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    example = torch.zeros(2, input_dim, dtype=torch.float32)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                module,
                (example,),
                str(out),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                external_data=False,  # one self-contained file: MLP weights are far below protobuf's 2 GiB
                verbose=False,
            )
    except Exception as e:  # the exporter raises its own error types; keep the first line, chain the rest
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FabricError(f"ONNX export to {out} failed: {first}") from e
    finally:
        module.train(was_training)
    return out


def session(
    path: str | Path, providers: list[str] | None = None, threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CUDA provider when present, else CPU.

    Args:
        path: the ``.onnx`` file.
        providers: explicit provider list (default: :func:`choose_providers`).
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
    """
    ort = require("onnxruntime", "export")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: no per-node placement notes in job logs
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or choose_providers())


def ort_outputs(sess: onnxruntime.InferenceSession, features: np.ndarray) -> np.ndarray:
    """Run ``sess`` on a float32 feature matrix."""
    import numpy as np

    name = sess.get_inputs()[0].name
    return np.asarray(sess.run(None, {name: np.ascontiguousarray(features, dtype=np.float32)})[0])


def torch_outputs(module: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Eager torch outputs for the same matrix (eval mode, no autograd)."""
    import numpy as np
    import torch

    module.eval()
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).float().numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    if a.shape != b.shape:
        raise FabricError(f"output shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def check_parity(
    module: torch.nn.Module,
    sess: onnxruntime.InferenceSession,
    features: np.ndarray,
    tolerance: float,
    path: str | None = None,
) -> float:
    """Max abs difference between torch and ONNX Runtime on ``features``.

    Raises:
        ParityError: the difference is above ``tolerance``.
    """
    diff = max_abs_diff(torch_outputs(module, features), ort_outputs(sess, features))
    if not diff <= tolerance:  # NaN fails too
        raise ParityError(diff, tolerance, len(features), path)
    return diff


def quantize(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization (int8 weights, activations quantized at run time) of ``src`` into ``dst``."""
    require("onnxruntime", "export")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        # ONNX Runtime's recommended pre-pass: shape inference and graph clean-up before quantizing.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
    return dst


def onnx_ops(path: str | Path) -> list[str]:
    """The op types of a model's graph, in order (e.g. to see MatMulInteger after quantization)."""
    onnx: Any = require("onnx", "export")
    return [n.op_type for n in onnx.load(str(path)).graph.node]
