"""The assemble stage: a child holds the BLD-trained weights its solution names."""

import json

import torch


def test_assembled_child_holds_the_library_weights(finished_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import puzzlenas  # noqa: F401
    from puzzlenas.model.parent import load_parent

    record = json.loads((finished_run / "child-fast" / "solution.json").read_text())
    child = AutoModelForCausalLM.from_pretrained(finished_run / "child-fast")
    parent = load_parent(finished_run / "parent")
    state = child.state_dict()
    for i, name in enumerate(record["names"]):
        attention, ffn = name.split("+")
        for sub, variant, key in (("attention", attention, "input_layernorm.weight"),
                                  ("ffn", ffn, "post_attention_layernorm.weight")):
            ours = state.get(f"model.layers.{i}.{key}")
            if variant.endswith("noop"):
                assert ours is None
            elif variant in ("attn_kv2", "ffn_96"):  # the parent's own block
                assert torch.equal(ours, parent.state_dict()[f"model.layers.{i}.{key}"])
            else:
                trained = load_file(str(finished_run / "bld" / f"layers/{i:03d}/{variant}/weights.safetensors"))
                assert torch.equal(ours, trained[f"{sub}.{key}"])
    assert (finished_run / "child-fast" / "tokenizer.json").is_file()
