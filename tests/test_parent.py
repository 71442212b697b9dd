"""Parent import: logits parity with transformers' own models, and clear errors."""

import json
import shutil

import pytest
import torch

from puzzlenas.model.parent import (LLAMA_WEIGHT_MAP, ParentError, hf_to_nas_name, load_parent, nas_to_hf_name,
                              resolve_parent_dir)
from tests.conftest import VOCAB, save_tiny_hf_parent

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def _hf_logits(parent_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("llama", {"head_dim": 32}),  # head_dim != hidden / heads
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases, no o_proj bias
    ("qwen2", {"tie_word_embeddings": True}),
])
def test_converted_parent_matches_transformers_logits(tmp_path, family, overrides):
    parent_dir = save_tiny_hf_parent(family, tmp_path / family, **overrides)
    ids = torch.randint(0, VOCAB, (2, 150))  # longer than original_max_position_embeddings: llama3 matters
    ours = load_parent(parent_dir)
    with torch.no_grad():
        logits = ours(ids).logits
    assert (logits - _hf_logits(parent_dir, ids)).abs().max().item() <= 1e-4


def test_weight_map_round_trip():
    for hf_template in LLAMA_WEIGHT_MAP:
        name = hf_template.replace("{i}", "17")
        assert nas_to_hf_name(hf_to_nas_name(name)) == name
    assert hf_to_nas_name("model.layers.3.self_attn.rotary_emb.inv_freq") is None


def test_unsupported_architecture_names_supported_ones(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ParentError, match="unsupported parent architecture GPT2LMHeadModel.*LlamaForCausalLM"):
        load_parent(d)


def test_moe_and_sliding_window_parents_are_refused(tmp_path, tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    for name, extra in (("moe", {"model_type": "mixtral", "num_local_experts": 8}),
                        ("swa", {"model_type": "mistral", "sliding_window": 16})):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**config, **extra}))
        with pytest.raises(ParentError, match="mixture-of-experts|sliding-window"):
            load_parent(d)


def test_pickled_weights_are_refused(tmp_path, tiny_llama_dir):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ParentError, match="never unpickles"):
        load_parent(d)


def test_corrupted_weights_and_shape_mismatch(tmp_path, tiny_llama_dir):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, d)
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ParentError, match="not a readable safetensors"):
        load_parent(d)
    d2 = tmp_path / "mismatch"
    shutil.copytree(tiny_llama_dir, d2)
    config = json.loads((d2 / "config.json").read_text())
    config["intermediate_size"] = 32
    (d2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParentError, match="has shape"):
        load_parent(d2)


def test_missing_parent_and_unreachable_hub(monkeypatch):
    with pytest.raises(ParentError, match="not found"):
        resolve_parent_dir("./no/such dir")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ParentError, match="could not download 'meta-llama/Llama-3.1-8B'"):
        resolve_parent_dir("meta-llama/Llama-3.1-8B")


def test_gguf_parsed_once_memoizes_inside_and_restores_after(tmp_path):
    """The bundled parent's GGUF is parsed once while transformers reads config, weights and
    tokenizer (three parses before); outside the context gguf is the library's own again."""
    import gguf
    import numpy as np

    from puzzlenas.model.parent import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is again
        assert np.array_equal(np.asarray(first.tensors[0].data).reshape(3, 4),
                              np.arange(12, dtype=np.float32).reshape(3, 4))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_cls and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
