"""Engines: what turns a float32 feature matrix into model outputs inside a replica.

``Engine`` is the seam (``start``, ``predict``, ``check_health``, ``shutdown``, after Ray Serve LLM's
``LLMEngine``): ONNX Runtime (the default; CUDA provider when present) and eager PyTorch implement it for
tabular models, and other engines join by subclassing. Engines know nothing of HTTP or batching.

:func:`load_version` finds a version's files: the model folder (``models:/name@alias`` resolved through the
registry, or a path), its ``model.json``, the preprocessor for named-column input, and the ONNX file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fabric import storage
from fabric.errors import FabricError, UsageError

if TYPE_CHECKING:
    from fabric.config import PipelineConfig
    from fabric.config.serve import ModelVersion
    from fabric.data import Preprocessor

ONNX_FILE = "model.onnx"
PREPROCESSOR_FILE = "preprocessor.json"


class Engine(abc.ABC):
    """Runs one model version. ``predict`` takes ``[rows, features]`` float32 and returns ``[rows, outputs]``."""

    platform: ClassVar[str] = "unknown"
    """The platform string of OIP model metadata (Triton's names)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Load the model (called once, in the replica, before any request)."""

    @abc.abstractmethod
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw model outputs (logits, or values for regression) for a float32 matrix."""

    def check_health(self) -> None:
        """Raise when the engine cannot serve; the default runs one zero row through ``predict``."""
        n = int(getattr(self, "n_features", 0))
        if n:
            out = self.predict(np.zeros((1, n), dtype=np.float32))
            if not np.all(np.isfinite(out)):
                raise FabricError(f"{type(self).__name__} returns non-finite outputs for a zero row")

    def shutdown(self) -> None:
        """Release what ``start`` took."""


class OnnxEngine(Engine):
    """ONNX Runtime on the exported ``model.onnx`` (via :func:`fabric.export.session`)."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: str | Path, n_features: int, threads: int = 1) -> None:
        self.path = Path(path)
        self.n_features = n_features
        self.threads = threads
        self._session: Any = None
        self._input = "input"

    def start(self) -> None:
        from fabric.export import session

        self._session = session(self.path, threads=self.threads)
        self._input = self._session.get_inputs()[0].name
        self.providers = list(self._session.get_providers())

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: features})[0]

    def shutdown(self) -> None:
        self._session = None


class TorchEngine(Engine):
    """The eager PyTorch module from ``model.pt`` + ``model.json`` (:func:`fabric.models.load_model`)."""

    platform = "pytorch_libtorch"

    def __init__(self, folder: str | Path, n_features: int, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.n_features = n_features
        self.threads = threads
        self._module: Any = None
        self._torch: Any = None

    def start(self) -> None:
        import torch

        from fabric.models import load_model

        torch.set_num_threads(self.threads)  # per process: a replica is its own process
        self._module, _ = load_model(self.folder)
        self._torch = torch

    def predict(self, features: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self._module(self._torch.from_numpy(features)).numpy()

    def shutdown(self) -> None:
        self._module = None


ENGINES: dict[str, type[Engine]] = {"onnx": OnnxEngine, "torch": TorchEngine}


# --------------------------------------------------------------------------- a version's files


@dataclass
class ModelSchema:
    """What the HTTP layer needs to know about a model: its features and what its outputs mean."""

    feature_names: list[str]
    """Encoded feature columns, in matrix order (the tensor input's second dimension)."""
    task: str
    output_dim: int
    num_classes: int | None
    preprocessor: Preprocessor | None = None
    """Turns raw named columns into features; None: named input must use the encoded feature names."""

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def input_columns(self) -> list[str]:
        """The columns named-column input must carry."""
        return list(self.preprocessor.input_columns) if self.preprocessor is not None else list(self.feature_names)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], preprocessor: Preprocessor | None = None) -> ModelSchema:
        """Read ``model.json`` (``kwargs`` of the builder, or the older ``arch``)."""
        arch = spec.get("kwargs") or spec.get("arch") or {}
        names = list(spec.get("feature_names") or [])
        n = int(arch.get("input_dim") or len(names))
        if not names:
            names = [f"x{i}" for i in range(n)]
        if len(names) != n:
            raise FabricError(f"model.json lists {len(names)} feature names but input_dim is {n}")
        task = spec.get("task", "classification")
        num_classes = spec.get("num_classes")
        output_dim = int(arch.get("output_dim") or (num_classes if task == "classification" else 1) or 1)
        return cls(names, task, output_dim, int(num_classes) if num_classes else None, preprocessor)


@dataclass
class VersionFiles:
    """A version's model folder, parsed ``model.json`` and the files beside it."""

    name: str
    folder: Path
    spec: dict[str, Any]
    preprocessor_path: Path | None
    onnx_path: Path | None


def read_model_json(folder: Path) -> dict[str, Any]:
    """``model.json`` of a model folder, read without importing torch (``fabric.models`` does), so an
    ONNX Runtime replica never loads torch."""
    import json

    file = folder / "model.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"no model.json in {folder}: not a fabric model folder") from None
    except ValueError as e:
        raise UsageError(f"{file} is not valid JSON: {e}") from None


def _preprocessor_for(folder: Path, spec: dict[str, Any], run_dir: str) -> Path | None:
    """``preprocessor.json`` in the model folder (registry models carry it), else the run's data folder's
    when its features are the model's (a model trained on another run's data must not borrow it); a URI
    run_dir's file is downloaded first."""
    own = folder / PREPROCESSOR_FILE
    if own.is_file():
        return own
    shared = storage.fetch(run_dir, f"data/{PREPROCESSOR_FILE}")
    if shared.is_file():
        import json

        try:
            names = json.loads(shared.read_text()).get("feature_names")
        except ValueError:
            return None
        if names and names == list(spec.get("feature_names") or []):
            return shared
    return None


def _exported_for(folder: Path, run_dir: str) -> Path | None:
    """The export stage's ``<run_dir>/export/model.onnx`` when its ``export.json`` says it was made from
    this very model folder (the pipeline exports the registered version it then serves); a URI run_dir's
    export folder is pulled first."""
    import json

    report = storage.pull(run_dir, "export", "export.json") / "export.json"
    try:
        info = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    source, onnx = info.get("model_dir"), info.get("onnx_path")
    if not source or not onnx or Path(source).resolve() != folder:
        return None
    path = Path(onnx) if Path(onnx).is_absolute() else storage.local_root(run_dir).parent / onnx
    for candidate in (path, report.parent / ONNX_FILE):
        if candidate.is_file():
            return candidate
    return None


def locate(version: ModelVersion, cfg: PipelineConfig) -> VersionFiles:
    """Resolve a version's ``model_uri`` to local files (downloading a registry version once).

    Raises:
        UsageError: nothing at the path, or an unknown registry name, alias or version.
    """
    from fabric.tracking import resolve_model

    folder = Path(resolve_model(version.model_uri, cfg)).resolve()
    spec = read_model_json(folder)
    onnx = Path(version.onnx_path) if version.onnx_path else folder / ONNX_FILE
    if version.onnx_path and not onnx.is_file():
        raise UsageError(f"version {version.name}: onnx_path {onnx} does not exist")
    if not onnx.is_file():
        onnx = _exported_for(folder, cfg.run_dir) or onnx
    return VersionFiles(
        version.name,
        folder,
        spec,
        _preprocessor_for(folder, spec, cfg.run_dir),
        onnx if onnx.is_file() else None,
    )


@dataclass
class LoadedVersion:
    """A started engine and the schema of its model."""

    name: str
    engine: Engine
    schema: ModelSchema
    folder: Path


def load_version(version: ModelVersion, cfg: PipelineConfig) -> LoadedVersion:
    """Find a version's files, build its engine and start it (in the replica)."""
    files = locate(version, cfg)
    preprocessor = None
    if files.preprocessor_path is not None:
        from fabric.data import load_preprocessor

        preprocessor = load_preprocessor(files.preprocessor_path)
    schema = ModelSchema.from_spec(files.spec, preprocessor)
    if cfg.serve.engine == "onnx":
        from fabric.export import onnx_for

        path = files.onnx_path or onnx_for(files.folder, cfg.export.opset)
        engine: Engine = OnnxEngine(path, schema.n_features, cfg.serve.threads)
    else:
        engine = TorchEngine(files.folder, schema.n_features, cfg.serve.threads)
    engine.start()
    return LoadedVersion(version.name, engine, schema, files.folder)
