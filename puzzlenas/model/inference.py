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
def time_fn(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3,
            calls_per_sample: int = 1, use_graph: bool = True) -> float:
    """Median seconds of one call of `fn`. On CUDA: captured in a CUDA graph (launch overhead
    would hide small blocks) and timed with events; elsewhere: wall clock."""
    if device.type == "cuda" and use_graph:
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_sample):
                fn()
        samples = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / calls_per_sample)
        return statistics.median(samples)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        _sync(device)
        started = time.perf_counter()
        for _ in range(calls_per_sample):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - started) / calls_per_sample)
    return statistics.median(samples)


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


def time_decode_over_fills(step: Callable[[], object], lengths: torch.Tensor, positions: list[int],
                           device: torch.device, iters: int, use_graph: bool = True,
                           calls_per_sample: int = 4) -> dict[int, float]:
    """Median seconds of `step` with every row's cache filled to each position."""
    out = {}
    for p in positions:
        def at_fill(p=p) -> None:
            lengths.fill_(p)
            step()

        out[p] = time_fn(at_fill, device, iters=iters, calls_per_sample=calls_per_sample, use_graph=use_graph)
    return out


@torch.no_grad()
def measure_generation(model: DeciLMForCausalLM, batch_size: int, prompt_tokens: int, generate_tokens: int,
                       iters: int = 5, use_graph: bool = True, fill_levels: int = 3) -> dict:
    """A greedy generation on the fast path: prefill `prompt_tokens`, then `generate_tokens`
    decode steps whose cost is integrated over the fills they pass through. Returns prefill
    and mean decode-step times (medians), the step time per timed fill, tokens/s and, on CUDA,
    peak memory: the model's weights + KV cache + work space of this run, whatever else is on
    the device excluded (the runner's fused weight copies counted once, as an engine stores them)."""
    from .fast import FastRunner

    device = model.model.embed_tokens.weight.device
    V = model.config.vocab_size
    max_len = prompt_tokens + generate_tokens
    _warm_up(model, device)
    base = _memory_baseline(device)  # before the cache: peak = this model's weights + cache + work space
    runner = FastRunner(model, batch_size, max_len)
    prompt = torch.randint(0, V, (batch_size, prompt_tokens), device=device)
    token = torch.zeros(batch_size, dtype=torch.long, device=device)

    def prefill() -> None:
        token.copy_(runner.prefill(prompt).argmax(-1))

    def decode() -> None:
        token.copy_(runner.decode_step(token).argmax(-1))

    prefill_s = time_fn(prefill, device, iters=iters, use_graph=use_graph)
    by_fill = time_decode_over_fills(decode, runner.cache.lengths,
                                     decode_positions(prompt_tokens, generate_tokens, fill_levels), device,
                                     max(iters, 10), use_graph)
    decode_s = mean_over_fills(by_fill)
    total = prefill_s + generate_tokens * decode_s
    peak = None
    if device.type == "cuda":
        # Whatever else lives on the device (an eval's resident parent, earlier models' leftovers)
        # is not this model's serving memory: count its own weights plus what this run allocated.
        own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        peak = torch.cuda.max_memory_allocated(device) - base + own - runner.fused_bytes()
    return {"batch_size": batch_size, "prompt_tokens": prompt_tokens, "generate_tokens": generate_tokens,
            "prefill_s": prefill_s, "decode_step_s": decode_s, "generate_s": total,
            "decode_step_s_by_fill": {str(p): t for p, t in by_fill.items()},
            "decode_tokens_per_s": batch_size / decode_s, "generate_tokens_per_s": batch_size * generate_tokens / total,
            "kv_cache_bytes": runner.cache.bytes(), "peak_memory_bytes": peak}
