"""Model builders and the self-contained model artifact (``model.pt`` + ``model.json``)."""

from fabric.models._artifact import BUILDERS, build_from_spec, load_model, model_spec, read_spec, save_model, write_spec
from fabric.models.tabular import MLP, build_mlp

__all__ = [
    "BUILDERS",
    "MLP",
    "build_from_spec",
    "build_mlp",
    "load_model",
    "model_spec",
    "read_spec",
    "save_model",
    "write_spec",
]
