"""What each block costs on the target device (METHOD.md section 5).

For every distinct subblock shape of the library (an attention of h KV heads, a linear
attention, an FFN of width w, a linear FFN) and every serving scenario (batch b, prompt N
tokens, M generated tokens): the prefill time of b x N tokens and the time of one decode step
with a static KV cache of N + M positions, measured on the static-cache path of
`inference.py` (the one the throughput benchmark and `puzzlenas` children use), inside CUDA
graphs with CUDA events on GPU, as medians. The fixed parts (embedding, RoPE tables, final
norm, LM head) are measured once. Memory: parameter bytes and KV-cache bytes per token.

A block timed alone keeps its weights and KV buffer in the processor's caches between calls,
which the real model (all layers streaming through) does not: on a 2-core CPU a SmolLM2 FFN
timed alone ran 0.53 ms per decode step and 0.91 ms per copy in a stack of 30 copies, and the
block sum missed whole models by -22..-26% (benchmarks/cpu_costs.py, benchmarks/RESULTS.md). So each block is timed as a stack of `stack_layers`
independent copies (own weights, own KV buffer), divided by the copies. "auto" stacks the
parent's layer count on CPU (capped by bytes) and times one copy on CUDA, where the
single-copy timings were checked against whole models within 10% (benchmarks/RESULTS.md).

A check measures whole models end to end (the parent and random children) and compares them
with the sum of their blocks' costs. What the block sum misses is then fitted per phase and
scenario as measured = scale x predicted + offset over those models (the offset: per-model
overheads no block owns, e.g. ~5 ms per decode step on a 2-core CPU), and folded into the table
(every block time x scale, the fixed part x scale + offset), so that sums of blocks, and the
speedups the search promises, predict whole models. The raw measurements are kept.
"""

from __future__ import annotations

import math
import platform
import random
from dataclasses import dataclass, field

import torch

from .model.blocks import AttentionConfig, BlockConfig, FFNConfig
from .model.info import DTYPE_BYTES, attention_params, ffn_params, fixed_params
from .model.inference import StaticKVCache, measure_generation, static_forward, time_fn
from .model.modeling import DeciLMConfig, DeciLMDecoderLayer, DeciLMForCausalLM, ForwardContext


@dataclass
class Scenario:
    """A serving scenario: b sequences, N prompt tokens, M generated tokens each."""

    name: str = "b64-p128-g128"
    batch_size: int = 64
    prompt_tokens: int = 128
    generate_tokens: int = 128

    def validate(self) -> None:
        if min(self.batch_size, self.prompt_tokens, self.generate_tokens) < 1:
            raise ValueError(f"scenario {self.name}: batch_size, prompt_tokens, generate_tokens must be >= 1")


@dataclass
class CostConfig:
    """Where and how costs are measured."""

    scenarios: list[Scenario] = field(default_factory=lambda: [Scenario()])
    dtype: str = "bfloat16"  # deployment dtype of weights, activations and KV cache
    iters: int = 20  # timed repetitions (medians reported)
    check_children: int = 2  # random children measured end to end against the sum of their blocks
    stack_layers: int | str = "auto"  # copies of a block timed in a row (see the module docstring)
    calibrate: bool = True  # fold the whole-model check into the table (needs check_children >= 1)

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"costs.dtype = {self.dtype!r}; allowed: bfloat16, float16, float32")
        if self.stack_layers != "auto" and not (isinstance(self.stack_layers, int) and self.stack_layers >= 1):
            raise ValueError(f"costs.stack_layers = {self.stack_layers!r}; allowed: auto or an int >= 1")
        names = [s.name for s in self.scenarios]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"costs.scenarios needs at least one scenario and unique names, got {names}")
        for s in self.scenarios:
            s.validate()


def subblock_key(config: AttentionConfig | FFNConfig) -> str:
    return config.short  # "gqa kv=3", "linear", "no-op", "ffn 1536"


STACK_BYTES_CAP = 2 * 1024**3  # the copies of one block never hold more weights than this


def stack_size(cfg: CostConfig, model_config: DeciLMConfig, block: BlockConfig, device: torch.device) -> int:
    """How many independent copies of `block` are timed in a row: on "auto" (CPU), as many as
    make the copies' weights as large as all the parent's layers, so they stream from memory
    as they do in the model."""
    if cfg.stack_layers != "auto":
        return int(cfg.stack_layers)
    if device.type == "cuda":
        return 1
    nbytes = DTYPE_BYTES[cfg.dtype]
    block_bytes = (attention_params(model_config, block) + ffn_params(model_config, block)) * nbytes
    layers_bytes = nbytes * sum(attention_params(model_config, b) + ffn_params(model_config, b)
                                for b in model_config.blocks)  # model_config is the parent's
    copies = math.ceil(min(layers_bytes, STACK_BYTES_CAP) / max(1, block_bytes))
    return max(1, min(copies, 4 * model_config.num_hidden_layers))


def _random_layer(model_config: DeciLMConfig, block: BlockConfig, dtype, device,
                  cache_index: int = 0) -> DeciLMDecoderLayer:
    layer = DeciLMDecoderLayer(model_config, block, cache_index=cache_index).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer.eval()


@torch.no_grad()
def time_layer(model_config: DeciLMConfig, block: BlockConfig, scenario: Scenario, dtype: torch.dtype,
               device: torch.device, iters: int, copies: int = 1) -> dict[str, float]:
    """Prefill and decode-step seconds of one layer on the static-cache path: `copies`
    independent copies (own weights, own KV buffers) run in a row, time divided by copies."""
    layers = [_random_layer(model_config, block, dtype, device, cache_index=i if block.attention.kind == "gqa" else 0)
              for i in range(copies)]
    B, N = scenario.batch_size, scenario.prompt_tokens
    max_len = N + scenario.generate_tokens
    cache = StaticKVCache.for_blocks([block] * copies, model_config.head_dim, B, max_len, dtype, device)
    rotary = _rotary(model_config, device)
    out = {}
    for phase, T, pos in (("prefill", N, 0), ("decode", 1, max_len - 1)):
        x = torch.randn(B, T, model_config.hidden_size, dtype=dtype, device=device)
        q_pos = torch.arange(pos, pos + T, device=device)
        cos, sin = rotary(q_pos.unsqueeze(0).expand(B, T), dtype)
        mask = (torch.arange(max_len, device=device)[None, :] <= q_pos[:, None])[None, None]
        ctx = ForwardContext(cos, sin, mask, False, cache)

        def run(x=x, ctx=ctx, pos=pos) -> None:
            cache.pos.fill_(pos)
            for layer in layers:  # each copy reads the same input: the cost of one is what counts
                layer(x, ctx)

        calls = 1 if phase == "prefill" or copies > 1 else 8
        out[phase] = time_fn(run, device, iters=iters, calls_per_sample=calls) / copies
    return out


def _rotary(model_config: DeciLMConfig, device):
    from .model.modeling import RotaryEmbedding

    return RotaryEmbedding(model_config).to(device)


@torch.no_grad()
def time_fixed(model_config: DeciLMConfig, scenario: Scenario, dtype, device, iters: int) -> dict[str, float]:
    """Embedding, RoPE tables, masks, final norm, LM head and argmax: a model with no layers."""
    empty = DeciLMConfig(**{**model_config.to_dict(), "block_configs": [], "num_hidden_layers": 0})
    with torch.device(device):
        model = DeciLMForCausalLM(empty).to(dtype).eval()
    B, N, M = scenario.batch_size, scenario.prompt_tokens, scenario.generate_tokens
    cache = StaticKVCache(model, B, N + M)
    prompt = torch.randint(0, empty.vocab_size, (B, N), device=device)
    token = torch.zeros(B, 1, dtype=torch.long, device=device)

    def prefill() -> None:
        cache.pos.zero_()
        token.copy_(static_forward(model, prompt, cache).argmax(-1, keepdim=True))

    def decode() -> None:
        cache.pos.fill_(N + M - 1)
        token.copy_(static_forward(model, token, cache).argmax(-1, keepdim=True))

    return {"prefill": time_fn(prefill, device, iters=iters),
            "decode": time_fn(decode, device, iters=iters, calls_per_sample=8)}


def scenario_costs(times: dict[str, float], scenario: Scenario) -> dict[str, float]:
    """Cost keys of one measured part for one scenario (seconds)."""
    name = scenario.name
    return {f"prefill_s/{name}": times["prefill"], f"decode_s/{name}": times["decode"],
            f"generate_s/{name}": times["prefill"] + scenario.generate_tokens * times["decode"]}


def measure_costs(model_config: DeciLMConfig, attention: list[AttentionConfig], ffn: list[FFNConfig],
                  cfg: CostConfig, device: torch.device, log=print) -> dict:
    """Costs of every distinct subblock shape, the fixed parts, and the device record."""
    dtype = getattr(torch, cfg.dtype)
    nbytes = DTYPE_BYTES[cfg.dtype]
    table: dict = {"attention": {}, "ffn": {}, "fixed": {}}
    noop_ffn, noop_att = FFNConfig("no_op"), AttentionConfig("no_op")
    fixed = {"params_bytes": fixed_params(model_config) * nbytes, "kv_bytes_per_token": 0}
    for s in cfg.scenarios:
        fixed.update(scenario_costs(time_fixed(model_config, s, dtype, device, cfg.iters), s))
    table["fixed"] = fixed
    for kind, configs in (("attention", attention), ("ffn", ffn)):
        for c in dict.fromkeys(configs):
            block = BlockConfig(c, noop_ffn) if kind == "attention" else BlockConfig(noop_att, c)
            params = attention_params(model_config, block) if kind == "attention" else ffn_params(model_config, block)
            entry = {"params_bytes": params * nbytes,
                     "kv_bytes_per_token": 2 * c.num_kv_heads * model_config.head_dim * nbytes
                     if kind == "attention" and c.kind == "gqa" else 0}
            for s in cfg.scenarios:
                if c.kind == "no_op":
                    entry.update(scenario_costs({"prefill": 0.0, "decode": 0.0}, s))
                else:
                    copies = stack_size(cfg, model_config, block, device)
                    entry.update(scenario_costs(time_layer(model_config, block, s, dtype, device, cfg.iters,
                                                           copies), s))
            table[kind][subblock_key(c)] = entry
            log(f"  {kind:<9} {subblock_key(c):<12} " + "  ".join(
                f"{s.name}: prefill {entry[f'prefill_s/{s.name}'] * 1e3:.3f} ms, decode "
                f"{entry[f'decode_s/{s.name}'] * 1e6:.1f} us" for s in cfg.scenarios))
    table["device"] = device_record(device, cfg)
    return table


def device_record(device: torch.device, cfg: CostConfig) -> dict:
    import transformers

    record = {"device": str(device), "dtype": cfg.dtype, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "timing": "CUDA graphs + CUDA events, medians" if device.type == "cuda" else "wall clock, medians",
              "stack_layers": cfg.stack_layers, "scenarios": [vars(s) for s in cfg.scenarios]}
    if device.type == "cuda":
        record["name"] = torch.cuda.get_device_name(device)
        record["cuda"] = torch.version.cuda
    else:
        record["name"] = platform.processor() or platform.machine()
        record["threads"] = torch.get_num_threads()
    return record


def predicted_costs(table: dict, blocks: list[BlockConfig]) -> dict[str, float]:
    """Sum of the fixed part and every layer's subblock costs, per cost key."""
    keys = [k for k in table["fixed"] if k != "device"]
    total = {k: float(table["fixed"][k]) for k in keys}
    for b in blocks:
        for kind, c in (("attention", b.attention), ("ffn", b.ffn)):
            entry = table[kind][subblock_key(c)]
            for k in keys:
                total[k] += entry[k]
    return total


def random_children(blocks_space: list[tuple[list, list]], n: int, seed: int) -> list[list[BlockConfig]]:
    rng = random.Random(seed)
    return [[BlockConfig(rng.choice(att).config, rng.choice(ffn).config) for att, ffn in blocks_space]
            for _ in range(n)]


@torch.no_grad()
def check_against_whole_models(model_config: DeciLMConfig, table: dict, children: dict[str, list[BlockConfig]],
                               cfg: CostConfig, device: torch.device, log=print) -> list[dict]:
    """Measure each model end to end (random weights) and compare with its predicted costs."""
    dtype = getattr(torch, cfg.dtype)
    rows = []
    for name, blocks in children.items():
        config = DeciLMConfig(**{**model_config.to_dict(),
                                 "block_configs": [b.to_nas_dict(model_config.num_attention_heads,
                                                                 model_config.hidden_size) for b in blocks],
                                 "num_hidden_layers": len(blocks)})
        with torch.device(device):
            model = DeciLMForCausalLM(config).to(dtype).eval()
        predicted = predicted_costs(table, blocks)
        for s in cfg.scenarios:
            measured = measure_generation(model, s.batch_size, s.prompt_tokens, s.generate_tokens, iters=cfg.iters)
            row = {"model": name, "scenario": s.name,
                   "prefill_s": measured["prefill_s"], "prefill_s_predicted": predicted[f"prefill_s/{s.name}"],
                   "decode_s": measured["decode_step_s"], "decode_s_predicted": predicted[f"decode_s/{s.name}"],
                   "generate_s": measured["generate_s"], "generate_s_predicted": predicted[f"generate_s/{s.name}"]}
            for k in ("prefill_s", "decode_s", "generate_s"):
                row[f"{k}_error"] = row[f"{k}_predicted"] / row[k] - 1
            rows.append(row)
            log(f"  {name:<10} {s.name}: decode step measured {row['decode_s'] * 1e3:.3f} ms, predicted "
                f"{row['decode_s_predicted'] * 1e3:.3f} ms ({row['decode_s_error']:+.1%}); prefill "
                f"{row['prefill_s'] * 1e3:.2f} vs {row['prefill_s_predicted'] * 1e3:.2f} ms "
                f"({row['prefill_s_error']:+.1%})")
        del model
    return rows


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (scale, offset) of y = scale * x + offset; None with < 2 distinct x."""
    if len({round(x, 12) for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    scale = sum((x - mx) * (y - my) for x, y in points) / sxx
    return scale, my - scale * mx


def calibrate(table: dict, check: list[dict], scenarios: list[Scenario]) -> dict:
    """Fold the whole-model check into the table (in place); returns the fit per cost key.

    Per scenario and phase (prefill, decode): measured = scale * predicted + offset over the
    checked models; every block time is multiplied by scale and the fixed part becomes
    scale * fixed + offset, so the sum for any architecture is the fitted prediction. A fit
    that is not usable (one model, scale <= 0, a negative fixed part) leaves that key raw.
    The generate keys are rebuilt as prefill + M x decode. The raw table is kept as
    table["uncalibrated"]."""
    import copy

    table["uncalibrated"] = copy.deepcopy({k: table[k] for k in ("attention", "ffn", "fixed")})
    entries = [e for kind in ("attention", "ffn") for e in table[kind].values()] + [table["fixed"]]
    fits = {}
    for s in scenarios:
        for phase in ("prefill", "decode"):
            key = f"{phase}_s/{s.name}"
            points = [(r[f"{phase}_s_predicted"], r[f"{phase}_s"]) for r in check if r["scenario"] == s.name]
            fit = fit_line(points)
            if fit is None or fit[0] <= 0 or fit[0] * table["fixed"][key] + fit[1] < 0:
                continue
            scale, offset = fit
            for e in entries:
                e[key] *= scale
            table["fixed"][key] += offset
            fits[key] = {"scale": scale, "offset_s": offset, "models": len(points)}
        for e in entries:
            e[f"generate_s/{s.name}"] = e[f"prefill_s/{s.name}"] + s.generate_tokens * e[f"decode_s/{s.name}"]
    table["calibration"] = fits
    return fits


def calibrated_check(table: dict, check: list[dict], children: dict[str, list[BlockConfig]]) -> list[dict]:
    """The check rows with the calibrated table's predictions and errors added."""
    rows = []
    for r in check:
        predicted = predicted_costs(table, children[r["model"]])
        row = dict(r)
        for k in ("prefill_s", "decode_s", "generate_s"):
            row[f"{k}_calibrated"] = predicted[f"{k}/{r['scenario']}"]
            row[f"{k}_calibrated_error"] = row[f"{k}_calibrated"] / r[k] - 1
        rows.append(row)
    return rows
