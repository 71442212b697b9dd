"""Timing of models and generations.

`measure_generation` times a whole generation on the fast path (`fast.py`: fused weights,
compiled blocks on CUDA, attention over each row's filled cache only, CUDA graphs): the
prefill, and the decode step at a few fill levels of the scenario (prompt .. prompt +
generated), integrated over the lengths the generation passes through (trapezoid), since a
step costs more as the cache fills.

`StaticKVCache` / `static_forward` are the previous path (attention over the whole
preallocated buffer under a validity mask, eager kernels), kept as the baseline that
benchmarks/fast_decode.py compares the fast path with.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from .modeling import DeciLMForCausalLM, ForwardContext


class StaticKVCache:
    """Per-layer K/V buffers sized by each layer's own KV-head count (GQA layers only)."""

    def __init__(self, model: DeciLMForCausalLM, batch_size: int, max_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        weight = model.model.embed_tokens.weight
        self._allocate(model.blocks, model.config.head_dim, batch_size, max_len, dtype or weight.dtype,
                       device or weight.device)

    @classmethod
    def for_blocks(cls, blocks, head_dim: int, batch_size: int, max_len: int, dtype: torch.dtype,
                   device: torch.device) -> "StaticKVCache":
        """A cache for a bare list of blocks (used to time single layers)."""
        cache = cls.__new__(cls)
        cache._allocate(blocks, head_dim, batch_size, max_len, dtype, device)
        return cache

    def _allocate(self, blocks, head_dim, batch_size, max_len, dtype, device) -> None:
        self.max_len = max_len
        self.k, self.v = [], []
        for block in blocks:
            if block.attention.kind == "gqa":
                shape = (batch_size, block.attention.num_kv_heads, max_len, head_dim)
                self.k.append(torch.zeros(shape, dtype=dtype, device=device))
                self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens already written

    def update(self, k: torch.Tensor, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, h, T, D) at positions pos..pos+T-1; return the whole buffers."""
        positions = self.pos + torch.arange(k.shape[2], device=k.device)
        self.k[index].index_copy_(2, positions, k)
        self.v[index].index_copy_(2, positions, v)
        return self.k[index], self.v[index]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # transformers' Cache interface
        return int(self.pos)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def static_forward(model: DeciLMForCausalLM, input_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Prefill or decode T new tokens (B, T) at the cache's position; returns the last
    position's logits (B, V) and advances the position. Graph-capturable."""
    B, T = input_ids.shape
    x = model.model.embed_tokens(input_ids)  # (B, T, C)
    q_pos = cache.pos + torch.arange(T, device=x.device)  # (T,)
    cos, sin = model.model.rotary_emb(q_pos.unsqueeze(0).expand(B, T), x.dtype)
    k_pos = torch.arange(cache.max_len, device=x.device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, max_len)
    ctx = ForwardContext(cos, sin, mask, False, cache)
    for layer in model.model.layers:
        x = layer(x, ctx)
    cache.pos.add_(T)
    return model.lm_head(model.model.norm(x[:, -1]))  # (B, V)


# =============================================================================================
# Timing
# =============================================================================================
# Share of each end of a function's samples left out of its mean: on a shared machine, samples
# hit by another process's burst (slow) or taken before a frequency drop (fast) are dropped.
TRIM = 0.25
# On a CPU a sample lasts at least this long (calls repeated within it): a small block's single
# call is shorter than the clock's and the scheduler's noise.
MIN_SAMPLE_S = 0.005
MAX_CALLS_PER_SAMPLE = 64


def trimmed_mean(samples: list[float], trim: float = TRIM) -> float:
    """Mean of the samples left after dropping `trim` of them at each end (the median for < 3)."""
    ordered = sorted(samples)
    k = int(len(ordered) * trim)
    kept = ordered[k:len(ordered) - k] if len(ordered) - 2 * k >= 1 else ordered
    return statistics.median(ordered) if len(ordered) < 3 else sum(kept) / len(kept)


def time_fn(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3,
            calls_per_sample: int | None = None, use_graph: bool = True) -> float:
    """Seconds of one call of `fn` (`time_interleaved` of one function)."""
    return time_interleaved([fn], device, iters, warmup, calls_per_sample, use_graph)[0]


def time_interleaved(fns: list[Callable[[], object]], device: torch.device, iters: int = 20, warmup: int = 3,
                     calls_per_sample: int | None = None, use_graph: bool = True) -> list[float]:
    """Seconds of one call of each of `fns`, timed in alternation: each of `iters` rounds takes one
    sample of every function (the order rotated from round to round), so load that comes and goes
    on a shared machine falls on all of them alike and their ratios hold; each function's time is
    the trimmed mean of its samples (`TRIM`). On CUDA: each captured in a CUDA graph (launch
    overhead would hide small blocks) and timed with events. Elsewhere: wall clock, with as many
    calls per sample (`calls_per_sample`, default: enough for MIN_SAMPLE_S) as make small
    functions measurable."""
    if device.type == "cuda" and use_graph:
        replays = [_graph_of(fn, device, warmup, calls_per_sample or 1) for fn in fns]
        calls = [calls_per_sample or 1] * len(fns)

        def sample(i: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replays[i]()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        calls = []
        for fn in fns:
            for _ in range(min(warmup, 1)):  # eager on a CPU: nothing to compile or capture
                fn()
            calls.append(calls_per_sample or _calls_for(fn, device))

        def sample(i: int) -> float:
            _sync(device)
            started = time.perf_counter()
            for _ in range(calls[i]):
                fns[i]()
            _sync(device)
            return time.perf_counter() - started

    samples: list[list[float]] = [[] for _ in fns]
    for r in range(iters):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            samples[i].append(sample(i) / calls[i])
    return [trimmed_mean(s) for s in samples]


def _calls_for(fn: Callable[[], object], device: torch.device) -> int:
    """Calls per sample so that a sample lasts about MIN_SAMPLE_S (one timed call decides)."""
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - started
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(once, 1e-7))))


def _graph_of(fn: Callable[[], object], device: torch.device, warmup: int, calls: int) -> Callable[[], None]:
    """`fn` x calls captured in a CUDA graph after warm-up calls on the side stream; returns its replay."""
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One warm-up / capture stream per device, reused: cuBLAS keeps a workspace per stream, so a
    new stream per measurement would allocate a new one inside whichever measurement came first."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _warm_up(model: DeciLMForCausalLM, device: torch.device) -> None:
    """One tiny captured decode step, so that per-stream library workspaces exist before a
    measurement's memory baseline (they are the process's, not the measured model's)."""
    if device.type != "cuda":
        return
    cache = StaticKVCache(model, 1, 2)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)

    def step() -> None:
        cache.pos.zero_()
        static_forward(model, token, cache)

    time_fn(step, device, iters=1, warmup=1)


def _memory_baseline(device: torch.device) -> int:
    """Bytes allocated on a CUDA device now, after freeing garbage (stale graphs, dropped models),
    with the peak counter reset; 0 elsewhere."""
    if device.type != "cuda":
        return 0
    import gc

    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_positions(prompt_tokens: int, generate_tokens: int, levels: int = 3) -> list[int]:
    """Cache fills (tokens already cached) at which a decode step is timed: `levels` points
    spread evenly over the generation's steps, whose fills run prompt .. prompt + generated - 1."""
    first, last = prompt_tokens, prompt_tokens + generate_tokens - 1
    if levels < 2 or last == first:
        return [first] if last == first or levels < 2 else [first, last]
    return sorted({round(first + (last - first) * i / (levels - 1)) for i in range(levels)})


def mean_over_fills(times: dict[int, float]) -> float:
    """Mean step time over the fills between the first and last timed one: the trapezoid
    integral of the piecewise-linear interpolation, divided by the span."""
    points = sorted(times.items())
    if len(points) == 1:
        return points[0][1]
    area = sum((p1 - p0) * (t0 + t1) / 2 for (p0, t0), (p1, t1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def at_fills(step: Callable[[], object], lengths: torch.Tensor, positions: list[int]) -> list[Callable[[], None]]:
    """One function per fill: every row's cache filled to it, then `step`."""
    def at_fill(p: int) -> Callable[[], None]:
        def call() -> None:
            lengths.fill_(p)
            step()
        return call

    return [at_fill(p) for p in positions]


def time_decode_over_fills(step: Callable[[], object], lengths: torch.Tensor, positions: list[int],
                           device: torch.device, iters: int, use_graph: bool = True,
                           calls_per_sample: int | None = None) -> dict[int, float]:
    """Seconds of `step` with every row's cache filled to each position (the fills interleaved)."""
    calls = calls_per_sample or (4 if device.type == "cuda" else None)
    times = time_interleaved(at_fills(step, lengths, positions), device, iters=iters, calls_per_sample=calls,
                             use_graph=use_graph)
    return dict(zip(positions, times))


@torch.no_grad()
def measure_generation(model: DeciLMForCausalLM, batch_size: int, prompt_tokens: int, generate_tokens: int,
                       iters: int = 5, use_graph: bool = True, fill_levels: int = 3) -> dict:
    """`measure_generations` of one model."""
    return measure_generations([model], batch_size, prompt_tokens, generate_tokens, iters, use_graph,
                               fill_levels)[0]


@torch.no_grad()
def measure_generations(models: list[DeciLMForCausalLM], batch_size: int, prompt_tokens: int, generate_tokens: int,
                        iters: int = 5, use_graph: bool = True, fill_levels: int = 3) -> list[dict]:
    """A greedy generation of each model on the fast path: prefill `prompt_tokens`, then
    `generate_tokens` decode steps whose cost is integrated over the fills they pass through.
    The models are timed in alternation (`time_interleaved`: every round samples each model's
    prefill and decode steps), so that their ratios, the speedups, hold on a busy machine.
    Returns per model prefill and mean decode-step times, the step time per timed fill, tokens/s
    and, on CUDA, peak memory: the model's weights + KV cache + work space of its own run,
    whatever else is on the device excluded (the runner's fused weight copies counted once, as
    an engine stores them)."""
    from .fast import FastRunner

    device = models[0].model.embed_tokens.weight.device
    max_len = prompt_tokens + generate_tokens
    positions = decode_positions(prompt_tokens, generate_tokens, fill_levels)
    _warm_up(models[0], device)
    fns, runners, peaks = [], [], []
    for model in models:
        base = _memory_baseline(device)  # before its cache: peak = this model's weights + cache + work space
        runner = FastRunner(model, batch_size, max_len)
        prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens), device=device)
        token = torch.zeros(batch_size, dtype=torch.long, device=device)

        def prefill(runner=runner, prompt=prompt, token=token) -> None:
            token.copy_(runner.prefill(prompt).argmax(-1))

        def decode(runner=runner, token=token) -> None:
            token.copy_(runner.decode_step(token).argmax(-1))

        peak = None
        if device.type == "cuda":  # its own run, alone: what serving it takes
            prefill()
            decode()
            torch.cuda.synchronize(device)
            # Whatever else lives on the device (an eval's resident parent, the models measured
            # before it) is not this model's serving memory: its own weights plus what its run allocated.
            own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            peak = torch.cuda.max_memory_allocated(device) - base + own - runner.fused_bytes()
        fns += [prefill, *at_fills(decode, runner.cache.lengths, positions)]
        runners.append(runner)
        peaks.append(peak)
    calls = 4 if device.type == "cuda" else None  # CUDA: 4 decode steps per graph; the prefill as well
    times = time_interleaved(fns, device, iters=max(iters, 6), warmup=2, calls_per_sample=calls, use_graph=use_graph)
    out, per_model = [], 1 + len(positions)
    for k, (runner, peak) in enumerate(zip(runners, peaks)):
        prefill_s, steps = times[k * per_model], times[k * per_model + 1:(k + 1) * per_model]
        by_fill = dict(zip(positions, steps))
        decode_s = mean_over_fills(by_fill)
        total = prefill_s + generate_tokens * decode_s
        out.append({"batch_size": batch_size, "prompt_tokens": prompt_tokens, "generate_tokens": generate_tokens,
                    "prefill_s": prefill_s, "decode_step_s": decode_s, "generate_s": total,
                    "decode_step_s_by_fill": {str(p): t for p, t in by_fill.items()},
                    "decode_tokens_per_s": batch_size / decode_s,
                    "generate_tokens_per_s": batch_size * generate_tokens / total,
                    "kv_cache_bytes": runner.cache.bytes(), "peak_memory_bytes": peak})
    return out
