"""Search space and training-free initialization of the variants (METHOD.md sections 1-2)."""

import pytest
import torch

from puzzlenas import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzlenas.activations import causal_context, parent_layer_activations
from puzzlenas.library import (LibraryConfig, Variant, build_unit, calibration_statistics, layer_space,
                               parent_attention_unit, pool_kv_heads, search_space)

HIDDEN, HEADS, VOCAB, FFN = 64, 4, 128, 128


def make_parent(kv_heads=4, layers=2, seed=0) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    blocks = [BlockConfig.parent(kv_heads, FFN)] * layers
    config = DeciLMConfig.from_blocks(blocks, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def variant(subblock, kind, size=None):
    if subblock == "attention":
        return Variant("v", "attention", AttentionConfig(kind, size))
    return Variant("v", "ffn", FFNConfig(kind, size))


def test_default_space_for_smollm2_shape():
    config = DeciLMConfig.from_blocks([BlockConfig.parent(3, 1536)], vocab_size=10, hidden_size=576,
                                      num_attention_heads=9)
    attention, ffn = layer_space(config, config.blocks[0], LibraryConfig())
    assert [v.name for v in attention] == ["attn_kv3", "attn_kv1", "attn_linear", "attn_noop"]
    assert [v.name for v in ffn] == ["ffn_1536", "ffn_1280", "ffn_1024", "ffn_768", "ffn_512", "ffn_256",
                                     "ffn_linear", "ffn_noop"]
    assert attention[0].is_parent and ffn[0].is_parent and not attention[1].is_parent
    # Every width is a multiple of 256: the Nemotron-NAS export holds for every choice.
    assert all(v.config.intermediate_size % 256 == 0 for v in ffn if v.config.kind == "gated")


def test_space_rejects_kv_heads_that_do_not_divide():
    config = DeciLMConfig.from_blocks([BlockConfig.parent(3, 1536)], vocab_size=10, hidden_size=576,
                                      num_attention_heads=9)
    with pytest.raises(ValueError, match="does not divide the 9 query heads"):
        search_space(config, LibraryConfig(kv_heads=[2]))


def test_kv_pooling_is_group_mean():
    D = 2
    w = torch.arange(4 * D * 3, dtype=torch.float).reshape(4 * D, 3)  # 4 KV heads of dim 2, input 3
    pooled = pool_kv_heads(w, num_heads=8, kv_from=4, kv_to=2, head_dim=D)
    heads = w.reshape(4, D, 3)
    assert torch.equal(pooled.reshape(2, D, 3), torch.stack([heads[:2].mean(0), heads[2:].mean(0)]))
    assert torch.equal(pool_kv_heads(w, 8, 4, 4, D), w)


def test_pooled_gqa_is_exact_when_merged_heads_agree():
    parent = make_parent(kv_heads=4)
    attn = parent.model.layers[0].self_attn
    with torch.no_grad():  # make KV heads 0==1 and 2==3: pooling to 2 heads loses nothing
        for proj in (attn.k_proj, attn.v_proj):
            w = proj.weight.view(4, -1, HIDDEN)
            w[1], w[3] = w[0], w[2]
    unit = build_unit(variant("attention", "gqa", 2), parent.config, parent, 0, None, LibraryConfig())
    x = torch.randn(2, 9, HIDDEN)
    ctx = causal_context(parent, torch.zeros(2, 9, dtype=torch.long), torch.float32)
    ref = parent_attention_unit(parent.config, parent.model.layers[0])(x, ctx)
    assert torch.allclose(unit(x, ctx), ref, atol=1e-5)


def test_linear_attention_product_equals_attention_on_one_token():
    # A token that attends only to itself: softmax over one key is 1, so attn(x) = W_o W_v x.
    parent = make_parent(kv_heads=2)
    unit = build_unit(variant("attention", "linear"), parent.config, parent, 1, None,
                      LibraryConfig(linear_attention_init="product"))
    x = torch.randn(3, 1, HIDDEN)
    ctx = causal_context(parent, torch.zeros(3, 1, dtype=torch.long), torch.float32)
    ref = parent_attention_unit(parent.config, parent.model.layers[1])(x, ctx)
    assert torch.allclose(unit(x, ctx), ref, atol=1e-5)


def _ffn_error(unit, parent, stats_ids, layer=0):
    acts, _ = parent_layer_activations(parent, stats_ids, [layer])
    a = acts[layer]
    with torch.no_grad():
        return (unit(a.m) - (a.y - a.m)).pow(2).mean().item()


def test_channel_contribution_beats_random_channels_and_lstsq_beats_product():
    parent = make_parent()
    batches = [torch.randint(0, VOCAB, (4, 16)) for _ in range(4)]
    stats = calibration_statistics(parent, batches, LibraryConfig())
    assert stats["layer0.channel_contribution"].shape == (FFN,)
    ids = torch.cat(batches)
    cc = build_unit(variant("ffn", "gated", 32), parent.config, parent, 0, stats, LibraryConfig())
    random_keep = build_unit(variant("ffn", "gated", 32), parent.config, parent, 0, None, LibraryConfig())
    with torch.no_grad():  # keep 32 random channels instead of the top-contribution ones
        keep = torch.randperm(FFN, generator=torch.Generator().manual_seed(0))[:32].sort().values
        src = parent.model.layers[0].mlp
        random_keep.mlp.gate_proj.weight.copy_(src.gate_proj.weight[keep])
        random_keep.mlp.up_proj.weight.copy_(src.up_proj.weight[keep])
        random_keep.mlp.down_proj.weight.copy_(src.down_proj.weight[:, keep])
    assert _ffn_error(cc, parent, ids) < _ffn_error(random_keep, parent, ids)

    full = build_unit(variant("ffn", "gated", FFN), parent.config, parent, 0, stats, LibraryConfig())
    assert _ffn_error(full, parent, ids) < 1e-10  # all channels kept = the parent's FFN

    lstsq = build_unit(variant("ffn", "linear"), parent.config, parent, 0, stats, LibraryConfig())
    product = build_unit(variant("ffn", "linear"), parent.config, parent, 0, stats,
                         LibraryConfig(linear_ffn_init="product"))
    assert _ffn_error(lstsq, parent, ids) < _ffn_error(product, parent, ids)


def test_random_init_has_the_same_shapes_but_other_weights():
    parent = make_parent()
    v = variant("ffn", "gated", 64)
    a = build_unit(v, parent.config, parent, 0, None, LibraryConfig())
    b = build_unit(v, parent.config, parent, 0, None, LibraryConfig(), init="random", seed=1)
    assert {k: t.shape for k, t in a.state_dict().items()} == {k: t.shape for k, t in b.state_dict().items()}
    assert not torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight)


# ---- the serving runtime narrows the space (serving.runtime; rules in model/info.py) ----------
def _smollm2_shaped(**overrides) -> DeciLMConfig:
    return DeciLMConfig.from_blocks([BlockConfig.parent(3, 1536)] * 2, vocab_size=10, hidden_size=576,
                                    num_attention_heads=9, **overrides)


def _names(space):
    return {v.name for layer in space for part in layer for v in part}


def test_vllm_space_holds_no_linear_subblock_and_only_ffn_mult_widths():
    config = _smollm2_shaped()
    odd = LibraryConfig(ffn_sizes=[1000])  # 1000: no ffn_mult gives it
    hf, vllm = search_space(config, odd, "hf"), search_space(config, odd, "vllm")
    assert {"attn_linear", "ffn_linear", "ffn_1000"} <= _names(hf)
    assert _names(hf) - _names(vllm) == {"attn_linear", "ffn_linear", "ffn_1000"}
    assert {"attn_kv1", "attn_noop", "ffn_noop", "ffn_256"} <= _names(vllm)
    assert _names(search_space(config, odd, "trtllm")) == _names(hf) - {"ffn_1000"}  # TensorRT-LLM builds linear


def test_mlx_space_drops_linear_subblocks_only_in_biased_models():
    assert "attn_linear" in _names(search_space(_smollm2_shaped(), LibraryConfig(), "mlx"))
    biased = _names(search_space(_smollm2_shaped(attention_bias=True, mlp_bias=True), LibraryConfig(), "mlx"))
    assert "attn_linear" not in biased and "ffn_linear" not in biased and "attn_kv1" in biased


def test_a_parent_the_runtime_cannot_run_is_refused_naming_the_runtimes_that_can():
    config = DeciLMConfig.from_blocks([BlockConfig.parent(3, 1000)], vocab_size=10, hidden_size=576,
                                      num_attention_heads=9)
    with pytest.raises(ValueError, match=r"vLLM .* cannot run the parent itself \(the FFN widths of layer 0 .*"
                                         r"can \(hf\)"):
        search_space(config, LibraryConfig(), "vllm")


def test_a_runtime_changes_the_library_fingerprint_only_where_it_may_narrow_the_space():
    from puzzlenas.config import load_run_config
    from puzzlenas.stages import costs, library

    def fingerprints(*overrides):
        cfg = load_run_config(None, ["device=cpu", *overrides])
        return library.STAGE.fingerprint(cfg), costs.STAGE.fingerprint(cfg)

    no_linear = ["library.attention_linear=false", "library.ffn_linear=false"]
    # the CPU preset's space (no linear, widths of 256s) is the same under every runtime: runs resume
    assert fingerprints(*no_linear, "serving.runtime=vllm") == fingerprints(*no_linear, "serving.runtime=hf")
    assert fingerprints("library.ffn_linear=true", "serving.runtime=vllm") != \
        fingerprints("library.ffn_linear=true", "serving.runtime=hf")
    assert fingerprints("library.ffn_sizes=[1000]", "serving.runtime=trtllm") != \
        fingerprints("library.ffn_sizes=[1000]", "serving.runtime=hf")
