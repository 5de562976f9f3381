"""Model builders (fabric's MLP, the user's own by import path) and the self-contained model artifact
(``model.pt`` + ``model.json``); causal language
models with LoRA (``fabric.models.causal_lm``, loaded on first use so that tabular users never import
transformers)."""

from typing import Any

from fabric.models._artifact import BUILDERS, build_from_spec, load_model, model_spec, read_spec, save_model, write_spec
from fabric.models._signature import SignatureAdapter, adapt, column_layout
from fabric.models._user import bundle_code, check_loop, check_model, code_digest, code_root
from fabric.models.tabular import MLP, build_mlp

# Names served lazily from fabric.models.causal_lm (it imports transformers and peft when used).
_CAUSAL_LM = (
    "DEFAULT_CHAT_TEMPLATE",
    "build_causal_lm",
    "load_causal_lm",
    "load_tokenizer",
    "lora_wrap",
    "merge_and_save",
    "train_tokenizer",
)

__all__ = [
    "BUILDERS",
    "DEFAULT_CHAT_TEMPLATE",
    "MLP",
    "SignatureAdapter",
    "adapt",
    "build_causal_lm",
    "build_from_spec",
    "build_mlp",
    "bundle_code",
    "check_loop",
    "check_model",
    "code_digest",
    "code_root",
    "column_layout",
    "load_causal_lm",
    "load_model",
    "load_tokenizer",
    "lora_wrap",
    "merge_and_save",
    "model_spec",
    "read_spec",
    "save_model",
    "train_tokenizer",
    "write_spec",
]


def __getattr__(name: str) -> Any:
    if name in _CAUSAL_LM:
        from fabric.models import causal_lm

        return getattr(causal_lm, name)
    raise AttributeError(f"module 'fabric.models' has no attribute {name!r}")
