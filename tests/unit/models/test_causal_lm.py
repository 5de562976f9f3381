"""Causal LMs without Ray: tokenizer training, the chat template, building, LoRA, merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fabric.config import LMModelConfig, LoRAConfig  # noqa: E402
from fabric.data import render_prompt  # noqa: E402
from fabric.errors import ConfigError  # noqa: E402
from fabric.models import DEFAULT_CHAT_TEMPLATE, build_causal_lm, load_causal_lm, load_tokenizer, lora_wrap  # noqa: E402
from fabric.models.causal_lm import (  # noqa: E402
    context_length,
    merge_and_save,
    prepare_tokenizer,
    save_pretrained,
    train_tokenizer,
)

TEXTS = [render_prompt(f"Reverse the word {w}.") + w[::-1] for w in ("apple", "river", "stone", "cloud")] * 10


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_tokenizer(TEXTS, vocab_size=320)


def test_trained_tokenizer_has_special_tokens_and_round_trips(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert len(tokenizer) <= 320
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    ids = tokenizer("<|user|>\nReverse the word apple.", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")  # a role marker is one token
    # Byte-level: text never seen in training (accents, digits, emoji) still round-trips.
    text = "Zoë paid 42€ 🙂"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_a_user_turn_like_the_training_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    for instruction, extra in (("Name the capital city.", "Peru"), ("What is 3 plus 4?", None)):
        content = f"{instruction}\n{extra}" if extra else instruction
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert chat == render_prompt(instruction, extra)
    two = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert two == "<|system|>\nBe brief.\n<|user|>\nHi\n"


def test_a_tokenizer_with_its_own_chat_template_keeps_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.chat_template = own
    try:
        assert prepare_tokenizer(tokenizer).chat_template == own
    finally:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_built_models_fit_the_tokenizer_and_context(tokenizer, arch: str) -> None:  # type: ignore[no-untyped-def]
    cfg = LMModelConfig(arch=arch, n_layer=1, n_embd=32, n_head=2, context_length=48)
    model = build_causal_lm(cfg, tokenizer, seed=3)
    assert model.config.model_type == arch and context_length(model) == 48
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.randint(0, len(tokenizer), (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, len(tokenizer)) and torch.isfinite(out.loss)
    # Seeded: the same weights again, other weights with another seed.
    same, other = build_causal_lm(cfg, tokenizer, seed=3), build_causal_lm(cfg, tokenizer, seed=4)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, next(iter(same.state_dict().values())))
    assert not torch.equal(first, next(iter(other.state_dict().values())))


@pytest.mark.parametrize(("arch", "targets"), [("gpt2", {"c_attn"}), ("llama", {"q_proj", "v_proj"})])
def test_lora_trains_only_the_adapter_on_default_targets(tokenizer, arch: str, targets: set[str]) -> None:  # type: ignore[no-untyped-def]
    model = build_causal_lm(LMModelConfig(arch=arch, n_layer=2, n_embd=32, n_head=2), tokenizer)
    wrapped = lora_wrap(model, LoRAConfig(r=4, alpha=8))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == targets
    assert wrapped.peft_config["default"].r == 4


def test_modules_to_save_train_in_full(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_causal_lm(LMModelConfig(n_layer=1, n_embd=32), tokenizer)
    wrapped = lora_wrap(model, LoRAConfig(r=4, modules_to_save=["wte", "lm_head"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("wte" in n and "lora_" not in n for n in trainable)
    assert any("lm_head" in n and "lora_" not in n for n in trainable)


def test_lora_names_the_field_of_an_unknown_target(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = build_causal_lm(LMModelConfig(n_layer=1, n_embd=32), tokenizer)
    with pytest.raises(ConfigError, match=r"llm\.lora\.target_modules.*nope"):
        lora_wrap(model, LoRAConfig(target_modules=["nope"]))


def test_save_load_and_merge_give_the_adapted_model(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = build_causal_lm(LMModelConfig(n_layer=1, n_embd=32, context_length=64), tokenizer, seed=1).eval()
    base_dir = save_pretrained(base, tokenizer, tmp_path / "base")
    loaded = load_causal_lm(base_dir)
    ids = torch.randint(0, len(tokenizer), (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, base(input_ids=ids).logits)
    assert load_tokenizer(base_dir).chat_template == DEFAULT_CHAT_TEMPLATE

    adapted = lora_wrap(loaded, LoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA's B starts at zero: move it so that merging has something to merge
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted.eval()
    expected = adapted(input_ids=ids).logits
    adapter_dir = save_pretrained(adapted, tokenizer, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    merged = load_causal_lm(merge_and_save(base_dir, adapter_dir, tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, base(input_ids=ids).logits, atol=1e-3)


def test_missing_folders_are_config_errors_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"llm\.model\.path: no Hugging Face model"):
        load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"llm\.model\.tokenizer_path: no tokenizer folder"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"llm\.model\.tokenizer_path: cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
