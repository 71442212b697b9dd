"""Architecture table: per-layer blocks, parameters and KV-cache bytes per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import AttentionConfig, BlockConfig, FFNConfig, ffn_mult_for_width
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
    lines.append(runtimes_text(config))
    return "\n".join(lines)


# =============================================================================================
# Runtimes that load the checkpoint (`puzzlenas export --runtime ...`)
# =============================================================================================
RUNTIMES = {  # --runtime value -> what runs it
    "vllm": "vLLM (nemotron_nas.py)",
    "trtllm": "TensorRT-LLM (modeling_nemotron_nas.py)",
    "mlx": "mlx-lm (models/nemotron-nas.py)",
    "hf": "transformers / lm-eval (the exported modeling_decilm.py, trust_remote_code)",
}


def _layers(indices: list[int]) -> str:
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(map(str, indices))


# Per-subblock rules, read from each runtime's Nemotron-NAS model code: reason -> message after the layers.
_SUBBLOCK_MESSAGES = {
    "linear_attention_vllm": "linear attention (replace_with_linear), which vLLM's nemotron_nas does not build",
    "linear_ffn_vllm": "linear FFN (replace_with_linear), which vLLM's nemotron_nas does not build",
    "linear_attention_bias_mlx": "linear attention in a model with attention biases (mlx-lm gives it a bias "
                                 "puzzlenas does not train)",
    "linear_ffn_bias_mlx": "linear FFN in a model with MLP biases (mlx-lm gives it a bias)",
}


def subblock_problems(config: DeciLMConfig, subblock: AttentionConfig | FFNConfig, runtime: str) -> list[str]:
    """Why `runtime` cannot run this one subblock in a model shaped like `config` (empty = it can):
    the per-layer half of `runtime_problems`, which the library reads to hold only variants the
    run's `serving.runtime` executes. Reasons are keys ("ffn_width", "linear_attention_vllm", ...)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    if runtime == "hf":
        return []  # our own modeling code runs every block puzzlenas builds
    attention = isinstance(subblock, AttentionConfig)
    problems = []
    # every runtime but hf derives FFN widths from ffn_mult alone
    if not attention and subblock.kind == "gated" and \
            ffn_mult_for_width(subblock.intermediate_size, config.hidden_size) is None:
        problems.append("ffn_width")
    if subblock.kind == "linear":
        part = "attention" if attention else "ffn"
        if runtime == "vllm":
            problems.append(f"linear_{part}_vllm")  # vLLM builds GQA or no-op subblocks only
        elif runtime == "mlx":
            biased = (config.attention_bias or config.qkv_bias) if attention else config.mlp_bias
            if biased:
                problems.append(f"linear_{part}_bias_mlx")
    return problems


def model_problems(config: DeciLMConfig, runtime: str) -> list[str]:
    """Why `runtime` cannot run a model of this shape whatever its blocks (biases, head_dim)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    natural_head_dim = config.head_dim == config.hidden_size // config.num_attention_heads
    problems = []
    if runtime == "trtllm":
        if config.attention_bias or config.qkv_bias or config.mlp_bias:
            problems.append("attention / MLP biases (TensorRT-LLM's Nemotron-NAS layers have none)")
        if not natural_head_dim:
            problems.append(f"head_dim {config.head_dim} != hidden_size / num_attention_heads")
    elif runtime == "mlx":
        if config.qkv_bias and not config.attention_bias:
            problems.append("q/k/v-only biases (Qwen2 style; mlx-lm has attention_bias on q, k, v and o together)")
        if not natural_head_dim:
            problems.append(f"head_dim {config.head_dim} != hidden_size / num_attention_heads (mlx-lm derives it)")
    return problems


def runtime_problems(config: DeciLMConfig, runtime: str) -> list[str]:
    """Why `runtime` cannot run this checkpoint as exported for it (empty = it can).

    Read from each runtime's Nemotron-NAS model code: vLLM builds GQA or no-op subblocks only;
    TensorRT-LLM has no biases and takes head_dim = hidden / heads; mlx-lm takes head_dim = hidden /
    heads, biases on q/k/v/o together (no Qwen2-style q/k/v-only bias) and linear subblocks with
    the subblock's bias; every one of them derives FFN widths from `ffn_mult` alone."""
    layers_by_reason: dict[str, list[int]] = {}
    for i, block in enumerate(config.blocks):
        for subblock in (block.attention, block.ffn):
            for reason in subblock_problems(config, subblock, runtime):
                layers_by_reason.setdefault(reason, []).append(i)
    problems = []
    if "ffn_width" in layers_by_reason:
        problems.append(f"the FFN widths of {_layers(layers_by_reason['ffn_width'])} are not expressible by "
                        f"ffn_mult (256 rounding)")
    problems += model_problems(config, runtime)
    problems += [f"{_layers(layers_by_reason[reason])}: {message}" for reason, message in _SUBBLOCK_MESSAGES.items()
                 if reason in layers_by_reason]
    return problems


def runtime_support(config: DeciLMConfig) -> dict[str, list[str]]:
    """{runtime: reasons it cannot run the checkpoint} for every runtime (empty list = it can)."""
    return {runtime: runtime_problems(config, runtime) for runtime in RUNTIMES}


def runtimes_text(config: DeciLMConfig) -> str:
    """One line per runtime: whether `puzzlenas export --runtime R` gives a checkpoint R loads."""
    support = runtime_support(config)
    ok = [r for r, problems in support.items() if not problems]
    lines = [f"runtimes (puzzlenas export --runtime R): {', '.join(ok)} can run this model"]
    for runtime, problems in support.items():
        if problems:
            lines.append(f"  not {runtime}: " + "; ".join(problems))
    return "\n".join(lines)


def count_model_params(model: torch.nn.Module) -> int:
    """Distinct parameters of a model (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
