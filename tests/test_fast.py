"""The fast path (model/fast.py, model/kernels.py) against the model's plain forward."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from puzzlenas.model.blocks import AttentionConfig as A
from puzzlenas.model.blocks import BlockConfig
from puzzlenas.model.blocks import FFNConfig as F_
from puzzlenas.model.fast import FastRunner, generate, sample
from puzzlenas.model.kernels import decode_attention_torch, split_plan
from tests.test_child import MIXED_BLOCKS, make_child

# GQA of 1, 2 and 4 KV heads (4 query heads), linear and no-op attention, three FFN kinds.
HETEROGENEOUS = MIXED_BLOCKS


def test_prefill_then_decode_steps_match_the_full_forward():
    """Logits of a prefill and N decode steps equal the plain forward of the whole sequence,
    with prompts of different lengths in one batch (right padding, per-row fill)."""
    model = make_child(HETEROGENEOUS, seed=1)
    torch.manual_seed(0)
    lengths = [5, 9, 7]
    steps = 6
    seqs = [torch.randint(3, 128, (n + steps,)) for n in lengths]
    runner = FastRunner(model, batch_size=3, max_len=max(lengths) + steps)
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        ids[i, :n] = s[:n]
    with torch.no_grad():
        got = [runner.prefill(ids, torch.tensor(lengths))]
        for j in range(steps):
            got.append(runner.decode_step(torch.stack([s[n + j] for s, n in zip(seqs, lengths)])))
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            want = model(s[None]).logits[0, n - 1:]  # (steps + 1, V): after the prompt, then each new token
            mine = torch.stack([g[i] for g in got])
            assert torch.allclose(mine, want, atol=1e-4, rtol=1e-4), (i, (mine - want).abs().max())
    assert runner.cache.lengths.tolist() == [n + steps for n in lengths]
    assert [k.shape[1] for k in runner.cache.k] == [4, 1, 2]  # each GQA layer's own KV heads, no expansion


def test_decode_attention_reads_only_the_filled_positions():
    """Garbage beyond each row's fill changes nothing (NaN beyond the longest row is never read);
    the new token lands at pos."""
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 3, 6, 2, 12, 8
    q, k, v = torch.randn(B, Hq, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    kc, vc = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    pos = torch.tensor([2, 7, 9])
    for b, p in enumerate(pos.tolist()):
        kc[b, :, p + 1:] = 1e4
        vc[b, :, p + 1:] = 1e4
    kc[:, :, 10:] = vc[:, :, 10:] = float("nan")
    y = decode_attention_torch(q, k, v, kc, vc, pos, D ** -0.5)
    assert torch.isfinite(y).all()
    assert torch.equal(kc[torch.arange(B), :, pos], k) and torch.equal(vc[torch.arange(B), :, pos], v)
    b = 1  # by hand, GQA: query head h reads KV head h // (Hq / Hkv)
    keys, values = kc[b, :, :8].repeat_interleave(3, 0), vc[b, :, :8].repeat_interleave(3, 0)  # (Hq, 8, D)
    att = ((q[b, :, None] * keys).sum(-1) * D ** -0.5).softmax(-1)
    assert torch.allclose(y[b], (att[..., None] * values).sum(1), atol=1e-5)


def test_kernel_launch_settings_by_query_group():
    """A one-KV-head block of the bundled parent (9 query heads per KV head) takes its own tuned
    settings; other groups the general ones, which a caller's change reaches."""
    from puzzlenas.model import kernels

    nine = kernels.launch_settings(9)
    assert (nine["block_n"], nine["num_warps"], nine["one_split_from"]) == (64, 4, 1)
    assert kernels.launch_settings(3) == kernels.TRITON_CONFIG
    assert split_plan(256, 1, 1152, nine["block_n"], nine["programs"], nine["one_split_from"]) == (1, 1152)


def test_split_plan_covers_the_buffer_in_block_multiples():
    for batch, heads, L in ((256, 3, 1152), (1, 3, 2304), (4, 1, 100), (1, 1, 1)):
        splits, split_len = split_plan(batch, heads, L)
        assert split_len % 64 == 0 and (splits - 1) * split_len < L <= splits * split_len
    assert split_plan(256, 3, 1152)[0] == 2 and split_plan(1, 3, 2304)[0] == 36
    # one split (no merge) from a number of (row, KV head) pairs on: the whole buffer in block multiples
    assert split_plan(256, 3, 1152, one_split_from=768) == (1, 1152)
    assert split_plan(256, 1, 1100, one_split_from=768) == split_plan(256, 1, 1100)
    assert split_plan(4, 1, 100, one_split_from=1) == (1, 128)


def test_greedy_generate_equals_transformers_generate_and_stops_at_eos():
    model = make_child(HETEROGENEOUS, seed=2)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    result = generate(model, prompts, max_new_tokens=7, temperature=0.0, eos_token_id=-1, batch_size=2)
    for p, out in zip(prompts, result.tokens):
        want = model.generate(torch.tensor([p]), max_new_tokens=7, min_new_tokens=7, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert out == want
    assert result.generated_tokens == 21 and result.tokens_per_s > 0
    # a row stops at its first EOS (kept); here EOS = the 3rd token the first prompt generates
    eos = result.tokens[0][2]
    stopped = generate(model, prompts[:1], max_new_tokens=7, temperature=0.0, eos_token_id=eos, check_every=2)
    first = result.tokens[0].index(eos)
    assert stopped.tokens[0] == result.tokens[0][:first + 1]


def test_sampling_respects_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(4000, 1)
    probs = logits[0].softmax(-1)
    counts = torch.bincount(sample(logits, 1.0, 1.0), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)
    nucleus = torch.bincount(sample(logits, 1.0, 0.5), minlength=4)  # p(top) = 0.71 > 0.5: only the top token
    assert nucleus[0] == 4000
    two = torch.bincount(sample(logits, 1.0, 0.9), minlength=4)
    assert two[2:].sum() == 0 and two[1] > 0
    assert torch.equal(sample(logits[:3], 0.0, 0.9), torch.zeros(3, dtype=torch.long))


def test_the_cpu_nucleus_from_top_k_is_the_whole_sorts_nucleus(monkeypatch):
    """On CPU the nucleus is cut from the top-k candidates when they hold top_p of the mass, else
    from the full sort: either way the same distribution as sorting the whole vocabulary."""
    import puzzlenas.model.fast as fast

    torch.manual_seed(0)
    V, K = 64, 8
    peaked = torch.randn(V) * 0.5
    peaked[:3] = torch.tensor([6.0, 5.5, 5.0])  # nucleus at 0.9: the three top tokens, within K
    flat = torch.randn(V) * 0.1  # nucleus at 0.9: ~58 tokens, beyond K -> the full sort
    for logits, expect_k in ((peaked, True), (flat, False)):
        rows = logits.repeat(6000, 1)
        top, ids = fast._descending(rows, 0.9, candidates=K)
        assert top.shape[-1] == (K if expect_k else V)
        assert torch.equal(ids[0], logits.argsort(descending=True)[:top.shape[-1]])
        monkeypatch.setattr(fast, "CPU_NUCLEUS_CANDIDATES", K)
        got = torch.bincount(fast.sample(rows, 1.0, 0.9), minlength=V).float() / len(rows)
        monkeypatch.setattr(fast, "CPU_NUCLEUS_CANDIDATES", V)  # the whole sort, as on CUDA
        want = torch.bincount(fast.sample(rows, 1.0, 0.9), minlength=V).float() / len(rows)
        assert (got > 0).sum() == (want > 0).sum() or not expect_k  # the same support when cut from top-k
        assert torch.allclose(got, want, atol=0.02)


def test_residual_adds_in_the_gemm_epilogue_equal_the_separate_adds():
    """after_attention / linear_attention with epilogue=True (torch.addmm, as on CUDA) equal the
    separate adds, for 2-D (decode) and 3-D (prefill) inputs; a bias falls back to the separate add."""
    from puzzlenas.model.fast import after_attention, linear_attention

    torch.manual_seed(0)
    C, H, F, D = 16, 4, 24, 4
    w_o, w_in, w_down, w_lin = (torch.randn(C, H * D), torch.randn(2 * F, C), torch.randn(C, F), torch.randn(C, C))
    norm = torch.rand(C) + 0.5
    for lead in ((5,), (2, 3)):
        x, y = torch.randn(*lead, C), torch.randn(*lead, H, D)
        for b_o in (None, torch.randn(C)):
            args = (x, y, w_o, b_o, norm, 1e-5, w_in, None, w_down, None, "gated")
            want, got = after_attention(*args, epilogue=False), after_attention(*args, epilogue=True)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-5)
        lin_args = (x, None, None, None, norm, 1e-5, w_lin, None, None, None, "linear")
        assert torch.allclose(after_attention(*lin_args, epilogue=True), after_attention(*lin_args), atol=1e-4)
        assert torch.allclose(linear_attention(x, norm, 1e-5, w_lin, True), linear_attention(x, norm, 1e-5, w_lin),
                              atol=1e-4)
        assert not torch.allclose(linear_attention(x, norm, 1e-5, w_lin), x)  # the projection is not a no-op


def test_generate_rejects_bad_input_with_the_fix():
    model = make_child(seed=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)


TRITON_TARGET = os.environ.get("PUZZLENAS_TRITON_PATH", "/tmp/triton_pkgs")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None and not os.path.isdir(f"{TRITON_TARGET}/triton"),
    reason="needs triton (pip install triton; or PUZZLENAS_TRITON_PATH=<a --target dir>)")


def run_in_triton_interpreter(code: str) -> None:
    """Run `code` in a subprocess under TRITON_INTERPRET=1 (the flag is read at import), from the
    repository root; it must exit 0 and print "ok"."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(Path(__file__).resolve().parents[1])
    extra = [root] if importlib.util.find_spec("triton") else [root, TRITON_TARGET]
    env["PYTHONPATH"] = os.pathsep.join(extra + [env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@needs_triton
def test_triton_split_kv_kernel_matches_the_reference_in_the_interpreter():
    """The Triton kernel under TRITON_INTERPRET=1 on CPU (a subprocess: the flag is read at import),
    one split and many splits, fp32 and fp16 (the interpreter mishandles bf16)."""
    code = r"""
import torch
from puzzlenas.model.kernels import decode_attention_torch, decode_attention_triton
torch.manual_seed(0)
for B, Hq, Hkv, D, L, dtype, tol in [(3, 4, 2, 16, 40, torch.float32, 1e-5), (2, 9, 3, 64, 200, torch.float32, 1e-5),
                                     (2, 4, 4, 16, 20, torch.float16, 2e-3), (2, 8, 1, 32, 50, torch.float16, 2e-3)]:
    q, k, v = torch.randn(B, Hq, D, dtype=dtype), torch.randn(B, Hkv, D, dtype=dtype), torch.randn(B, Hkv, D, dtype=dtype)
    kc, vc = torch.randn(B, Hkv, L, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype)
    pos = torch.randint(0, L, (B,)); pos[0] = L - 1
    want_k, want_v = kc.clone(), vc.clone()
    want = decode_attention_torch(q, k, v, want_k, want_v, pos, D ** -0.5)
    for programs in (1, 64):
        kc2, vc2 = kc.clone(), vc.clone()
        got = decode_attention_triton(q, k, v, kc2, vc2, pos, D ** -0.5, block_n=16, programs=programs)
        err = (got.float() - want.float()).abs().max().item()
        assert err < tol, (B, Hq, Hkv, L, dtype, programs, err)
        assert torch.equal(kc2, want_k) and torch.equal(vc2, want_v)
print("ok")
"""
    run_in_triton_interpreter(code)


@needs_triton
def test_triton_kernel_with_rope_inside_matches_the_reference_in_the_interpreter():
    """The kernel that applies RoPE itself and reads q, k, v in place from the fused projection
    (kernels.decode_attention_qkv) under TRITON_INTERPRET=1: output and the written cache equal
    the unfused reference (RoPE in PyTorch, then attention), one split and many, fp32 and fp16;
    then the whole fast path on it (prefill + decode steps of the heterogeneous child, fused and
    not) against the model's plain forward."""
    code = r"""
import torch
from puzzlenas.model.fast import rope_tables
from puzzlenas.model.kernels import decode_attention_qkv_torch, decode_attention_qkv_triton
torch.manual_seed(0)
for B, Hq, Hkv, D, L, dtype, tol in [(3, 4, 2, 16, 40, torch.float32, 1e-5), (2, 9, 3, 64, 200, torch.float32, 1e-5),
                                     (2, 4, 4, 16, 20, torch.float16, 2e-3), (2, 8, 1, 32, 50, torch.float16, 2e-3)]:
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, dtype=dtype)
    kc, vc = torch.randn(B, Hkv, L, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype)
    pos = torch.randint(0, L, (B,)); pos[0] = L - 1
    cos, sin = rope_tables(pos, 1.0 / 10000 ** (torch.arange(0, D, 2) / D), dtype)  # (B, 1, D)
    want_k, want_v = kc.clone(), vc.clone()
    want = decode_attention_qkv_torch(qkv, cos, sin, want_k, want_v, pos, Hq, D ** -0.5)
    for programs in (1, 64):
        kc2, vc2 = kc.clone(), vc.clone()
        got = decode_attention_qkv_triton(qkv, cos, sin, kc2, vc2, pos, Hq, D ** -0.5, block_n=16, programs=programs)
        err = (got.float() - want.float()).abs().max().item()
        assert err < tol, (B, Hq, Hkv, L, dtype, programs, err)
        cache_tol = 0 if dtype == torch.float32 else 1e-3  # fp16: RoPE rounded once (kernel) vs per op (PyTorch)
        for mine, ref in ((kc2, want_k), (vc2, want_v)):
            assert torch.allclose(mine.float(), ref.float(), atol=cache_tol, rtol=0), (dtype, programs)
        rows = torch.arange(B)
        assert not torch.equal(kc2[rows, :, pos], kc[rows, :, pos])  # the new k was written

# the default launch settings of a one-KV-head block of 9 query heads (kernels.TRITON_CONFIG_BY_GROUP:
# block_n 64, one split) and of the parent's shape (block_n 32, splits), on a buffer of 200
for Hkv in (1, 3):
    qkv = torch.randn(2, (9 + 2 * Hkv) * 64)
    kc, vc = torch.randn(2, Hkv, 200, 64), torch.randn(2, Hkv, 200, 64)
    pos = torch.tensor([199, 61])
    cos, sin = rope_tables(pos, 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64), torch.float32)
    want = decode_attention_qkv_torch(qkv, cos, sin, kc.clone(), vc.clone(), pos, 9, 0.125)
    got = decode_attention_qkv_triton(qkv, cos, sin, kc.clone(), vc.clone(), pos, 9, 0.125)
    assert (got - want).abs().max().item() < 1e-5, Hkv

from puzzlenas.model import kernels
from puzzlenas.model.fast import FastRunner
from tests.test_child import MIXED_BLOCKS, make_child
calls = []
launch = kernels.decode_attention_qkv_triton
kernels.decode_attention_qkv_triton = lambda *a, **k: calls.append(1) or launch(*a, **k)
model = make_child(MIXED_BLOCKS, seed=1)
lengths, steps = [5, 9, 7], 4
seqs = [torch.randint(3, 128, (n + steps,)) for n in lengths]
ids = torch.zeros(3, max(lengths), dtype=torch.long)
for i, (s, n) in enumerate(zip(seqs, lengths)):
    ids[i, :n] = s[:n]
with torch.no_grad():
    for fused in (True, False):
        runner = FastRunner(model, batch_size=3, max_len=max(lengths) + steps, fused=fused)
        got = [runner.prefill(ids, torch.tensor(lengths))]
        for j in range(steps):
            got.append(runner.decode_step(torch.stack([s[n + j] for s, n in zip(seqs, lengths)])))
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            want = model(s[None]).logits[0, n - 1:]
            mine = torch.stack([g[i] for g in got])
            assert torch.allclose(mine, want, atol=1e-4, rtol=1e-4), (fused, i, (mine - want).abs().max())
        assert len(calls) == (3 * steps if fused else 0), len(calls)  # 3 GQA layers x steps: the fused kernel ran
        calls.clear()
print("ok")
"""
    run_in_triton_interpreter(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_graphed_decode_matches_eager_on_cuda():
    model = make_child(HETEROGENEOUS, seed=3).cuda().to(torch.bfloat16)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    fast = generate(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_id=-1)
    eager = generate(model.float(), prompts, max_new_tokens=12, temperature=0.0, eos_token_id=-1, use_graph=False)
    agree = sum(a == b for x, y in zip(fast.tokens, eager.tokens) for a, b in zip(x, y))
    assert agree >= 0.8 * fast.generated_tokens  # bf16 vs fp32 may flip near-ties


@needs_triton
def test_threshold_nucleus_kernel_draws_only_inside_the_sorted_nucleus_in_the_interpreter():
    """model/nucleus.py under TRITON_INTERPRET=1: every draw lies in the nucleus the sort defines
    (at two temperatures, rows longer than a chunk), several tokens of it are drawn, their
    frequencies follow the renormalized probabilities, and a tiny top_p gives the argmax."""
    code = r"""
import torch
from puzzlenas.model.nucleus import nucleus_sample
torch.manual_seed(0)
V, B = 40, 120
logits = torch.randn(V)
for temperature, top_p in ((1.0, 0.8), (0.5, 0.9)):
    p = torch.softmax(logits / temperature, -1)
    sp, order = p.sort(descending=True)
    keep = (sp.cumsum(0) - sp) < top_p
    nucleus = set(order[keep].tolist())
    drawn = nucleus_sample(logits.expand(B, V).contiguous(), temperature, top_p, iterations=16, block=16)
    assert set(drawn.tolist()) <= nucleus, (temperature, set(drawn.tolist()) - nucleus)
    assert len(set(drawn.tolist())) >= min(3, len(nucleus)), drawn
    freq = torch.bincount(drawn, minlength=V).float() / B
    want = torch.zeros(V); want[order[keep]] = sp[keep] / sp[keep].sum()
    assert (freq - want).abs().max() < 0.15, (freq - want).abs().max()
assert nucleus_sample(logits[None].repeat(2, 1), 1.0, 0.01, iterations=16, block=16).tolist() == [int(logits.argmax())] * 2
print("ok")
"""
    run_in_triton_interpreter(code)


def test_nucleus_setting_is_checked():
    from puzzlenas.model import fast

    old = fast.NUCLEUS
    try:
        fast.NUCLEUS = "radix"
        with pytest.raises(ValueError, match="fast.NUCLEUS = 'radix'; allowed: sort, threshold"):
            fast.sample(torch.zeros(1, 4), 1.0, 0.9)
    finally:
        fast.NUCLEUS = old
