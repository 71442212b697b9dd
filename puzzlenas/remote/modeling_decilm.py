# Shipped by puzzlenas next to exported weights (Apache-2.0). Self-contained: imports only torch
# and transformers (4.x or 5.x), so that lm-evaluation-harness and plain transformers run the
# export with `trust_remote_code=True` without puzzlenas installed.
"""Nemotron-NAS (DeciLM) decoder: every layer built from its own block config.

Attention is GQA with the layer's own KV-head count, one hidden->hidden matrix
(`self_attn.linear_attn`), or nothing; the FFN is a gated SiLU MLP of the layer's own width,
one matrix (`mlp.linear_mlp`), or nothing. A missing subblock has no norm either. Weight
names are the Llama ones; the KV cache holds only the GQA layers, numbered in order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # transformers < 4.45
    from transformers.generation import GenerationMixin

from .configuration_decilm import DeciLMConfig, intermediate_size_of

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalize in fp32 like Llama, scale in the input dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies for default, linear and llama3 RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclasses.dataclass
class ForwardContext:
    """What the attention layers of one forward pass share."""

    cos: torch.Tensor  # (B, T, D)
    sin: torch.Tensor  # (B, T, D)
    mask: torch.Tensor | None  # bool (B, 1, T, past + T), True = attend; None = see is_causal
    is_causal: bool
    cache: Cache | None


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, num_kv_heads: int, cache_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, num_kv_heads, config.head_dim
        self.cache_index = cache_index
        hidden, qkv_bias = config.hidden_size, config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.cos[:, None], ctx.sin[:, None]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.cache_index)  # (B, Hkv, past + T, D)
        if self.num_kv_heads != self.num_heads:  # repeat KV heads (portable across torch versions)
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class DeciLMLinearAttention(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        hidden, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); a no-op subblock is skipped with its norm."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int):
        super().__init__()
        block = config.block_configs[layer_idx]
        att, ffn = block.attention, block.ffn
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if not att.no_op:
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (DeciLMLinearAttention(config) if att.replace_with_linear else
                              DeciLMAttention(config, config.num_attention_heads // att.n_heads_in_group, cache_index))
        if not ffn.no_op:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = (DeciLMLinearMLP(config) if ffn.replace_with_linear else
                        DeciLMMLP(config, intermediate_size_of(ffn, config.hidden_size)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), ctx)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        # KV-cache slots: GQA layers numbered 0, 1, ... in order (slot 0 is a real attention layer,
        # so the cache's sequence length is right even when layer 0 has no attention).
        slots, next_slot = [], 0
        for block in config.block_configs:
            has_cache = not (block.attention.no_op or block.attention.replace_with_linear)
            slots.append(next_slot if has_cache else -1)
            next_slot += has_cache
        self.num_cache_layers = next_slot
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, i, slot) for i, slot in enumerate(slots))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed each call (head_dim / 2 numbers): no buffer to lose to meta-device loading.
        theta, scaling = self.config.rope
        inv_freq = rope_inverse_frequencies(self.config.head_dim, theta, scaling).to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, cache: Cache | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if use_cache and cache is None and not self.training:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None and self.num_cache_layers else 0
        if position_ids is None:
            position_ids = _positions(attention_mask, B, T, past, x.device)
        cos, sin = self._rope(position_ids, x.dtype)
        mask, is_causal = _attention_mask(attention_mask, B, T, past, x.device)
        ctx = ForwardContext(cos, sin, mask, is_causal, cache)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, ctx)
            if hidden_states is not None:
                hidden_states.append(x)
        return _with_cache(BaseModelOutputWithPast, last_hidden_state=self.norm(x), cache=cache,
                           hidden_states=tuple(hidden_states) if hidden_states is not None else None)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # transformers 5 maps tied names; 4 lists them (and ties through get_output_embeddings).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, cache: Cache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state  # (B, T, C)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return _with_cache(CausalLMOutputWithPast, loss=loss, logits=logits, cache=_cache_of(out),
                           hidden_states=out.hidden_states)


def _positions(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Position ids (B, T); with a 2D padding mask they count only real tokens (left padding)."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return (torch.arange(T, device=device) + past).unsqueeze(0).expand(B, T)


def _attention_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                    device) -> tuple[torch.Tensor | None, bool]:
    """(bool mask (B, 1, T, past + T) or None, is_causal) for SDPA."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token sees the whole cache
    K = past + T
    q_pos = torch.arange(past, K, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(K, device=device)[None, :]  # (1, K)
    mask = (k_pos <= q_pos)[None, None].expand(B, 1, T, K)
    if padded:
        keep = attention_mask[:, -K:].bool()[:, None, None, :]  # (B, 1, 1, K)
        mask = (mask & keep) | (k_pos == q_pos)[None, None]  # a padding query sees itself (no NaN)
    return mask, False


def _output_field(cls: type) -> str:
    names = {f.name for f in dataclasses.fields(cls)}
    return "cache" if "cache" in names else "past_key_values"


def _with_cache(cls: type, cache: Cache | None, **fields: Any):
    """A transformers output whose cache field is `cache` or `past_key_values`, by version."""
    return cls(**fields, **{_output_field(cls): cache})


def _cache_of(output: Any) -> Cache | None:
    return getattr(output, _output_field(type(output)))
