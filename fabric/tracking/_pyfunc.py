"""The registered model as an MLflow pyfunc: named columns -> preprocessor -> torch model -> predictions.

The model folder it wraps is the training stage's artifact folder (``model.pt``, ``model.json``) plus the
ingestion stage's ``preprocessor.json``. How those files are read belongs to ``fabric.models`` and
``fabric.data``, which sit above tracking in the dependency order; so, like an MLflow flavor's
``loader_module``, the logged model names its loaders as ``"module:function"`` strings in its
``model_config`` and resolves them when it is loaded (in the serving process, not when tracking is imported).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from fabric.errors import FabricError
from fabric.tracking._predict import predictions_frame

DEFAULT_MODEL_LOADER = "fabric.models:load_model"
"""``(model_dir) -> (torch.nn.Module, meta dict)``."""
DEFAULT_PREPROCESSOR_LOADER = "fabric.data:load_preprocessor"
"""``(preprocessor.json path) -> object with .transform(DataFrame) -> float32 array``."""
PREPROCESSOR_FILE = "preprocessor.json"


def load_entry(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise FabricError(f"loader {spec!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise FabricError(f"cannot load {spec!r}: {e}") from e


class FabricModel(mlflow.pyfunc.PythonModel):
    """Serves a fabric model folder; ``predict`` takes raw named columns and returns ``prediction``
    (class index or value) and, for classification, ``proba_<k>`` per class.
    """

    module: Any
    meta: dict[str, Any]
    preprocessor: Any | None

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        self.load(
            Path(context.artifacts["model_dir"]),
            config.get("model_loader", DEFAULT_MODEL_LOADER),
            config.get("preprocessor_loader", DEFAULT_PREPROCESSOR_LOADER),
        )

    def load(
        self,
        model_dir: Path,
        model_loader: str = DEFAULT_MODEL_LOADER,
        preprocessor_loader: str = DEFAULT_PREPROCESSOR_LOADER,
    ) -> FabricModel:
        """Load the folder's model (and its preprocessor, when the folder has one) with the named loaders."""
        self.module, self.meta = load_entry(model_loader)(model_dir)
        self.module.eval()
        pre = model_dir / PREPROCESSOR_FILE
        self.preprocessor = load_entry(preprocessor_loader)(pre) if pre.is_file() else None
        return self

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "classification"))

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta.get("feature_names") or [])

    def features(self, frame: pd.DataFrame, preprocessed: bool = False) -> np.ndarray:
        """Model inputs from named columns: the preprocessor's transform, or (``preprocessed``, or no
        preprocessor in the folder) the feature columns as they are, e.g. the data folder's splits."""
        if self.preprocessor is not None and not preprocessed:
            return np.asarray(self.preprocessor.transform(frame), dtype=np.float32)
        names = self.feature_names or list(frame.columns)
        missing = [c for c in names if c not in frame.columns]
        if missing:
            raise FabricError(f"input lacks feature column(s) {missing}")
        return frame[names].to_numpy(np.float32)

    def outputs(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Raw model outputs (logits or values) for a float32 feature matrix."""
        import torch

        parts = []
        with torch.inference_mode():
            for i in range(0, len(features), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(features[i : i + batch_size], dtype=np.float32))
                parts.append(self.module(chunk).float().cpu().numpy())
        if not parts:
            return np.zeros((0, int(self.meta.get("arch", {}).get("output_dim", 1))), dtype=np.float32)
        return np.concatenate(parts)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return predictions_frame(self.outputs(self.features(frame)), self.task)  # type: ignore[arg-type]
