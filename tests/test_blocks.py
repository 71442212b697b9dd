import pytest

from puzzlenas.model.blocks import (AttentionConfig, BlockConfig, BlockConfigError, FFNConfig, ffn_mult_for_width,
                              nas_ffn_width)


def test_ffn_mult_formula_matches_method_md():
    # round_up(int(2 * ffn_mult * hidden / 3), 256): 2 * 3.5 * 8192 / 3 = 19114.67 -> 19114 -> 19200.
    assert nas_ffn_width(3.5, 8192) == 19200
    assert nas_ffn_width(4.0, 576) == 1536  # SmolLM2's FFN


@pytest.mark.parametrize("width", [256, 512, 768, 1024, 1280, 1536])
def test_every_multiple_of_256_is_expressible(width):
    mult = ffn_mult_for_width(width, 576)
    assert mult is not None and nas_ffn_width(mult, 576) == width


def test_non_multiple_width_is_not_expressible_and_keeps_exact_size():
    assert ffn_mult_for_width(1000, 576) is None
    block = BlockConfig(AttentionConfig("gqa", 3), FFNConfig("gated", 1000))
    d = block.to_nas_dict(9, 576)
    assert d["ffn"]["intermediate_size"] == 1000
    assert BlockConfig.from_nas_dict(d, 9, 576) == block


@pytest.mark.parametrize("block", [
    BlockConfig(AttentionConfig("gqa", 9), FFNConfig("gated", 1536)),
    BlockConfig(AttentionConfig("gqa", 1), FFNConfig("gated", 256)),
    BlockConfig(AttentionConfig("linear"), FFNConfig("linear")),
    BlockConfig(AttentionConfig("no_op"), FFNConfig("no_op")),
])
def test_nas_dict_round_trip(block):
    d = block.to_nas_dict(9, 576)
    assert set(d) == {"attention", "ffn"}
    assert set(d["attention"]) == {"n_heads_in_group", "no_op", "replace_with_linear"}
    assert set(d["ffn"]) == {"ffn_mult", "no_op", "replace_with_linear"}
    assert BlockConfig.from_nas_dict(d, 9, 576) == block


def test_n_heads_in_group_is_query_heads_per_kv_head():
    d = BlockConfig(AttentionConfig("gqa", 3), FFNConfig("no_op")).to_nas_dict(9, 576)
    assert d["attention"]["n_heads_in_group"] == 3


def test_real_nemotron_block_with_neutral_extra_keys_parses():
    d = {"attention": {"n_heads_in_group": 8, "no_op": False, "replace_with_linear": False, "sparsify": None,
                       "num_sink_tokens": None, "use_prefill_window_in_sink_attention": False,
                       "unshifted_sink": False, "window_length": None},
         "ffn": {"ffn_mult": 5.25, "no_op": False, "replace_with_linear": False, "sparsify": None}}
    block = BlockConfig.from_nas_dict(d, 64, 8192)
    assert block.attention.num_kv_heads == 8 and block.ffn.intermediate_size == 28672


@pytest.mark.parametrize("bad, message", [
    ({"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 1.0}}, "must divide the 9 query heads"),
    ({"attention": {"n_heads_in_group": 3, "colour": 1}, "ffn": {"ffn_mult": 1.0}}, "unknown key"),
    ({"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"no_op": True}}, "both true"),
    ({"attention": {"n_heads_in_group": 3, "window_length": 4096}, "ffn": {"no_op": True}}, "not supported"),
    ({"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": -1}}, "positive number"),
    ({"attention": {"n_heads_in_group": 3}}, "missing key"),
])
def test_bad_nas_dicts_fail_with_path(bad, message):
    with pytest.raises(BlockConfigError, match=message) as err:
        BlockConfig.from_nas_dict(bad, 9, 576, where="block_configs[7]")
    assert "block_configs[7]" in str(err.value)


def test_kv_heads_must_divide_query_heads():
    with pytest.raises(BlockConfigError, match=r"allowed: \[1, 3, 9\]"):
        BlockConfig(AttentionConfig("gqa", 2), FFNConfig("no_op")).validate(9)
