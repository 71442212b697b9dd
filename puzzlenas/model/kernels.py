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


# =============================================================================================
# Triton split-KV kernel
# =============================================================================================
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, KN, VN, KC, VC, Pos, Out, ML,
                     s_qb, s_qh, s_nb, s_nh, s_cb, s_ch, s_cn, s_ob, s_oh, s_os, s_mb, s_mh,
                     scale_log2, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # KV head
        s = tl.program_id(2)  # split of the sequence
        pos = tl.load(Pos + b).to(tl.int32)  # tokens already cached; the new one goes at pos
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, pos + 1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        g_ok = g < G
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        k_new = tl.load(KN + b * s_nb + h * s_nh + d)
        v_new = tl.load(VN + b * s_nb + h * s_nh + d)
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
TRITON_CONFIG = {"block_n": 32, "num_warps": 2, "programs": 1024}  # best of 27 on an H200 (RESULTS.md)


def split_plan(batch: int, kv_heads: int, max_len: int, block_n: int = 64, programs: int = 1024) -> tuple[int, int]:
    """(splits, split length): enough programs to fill the device at the full buffer; each split
    a multiple of block_n. Splits beyond a row's fill exit at once, so low fills cost little."""
    blocks = math.ceil(max_len / block_n)
    splits = max(1, min(blocks, math.ceil(programs / max(1, batch * kv_heads))))
    split_len = math.ceil(blocks / splits) * block_n
    return math.ceil(max_len / split_len), split_len


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, pos: torch.Tensor, scale: float,
                            block_n: int | None = None, num_warps: int | None = None,
                            programs: int | None = None) -> torch.Tensor:
    """Triton split-KV decode attention; same contract as `decode_attention_torch`. Launch
    settings default to TRITON_CONFIG."""
    block_n = block_n or TRITON_CONFIG["block_n"]
    num_warps = num_warps or TRITON_CONFIG["num_warps"]
    programs = programs or TRITON_CONFIG["programs"]
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv or D & (D - 1) or D < 16:
        raise ValueError(f"decode_attention_triton needs Hq % Hkv == 0 and a power-of-two head_dim >= 16; "
                         f"got Hq {Hq}, Hkv {Hkv}, D {D}")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention_triton needs K and V caches of the same strides, last dimension contiguous")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    split_kernel, merge_kernel = _kernels()
    G = Hq // Hkv
    splits, split_len = split_plan(B, Hkv, L, block_n, programs)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    ieee = q.dtype == torch.float32
    common = dict(G=G, G_PAD=max(16, 1 << (G - 1).bit_length()), D=D, BLOCK_N=block_n, SPLIT=split_len,
                  IEEE=ieee, num_warps=num_warps)
    if splits == 1:
        split_kernel[(B, Hkv, 1)](q, k, v, k_cache, v_cache, pos, out, out,
                                  q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                  k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                  out.stride(0), out.stride(1), 0, 0, 0,
                                  scale * LOG2E, DIRECT=True, **common)
        return out
    part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device)
    split_kernel[(B, Hkv, splits)](q, k, v, k_cache, v_cache, pos, part, ml,
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                   k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                   part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1),
                                   scale * LOG2E, DIRECT=False, **common)
    merge_kernel[(B, Hq)](part, ml, out, part.stride(0), part.stride(1), part.stride(2), ml.stride(0),
                          ml.stride(1), out.stride(0), out.stride(1), splits,
                          S_PAD=max(2, 1 << (splits - 1).bit_length()), D=D)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Write the new token's k, v (B, Hkv, D) at pos (B,) into the caches (B, Hkv, L, D) and
    return attention of q (B, Hq, D) over positions 0..pos[b] of each row: (B, Hq, D).
    backend: "auto" (Triton where it runs, else PyTorch), "triton" or "torch"."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"decode_attention backend {backend!r}; allowed: auto, triton, torch")
    if backend == "triton" or (backend == "auto" and use_triton_for(q)):
        return decode_attention_triton(q, k, v, k_cache, v_cache, pos, scale)
    return decode_attention_torch(q, k, v, k_cache, v_cache, pos, scale)
