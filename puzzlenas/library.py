"""The replacement library: which variants each layer may take, and how each is initialized
from the parent without training (METHOD.md sections 1-2).

The `library` stage writes `library/space.json` (variants per layer) and
`library/calibration.safetensors` (per-layer Channel Contribution scores and least-squares
linear FFN / attention weights measured on calibration tokens). Every variant's initial
weights are a deterministic function of the parent and these statistics, so the stage never
writes the (large) weights of every variant; BLD materializes them when it trains them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .activations import LayerActivations, visit_parent_layers
from .model.blocks import AttentionConfig, BlockConfig, FFNConfig
from .model.info import RUNTIMES, runtime_problems, subblock_problems
from .model.modeling import (DeciLMConfig, DeciLMDecoderLayer, DeciLMForCausalLM, ForwardContext, RMSNorm,
                       build_attention_subblock, build_ffn_subblock)
from .sections import LINEAR_INITS, LibraryConfig  # noqa: F401  (re-exported)




@dataclass(frozen=True)
class Variant:
    """One alternative for one subblock of one layer."""

    name: str  # attn_kv1, attn_linear, attn_noop, ffn_768, ffn_linear, ffn_noop, ...
    subblock: str  # "attention" | "ffn"
    config: AttentionConfig | FFNConfig
    is_parent: bool = False

    @property
    def trainable(self) -> bool:
        return not self.is_parent and self.config.kind != "no_op"

    def to_json(self) -> dict:
        return {"name": self.name, "subblock": self.subblock, "kind": self.config.kind,
                "size": getattr(self.config, "num_kv_heads", None) or getattr(self.config, "intermediate_size", None),
                "is_parent": self.is_parent}

    @classmethod
    def from_json(cls, d: dict) -> "Variant":
        if d["subblock"] == "attention":
            config = AttentionConfig(d["kind"], d["size"] if d["kind"] == "gqa" else None)
        else:
            config = FFNConfig(d["kind"], d["size"] if d["kind"] == "gated" else None)
        return cls(d["name"], d["subblock"], config, d["is_parent"])


def attention_variant(config: AttentionConfig, parent: AttentionConfig) -> Variant:
    name = {"gqa": f"attn_kv{config.num_kv_heads}", "linear": "attn_linear", "no_op": "attn_noop"}[config.kind]
    return Variant(name, "attention", config, config == parent)


def ffn_variant(config: FFNConfig, parent: FFNConfig) -> Variant:
    name = {"gated": f"ffn_{config.intermediate_size}", "linear": "ffn_linear", "no_op": "ffn_noop"}[config.kind]
    return Variant(name, "ffn", config, config == parent)


def layer_space(model_config: DeciLMConfig, parent_block: BlockConfig, cfg: LibraryConfig,
                runtime: str = "hf") -> tuple[list[Variant], list[Variant]]:
    """(attention variants, FFN variants) of one layer, the parent's own first; only those that
    `runtime` executes (`model.info.subblock_problems`; hf: every block puzzlenas builds)."""
    heads = model_config.num_attention_heads
    attention = [parent_block.attention]
    if parent_block.attention.kind == "gqa":
        parent_kv = parent_block.attention.num_kv_heads
        kv_options = cfg.kv_heads if cfg.kv_heads is not None else \
            [d for d in range(1, parent_kv + 1) if heads % d == 0]
        for kv in sorted(set(kv_options), reverse=True):
            if heads % kv != 0:
                raise ValueError(f"library.kv_heads: {kv} does not divide the {heads} query heads; allowed: "
                                 f"{[d for d in range(1, heads + 1) if heads % d == 0]}")
            attention.append(AttentionConfig("gqa", kv))
    if cfg.attention_linear:
        attention.append(AttentionConfig("linear"))
    if cfg.attention_no_op:
        attention.append(AttentionConfig("no_op"))

    ffn = [parent_block.ffn]
    if parent_block.ffn.kind == "gated":
        full = parent_block.ffn.intermediate_size
        widths = [round_width(r * full, cfg.ffn_multiple, full) for r in cfg.ffn_ratios]
        widths += [min(s, full) for s in cfg.ffn_sizes]
        ffn += [FFNConfig("gated", w) for w in sorted(set(widths), reverse=True)]
    if cfg.ffn_linear:
        ffn.append(FFNConfig("linear"))
    if cfg.ffn_no_op:
        ffn.append(FFNConfig("no_op"))
    dedup = lambda items: list(dict.fromkeys(items))  # noqa: E731  (keep order, drop repeats)
    runs = lambda sub: sub in (parent_block.attention, parent_block.ffn) or \
        not subblock_problems(model_config, sub, runtime)  # noqa: E731  (the parent's own: see search_space)
    return ([attention_variant(a, parent_block.attention) for a in dedup(attention) if runs(a)],
            [ffn_variant(f, parent_block.ffn) for f in dedup(ffn) if runs(f)])


def round_width(width: float, multiple: int, full: int) -> int:
    """Nearest multiple of `multiple` (at least one multiple, at most the parent's width)."""
    return int(min(full, max(multiple, multiple * round(width / multiple))))


def search_space(model_config: DeciLMConfig, cfg: LibraryConfig,
                 runtime: str = "hf") -> list[tuple[list[Variant], list[Variant]]]:
    """Every layer's variants that `runtime` (the run's `serving.runtime`) executes, so that no
    search can choose a child it cannot serve. A parent the runtime cannot run is refused."""
    problems = runtime_problems(model_config, runtime)
    if problems:
        able = [r for r in RUNTIMES if not runtime_problems(model_config, r)]
        raise ValueError(f"serving.runtime = {runtime}: {RUNTIMES[runtime]} cannot run the parent itself "
                         f"({'; '.join(problems)}), so no child of it either; set serving.runtime to one that "
                         f"can ({', '.join(able)})")
    return [layer_space(model_config, block, cfg, runtime) for block in model_config.blocks]


def excluded_by_runtime(model_config: DeciLMConfig, cfg: LibraryConfig, runtime: str) -> list[str]:
    """Names of the variants the library config asks for that `runtime` cannot run (for the log)."""
    held = {v.name for layer in search_space(model_config, cfg, runtime) for part in layer for v in part}
    everything = [v.name for layer in search_space(model_config, cfg) for part in layer for v in part]
    return [name for name in dict.fromkeys(everything) if name not in held]


# =============================================================================================
# Trainable units: a subblock together with its pre-norm
# =============================================================================================
class AttentionUnit(nn.Module):
    """input_layernorm + attention of one layer; forward returns its residual update."""

    def __init__(self, config: DeciLMConfig, attention: AttentionConfig):
        super().__init__()
        block = BlockConfig(attention, FFNConfig("no_op"))
        self.self_attn = build_attention_subblock(config, block, cache_index=0)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.self_attn else None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.self_attn is None:
            return torch.zeros_like(x)
        return self.self_attn(self.input_layernorm(x), ctx)


class FFNUnit(nn.Module):
    """post_attention_layernorm + FFN of one layer; forward returns its residual update."""

    def __init__(self, config: DeciLMConfig, ffn: FFNConfig):
        super().__init__()
        self.mlp = build_ffn_subblock(config, BlockConfig(AttentionConfig("no_op"), ffn))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.mlp else None

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return torch.zeros_like(m)
        return self.mlp(self.post_attention_layernorm(m))


def parent_attention_unit(config: DeciLMConfig, layer: DeciLMDecoderLayer) -> AttentionUnit:
    unit = AttentionUnit(config, layer.block.attention)
    unit.self_attn, unit.input_layernorm = layer.self_attn, layer.input_layernorm  # shared, not copied
    return unit


def parent_ffn_unit(config: DeciLMConfig, layer: DeciLMDecoderLayer) -> FFNUnit:
    unit = FFNUnit(config, layer.block.ffn)
    unit.mlp, unit.post_attention_layernorm = layer.mlp, layer.post_attention_layernorm
    return unit


# =============================================================================================
# Initialization from the parent (METHOD.md section 2)
# =============================================================================================
def kv_head_of_query(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(num_heads,) index of the KV head each query head reads."""
    return torch.arange(num_heads) // (num_heads // num_kv_heads)


def pool_kv_heads(weight: torch.Tensor, num_heads: int, kv_from: int, kv_to: int, head_dim: int) -> torch.Tensor:
    """Mean-pool K or V projection rows (kv_from*D, ...) into kv_to heads (kv_to*D, ...).

    New head j serves query heads G_j; it is the mean, over q in G_j, of the parent head q
    read. When kv_to divides kv_from this is the plain mean over each merged group."""
    rest = weight.shape[1:]
    heads = weight.reshape(kv_from, head_dim, *rest)
    per_query = heads[kv_head_of_query(num_heads, kv_from)]  # (Hq, D, ...)
    pooled = per_query.reshape(kv_to, num_heads // kv_to, head_dim, *rest).mean(1)
    return pooled.reshape(kv_to * head_dim, *rest)


@torch.no_grad()
def init_attention(unit: AttentionUnit, parent_layer: DeciLMDecoderLayer, config: DeciLMConfig,
                   stats: dict[str, torch.Tensor] | None, layer_index: int, linear_init: str) -> None:
    """Initialize an attention unit from the parent layer's attention."""
    if unit.self_attn is None:
        return
    parent = parent_layer.self_attn
    unit.input_layernorm.weight.copy_(parent_layer.input_layernorm.weight)
    Hq, D = config.num_attention_heads, config.head_dim
    kind = unit.self_attn.__class__.__name__
    if kind == "GQAAttention":
        kv_to, kv_from = unit.self_attn.num_kv_heads, parent.num_kv_heads
        child = unit.self_attn
        child.q_proj.load_state_dict(parent.q_proj.state_dict())
        child.o_proj.load_state_dict(parent.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(parent, name), getattr(child, name)
            dst.weight.copy_(pool_kv_heads(src.weight, Hq, kv_from, kv_to, D))
            if dst.bias is not None:
                dst.bias.copy_(pool_kv_heads(src.bias, Hq, kv_from, kv_to, D))
    else:  # linear attention
        key = f"layer{layer_index}.linear_attention"
        if linear_init == "lstsq" and stats is not None and key in stats:
            unit.self_attn.linear_attn.weight.copy_(stats[key])
        else:
            unit.self_attn.linear_attn.weight.copy_(linear_attention_product(parent, Hq, D))


def linear_attention_product(parent_attention: nn.Module, num_heads: int, head_dim: int) -> torch.Tensor:
    """W_o · W_v with the KV heads expanded to the query heads: (C, C)."""
    w_v = parent_attention.v_proj.weight  # (Hkv*D, C)
    w_v = w_v.reshape(parent_attention.num_kv_heads, head_dim, -1)[kv_head_of_query(num_heads,
                                                                                    parent_attention.num_kv_heads)]
    return parent_attention.o_proj.weight @ w_v.reshape(num_heads * head_dim, -1)  # (C, Hq*D) @ (Hq*D, C)


@torch.no_grad()
def init_ffn(unit: FFNUnit, parent_layer: DeciLMDecoderLayer, stats: dict[str, torch.Tensor] | None,
             layer_index: int, linear_init: str) -> None:
    """Initialize an FFN unit from the parent layer's FFN (Channel Contribution pruning, lstsq)."""
    if unit.mlp is None:
        return
    parent = parent_layer.mlp
    unit.post_attention_layernorm.weight.copy_(parent_layer.post_attention_layernorm.weight)
    if unit.mlp.__class__.__name__ == "GatedMLP":
        width = unit.mlp.gate_proj.out_features
        scores = stats.get(f"layer{layer_index}.channel_contribution") if stats else None
        if scores is None:  # no calibration: fall back to the weight-only part of the score
            scores = parent.down_proj.weight.norm(dim=0)
        keep = torch.topk(scores.float(), width).indices.sort().values  # keep channel order
        for name in ("gate_proj", "up_proj"):
            getattr(unit.mlp, name).weight.copy_(getattr(parent, name).weight[keep])
            if getattr(unit.mlp, name).bias is not None:
                getattr(unit.mlp, name).bias.copy_(getattr(parent, name).bias[keep])
        unit.mlp.down_proj.weight.copy_(parent.down_proj.weight[:, keep])
        if unit.mlp.down_proj.bias is not None:
            unit.mlp.down_proj.bias.copy_(parent.down_proj.bias)
    else:  # linear FFN
        key = f"layer{layer_index}.linear_ffn"
        if linear_init == "lstsq" and stats is not None and key in stats:
            unit.mlp.linear_mlp.weight.copy_(stats[key])
        else:
            unit.mlp.linear_mlp.weight.copy_(parent.down_proj.weight @ parent.up_proj.weight)


def build_unit(variant: Variant, config: DeciLMConfig, parent: DeciLMForCausalLM, layer_index: int,
               stats: dict[str, torch.Tensor] | None, lib_cfg: LibraryConfig, init: str = "parent",
               seed: int = 0) -> nn.Module:
    """A fresh trainable unit for `variant` at `layer_index`, initialized from the parent
    (`init="parent"`) or randomly like a new model (`init="random"`, for ablations)."""
    parent_layer = parent.model.layers[layer_index]
    device = parent.model.embed_tokens.weight.device
    if variant.subblock == "attention":
        unit = AttentionUnit(config, variant.config)
    else:
        unit = FFNUnit(config, variant.config)
    unit = unit.to(device=device, dtype=torch.float32)
    if init == "random":
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for name, p in unit.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * config.initializer_range)
        return unit
    if variant.subblock == "attention":
        init_attention(unit, parent_layer, config, stats, layer_index, lib_cfg.linear_attention_init)
    else:
        init_ffn(unit, parent_layer, stats, layer_index, lib_cfg.linear_ffn_init)
    return unit


# =============================================================================================
# Calibration statistics
# =============================================================================================
class CalibrationAccumulator:
    """Running sums over calibration tokens, per layer:
    - sum |a_k| of the gated activation a = silu(gate n) * up n (Channel Contribution),
    - n^T n and n^T f for the least-squares linear FFN (n: normed FFN input, f: FFN output),
    - u^T u and u^T o for the least-squares linear attention (u: normed attention input)."""

    def __init__(self, model: DeciLMForCausalLM, want_linear_ffn: bool, want_linear_attention: bool):
        self.model = model
        self.want_ffn, self.want_attn = want_linear_ffn, want_linear_attention
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    @torch.no_grad()
    def visit(self, i: int, acts: LayerActivations, ctx: ForwardContext) -> None:
        layer = self.model.model.layers[i]
        if layer.mlp is not None:
            n = layer.post_attention_layernorm(acts.m).flatten(0, 1)  # (N, C)
            if layer.mlp.__class__.__name__ == "GatedMLP":
                mlp = layer.mlp
                a = torch.nn.functional.silu(mlp.gate_proj(n)) * mlp.up_proj(n)  # (N, I)
                self._add(f"layer{i}.abs_activation_sum", a.abs().double().sum(0))
            if self.want_ffn:
                f = (acts.y - acts.m).flatten(0, 1).double()  # (N, C)
                nd = n.double()
                self._add(f"layer{i}.ffn_xtx", nd.T @ nd)
                self._add(f"layer{i}.ffn_xty", nd.T @ f)
        if layer.self_attn is not None and self.want_attn:
            u = layer.input_layernorm(acts.x).flatten(0, 1).double()
            o = (acts.m - acts.x).flatten(0, 1).double()
            self._add(f"layer{i}.attn_xtx", u.T @ u)
            self._add(f"layer{i}.attn_xty", u.T @ o)

    def finish(self) -> dict[str, torch.Tensor]:
        """Channel Contribution scores and least-squares weights, in float32 on the CPU."""
        out = {}
        for i, layer in enumerate(self.model.model.layers):
            key = f"layer{i}.abs_activation_sum"
            if key in self.sums:
                down_norm = layer.mlp.down_proj.weight.double().norm(dim=0)  # ||W_down[:, k]||
                out[f"layer{i}.channel_contribution"] = (self.sums[key] / self.tokens * down_norm).float().cpu()
            for sub, name in (("ffn", "linear_ffn"), ("attn", "linear_attention")):
                if f"layer{i}.{sub}_xtx" in self.sums:
                    w = ridge_solve(self.sums[f"layer{i}.{sub}_xtx"], self.sums[f"layer{i}.{sub}_xty"])
                    out[f"layer{i}.{name}"] = w.T.float().cpu().contiguous()  # nn.Linear weight (out, in)
        return out


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, rel_ridge: float = 1e-6) -> torch.Tensor:
    """argmin_W ||X W - Y||^2 + lambda ||W||^2 from X^T X and X^T Y; lambda relative to trace."""
    lam = rel_ridge * xtx.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx + lam * eye, xty)


def calibration_statistics(model: DeciLMForCausalLM, batches, lib_cfg: LibraryConfig) -> dict[str, torch.Tensor]:
    """Run the parent over calibration batches and return the per-layer statistics."""
    acc = CalibrationAccumulator(model, lib_cfg.ffn_linear and lib_cfg.linear_ffn_init == "lstsq",
                                 lib_cfg.attention_linear and lib_cfg.linear_attention_init == "lstsq")
    device = model.model.embed_tokens.weight.device
    last = len(model.model.layers) - 1
    for batch in batches:
        batch = batch.to(device)
        visit_parent_layers(model, batch, last, acc.visit)
        acc.tokens += batch.numel()
    if acc.tokens == 0:
        raise ValueError("no calibration tokens: the train split is empty; add data or lower data.seq_len")
    return acc.finish()


# =============================================================================================
# Stage files
# =============================================================================================
def write_space(path: Path, space: list[tuple[list[Variant], list[Variant]]]) -> None:
    layers = [{"layer": i, "attention": [v.to_json() for v in att], "ffn": [v.to_json() for v in ffn]}
              for i, (att, ffn) in enumerate(space)]
    from .checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps({"layers": layers}, indent=1))


def read_space(path: Path) -> list[tuple[list[Variant], list[Variant]]]:
    try:
        layers = json.loads(path.read_text())["layers"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path} is missing or corrupted ({err}); rerun with --force library") from err
    return [([Variant.from_json(v) for v in layer["attention"]], [Variant.from_json(v) for v in layer["ffn"]])
            for layer in layers]


def space_table(space: list[tuple[list[Variant], list[Variant]]]) -> str:
    att, ffn = space[0]
    same = all([v.name for v in a] == [v.name for v in att] and [v.name for v in f] == [v.name for v in ffn]
               for a, f in space)
    lines = [f"search space: {len(space)} layers x {len(att)} attention x {len(ffn)} FFN variants"
             f" = {len(att) * len(ffn)} choices per layer" + ("" if same else " (layer 0; layers differ)"),
             "  attention: " + ", ".join(v.name + ("*" if v.is_parent else "") for v in att),
             "  ffn:       " + ", ".join(v.name + ("*" if v.is_parent else "") for v in ffn),
             "  (* = the parent's own block)"]
    total = sum(len(a) * len(f) for a, f in space)
    lines.append(f"  log10(architectures) = {sum(math.log10(len(a) * len(f)) for a, f in space):.1f}; "
                 f"{total} (layer, attention, FFN) triples")
    return "\n".join(lines)
