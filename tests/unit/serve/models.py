"""Tiny model folders for the serving tests, built the way training and ingestion write them.

Shared by the unit tests (FastAPI TestClient, no Ray) and tests/integration/test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RAW_COLUMNS = ["age", "income", "city"]
FEATURES = ["age", "income", "city=oslo", "city=paris"]
PREPROCESSOR = {
    "format_version": 1,
    "scaling": "standard",
    "columns": [
        {"name": "age", "kind": "numeric", "center": 40.0, "scale": 10.0, "fill": 40.0, "min": 0.0, "max": 95.0},
        {"name": "income", "kind": "numeric", "center": 50.0, "scale": 20.0, "fill": 50.0, "min": -40.0, "max": 140.0},
        {"name": "city", "kind": "categorical", "categories": ["oslo", "paris"]},
    ],
    "feature_names": FEATURES,
    "nullable": ["income", "city"],  # the training data held nulls in these, none in age
}


def make_model(
    folder: Path,
    *,
    task: str = "classification",
    num_classes: int = 3,
    hidden_size: int = 16,
    num_layers: int = 1,
    seed: int = 0,
    preprocessor: bool = True,
    onnx: bool = True,
) -> Path:
    """Write ``model.pt`` + ``model.json`` (+ ``preprocessor.json``, ``model.onnx``) into ``folder``."""
    import json

    import torch

    from fabric.models import build_mlp, model_spec, save_model

    torch.manual_seed(seed)
    output_dim = num_classes if task == "classification" else 1
    kwargs = {
        "input_dim": len(FEATURES),
        "output_dim": output_dim,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "dropout": 0.0,
    }
    model = build_mlp(**kwargs).eval()
    spec = model_spec(
        "mlp",
        kwargs,
        task=task,
        target="target",
        feature_names=FEATURES,
        num_classes=num_classes if task == "classification" else None,
    )
    save_model(folder, model, spec)
    if preprocessor:
        (folder / "preprocessor.json").write_text(json.dumps(PREPROCESSOR))
    if onnx:
        from fabric.export import export_onnx

        export_onnx(model, len(FEATURES), folder / "model.onnx")
    return folder


def reference(folder: Path, features: np.ndarray) -> np.ndarray:
    """The model's raw outputs computed directly with torch (what the endpoint must agree with)."""
    import torch

    from fabric.models import load_model

    module, _ = load_model(folder)
    with torch.inference_mode():
        return module(torch.from_numpy(np.asarray(features, dtype=np.float32))).numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def encode(rows: list[dict]) -> np.ndarray:
    """The features PREPROCESSOR makes of raw rows (computed by hand, independently of fabric.data)."""
    out = []
    for r in rows:
        age = 40.0 if r.get("age") is None else float(r["age"])
        income = 50.0 if r.get("income") is None else float(r["income"])
        out.append(
            [(age - 40) / 10, (income - 50) / 20, float(r.get("city") == "oslo"), float(r.get("city") == "paris")]
        )
    return np.asarray(out, dtype=np.float32)


def tensor_request(x: np.ndarray, name: str = "input", **extra: object) -> dict:
    """An OIP request with one FP32 tensor."""
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}], **extra}
