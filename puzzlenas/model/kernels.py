"""Decode attention over the filled part of a KV cache ("flash-decoding"), GQA without copies.

One decode step: each row b has `pos[b]` tokens in its cache and one new token whose q, k, v
were just computed. `decode_attention` writes the new k, v at position pos[b] and returns the
attention of q over positions 0..pos[b], reading only those positions: the cost follows the
fill, not the buffer. The length lives on the device, so a step is CUDA-graph capturable with
a fixed buffer.

Two implementations with the same results:
- a Triton split-KV kernel (CUDA; or on CPU under TRITON_INTERPRET=1 for tests): a program per
  (row, KV head, split of the sequence) holds the head's G = Hq / Hkv query heads as the rows
  of one tensor-core product, so K/V are read once per KV head (GQA never expands them);
  splits beyond the row's fill exit at once; a second kernel merges the splits' partial
  softmaxes (skipped when one split covers the buffer);
- a PyTorch one: on CPU it slices the cache to the longest row (a host read); on CUDA without
  Triton it reads the whole buffer under a mask (capturable, not fill-aware).
Triton is optional: imported inside the functions that need it.

`decode_attention_qkv` takes the fused q/k/v projection before RoPE instead: the Triton kernel
then applies RoPE to q and the new k itself and reads q, k, v as strided views of the GEMM's
output, so a decode step spends no separate kernels on RoPE or on making k, v contiguous.
"""

from __future__ import annotations

import functools
import math
import os

import torch

LOG2E = 1.4426950408889634


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton_for(q: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA when Triton is installed (or anywhere when interpreting)."""
    return (q.is_cuda or _interpreting()) and triton_available()


# =============================================================================================
# PyTorch reference
# =============================================================================================
def write_new_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 pos: torch.Tensor) -> None:
    """k_cache[b, :, pos[b]] = k[b] (and v): caches (B, Hkv, L, D), k/v (B, Hkv, D), pos (B,)."""
    rows = torch.arange(k.shape[0], device=k.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v


def decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: q (B, Hq, D), k/v (B, Hkv, D), caches (B, Hkv, L, D), pos (B,) -> (B, Hq, D)."""
    write_new_kv(k_cache, v_cache, k, v, pos)
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if not q.is_cuda:  # the host may read the fill: attend over the longest row only
        L = int(pos.max()) + 1
    # GQA by grouping the query heads of one KV head (no copy of K/V): (B, Hkv, G, D)
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    scores = qg @ k_cache[:, :, :L].float().transpose(-1, -2) * scale  # (B, Hkv, G, L)
    keys = torch.arange(L, device=q.device)
    scores = scores.masked_fill((keys[None, :] > pos[:, None])[:, None, None, :], float("-inf"))
    y = scores.softmax(-1) @ v_cache[:, :, :L].float()  # (B, Hkv, G, D)
    return y.reshape(B, Hq, D).to(q.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x (..., heads, D); cos/sin broadcast over heads (..., 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """qkv (..., (Hq + 2 Hkv) D), the fused projection -> q (..., Hq, D), k, v (..., Hkv, D): views."""
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim)), v.unflatten(-1, (kv_heads, head_dim))


def decode_attention_qkv_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, pos: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Reference of `decode_attention_qkv`: RoPE on q and k (as the unfused path: `rope`), then
    `decode_attention_torch`. qkv (B, (Hq + 2 Hkv) D), cos/sin (B, 1, D) -> (B, Hq, D)."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[-1]
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    return decode_attention_torch(rope(q, cos, sin), rope(k, cos, sin), v, k_cache, v_cache, pos, scale)


# =============================================================================================
# Triton split-KV kernel
# =============================================================================================
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, KN, VN, KC, VC, Pos, Out, ML, Cos, Sin,
                     s_qb, s_qh, s_nb, s_nh, s_cb, s_ch, s_cn, s_ob, s_oh, s_os, s_mb, s_mh, s_rb,
                     scale_log2, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
                     ROPE: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # KV head
        s = tl.program_id(2)  # split of the sequence
        pos = tl.load(Pos + b).to(tl.int32)  # tokens already cached; the new one goes at pos
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, pos + 1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        g_ok = g < G
        q_ptr = Q + b * s_qb + (h * G + g)[:, None] * s_qh
        q = tl.load(q_ptr + d[None, :], mask=g_ok[:, None], other=0.0)
        k_new = tl.load(KN + b * s_nb + h * s_nh + d)
        v_new = tl.load(VN + b * s_nb + h * s_nh + d)
        if ROPE:  # rotate-half RoPE of q and the new k, in fp32, rounded once to the input dtype
            d_rot = (d + D // 2) % D  # x2 for the first half, x1 for the second
            sign = tl.where(d < D // 2, -1.0, 1.0)
            cos = tl.load(Cos + b * s_rb + d).to(tl.float32)
            sin = tl.load(Sin + b * s_rb + d).to(tl.float32)
            q_rot = tl.load(q_ptr + d_rot[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * cos[None, :] + (sign[None, :] * q_rot) * sin[None, :]).to(q.dtype)
            k_rot = tl.load(KN + b * s_nb + h * s_nh + d_rot).to(tl.float32)
            k_new = (k_new.to(tl.float32) * cos + (sign * k_rot) * sin).to(k_new.dtype)
        k_base = KC + b * s_cb + h * s_ch
        v_base = VC + b * s_cb + h * s_ch
        if (pos >= start) & (pos < start + SPLIT):  # this split holds the new token: write it once
            tl.store(k_base + pos * s_cn + d, k_new)
            tl.store(v_base + pos * s_cn + d, v_new)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < end
            k = tl.load(k_base + n[:, None] * s_cn + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * s_cn + d[None, :], mask=ok[:, None], other=0.0)
            new = (n == pos)[:, None]  # the new token is taken from registers, not from the store above
            k = tl.where(new, k_new[None, :], k)
            v = tl.where(new, v_new[None, :], v)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(ok[None, :], qk * scale_log2, float("-inf"))  # (G_PAD, BLOCK_N), log2 units
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        rows = h * G + g
        if DIRECT:  # one split: normalize and write the output
            tl.store(Out + b * s_ob + rows[:, None] * s_oh + d[None, :],
                     (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=g_ok[:, None])
        else:  # partial results (unnormalized acc, running max in log2 units, sum) per split
            tl.store(Out + b * s_ob + rows[:, None] * s_oh + s * s_os + d[None, :], acc, mask=g_ok[:, None])
            tl.store(ML + b * s_mb + rows * s_mh + s * 2, m_i, mask=g_ok)
            tl.store(ML + b * s_mb + rows * s_mh + s * 2 + 1, l_i, mask=g_ok)

    @triton.jit
    def merge_kernel(Part, ML, Out, s_pb, s_ph, s_ps, s_mb, s_mh, s_ob, s_oh, S,
                     S_PAD: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D)
        s_ok = s < S
        m = tl.load(ML + b * s_mb + hq * s_mh + s * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(ML + b * s_mb + hq * s_mh + s * 2 + 1, mask=s_ok, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))  # empty splits: m = -inf, weight 0; split 0 is never empty
        acc = tl.load(Part + b * s_pb + hq * s_ph + s[:, None] * s_ps + d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(Out + b * s_ob + hq * s_oh + d, out.to(Out.dtype.element_ty))

    return split_kernel, merge_kernel


# Launch settings of the split-KV kernel (benchmarks/fast_decode.py sweeps them on the device;
# `programs`: how many (row, KV head, split) programs to aim for at the full buffer).
# `one_split_from`: from this many (row, KV head) pairs on, one split per pair, so no merge kernel
# (0: never). Measured on an H200 (`fast_decode.py --quick`, RESULTS.md): 768 pairs (batch 256 x 3
# KV heads) fill the device alone, and one split cut the parent's mean step 2.19 -> 1.99 ms at every
# fill; 256 pairs (one KV head) still need the splits at long fills (1.86 vs 1.72 ms at 1,151).
TRITON_CONFIG = {"block_n": 32, "num_warps": 2, "programs": 1024,  # best of 27 on an H200 (RESULTS.md)
                 "one_split_from": 768}
# Overrides by query heads per KV head (G), swept by benchmarks/attention_tune.py on an H200 at
# batch 256, buffer 1,152: with 9 query heads on one KV head (the bundled parent's one-KV-head
# block) each program does 3x the parent's work per key, and wider blocks, 4 warps and one split
# cut the mean of fills 128/640/1151 from 22.4 to 18.0 us (7.5/18.1/28.4 us; RESULTS.md). G=3
# (the parent's shape) was already at its best.
TRITON_CONFIG_BY_GROUP = {9: {"block_n": 64, "num_warps": 4, "one_split_from": 1}}


def launch_settings(group: int) -> dict:
    """The split-KV kernel's launch settings for `group` query heads per KV head."""
    return {**TRITON_CONFIG, **TRITON_CONFIG_BY_GROUP.get(group, {})}


def split_plan(batch: int, kv_heads: int, max_len: int, block_n: int = 64, programs: int = 1024,
               one_split_from: int = 0) -> tuple[int, int]:
    """(splits, split length): enough programs to fill the device at the full buffer; each split
    a multiple of block_n. Splits beyond a row's fill exit at once, so low fills cost little.
    one_split_from > 0: one split whenever batch x kv_heads reaches it (no merge kernel)."""
    blocks = math.ceil(max_len / block_n)
    if 0 < one_split_from <= batch * kv_heads:
        return 1, blocks * block_n
    splits = max(1, min(blocks, math.ceil(programs / max(1, batch * kv_heads))))
    split_len = math.ceil(blocks / splits) * block_n
    return math.ceil(max_len / split_len), split_len


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                            block_n: int | None = None, num_warps: int | None = None,
                            programs: int | None = None) -> torch.Tensor:
    """Triton split-KV decode attention; same contract as `decode_attention_torch`. Launch
    settings default to `launch_settings` of the query group."""
    return _launch(q, k, v, k_cache, v_cache, pos, scale, None, None, block_n, num_warps, programs)


def decode_attention_qkv_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, pos: torch.Tensor, heads: int, scale: float,
                                block_n: int | None = None, num_warps: int | None = None,
                                programs: int | None = None) -> torch.Tensor:
    """Triton split-KV decode attention with RoPE inside; same contract as
    `decode_attention_qkv_torch`. q, k, v are read in place from `qkv` (no copies)."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[-1]
    if qkv.shape[-1] != (heads + 2 * kv_heads) * head_dim:
        raise ValueError(f"decode_attention_qkv: qkv has {qkv.shape[-1]} features; {heads} query heads and "
                         f"{kv_heads} KV heads of {head_dim} need {(heads + 2 * kv_heads) * head_dim}")
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    return _launch(q, k, v, k_cache, v_cache, pos, scale, _rope_table(cos, qkv), _rope_table(sin, qkv),
                   block_n, num_warps, programs)


def _rope_table(t: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
    """cos or sin (B, 1, D) or (B, D) -> (B, D), last dimension contiguous."""
    t = t.reshape(qkv.shape[0], t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, v, k_cache, v_cache, pos, scale, cos, sin, block_n, num_warps, programs) -> torch.Tensor:
    """q (B, Hq, D), k/v (B, Hkv, D) with any row and head strides (last dimension contiguous);
    cos/sin (B, D) or None: RoPE applied to q and k in the kernel."""
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    settings = launch_settings(Hq // Hkv if Hkv and Hq % Hkv == 0 else 0)
    block_n = block_n or settings["block_n"]
    num_warps = num_warps or settings["num_warps"]
    programs = programs or settings["programs"]
    if Hq % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"decode_attention_triton needs Hq % Hkv == 0 and a power-of-two head_dim >= 16; "
                         f"got Hq {Hq}, Hkv {Hkv}, D {D}")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention_triton needs K and V caches of the same strides, last dimension contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride() != k.stride():  # the kernel reads k and v with one set of strides
        k, v = k.contiguous(), v.contiguous()
    split_kernel, merge_kernel = _kernels()
    G = Hq // Hkv
    splits, split_len = split_plan(B, Hkv, L, block_n, programs, settings.get("one_split_from", 0))
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    ieee = q.dtype == torch.float32
    rope_ = cos is not None
    cos = q if cos is None else cos  # unused pointers when ROPE is off
    sin = q if sin is None else sin
    common = dict(G=G, G_PAD=max(16, 1 << (G - 1).bit_length()), D=D, BLOCK_N=block_n, SPLIT=split_len,
                  IEEE=ieee, ROPE=rope_, num_warps=num_warps)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    if splits == 1:
        split_kernel[(B, Hkv, 1)](q, k, v, k_cache, v_cache, pos, out, out, cos, sin, *strides,
                                  out.stride(0), out.stride(1), 0, 0, 0, cos.stride(0),
                                  scale * LOG2E, DIRECT=True, **common)
        return out
    part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device)
    split_kernel[(B, Hkv, splits)](q, k, v, k_cache, v_cache, pos, part, ml, cos, sin, *strides,
                                   part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1),
                                   cos.stride(0), scale * LOG2E, DIRECT=False, **common)
    merge_kernel[(B, Hq)](part, ml, out, part.stride(0), part.stride(1), part.stride(2), ml.stride(0),
                          ml.stride(1), out.stride(0), out.stride(1), splits,
                          S_PAD=max(2, 1 << (splits - 1).bit_length()), D=D)
    return out


def attention_kernel(q: torch.Tensor, backend: str) -> str:
    """Which implementation `backend` ("auto", "triton", "torch") runs for tensors like q: "triton" or "torch"."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"decode_attention backend {backend!r}; allowed: auto, triton, torch")
    return "triton" if backend == "triton" or (backend == "auto" and use_triton_for(q)) else "torch"


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Write the new token's k, v (B, Hkv, D) at pos (B,) into the caches (B, Hkv, L, D) and
    return attention of q (B, Hq, D) over positions 0..pos[b] of each row: (B, Hq, D).
    backend: "auto" (Triton where it runs, else PyTorch), "triton" or "torch"."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if attention_kernel(q, backend) == "triton":
        return decode_attention_triton(q, k, v, k_cache, v_cache, pos, scale)
    return decode_attention_torch(q, k, v, k_cache, v_cache, pos, scale)


def decode_attention_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, pos: torch.Tensor, heads: int, scale: float | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """As `decode_attention`, from the fused projection before RoPE: qkv (B, (Hq + 2 Hkv) D) is
    split into q, k, v, RoPE (cos/sin (B, 1, D)) is applied to q and k, the new k, v are written
    at pos and q attends over positions 0..pos[b]: (B, Hq, D). On Triton all of it is one kernel
    (plus the split merge); the PyTorch backend runs the same steps unfused."""
    head_dim = k_cache.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    if attention_kernel(qkv, backend) == "triton":
        return decode_attention_qkv_triton(qkv, cos, sin, k_cache, v_cache, pos, heads, scale)
    return decode_attention_qkv_torch(qkv, cos, sin, k_cache, v_cache, pos, heads, scale)
