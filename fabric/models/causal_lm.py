"""Causal language models: load one from a local Hugging Face folder or build a small one from a config,
get or train its tokenizer, wrap it with a peft LoRA adapter, merge the adapter back in.

Nothing here downloads: folders are read with ``local_files_only=True``. Training prompts and the chat
template agree (see ``DEFAULT_CHAT_TEMPLATE``), so a chat with one user message renders exactly like an
instruction record did in training.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fabric.config import LMModelConfig, LoRAConfig
from fabric.errors import ConfigError, ConfigProblem, FabricError, require

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Each message as ``<|{role}|>\\n{content}\\n``; ``add_generation_prompt`` appends ``<|assistant|>\\n``.
Tokenizers without a chat template of their own get this one when fabric saves them."""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
"""Role markers of the chat template: single tokens in a tokenizer fabric trains."""

DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
}
"""LoRA targets by ``config.model_type`` when ``lora.target_modules`` is not set: the attention projections."""


def _transformers() -> Any:
    return require("transformers", "llm")


# --------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on ``texts`` (HF ``tokenizers``).

    Its special tokens are ``<|endoftext|>`` (bos and eos), ``<|pad|>`` and the chat template's role
    markers; any text can be encoded (byte fallback), and the chat template is set.

    Args:
        texts: the training texts (iterated once).
        vocab_size: the most tokens in the vocabulary (the 256 bytes and the special tokens included).
    """
    tokenizers = require("tokenizers", "llm")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2 + len(ROLE_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 bytes and the special tokens")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens, ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    return prepare_tokenizer(fast)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` what fine-tuning and serving need: an eos token, a pad token (eos when it
    has none) and a chat template (``DEFAULT_CHAT_TEMPLATE`` unless it has its own)."""
    if tokenizer.eos_token is None:
        raise FabricError("the tokenizer has no eos token: fine-tuning ends every example with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path, field: str = "llm.model.tokenizer_path") -> PreTrainedTokenizerBase:
    """The tokenizer in a local folder (``AutoTokenizer``, never downloaded), prepared by ``prepare_tokenizer``.

    Raises:
        ConfigError: naming ``field``, when the folder is missing or holds no tokenizer.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError([ConfigProblem(field, f"no tokenizer folder at {folder}")])
    try:
        tok = _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError([ConfigProblem(field, f"cannot load a tokenizer from {folder}: {_first_line(e)}")]) from None
    return prepare_tokenizer(tok)


def has_tokenizer(folder: str | Path) -> bool:
    """True when ``folder`` holds tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, a vocab)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return any((Path(folder) / n).is_file() for n in names)


# --------------------------------------------------------------------------- models


def load_causal_lm(path: str | Path, field: str = "llm.model.path") -> PreTrainedModel:
    """A causal LM from a local Hugging Face folder (``AutoModelForCausalLM.from_pretrained``, local files only).

    Raises:
        ConfigError: naming ``field``, when the folder is missing or is not a causal LM.
    """
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError([ConfigProblem(field, f"no Hugging Face model at {folder} (no config.json)")])
    try:
        return _transformers().AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError([ConfigProblem(field, f"cannot load a causal LM from {folder}: {_first_line(e)}")]) from None


def build_causal_lm(cfg: LMModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A GPT-2 or Llama style model of ``cfg``'s sizes with fresh weights (seeded), sized to ``tokenizer``.

    Args:
        cfg: ``arch``, ``n_layer``, ``n_embd``, ``n_head``, ``context_length``.
        tokenizer: its vocabulary size and bos/eos/pad ids go into the model config.
        seed: torch seed of the initial weights.
    """
    import torch

    tf = _transformers()
    ids = {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=cfg.context_length,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            **ids,
        )
        model_cls = tf.GPT2LMHeadModel
    else:
        config = tf.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.n_embd,
            intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.context_length,
            **ids,
        )
        model_cls = tf.LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_cls(config)


def context_length(model: PreTrainedModel) -> int:
    """The most positions ``model`` attends over (``n_positions`` or ``max_position_embeddings``)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise FabricError(f"cannot tell the context length of a {type(model).__name__}")


# --------------------------------------------------------------------------- LoRA


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """The attention projections LoRA adapts in ``model``'s architecture (``DEFAULT_TARGET_MODULES``).

    Raises:
        ConfigError: the architecture has no default; ``llm.lora.target_modules`` must name the modules.
    """
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(
            [ConfigProblem("llm.lora.target_modules", f"no default for model type {model_type!r}; name the modules")]
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def lora_wrap(model: PreTrainedModel, lora: LoRAConfig) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (peft): only the adapter's weights train.

    Raises:
        ConfigError: naming ``llm.lora.target_modules`` when a target is not a module of the model.
    """
    peft = require("peft", "llm")
    targets = list(lora.target_modules) if lora.target_modules else default_target_modules(model)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        task_type="CAUSAL_LM",
        # GPT-2's projections are Conv1D layers, whose weights are stored transposed.
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError([ConfigProblem("llm.lora.target_modules", _first_line(e))]) from None


def load_adapter(base: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """``base`` with the peft adapter saved in ``adapter_dir``."""
    peft = require("peft", "llm")
    return peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def save_pretrained(model: Any, tokenizer: PreTrainedTokenizerBase, out: str | Path) -> Path:
    """Write ``model`` (a transformers or peft model) and ``tokenizer`` into a fresh folder ``out``."""
    folder = Path(out)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def merge_and_save(base_dir: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """Merge the adapter in ``adapter_dir`` into the base model in ``base_dir`` and save the result (with
    the adapter folder's tokenizer, else the base's) to ``out``: a plain transformers model for serving."""
    base = load_causal_lm(base_dir)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    source = adapter_dir if has_tokenizer(adapter_dir) else base_dir
    return save_pretrained(merged, load_tokenizer(source), out)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
