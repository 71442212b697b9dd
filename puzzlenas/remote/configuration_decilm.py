# Shipped by puzzlenas next to exported weights (Apache-2.0). Self-contained: imports only
# transformers, so that vLLM, TensorRT-LLM, lm-evaluation-harness and plain transformers load
# the export with `trust_remote_code=True` without puzzlenas installed.
"""Nemotron-NAS (DeciLM) configuration: the Llama fields plus one block config per layer.

`config.block_configs[i]` is an object with attribute access, the form Nemotron-NAS readers
use: `.attention.no_op`, `.attention.replace_with_linear`, `.attention.n_heads_in_group`,
`.ffn.no_op`, `.ffn.replace_with_linear`, `.ffn.ffn_mult` (FFN width
round_up(int(2 * ffn_mult * hidden / 3), 256)), and `.ffn.intermediate_size` only where that
rounding cannot express the width (such a checkpoint runs in transformers, not in vLLM).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from transformers import PretrainedConfig

# Keys NVIDIA's Nemotron-NAS checkpoints carry besides ours; accepted at their neutral value only.
_NEUTRAL_ATTENTION_KEYS = ("window_length", "num_sink_tokens", "sparsify", "unshifted_sink",
                           "use_prefill_window_in_sink_attention", "llama4", "mamba", "moe")
_NEUTRAL_FFN_KEYS = ("sparsify", "gated", "hidden_act", "moe")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One layer's attention: GQA with num_heads / n_heads_in_group KV heads, a linear layer, or none."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """One layer's FFN: a gated SiLU MLP of the width `ffn_mult` gives, a linear layer, or none."""

    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None
    intermediate_size: int | None = None  # only where ffn_mult cannot express the width


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    def to_dict(self) -> dict[str, Any]:
        ffn = dataclasses.asdict(self.ffn)
        if ffn["intermediate_size"] is None:
            del ffn["intermediate_size"]
        return {"attention": dataclasses.asdict(self.attention), "ffn": ffn}


def ffn_width(ffn_mult: float, hidden_size: int, multiple: int = 256) -> int:
    """Nemotron-NAS FFN width: int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256."""
    return int(math.ceil(int(2 * ffn_mult * hidden_size / 3) / multiple) * multiple)


def intermediate_size_of(ffn: FFNConfig, hidden_size: int) -> int:
    return ffn.intermediate_size if ffn.intermediate_size is not None else ffn_width(ffn.ffn_mult, hidden_size)


def _part(value: Any, cls: type, neutral: tuple[str, ...], where: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        value = dict(vars(value)) if hasattr(value, "__dict__") else value
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a dict, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in value.items() if k in fields}
    for key in set(value) - fields:
        if key not in neutral:
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {sorted(fields)}")
        if value[key] not in (None, False):
            raise ValueError(f"{where}.{key} = {value[key]!r} is not supported by this model code")
    return cls(**known)


def parse_block_config(block: Any, num_heads: int, where: str) -> BlockConfig:
    """A block config from its JSON dict (or an object with .attention / .ffn), validated."""
    if isinstance(block, BlockConfig):
        parsed = block
    else:
        get = block.get if isinstance(block, dict) else (lambda k: getattr(block, k, None))
        if get("attention") is None or get("ffn") is None:
            raise ValueError(f"{where} needs 'attention' and 'ffn', got {block!r}")
        parsed = BlockConfig(_part(get("attention"), AttentionConfig, _NEUTRAL_ATTENTION_KEYS, f"{where}.attention"),
                             _part(get("ffn"), FFNConfig, _NEUTRAL_FFN_KEYS, f"{where}.ffn"))
    att, ffn = parsed.attention, parsed.ffn
    if att.no_op and att.replace_with_linear or ffn.no_op and ffn.replace_with_linear:
        raise ValueError(f"{where}: no_op and replace_with_linear are both true")
    if not (att.no_op or att.replace_with_linear):
        group = att.n_heads_in_group
        if not isinstance(group, int) or group < 1 or num_heads % group:
            raise ValueError(f"{where}.attention.n_heads_in_group = {group!r} must divide {num_heads} heads")
    if not (ffn.no_op or ffn.replace_with_linear) and ffn.ffn_mult is None and ffn.intermediate_size is None:
        raise ValueError(f"{where}.ffn needs ffn_mult (or intermediate_size)")
    return parsed


def _rope(theta: float, scaling: dict | None, parameters: dict | None) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`) spellings."""
    if parameters:
        parameters = dict(parameters)
        theta = parameters.pop("rope_theta", theta)
        if parameters.get("rope_type", parameters.get("type", "default")) != "default":
            scaling = parameters
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling = {**{k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}, "rope_type": rope_type}
    if scaling["rope_type"] not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling type {scaling['rope_type']!r}; supported: {', '.join(_ROPE_TYPES)}")
    return float(theta), None if scaling["rope_type"] == "default" else scaling


class DeciLMConfig(PretrainedConfig):
    """Nemotron-NAS config; `block_configs` holds one `BlockConfig` object per layer."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        block_configs: list | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs: Any,
    ):
        theta, scaling = _rope(rope_theta, rope_scaling, kwargs.pop("rope_parameters", None))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if block_configs is None:  # all layers Llama-like (multi-head attention, FFN 4x hidden)
            block_configs = [{"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 6.0}}] * num_hidden_layers
        self.block_configs = [parse_block_config(b, num_attention_heads, f"block_configs[{i}]")
                              for i, b in enumerate(block_configs)]
        if len(self.block_configs) != num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for {num_hidden_layers} layers")
        # RoPE under both spellings: transformers 5 reads `rope_parameters` (its `rope_scaling` is
        # an alias of it), transformers 4 and mlx-lm read `rope_theta` + `rope_scaling`.
        self.rope_theta = theta
        self.rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
        if not isinstance(getattr(type(self), "rope_scaling", None), property):
            self.rope_scaling = scaling
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        if hidden_act != "silu":
            raise ValueError(f"hidden_act = {hidden_act!r}; this model code supports 'silu' only")

    @property
    def rope(self) -> tuple[float, dict | None]:
        """(theta, scaling dict or None), whichever transformers version standardized them."""
        return _rope(self.rope_theta, None, self.rope_parameters)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        out.pop("rope_parameters", None)
        out["rope_theta"], out["rope_scaling"] = self.rope
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()
