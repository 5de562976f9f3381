"""A tiny causal language model folder for the serving tests, built in seconds and never downloaded.

``tiny_llm(root)`` writes, as fine-tuning does (``{run_dir}/llm/...``):

* ``llm/base/``: a 2-layer GPT-2 with fresh (seeded) weights and a byte-level BPE tokenizer trained with HF
  ``tokenizers`` on a few hundred generated lines, carrying the chat template of the fine-tuning contract;
* ``llm/adapter/`` and ``llm/adapter2/``: peft LoRA adapters with random (not zero) weights, so selecting one
  visibly changes the output;
* ``llm/adapter3/``: the same, which also saves a trained copy of the final layer norm (``modules_to_save``);
* ``llm/reference.parquet``: the drift reference of the serving stream.
"""

from __future__ import annotations

import random
from pathlib import Path

CONTEXT = 96
"""The tiny model's context length (prompt plus completion tokens)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
EOS = "<|endoftext|>"
_WORDS = (
    "the cat sat on a mat while ray serve batches many tokens for each model request and the dog ran over green "
    "hills to find seven red apples under an old tree near the quiet river bank today"
).split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Seeded lines of plain English words (the tokenizer's training text)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(lines)]


def build_tokenizer(out: Path) -> object:
    """A byte-level BPE tokenizer trained on :func:`corpus`, saved to ``out``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_llm(root: Path, seed: int = 0) -> Path:
    """Write the run folder described in the module docstring under ``root``; returns ``root`` (the run_dir).

    Reuses what an earlier call wrote there.
    """
    import pandas as pd
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    llm = root / "llm"
    base = llm / "base"
    if (llm / "reference.parquet").is_file():
        return root
    tok = build_tokenizer(base)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),  # type: ignore[arg-type]
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        # Fresh weights rarely but sometimes pick the end-of-sequence token first; keep outputs full-length.
        model.lm_head.weight[tok.eos_token_id] = 0.0  # type: ignore[attr-defined]
    model.save_pretrained(base)
    for i, name in enumerate(("adapter", "adapter2", "adapter3")):
        torch.manual_seed(seed + 1 + i)
        lora = LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["c_attn"],
            init_lora_weights=False,
            fan_in_fan_out=True,
            modules_to_save=["ln_f"] if name == "adapter3" else None,
        )
        wrapped = get_peft_model(GPT2LMHeadModel.from_pretrained(base), lora)
        if name == "adapter3":
            with torch.no_grad():  # the saved copy differs from the base's, so it changes outputs
                wrapped.base_model.model.transformer.ln_f.modules_to_save["default"].weight.mul_(1.5)
        wrapped.save_pretrained(llm / name)
        tok.save_pretrained(llm / name)  # type: ignore[attr-defined]
    rng = random.Random(seed)
    pd.DataFrame(
        {
            "prompt_tokens": [rng.randint(5, 40) for _ in range(200)],
            "completion_tokens": [rng.randint(1, 32) for _ in range(200)],
        }
    ).to_parquet(llm / "reference.parquet")
    return root


def tiny_llama(root: Path, seed: int = 0) -> Path:
    """Like :func:`tiny_llm`, for vLLM (which has no LoRA for GPT-2): a 2-layer Llama in ``llm/base/`` and a peft
    LoRA adapter on its attention projections in ``llm/adapter/``; returns ``root`` (the run_dir).

    The sizes suit vLLM's CPU attention (head size 64). Reuses what an earlier call wrote there.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = root / "llm"
    base = llm / "base"
    if (llm / "adapter" / "adapter_config.json").is_file():
        return root
    tok = build_tokenizer(base)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),  # type: ignore[arg-type]
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4 * CONTEXT,
        bos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0  # type: ignore[attr-defined]  # full-length outputs
    model.save_pretrained(base)
    torch.manual_seed(seed + 1)
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
    wrapped.save_pretrained(llm / "adapter")
    tok.save_pretrained(llm / "adapter")  # type: ignore[attr-defined]
    return root
