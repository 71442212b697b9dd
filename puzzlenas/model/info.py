"""Architecture table: per-layer blocks, parameters and KV-cache bytes per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import BlockConfig
from .modeling import DeciLMConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class LayerCost:
    index: int
    block: BlockConfig
    attention_params: int
    ffn_params: int
    kv_cache_bytes_per_token: int

    @property
    def params(self) -> int:
        return self.attention_params + self.ffn_params


def attention_params(config: DeciLMConfig, block: BlockConfig) -> int:
    """Parameters of one attention subblock, its RMSNorm included."""
    att, H, D, Hq = block.attention, config.hidden_size, config.head_dim, config.num_attention_heads
    if att.kind == "no_op":
        return 0
    if att.kind == "linear":
        return H * H + H
    qkv_bias = config.attention_bias or config.qkv_bias
    q = H * Hq * D + (Hq * D if qkv_bias else 0)
    kv = 2 * (H * att.num_kv_heads * D + (att.num_kv_heads * D if qkv_bias else 0))
    o = Hq * D * H + (H if config.attention_bias else 0)
    return q + kv + o + H


def ffn_params(config: DeciLMConfig, block: BlockConfig) -> int:
    """Parameters of one FFN subblock, its RMSNorm included."""
    ffn, H = block.ffn, config.hidden_size
    if ffn.kind == "no_op":
        return 0
    if ffn.kind == "linear":
        return H * H + H
    inter = ffn.intermediate_size
    bias = (2 * inter + H) if config.mlp_bias else 0
    return 3 * H * inter + bias + H


def kv_cache_bytes_per_token(config: DeciLMConfig, block: BlockConfig, dtype: str = "bfloat16") -> int:
    """K and V of one token in one layer: 2 x kv_heads x head_dim x bytes (0 without GQA)."""
    if block.attention.kind != "gqa":
        return 0
    return 2 * block.attention.num_kv_heads * config.head_dim * DTYPE_BYTES[dtype]


def layer_costs(config: DeciLMConfig, dtype: str = "bfloat16") -> list[LayerCost]:
    return [LayerCost(i, b, attention_params(config, b), ffn_params(config, b),
                      kv_cache_bytes_per_token(config, b, dtype))
            for i, b in enumerate(config.blocks)]


def fixed_params(config: DeciLMConfig) -> int:
    """Embedding, final norm and (untied) LM head."""
    embed = config.vocab_size * config.hidden_size
    return embed + config.hidden_size + (0 if config.tie_word_embeddings else embed)


def total_params(config: DeciLMConfig) -> int:
    return fixed_params(config) + sum(c.params for c in layer_costs(config))


def architecture_table(config: DeciLMConfig, dtype: str = "bfloat16") -> str:
    """A plain-text table of the model's layers and totals."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    costs = layer_costs(config, dtype)
    lines = [f"{'layer':>5}  {'attention':<12} {'ffn':<12} {'params':>12}  {'KV B/token':>10}"]
    for c in costs:
        lines.append(f"{c.index:>5}  {c.block.attention.short:<12} {c.block.ffn.short:<12} "
                     f"{c.params:>12,}  {c.kv_cache_bytes_per_token:>10,}")
    fixed = fixed_params(config)
    total = fixed + sum(c.params for c in costs)
    kv = sum(c.kv_cache_bytes_per_token for c in costs)
    tied = "tied" if config.tie_word_embeddings else "untied"
    lines += [
        f"{'embedding + final norm + LM head':<33} ({tied}) {fixed:>12,}",
        f"{'total':<42} {total:>12,}  {kv:>10,}",
        f"hidden {config.hidden_size}, {config.num_attention_heads} query heads of dim {config.head_dim}, "
        f"vocab {config.vocab_size}, {config.num_hidden_layers} layers; KV bytes per token in {dtype}; "
        f"parameters {total / 1e6:.1f}M = {total * DTYPE_BYTES[dtype] / 2**20:.1f} MiB in {dtype}",
    ]
    problems = config.nemotron_nas_incompatibilities()
    if problems:
        lines.append("not loadable by Nemotron-NAS runtimes (vLLM / TRT-LLM / mlx-lm): " + "; ".join(problems))
    return "\n".join(lines)


def count_model_params(model: torch.nn.Module) -> int:
    """Distinct parameters of a model (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
