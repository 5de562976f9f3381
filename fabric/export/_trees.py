"""ONNX export of a tree model folder with onnxmltools, shaped like every fabric ONNX model.

onnxmltools' converters give ``label`` + ``probabilities`` (classifiers, no ZipMap) or ``variable``
(regressors). fabric's ONNX models take ``features`` (float32 ``[N, n_features]``) and answer ``output``:
here ``Log(Max(probabilities, EPS))`` for classification and the values for regression, the contract of
``fabric.models.trees.TreeModel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fabric.errors import FabricError, require
from fabric.export._onnx import INPUT, OUTPUT

MAX_CONVERTER_OPSET = 15
"""The highest default-domain opset onnxmltools' tree converters emit; a higher ``export.opset`` is capped."""


def convert(booster: Any, framework: str, task: str, n_features: int, opset: int) -> Any:
    """The booster as an ONNX ``ModelProto`` with input ``features`` and output ``output``."""
    onnxmltools = require("onnxmltools", "gbdt")
    onnx = require("onnx", "export")
    from onnxmltools.convert.common.data_types import FloatTensorType

    from fabric.models.trees import EPS

    initial = [(INPUT, FloatTensorType([None, n_features]))]
    target = min(opset, MAX_CONVERTER_OPSET)
    try:
        if framework == "xgboost":
            # The converter reads features as f0, f1...: the booster's own names mean nothing to ONNX.
            anonymous = booster.copy()
            anonymous.feature_names = None
            anonymous.feature_types = None
            model = onnxmltools.convert_xgboost(anonymous, initial_types=initial, target_opset=target)
        else:
            model = onnxmltools.convert_lightgbm(booster, initial_types=initial, target_opset=target, zipmap=False)
    except Exception as e:  # the converters raise plain RuntimeError/ValueError/NotImplementedError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FabricError(f"ONNX conversion of the {framework} booster failed: {first}") from e

    graph = model.graph
    for node in graph.node:  # free the name ``output`` (LightGBM's regressor uses it inside its graph)
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == OUTPUT:
                    names[i] = f"converter_{OUTPUT}"
    for value in graph.output:
        if value.name == OUTPUT:
            value.name = f"converter_{OUTPUT}"
    produced = [o.name for o in graph.output]
    source = "probabilities" if task == "classification" else produced[0]
    if source not in produced:
        raise FabricError(f"the {framework} converter gave outputs {produced}, not {source!r}")
    helper = onnx.helper
    if task == "classification":
        graph.initializer.append(helper.make_tensor("fabric_eps", onnx.TensorProto.FLOAT, [], [EPS]))
        graph.node.extend([
            helper.make_node("Max", [source, "fabric_eps"], ["fabric_clipped"], name="fabric_clip"),
            helper.make_node("Log", ["fabric_clipped"], [OUTPUT], name="fabric_log"),
        ])  # fmt: skip
        width = None
    else:
        graph.node.append(helper.make_node("Identity", [source], [OUTPUT], name="fabric_output"))
        width = 1
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [None, width]))
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("", target))  # Max, Log, Identity
    onnx.checker.check_model(model)
    return model


def check_tree_parity(
    module: Any, sess: Any, features: Any, tolerance: float, task: str, path: str | None = None
) -> float:
    """The largest difference between the booster (through its module) and ONNX Runtime on ``features``:
    absolute for log-probabilities; for regression relative to the values' scale (``max(1, max |value|)``),
    since ONNX Runtime's tree ensemble adds the leaves in float32 and a large target's float32 step alone
    can exceed an absolute tolerance.

    Raises:
        ParityError: the difference is above ``tolerance``.
    """
    import numpy as np

    from fabric.export._onnx import ParityError, max_abs_diff, ort_outputs, torch_outputs

    ours, theirs = torch_outputs(module, features), ort_outputs(sess, features)
    diff = max_abs_diff(ours, theirs)
    if task == "regression" and ours.size:
        diff /= max(1.0, float(np.max(np.abs(ours))))
    if not diff <= tolerance:  # NaN fails too
        raise ParityError(diff, tolerance, len(features), path)
    return diff


def export_trees(folder: str | Path, path: str | Path, opset: int = 18) -> Path:
    """Write the ONNX model of the tree model folder ``folder`` (``model.json`` + booster file) to ``path``.

    Raises:
        FabricError: the folder is not a tree model, or the converter refused the booster.
        MissingExtraError: onnxmltools (``gbdt``) or onnx (``export``) is not installed.
    """
    onnx = require("onnx", "export")
    from fabric.models import load_model

    module, spec = load_model(folder)
    framework = spec.get("framework")
    names = spec.get("feature_names") or []
    if not names:
        raise FabricError(f"{folder}/model.json lists no feature_names: cannot shape the ONNX input")
    model = convert(module.booster, str(framework), str(spec.get("task", "classification")), len(names), opset)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out
