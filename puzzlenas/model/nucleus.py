"""Nucleus (top-p) sampling without sorting the vocabulary: one Triton program per row.

The fast path's sampler (`fast.sample`) sorts each row's V logits to find the nucleus, the
smallest set of most likely tokens whose probability reaches top_p. On an H200 that sort is
~2.3 ms of a 5.1 ms teacher-generation step (512 rows x 49,152 logits; benchmarks/RESULTS.md,
session 10). The same set is {tokens with q >= t}, q = exp(logit / T - max), for the largest
threshold t whose set still holds top_p of the row's mass; this kernel finds t by bisection over
(0, 1] (each step one pass over the row, which stays in L2 while its program runs), then draws
from the set by the Gumbel-max trick in one more pass. No sort, no host synchronization,
capturable in a CUDA graph. The set equals the sorted definition's up to ties and the
bisection's resolution (2^-ITERATIONS of the top token's q).

The fast path's default on CUDA (`fast.NUCLEUS`): on an H200 the sampler takes 0.51 ms a step
against the sort's 3.03 ms, and teacher generation runs at 172k tokens/s against 95k, the speed of
sampling with no top-p at all (`benchmarks/teacher_speed.py`, RESULTS.md, session 11); every
one of its draws checked there lay inside the sorted nucleus.
"""

from __future__ import annotations

import functools

import torch

ITERATIONS = 26  # bisection steps: the threshold within 2^-26 ~ 1.5e-8 of the top token's q
BLOCK = 4096  # logits per chunk of a row


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nucleus_kernel(Logits, Out, Seed, stride, V, inv_temperature, top_p,
                       ITERS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = Logits + row.to(tl.int64) * stride
        offs = tl.arange(0, BLOCK)
        # pass 1: the row's largest scaled logit
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temperature
            top = tl.maximum(top, x)
        mx = tl.max(top, 0)
        # pass 2: the row's mass Z = sum q, q = exp(x - mx) in (0, 1]
        z = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temperature
            z += tl.exp(x - mx)  # masked slots: exp(-inf) = 0
        target = top_p * tl.sum(z, 0)
        # bisection: the largest t with mass(q >= t) >= top_p Z (t = 0 keeps everything: always valid)
        lo = mx * 0.0
        hi = lo + 1.0
        for _ in range(ITERS):
            mid = (lo + hi) * 0.5
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temperature
                q = tl.exp(x - mx)
                acc += tl.where(q >= mid, q, 0.0)
            keep = tl.sum(acc, 0) >= target
            lo = tl.where(keep, mid, lo)
            hi = tl.where(keep, hi, mid)
        # draw: argmax of x + Gumbel noise over the nucleus {q >= lo}
        seed = tl.load(Seed)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_id = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temperature
            u = tl.rand(seed, row * V + idx)  # (0, 1) uniforms, independent per (row, token)
            gumbel = -tl.log(-tl.log(tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-7)))
            score = tl.where((idx < V) & (tl.exp(x - mx) >= lo), x + gumbel, float("-inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_id = tl.where(better, idx, best_id)
        j = tl.argmax(best, 0)
        tl.store(Out + row, tl.sum(tl.where(offs == j, best_id, 0), 0).to(tl.int64))

    return nucleus_kernel


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, iterations: int = ITERATIONS,
                   block: int = BLOCK) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids drawn from softmax(logits / temperature) restricted to the
    top-p nucleus. Triton (CUDA, or the interpreter under TRITON_INTERPRET=1)."""
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"nucleus_sample needs temperature > 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    if logits.dim() != 2:
        raise ValueError(f"nucleus_sample takes (B, V) logits; got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    if B * V >= 2 ** 31:  # the random offsets are int32
        raise ValueError(f"nucleus_sample: B x V = {B * V} must stay below 2^31; sample fewer rows at a time")
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=logits.device)  # from torch's generator: graph-safe
    _kernel()[(B,)](logits, out, seed, logits.stride(0), V, 1.0 / temperature, float(top_p),
                    ITERS=iterations, BLOCK=block, num_warps=8)
    return out
