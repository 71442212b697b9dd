"""The heterogeneous decoder: one model class for parent and child (Nemotron-NAS / DeciLM layout).

Every layer is built from its `BlockConfig`: GQA attention with its own KV-head count, a
linear attention (one hidden->hidden matrix) or no attention; a gated SiLU FFN of its own
width, a linear FFN or no FFN. Weight names are the Llama ones, plus
`self_attn.linear_attn` / `mlp.linear_mlp`; a no-op subblock has neither weights nor norm.
The classes plug into transformers (AutoConfig / AutoModelForCausalLM, `generate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .blocks import BlockConfig, BlockConfigError, is_nas_expressible

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# =============================================================================================
# Config
# =============================================================================================
class DeciLMConfig(PretrainedConfig):
    """Nemotron-NAS config: the Llama fields plus `block_configs`, one dict per layer."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        block_configs: list[dict] | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,  # bias on q, k, v and o (Llama semantics)
        qkv_bias: bool = False,  # bias on q, k, v only (Qwen2)
        mlp_bias: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs: Any,
    ):
        # transformers 5 keeps RoPE settings in `rope_parameters`; we accept both spellings and
        # store the Llama-style `rope_theta` / `rope_scaling` that Nemotron-NAS readers expect.
        rope_parameters = kwargs.pop("rope_parameters", None)
        rope_theta, rope_scaling = _normalize_rope(rope_theta, rope_scaling, rope_parameters)
        # Fields of the DeciLM remote-code config that we derive instead of storing.
        for derived in ("num_key_value_heads", "intermediate_size", "attention_dropout",
                        "pretraining_tp", "auto_map"):
            kwargs.pop(derived, None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.rope_scaling_config = rope_scaling
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if block_configs is None:  # all-parent blocks of a plain Llama shape
            default = BlockConfig.parent(num_attention_heads, 4 * hidden_size)
            block_configs = [default.to_nas_dict(num_attention_heads, hidden_size)] * num_hidden_layers
        self.block_configs = [_plain_block_dict(b) for b in block_configs]
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_blocks()

    # ---- blocks ---------------------------------------------------------------------------
    @property
    def blocks(self) -> list[BlockConfig]:
        """The parsed, validated per-layer `BlockConfig`s."""
        return [BlockConfig.from_nas_dict(b, self.num_attention_heads, self.hidden_size,
                                          f"block_configs[{i}]")
                for i, b in enumerate(self.block_configs)]

    def validate_blocks(self) -> None:
        if self.hidden_act != "silu":
            raise BlockConfigError(f"hidden_act = {self.hidden_act!r}; puzzlenas supports 'silu' only")
        if len(self.block_configs) != self.num_hidden_layers:
            raise BlockConfigError(f"block_configs has {len(self.block_configs)} entries but "
                                   f"num_hidden_layers = {self.num_hidden_layers}; give one per layer")
        _ = self.blocks  # raises with the offending layer's path

    @classmethod
    def from_blocks(cls, blocks: list[BlockConfig], **fields: Any) -> "DeciLMConfig":
        """Build a config from explicit `BlockConfig`s (our exact schema)."""
        heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
        for i, b in enumerate(blocks):
            b.validate(heads, f"blocks[{i}]")
        nas = [b.to_nas_dict(heads, hidden) for b in blocks]
        return cls(block_configs=nas, num_hidden_layers=len(blocks), **fields)

    def nemotron_nas_incompatibilities(self) -> list[str]:
        """Reasons why vLLM / TensorRT-LLM / mlx-lm would not load this checkpoint (empty = fine)."""
        problems = []
        bad = is_nas_expressible(self.blocks, self.hidden_size)
        if bad:
            problems.append(f"FFN widths of layers {bad} are not expressible by ffn_mult with 256 rounding")
        if self.qkv_bias or self.attention_bias or self.mlp_bias:
            problems.append("attention/MLP biases are not part of the Nemotron-NAS architecture")
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            problems.append(f"head_dim {self.head_dim} != hidden_size / num_attention_heads")
        return problems

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("rope_scaling_config", None)
        out.pop("rope_parameters", None)
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = self.rope_scaling_config
        # Generic fields of sequence-classification heads etc. that a causal LM never uses.
        for unused in ("id2label", "label2id", "problem_type", "chunk_size_feed_forward", "_name_or_path"):
            out.pop(unused, None)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _plain_block_dict(block: Any) -> dict:
    """Block configs may arrive as dicts or as dataclass-like objects (DeciLM remote code)."""
    if isinstance(block, dict):
        return {k: (dict(v) if isinstance(v, dict) else _plain_block_dict_part(v)) for k, v in block.items()}
    return {"attention": _plain_block_dict_part(block.attention), "ffn": _plain_block_dict_part(block.ffn)}


def _plain_block_dict_part(part: Any) -> dict:
    if isinstance(part, dict):
        return dict(part)
    if dataclasses.is_dataclass(part):
        return dataclasses.asdict(part)
    return dict(vars(part))


def _normalize_rope(theta: float, scaling: dict | None, parameters: dict | None) -> tuple[float, dict | None]:
    """Reduce the RoPE settings of transformers 4 (`rope_theta` + `rope_scaling`) and 5
    (`rope_parameters`) to (theta, scaling-or-None) and check the scaling type is supported."""
    if parameters:
        parameters = dict(parameters)
        theta = parameters.pop("rope_theta", theta)
        parameters.pop("partial_rotary_factor", None)
        if parameters.get("rope_type", parameters.get("type", "default")) != "default":
            scaling = parameters
    if scaling:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise BlockConfigError(f"rope_scaling type {rope_type!r} is not supported; "
                                   f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        scaling.pop("rope_theta", None)
        if rope_type == "default":
            scaling = None
    return theta, scaling or None


# =============================================================================================
# Modules
# =============================================================================================
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 like the Llama reference, then return to the input dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for default, linear and llama3 RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between is
    # interpolated (Llama 3.1 reference implementation).
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, D); cos/sin: (B, T, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class GQAAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, num_kv_heads: int, cache_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, num_kv_heads, config.head_dim
        self.cache_index = cache_index  # this layer's slot in the KV cache (GQA layers only)
        qkv_bias = config.attention_bias or config.qkv_bias
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.cache_index)  # (B, Hkv, past + T, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LinearAttention(nn.Module):
    """Attention replaced by one hidden->hidden matrix (a token that attends only to itself)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        return self.linear_attn(x)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with this layer's own intermediate size."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        hidden, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


@dataclasses.dataclass
class ForwardContext:
    """What every attention layer of one forward pass shares."""

    cos: torch.Tensor  # (B, T, D)
    sin: torch.Tensor  # (B, T, D)
    mask: torch.Tensor | None  # bool (B, 1, T, past + T), True = attend; None = see is_causal
    is_causal: bool
    cache: Cache | None


def build_attention_subblock(config: DeciLMConfig, block: BlockConfig, cache_index: int) -> nn.Module | None:
    att = block.attention
    if att.kind == "gqa":
        return GQAAttention(config, att.num_kv_heads, cache_index)
    if att.kind == "linear":
        return LinearAttention(config)
    return None


def build_ffn_subblock(config: DeciLMConfig, block: BlockConfig) -> nn.Module | None:
    if block.ffn.kind == "gated":
        return GatedMLP(config, block.ffn.intermediate_size)
    if block.ffn.kind == "linear":
        return LinearMLP(config)
    return None


class DeciLMDecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); a no-op subblock is skipped with its norm."""

    def __init__(self, config: DeciLMConfig, block: BlockConfig, cache_index: int):
        super().__init__()
        self.block = block
        self.self_attn = build_attention_subblock(config, block, cache_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.self_attn else None
        self.mlp = build_ffn_subblock(config, block)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.mlp else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), ctx)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# =============================================================================================
# Models
# =============================================================================================
class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
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
        elif isinstance(module, RotaryEmbedding):
            cfg = self.config
            module.inv_freq.copy_(rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_config))


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        blocks = config.blocks
        cache_slots = _kv_cache_slots(blocks)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DeciLMDecoderLayer(config, block, cache_slots[i]) for i, block in enumerate(blocks))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.num_cache_layers = sum(slot >= 0 for slot in cache_slots)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
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
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask, is_causal = _attention_mask(attention_mask, B, T, past, x.device)
        ctx = ForwardContext(cos, sin, mask, is_causal, cache)

        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        return _with_cache(BaseModelOutputWithPast, last_hidden_state=x, cache=cache,
                           hidden_states=tuple(hidden_states) if hidden_states is not None else None)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

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

    @property
    def blocks(self) -> list[BlockConfig]:
        return [layer.block for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
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


# =============================================================================================
# Helpers
# =============================================================================================
def _kv_cache_slots(blocks: list[BlockConfig]) -> list[int]:
    """Cache slot per layer: GQA layers are numbered 0, 1, ... in order; others get -1.

    Only layers that keep a KV cache take a slot, so slot 0 is always a real attention layer
    and `cache.get_seq_length()` (which reads slot 0) is right even when layer 0 is no-op."""
    slots, next_slot = [], 0
    for block in blocks:
        if block.attention.kind == "gqa":
            slots.append(next_slot)
            next_slot += 1
        else:
            slots.append(-1)
    return slots


def _positions(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Position ids (B, T); with a 2D padding mask, positions count only real tokens (left padding)."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -T:]
    return (torch.arange(T, device=device) + past).unsqueeze(0).expand(B, T)


def _attention_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                    device) -> tuple[torch.Tensor | None, bool]:
    """Return (bool mask (B, 1, T, past + T) or None, is_causal) for SDPA."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token sees the whole cache
    K = past + T
    q_pos = torch.arange(past, K, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(K, device=device)[None, :]  # (1, K)
    mask = (k_pos <= q_pos)[None, None].expand(B, 1, T, K)  # (B, 1, T, K)
    if padded:
        keep = attention_mask[:, -K:].bool()[:, None, None, :]  # (B, 1, 1, K)
        # A padding query would see nothing and give NaN; let it see itself (its output is unused).
        mask = (mask & keep) | (k_pos == q_pos)[None, None]
    return mask, False


def _output_field(cls: type) -> str:
    names = {f.name for f in dataclasses.fields(cls)}
    return "cache" if "cache" in names else "past_key_values"


def _with_cache(cls: type, cache: Cache | None, **fields: Any):
    """Build a transformers output whose cache field is `cache` (5.2x) or `past_key_values` (5.1x)."""
    return cls(**fields, **{_output_field(cls): cache})


def _cache_of(output: Any) -> Cache | None:
    return getattr(output, _output_field(type(output)))


def _register_with_transformers() -> None:
    """`AutoModelForCausalLM.from_pretrained(child_dir)` loads puzzlenas children once this module
    is imported (`from puzzlenas import DeciLMForCausalLM` does it)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig)
        AutoModel.register(DeciLMConfig, DeciLMModel)
        AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM)
    except ValueError:  # already registered (module re-imported)
        pass


_register_with_transformers()
