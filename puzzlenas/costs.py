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

import torch

from .model.blocks import AttentionConfig, BlockConfig, FFNConfig
from .model.info import DTYPE_BYTES, attention_params, ffn_params, fixed_params
from .model.inference import (at_fills, decode_positions, mean_over_fills, measure_generations, time_fn,
                              time_interleaved)
from .model.modeling import DeciLMConfig, DeciLMDecoderLayer, DeciLMForCausalLM, ForwardContext
from .progress import progress
from .sections import CostConfig, Scenario  # noqa: F401  (re-exported)


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
               device: torch.device, iters: int, copies: int = 1, fill_levels: int = 3) -> dict:
    """Prefill seconds and decode-step seconds at a few cache fills of one layer on the fast
    path: `copies` independent copies (own weights, own KV buffers) run in a row, time divided
    by copies. Returns {"prefill": s, "decode": mean step over the generation, "decode_by_fill": {fill: s}}."""
    from .model.fast import FastLayer, KVCache, prefill_layers, rope_tables, run_layers

    layers = [FastLayer.of(_random_layer(model_config, block, dtype, device), i if block.attention.kind == "gqa" else -1)
              for i in range(copies)]
    B, N = scenario.batch_size, scenario.prompt_tokens
    kv_heads = [block.attention.num_kv_heads] * copies if block.attention.kind == "gqa" else []
    cache = KVCache(kv_heads, model_config.head_dim, B, N + scenario.generate_tokens, dtype, device)
    inv_freq = _rotary(model_config, device).inv_freq
    args = (cache, model_config.rms_norm_eps, model_config.num_attention_heads, model_config.head_dim,
            device.type == "cuda")
    x_prefill = torch.randn(B, N, model_config.hidden_size, dtype=dtype, device=device)
    cos_p, sin_p = rope_tables(torch.arange(N, device=device)[None].expand(B, N), inv_freq, dtype)
    x_step = torch.randn(B, model_config.hidden_size, dtype=dtype, device=device)

    def prefill() -> None:  # each copy reads the same input: the cost of one is what counts
        for layer in layers:
            prefill_layers([layer], x_prefill, cos_p, sin_p, *args)

    cos, sin = rope_tables(torch.full((B,), N, device=device), inv_freq, dtype)  # values do not change the cost

    def decode() -> None:
        for layer in layers:
            run_layers([layer], x_step, cos, sin, *args)

    positions = decode_positions(N, scenario.generate_tokens, fill_levels)
    # prefill and the decode fills interleaved; CUDA: 8 steps of one copy per graph
    times = time_interleaved([prefill, *at_fills(decode, cache.lengths, positions)], device, iters=iters,
                             calls_per_sample=8 if device.type == "cuda" else None)
    by_fill = dict(zip(positions, times[1:]))
    return {"prefill": times[0] / copies, "decode": mean_over_fills(by_fill) / copies,
            "decode_by_fill": {str(p): t / copies for p, t in by_fill.items()}}


def _rotary(model_config: DeciLMConfig, device):
    from .model.modeling import RotaryEmbedding

    return RotaryEmbedding(model_config).to(device)


@torch.no_grad()
def time_fixed(model_config: DeciLMConfig, scenario: Scenario, dtype, device, iters: int,
               fill_levels: int = 3) -> dict:
    """Embedding, RoPE tables, final norm, LM head and argmax: a model with no layers, on the fast path."""
    from .model.fast import FastRunner

    empty = DeciLMConfig(**{**model_config.to_dict(), "block_configs": [], "num_hidden_layers": 0})
    with torch.device(device):
        model = DeciLMForCausalLM(empty).to(dtype).eval()
    B, N, M = scenario.batch_size, scenario.prompt_tokens, scenario.generate_tokens
    runner = FastRunner(model, B, N + M)
    prompt = torch.randint(0, empty.vocab_size, (B, N), device=device)
    token = torch.zeros(B, dtype=torch.long, device=device)

    def prefill() -> None:
        token.copy_(runner.prefill(prompt).argmax(-1))

    def decode() -> None:
        token.copy_(runner.decode_step(token).argmax(-1))

    positions = decode_positions(N, M, fill_levels)
    times = time_interleaved([prefill, *at_fills(decode, runner.cache.lengths, positions)], device, iters=iters,
                             calls_per_sample=4 if device.type == "cuda" else None)
    by_fill = dict(zip(positions, times[1:]))
    return {"prefill": times[0], "decode": mean_over_fills(by_fill), "decode_by_fill": {str(p): t for p, t in by_fill.items()}}


def mean_context(scenario: Scenario) -> float:
    """Mean number of cached positions a decode step of the scenario reads (fills N+1 .. N+M)."""
    return scenario.prompt_tokens + (scenario.generate_tokens + 1) / 2


def scenario_costs(times: dict, scenario: Scenario, read_bytes: float | None = None) -> dict[str, float]:
    """Cost keys of one measured part for one scenario (seconds; `read_bytes`: bytes a mean decode
    step must read for this part, weights + KV at the mean fill)."""
    name = scenario.name
    out = {f"prefill_s/{name}": times["prefill"], f"decode_s/{name}": times["decode"],
           f"generate_s/{name}": times["prefill"] + scenario.generate_tokens * times["decode"]}
    if read_bytes is not None:
        out[f"read_bytes/{name}"] = float(read_bytes)
    return out


def copy_bandwidth(device: torch.device, iters: int = 10) -> float:
    """Bytes per second a plain device-to-device copy moves (read + write) on `device`: the
    achievable memory bandwidth the decode costs are compared with."""
    nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, iters=iters)
    return 2 * nbytes / seconds


CPU_ROUNDS = 3  # passes over every shape on a CPU (see measure_costs)


def measure_costs(model_config: DeciLMConfig, attention: list[AttentionConfig], ffn: list[FFNConfig],
                  cfg: CostConfig, device: torch.device, log=print) -> dict:
    """Costs of every distinct subblock shape, the fixed parts, and the device record.

    Per scenario and part: prefill_s, decode_s (the mean decode step of the generation, integrated
    over the fills it passes through), generate_s = prefill + M x decode, and read_bytes (bytes a
    mean decode step must read: weights + KV at the mean fill). The step times per timed fill
    are kept under table["decode_by_fill"].

    On a CPU (shared, its load coming and going) every shape is timed in CPU_ROUNDS passes over
    all of them, `iters` samples split between the passes, and each time is the median of its
    passes: a burst of load during one shape's turn moves one of its passes, not the shape's cost
    against the others'. (Within a pass, prefill and the decode fills are interleaved, samples
    trimmed: `inference.time_interleaved`.)"""
    dtype = getattr(torch, cfg.dtype)
    nbytes = DTYPE_BYTES[cfg.dtype]
    rounds = 1 if device.type == "cuda" else CPU_ROUNDS
    iters = cfg.iters if rounds == 1 else max(2, math.ceil(cfg.iters / rounds))
    table: dict = {"attention": {}, "ffn": {}, "fixed": {}}
    by_fill: dict = {"attention": {}, "ffn": {}, "fixed": {}}
    noop_ffn, noop_att = FFNConfig("no_op"), AttentionConfig("no_op")
    # the timed parts: (kind, subblock config or None for the fixed part, block, copies)
    parts = [("fixed", None, None, 1)]
    for kind, configs in (("attention", attention), ("ffn", ffn)):
        for c in dict.fromkeys(configs):
            block = BlockConfig(c, noop_ffn) if kind == "attention" else BlockConfig(noop_att, c)
            if c.kind != "no_op":
                parts.append((kind, c, block, stack_size(cfg, model_config, block, device)))
    passes: dict = {}  # (part index, scenario) -> [times of each pass]
    for r in range(rounds):
        for i, (kind, c, block, copies) in enumerate(parts):
            for s in cfg.scenarios:
                times = time_fixed(model_config, s, dtype, device, iters, cfg.decode_fills) if c is None else \
                    time_layer(model_config, block, s, dtype, device, iters, copies, cfg.decode_fills)
                passes.setdefault((i, s.name), []).append(times)
        if rounds > 1:
            log(f"  costs: pass {r + 1} of {rounds} over {len(parts)} parts done")
    measured = {key: _median_of_passes(runs) for key, runs in passes.items()}

    fixed = {"params_bytes": fixed_params(model_config) * nbytes, "kv_bytes_per_token": 0}
    # a decode step reads the LM head, the final norm and B embedding rows
    head_bytes = (model_config.vocab_size + 1) * model_config.hidden_size * nbytes
    for s in cfg.scenarios:
        times = measured[(0, s.name)]
        fixed.update(scenario_costs(times, s, head_bytes + s.batch_size * model_config.hidden_size * nbytes))
        by_fill["fixed"][s.name] = times["decode_by_fill"]
    table["fixed"] = fixed
    timed = {(kind, c): i for i, (kind, c, _, _) in enumerate(parts) if c is not None}
    for kind, configs in (("attention", attention), ("ffn", ffn)):
        for c in progress(list(dict.fromkeys(configs)), desc=f"[costs] {kind}", unit="subblock"):
            block = BlockConfig(c, noop_ffn) if kind == "attention" else BlockConfig(noop_att, c)
            params = attention_params(model_config, block) if kind == "attention" else ffn_params(model_config, block)
            kv_per_token = 2 * c.num_kv_heads * model_config.head_dim * nbytes \
                if kind == "attention" and c.kind == "gqa" else 0
            entry = {"params_bytes": params * nbytes, "kv_bytes_per_token": kv_per_token}
            fills = by_fill[kind].setdefault(subblock_key(c), {})
            for s in cfg.scenarios:
                read = params * nbytes + kv_per_token * s.batch_size * mean_context(s)
                if c.kind == "no_op":
                    entry.update(scenario_costs({"prefill": 0.0, "decode": 0.0}, s, 0.0))
                else:
                    times = measured[(timed[(kind, c)], s.name)]
                    entry.update(scenario_costs(times, s, read))
                    fills[s.name] = times["decode_by_fill"]
            table[kind][subblock_key(c)] = entry
            log(f"  {kind:<9} {subblock_key(c):<12} " + "  ".join(
                f"{s.name}: prefill {entry[f'prefill_s/{s.name}'] * 1e3:.3f} ms, decode "
                f"{entry[f'decode_s/{s.name}'] * 1e6:.1f} us" for s in cfg.scenarios))
    table["decode_by_fill"] = by_fill
    table["device"] = device_record(device, cfg)
    table["device"]["copy_bandwidth_Bps"] = copy_bandwidth(device)
    return table


def _median_of_passes(runs: list[dict]) -> dict:
    """One part's times from several passes: the median of each (decode: of each fill, then integrated)."""
    import statistics

    if len(runs) == 1:
        return runs[0]
    fills = {p: statistics.median(float(r["decode_by_fill"][p]) for r in runs) for p in runs[0]["decode_by_fill"]}
    return {"prefill": statistics.median(r["prefill"] for r in runs),
            "decode": mean_over_fills({int(p): t for p, t in fills.items()}), "decode_by_fill": fills}


def load_recorded_table(path: str, attention: list[AttentionConfig], ffn: list[FFNConfig],
                        scenarios: list[Scenario]) -> dict:
    """A recorded cost table, reduced to `scenarios`, after checking it prices every subblock of
    the library in every scenario with the same batch and token counts."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"costs.recorded = {path!r} cannot be read as a cost table ({err}); give the path of "
                         f"an earlier run's costs/costs.json or remove costs.recorded") from err
    recorded = {s["name"]: s for s in data.get("device", {}).get("scenarios", [])}
    problems = []
    for s in scenarios:
        if s.name not in recorded:
            problems.append(f"scenario {s.name} (recorded: {sorted(recorded)})")
        elif any(recorded[s.name][k] != getattr(s, k) for k in ("batch_size", "prompt_tokens", "generate_tokens")):
            problems.append(f"scenario {s.name} with other sizes ({recorded[s.name]})")
    for kind, configs in (("attention", attention), ("ffn", ffn)):
        for c in dict.fromkeys(configs):
            if subblock_key(c) not in data.get(kind, {}):
                problems.append(f"{kind} {subblock_key(c)}")
    if problems:
        raise ValueError(f"costs.recorded = {path!r} has no costs for: {'; '.join(problems)}; record a table for "
                         f"this library and these scenarios (`puzzlenas costs` on the target device) or remove "
                         f"costs.recorded to measure here")
    names = {s.name for s in scenarios}

    def keep(entry: dict) -> dict:
        return {k: v for k, v in entry.items() if "/" not in k or k.split("/", 1)[1] in names}

    table = {kind: {key: keep(e) for key, e in data[kind].items()} for kind in ("attention", "ffn")}
    table["fixed"] = keep(data["fixed"])
    table["device"] = {**data["device"], "scenarios": [recorded[s.name] for s in scenarios], "recorded_from": str(path)}
    for extra in ("calibration", "uncalibrated", "decode_by_fill"):
        if extra in data:
            table[extra] = data[extra]
    return table


def device_record(device: torch.device, cfg: CostConfig) -> dict:
    import transformers

    record = {"device": str(device), "dtype": cfg.dtype, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "timing": "fast path (compiled blocks, split-KV attention), CUDA graphs + CUDA events, medians"
              if device.type == "cuda" else "fast path (eager), wall clock, medians",
              "decode": f"mean step over the generation: {cfg.decode_fills} fills, trapezoid",
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
    """Measure each model end to end (random weights) and compare with its predicted costs. On a
    CPU the models are timed together, in alternation (`inference.measure_generations`), so that
    the calibration fits models measured under the same load; on CUDA one at a time (its timings
    hold, and several large models need not fit at once)."""
    names = list(children)
    groups = [names] if device.type != "cuda" else [[n] for n in names]
    rows = []
    for group in groups:
        times = measure_whole_models(model_config, {n: children[n] for n in group}, cfg.scenarios, cfg, device)
        for s in cfg.scenarios:
            for name in group:
                predicted = predicted_costs(table, children[name])
                row = {"model": name, "scenario": s.name, "read_bytes": predicted.get(f"read_bytes/{s.name}")}
                for k in ("prefill_s", "decode_s", "generate_s"):
                    row[k], row[f"{k}_predicted"] = times[name][f"{k}/{s.name}"], predicted[f"{k}/{s.name}"]
                    row[f"{k}_error"] = row[f"{k}_predicted"] / row[k] - 1
                rows.append(row)
                log(f"  {name:<10} {s.name}: decode step measured {row['decode_s'] * 1e3:.3f} ms, predicted "
                    f"{row['decode_s_predicted'] * 1e3:.3f} ms ({row['decode_s_error']:+.1%}); prefill "
                    f"{row['prefill_s'] * 1e3:.2f} vs {row['prefill_s_predicted'] * 1e3:.2f} ms "
                    f"({row['prefill_s_error']:+.1%})")
    order = {n: i for i, n in enumerate(names)}
    return sorted(rows, key=lambda r: (order[r["model"]], [s.name for s in cfg.scenarios].index(r["scenario"])))


def random_model(model_config: DeciLMConfig, blocks: list[BlockConfig], dtype: torch.dtype,
                 device: torch.device) -> DeciLMForCausalLM:
    """The parent's shape with `blocks` as its layers, random weights (timings do not depend on them)."""
    config = DeciLMConfig(**{**model_config.to_dict(),
                             "block_configs": [b.to_nas_dict(model_config.num_attention_heads,
                                                             model_config.hidden_size) for b in blocks],
                             "num_hidden_layers": len(blocks)})
    with torch.device(device):
        return DeciLMForCausalLM(config).to(dtype).eval()


@torch.no_grad()
def measure_whole_models(model_config: DeciLMConfig, models: dict[str, list[BlockConfig]], scenarios: list[Scenario],
                         cfg: CostConfig, device: torch.device, iters: int | None = None) -> dict[str, dict[str, float]]:
    """{name: {"prefill_s/<scenario>": s, "decode_s/<scenario>": s, "generate_s/<scenario>": s}}: the
    named architectures (random weights) timed together, in alternation, on the fast path: the
    benchmark of eval's speedups (`inference.measure_generations`), so that their ratios are
    measured speedups. All of them are on the device at once (the search's candidates of one
    target and the parent). iters: timed rounds (default cfg.iters)."""
    dtype = getattr(torch, cfg.dtype)
    built = {name: random_model(model_config, blocks, dtype, device) for name, blocks in models.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for s in scenarios:
        runs = measure_generations(list(built.values()), s.batch_size, s.prompt_tokens, s.generate_tokens,
                                   iters=iters or cfg.iters, fill_levels=cfg.decode_fills)
        for name, measured in zip(built, runs):
            out[name].update({f"prefill_s/{s.name}": measured["prefill_s"],
                              f"decode_s/{s.name}": measured["decode_step_s"],
                              f"generate_s/{s.name}": measured["generate_s"]})
    del built
    return out


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


def costs_table(table: dict, check: list[dict]) -> str:
    """The text table of `puzzlenas costs`: per scenario and subblock, parameters, KV bytes per
    token, prefill and mean decode-step times, and the bandwidth each decode step achieved (bytes
    it must read / time) as a share of the device's copy bandwidth; then the whole-model check."""
    dev = table["device"]
    copy_bw = dev.get("copy_bandwidth_Bps")
    lines = [f"costs on {dev.get('name')} ({dev['dtype']}, {dev['timing']}), torch {dev['torch']}"]
    if copy_bw:
        lines.append(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write of a device copy); "
                     f"'GB/s' = bytes a mean decode step must read (weights + KV at the mean fill) / its time")

    def bandwidth(read: float | None, seconds: float) -> str:
        if read is None or seconds <= 0 or not read:
            return f"{'':>8} {'':>6}"
        bw = read / seconds
        return f"{bw / 1e9:>8.1f} {bw / copy_bw:>6.0%}" if copy_bw else f"{bw / 1e9:>8.1f} {'':>6}"

    for s in dev["scenarios"]:
        n = s["name"]
        lines.append(f"scenario {n}: batch {s['batch_size']}, prompt {s['prompt_tokens']}, "
                     f"generate {s['generate_tokens']}")
        lines.append(f"  {'subblock':<20} {'params MiB':>10} {'KV B/tok':>9} {'prefill ms':>11} {'decode us':>10} "
                     f"{'GB/s':>8} {'of copy':>6}")
        rows = [(kind[:4] + " " + key, e) for kind in ("attention", "ffn") for key, e in table[kind].items()]
        for label, e in rows + [("fixed (embed, head)", table["fixed"])]:
            lines.append(f"  {label:<20} {e['params_bytes'] / 2**20:>10.2f} {e['kv_bytes_per_token']:>9} "
                         f"{e[f'prefill_s/{n}'] * 1e3:>11.3f} {e[f'decode_s/{n}'] * 1e6:>10.1f} "
                         + bandwidth(e.get(f"read_bytes/{n}"), e[f"decode_s/{n}"]))
    lines.append("check: whole model measured end to end vs the sum of its blocks")
    for r in check:
        lines.append(f"  {r['model']:<10} {r['scenario']}: decode step {r['decode_s'] * 1e3:.3f} ms measured, "
                     f"{r['decode_s_predicted'] * 1e3:.3f} predicted ({r['decode_s_error']:+.1%}); prefill "
                     f"{r['prefill_s_error']:+.1%}; generation {r['generate_s_error']:+.1%}"
                     + (f"; calibrated: decode {r['decode_s_calibrated_error']:+.1%}, prefill "
                        f"{r['prefill_s_calibrated_error']:+.1%}" if "decode_s_calibrated" in r else "")
                     + (f"; decode reads {r['read_bytes'] / 1e6:.3f} MB at"
                        f"{bandwidth(r['read_bytes'], r['decode_s'])}" if r.get("read_bytes") else ""))
    for key, fit in table.get("calibration", {}).items():
        lines.append(f"  calibration {key}: measured = {fit['scale']:.3f} x block sum + "
                     f"{fit['offset_s'] * 1e3:.3f} ms (fit on {fit['models']} models; folded into the table above)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Other processes' load while the costs are measured (CPU)
# --------------------------------------------------------------------------------------------
OTHER_LOAD_WARNING = 0.2  # share of the machine's CPU other processes may use before costs are suspect


def machine_cpu_ticks(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(all ticks, busy ticks) of the machine so far, from the aggregate `cpu` line of /proc/stat
    (idle and iowait count as idle); None where it cannot be read."""
    try:
        fields = [int(v) for v in open(stat).readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    total = sum(fields[:8])
    return total, total - fields[3] - (fields[4] if len(fields) > 4 else 0)


def own_cpu_seconds() -> float:
    """This process's CPU time so far (every thread), user + system."""
    import os

    t = os.times()
    return t.user + t.system


class OtherLoad:
    """The share of the machine's CPU that other processes used between construction and
    `share()`: the machine's busy ticks minus this process's own CPU time, over all ticks. Block
    costs measured beside a busy process are biased, not uniformly slower: beside the test suite
    on 2 cores an FFN 1536 decode step read 2.7x an FFN 768 one (other runs: 1.7-2.0x), and the search
    chose a child that missed its target (benchmarks/RESULTS.md, session 15)."""

    def __init__(self, stat: str = "/proc/stat", own=own_cpu_seconds, ticks_per_second: int | None = None):
        import os

        self.stat, self.own = stat, own
        self.hz = ticks_per_second or os.sysconf("SC_CLK_TCK")
        self.start, self.own_start = machine_cpu_ticks(stat), own()

    def share(self) -> float | None:
        end = machine_cpu_ticks(self.stat)
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        total, busy = end[0] - self.start[0], end[1] - self.start[1]
        own = (self.own() - self.own_start) * self.hz
        return max(0.0, min(1.0, (busy - own) / total))


def other_load_warning(share: float | None) -> str | None:
    """The warning for costs measured while other processes used `share` of the CPU, or None."""
    if share is None or share < OTHER_LOAD_WARNING:
        return None
    return (f"warning: other processes used {share:.0%} of the CPU while the costs were measured: block costs "
            f"measured beside a busy process are biased (not uniformly slower) and the children chosen on them can "
            f"miss their targets; rerun the stage on an idle machine: puzzlenas run --force costs")
