"""A hand-made child mixing every block kind: export format, reload, KV-cache generation."""

import json

import pytest
import torch
from safetensors import safe_open

import puzzlenas  # noqa: F401  (registers nemotron-nas with transformers)
from puzzlenas import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzlenas.model.info import count_model_params, total_params

HIDDEN, HEADS, VOCAB = 64, 4, 128
A, F_ = AttentionConfig, FFNConfig
MIXED_BLOCKS = [
    BlockConfig(A("gqa", 4), F_("gated", 512)),  # parent-like, MHA
    BlockConfig(A("gqa", 1), F_("gated", 256)),  # fewer KV heads, narrow FFN
    BlockConfig(A("linear"), F_("linear")),
    BlockConfig(A("no_op"), F_("gated", 512)),
    BlockConfig(A("gqa", 2), F_("no_op")),
    BlockConfig(A("no_op"), F_("no_op")),  # the whole layer skipped
]


def make_child(blocks=MIXED_BLOCKS, seed=0, **fields) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    config = DeciLMConfig.from_blocks(blocks, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, **fields)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so that a missing/misplaced norm changes logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def expected_weight_names(blocks) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i, b in enumerate(blocks):
        pre = f"model.layers.{i}"
        if b.attention.kind == "gqa":
            names |= {f"{pre}.self_attn.{p}_proj.weight" for p in "qkvo"} | {f"{pre}.input_layernorm.weight"}
        elif b.attention.kind == "linear":
            names |= {f"{pre}.self_attn.linear_attn.weight", f"{pre}.input_layernorm.weight"}
        if b.ffn.kind == "gated":
            names |= {f"{pre}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
            names |= {f"{pre}.post_attention_layernorm.weight"}
        elif b.ffn.kind == "linear":
            names |= {f"{pre}.mlp.linear_mlp.weight", f"{pre}.post_attention_layernorm.weight"}
    return names


def test_export_follows_nemotron_nas_layout_and_reloads(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = make_child()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-5
    assert config["block_configs"] == [
        {"attention": {"n_heads_in_group": 1, "no_op": False, "replace_with_linear": False},
         "ffn": {"ffn_mult": 12.0, "no_op": False, "replace_with_linear": False}},
        {"attention": {"n_heads_in_group": 4, "no_op": False, "replace_with_linear": False},
         "ffn": {"ffn_mult": 6.0, "no_op": False, "replace_with_linear": False}},
        {"attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
         "ffn": {"ffn_mult": None, "no_op": False, "replace_with_linear": True}},
        {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
         "ffn": {"ffn_mult": 12.0, "no_op": False, "replace_with_linear": False}},
        {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False},
         "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}},
        {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
         "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}},
    ]
    # The METHOD.md width formula reproduces every FFN width.
    for block, written in zip(MIXED_BLOCKS, config["block_configs"]):
        if block.ffn.kind == "gated":
            assert int(-(-int(2 * written["ffn"]["ffn_mult"] * HIDDEN / 3) // 256) * 256) == block.ffn.intermediate_size
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_weight_names(MIXED_BLOCKS)

    assert type(AutoConfig.from_pretrained(tmp_path)) is DeciLMConfig
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DeciLMForCausalLM
    assert reloaded.blocks == MIXED_BLOCKS
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_tied_child_saves_without_lm_head(tmp_path):
    model = make_child(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    reloaded = DeciLMForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_non_expressible_width_is_flagged_but_round_trips(tmp_path):
    blocks = [BlockConfig(A("gqa", 2), F_("gated", 100))]
    model = make_child(blocks)
    assert "not expressible" in model.config.nemotron_nas_incompatibilities()[0]
    model.save_pretrained(tmp_path)
    assert DeciLMForCausalLM.from_pretrained(tmp_path).blocks == blocks


def test_param_count_matches_info_table():
    model = make_child()
    assert count_model_params(model) == total_params(model.config)
    tied = make_child(tie_word_embeddings=True)
    assert count_model_params(tied) == total_params(tied.config)


def greedy_by_recomputation(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("blocks", [MIXED_BLOCKS, [BlockConfig(A("linear"), F_("gated", 256)),
                                                    BlockConfig(A("no_op"), F_("linear"))]],
                         ids=["mixed", "no-kv-cache-at-all"])
def test_greedy_generate_with_cache_equals_recomputation(blocks):
    model = make_child(blocks)
    ids = torch.randint(3, VOCAB, (2, 7))
    expected = greedy_by_recomputation(model, ids, 12)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12, pad_token_id=0)
    assert torch.equal(got, expected)


def test_kv_cache_holds_each_layers_own_kv_heads():
    from transformers import DynamicCache

    model = make_child()
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 5)), past_key_values=cache, use_cache=True)
    kv_heads = [layer.keys.shape[1] for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert kv_heads == [4, 1, 2]  # GQA layers only; linear and no-op attention keep no cache
    assert cache.get_seq_length() == 5


def test_left_padded_batch_generates_like_single_prompts():
    model = make_child()
    short, long = torch.randint(3, VOCAB, (1, 4)), torch.randint(3, VOCAB, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    with torch.no_grad():
        got = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(got[0, 5:], greedy_by_recomputation(model, short, 6)[0])
    assert torch.equal(got[1], greedy_by_recomputation(model, long, 6)[0])


def test_bf16_forward_is_close_to_fp32():
    model = make_child()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_hidden_states_and_loss():
    model = make_child()
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(MIXED_BLOCKS) + 1
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), rel=0.2)
    out.loss.backward()
    assert model.model.layers[2].self_attn.linear_attn.weight.grad is not None
