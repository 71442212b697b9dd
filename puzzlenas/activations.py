"""The parent's own activations, layer by layer: what BLD and scoring feed their blocks.

For layer i of the parent: x_i is the residual stream entering the layer, m_i the stream
after its attention subblock (x_i + attn_i), y_i the stream leaving it (m_i + ffn_i).
Teacher forcing = every child block of layer i sees the parent's x_i (or m_i).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .model.modeling import DeciLMForCausalLM, ForwardContext


@dataclass
class LayerActivations:
    x: torch.Tensor  # (B, T, C) input of the layer
    m: torch.Tensor  # (B, T, C) after the attention subblock
    y: torch.Tensor  # (B, T, C) output of the layer


def causal_context(model: DeciLMForCausalLM, input_ids: torch.Tensor, dtype: torch.dtype) -> ForwardContext:
    """RoPE tables and causal masking for a full (un-padded, cache-free) batch."""
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
    cos, sin = model.model.rotary_emb(positions, dtype)
    # No padding and no cache: SDPA's own causal mask, no mask tensor (one token needs none).
    return ForwardContext(cos, sin, None, T > 1, None)


@torch.no_grad()
def visit_parent_layers(model: DeciLMForCausalLM, input_ids: torch.Tensor, last_layer: int,
                        visit: Callable[[int, LayerActivations, ForwardContext], None]) -> None:
    """Run the parent through layers 0..last_layer, calling visit(i, acts, ctx) after each."""
    x = model.model.embed_tokens(input_ids)  # (B, T, C)
    ctx = causal_context(model, input_ids, x.dtype)
    for i, layer in enumerate(model.model.layers[: last_layer + 1]):
        m = x + layer.self_attn(layer.input_layernorm(x), ctx) if layer.self_attn is not None else x
        y = m + layer.mlp(layer.post_attention_layernorm(m)) if layer.mlp is not None else m
        visit(i, LayerActivations(x, m, y), ctx)
        x = y


def parent_layer_activations(model: DeciLMForCausalLM, input_ids: torch.Tensor,
                             layers: set[int] | list[int]) -> tuple[dict[int, LayerActivations], ForwardContext]:
    """Run the parent up to the deepest requested layer; keep x, m, y of the requested ones."""
    wanted, out = set(layers), {}
    ctx_holder: list[ForwardContext] = []

    def keep(i: int, acts: LayerActivations, ctx: ForwardContext) -> None:
        if i in wanted:
            out[i] = acts
        if not ctx_holder:
            ctx_holder.append(ctx)

    if wanted:
        visit_parent_layers(model, input_ids, max(wanted), keep)
    return out, (ctx_holder[0] if ctx_holder else None)
