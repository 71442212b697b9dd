"""Old path vs fast path on one GPU: the decode step of a SmolLM2-135M-shaped parent (random
weights, bf16) at batch 256, 128 + 1024 tokens; % of the bandwidth floor; per block kind.

    PYTHONPATH=$PWD python benchmarks/fast_decode.py --out results.json

Sections (each saved to the JSON as it finishes; a failing one is recorded and skipped):
1. correctness: Triton split-KV kernel vs PyTorch (bf16, several shapes); fast-path logits
   (prefill + decode steps) vs the model's plain forward;
2. copy bandwidth of the device;
3. the parent's decode step: old path (`static_forward` over the whole buffer, CUDA graph) and
   fast path at fills 128 / 640 / 1151 (CUDA graphs), a real 1,024-step generation loop, and the
   bytes each must read at the scenario's mean fill against copy bandwidth;
4. `costs.measure_costs` on the fast path (per block kind, with bandwidth) and the whole-model
   check (parent, one-KV-head child, a mixed child);
5. `generate` throughput (sampling, top-p).

`--quick` (one short device call, < 90 s with compiles): the fused fast path (RoPE and the cache
write inside the attention kernel, residual adds in the GEMMs: `FastRunner(fused=True)`, the
default) against the fast path before it (`fused=False`):

    PYTHONPATH=$PWD python benchmarks/fast_decode.py --quick --out $OUT/fast_decode_quick.json

1. quick_kernel: the RoPE-inside kernel (bf16) vs the PyTorch reference (fp32): output and the
   K/V it writes;
2. bandwidth;
3. quick_parent / quick_kv1: decode step of the parent and of the one-KV-head child at fills
   128 / 640 / 1151, old fast path vs new, plus the new path with one split (no merge kernel),
   interleaved in CUDA graphs; mean over the generation, % of the floor; then one decode step
   of old and new from the same random cache: logits and the written K/V compared;
4. quick_forward: the new path's logits (prefill + decode steps, fp32 mixed child) vs the model's
   plain forward.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from puzzlenas.costs import (CostConfig, Scenario, check_against_whole_models, copy_bandwidth, costs_table,
                             measure_costs, predicted_costs)
from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzlenas.model.fast import FastRunner, generate, rope_tables
from puzzlenas.model.inference import (StaticKVCache, at_fills, decode_positions, mean_over_fills, static_forward,
                                       time_decode_over_fills, time_fn, time_interleaved)
from puzzlenas.model.kernels import (decode_attention_qkv_torch, decode_attention_qkv_triton, decode_attention_torch,
                                     decode_attention_triton)
from puzzlenas.model.modeling import DeciLMConfig, DeciLMForCausalLM

SMOL = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True)
B, N, M = 256, 128, 1024


def blocks(kv: int, ffn: int = 1536, layers: int = 30) -> list[BlockConfig]:
    return [BlockConfig(AttentionConfig("gqa", kv), FFNConfig("gated", ffn))] * layers


def model_of(blocks_: list[BlockConfig], dtype=torch.bfloat16) -> DeciLMForCausalLM:
    with torch.device("cuda"):
        return DeciLMForCausalLM(DeciLMConfig.from_blocks(blocks_, **SMOL)).to(dtype).eval()


def model_bytes_read(model: DeciLMForCausalLM, fill: float, batch: int) -> dict:
    """Bytes a decode step must read: every weight but the embedding (B rows of it) + KV at `fill`."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv = sum(2 * b.attention.num_kv_heads * cfg.head_dim * 2 for b in model.blocks if b.attention.kind == "gqa")
    return {"weights": weights, "kv": kv * batch * fill, "total": weights + kv * batch * fill}


MIXED = [BlockConfig(AttentionConfig("gqa", 3), FFNConfig("gated", 1536)),
         BlockConfig(AttentionConfig("gqa", 1), FFNConfig("gated", 768)),
         BlockConfig(AttentionConfig("linear"), FFNConfig("linear")),
         BlockConfig(AttentionConfig("no_op"), FFNConfig("gated", 1536)),
         BlockConfig(AttentionConfig("gqa", 9), FFNConfig("no_op"))]


def forward_check(fused: bool, device: str = "cuda") -> dict:
    """Fast-path logits (compiled, Triton; prefill + 9 decode steps) of an fp32 mixed child vs
    the model's plain forward."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeciLMForCausalLM(DeciLMConfig.from_blocks(MIXED, **SMOL)).eval()
    ids = torch.randint(0, 49152, (4, 40), device=device)
    runner = FastRunner(model, 4, 40, fused=fused)
    with torch.no_grad():
        got = [runner.prefill(ids[:, :30])] + [runner.decode_step(ids[:, 30 + j]) for j in range(9)]
        want = model(ids).logits[:, 29:39]
    return {"max_abs_err": (torch.stack(got, 1) - want).abs().max().item(), "logit_scale": want.abs().max().item()}


def correctness(out: dict) -> None:
    rows = []
    torch.manual_seed(0)
    for b, hq, hkv, d, L in ((256, 9, 3, 64, 1152), (1, 9, 3, 64, 2304), (4, 8, 1, 128, 333), (7, 32, 8, 128, 4096)):
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kc, vc = (torch.randn(b, hkv, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        pos = torch.randint(0, L, (b,), device="cuda")
        pos[0] = L - 1
        kc2, vc2 = kc.clone(), vc.clone()
        want = decode_attention_torch(q.float(), k.float(), v.float(), kc.float(), vc.float(), pos, d ** -0.5)
        got = decode_attention_triton(q, k, v, kc2, vc2, pos, d ** -0.5)
        rows.append({"shape": [b, hq, hkv, d, L], "max_abs_err": (got.float() - want).abs().max().item(),
                     "cache_written": bool(torch.equal(kc2[torch.arange(b), :, pos], k))})
    out["kernel_vs_reference"] = rows
    # fast path (compiled, Triton, graphs not needed here) vs the model's plain forward, fp32, mixed blocks
    check = forward_check(fused=True)
    out["fast_path_vs_forward_fp32_max_abs_err"] = check["max_abs_err"]
    out["fast_path_vs_forward_logit_scale"] = check["logit_scale"]


def tune(out: dict) -> None:
    """The split-KV kernel alone at the scenarios' mean fills, over launch settings; the best
    (least summed time relative to each shape's best) becomes kernels.TRITON_CONFIG for the rest."""
    from puzzlenas.model import kernels

    shapes = {"b256-L1152-fill640": (256, 1152, 640), "b64-L1152-fill640": (64, 1152, 640),
              "b1-L2304-fill2176": (1, 2304, 2176)}
    configs = [{"block_n": bn, "num_warps": nw, "programs": pr} for bn in (32, 64, 128) for nw in (2, 4, 8)
               for pr in (1024, 4096, 16384)]
    times = {}
    for name, (b, L, fill) in shapes.items():
        q = torch.randn(b, 9, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kc, vc = (torch.randn(b, 3, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        pos = torch.full((b,), fill, device="cuda")
        for i, c in enumerate(configs):
            times.setdefault(i, {})[name] = time_fn(lambda c=c: decode_attention_triton(q, k, v, kc, vc, pos, 0.125, **c),
                                                   torch.device("cuda"), iters=20, calls_per_sample=8)
    best_per_shape = {n: min(t[n] for t in times.values()) for n in shapes}
    score = {i: sum(t[n] / best_per_shape[n] for n in shapes) for i, t in times.items()}
    best = min(score, key=score.get)
    out["tune"] = [{**configs[i], **{n: t[n] for n in shapes}, "score": score[i]} for i, t in times.items()]
    out["tune_before"] = dict(kernels.TRITON_CONFIG)
    out["tune_best"] = configs[best]
    kernels.TRITON_CONFIG.update(configs[best])


def parent_decode(out: dict) -> None:
    torch.manual_seed(0)
    model = model_of(blocks(3))
    L = N + M
    mean_fill = N + (M + 1) / 2
    token = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    cache = StaticKVCache(model, B, L)

    def old_step() -> None:
        cache.pos.fill_(L - 1)
        static_forward(model, token, cache)

    out["old_step_s"] = time_fn(old_step, torch.device("cuda"), iters=20, calls_per_sample=4)
    del cache
    runner = FastRunner(model, B, L)
    tok = torch.zeros(B, dtype=torch.long, device="cuda")
    t0 = time.time()
    by_fill = time_decode_over_fills(lambda: runner.decode_step(tok), runner.cache.lengths,
                                     [N, 384, 640, 896, L - 1], torch.device("cuda"), iters=20)
    out["fast_compile_and_time_s"] = time.time() - t0
    out["fast_step_s_by_fill"] = {str(k): v for k, v in by_fill.items()}
    three = {p: by_fill[p] for p in (N, 640, L - 1)}
    out["fast_mean_step_s_trapezoid_3"] = mean_over_fills(three)
    out["fast_mean_step_s_trapezoid_5"] = mean_over_fills(by_fill)
    # a real generation: M graph replays of the decode step, the fill advancing on the device
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner.decode_step(tok)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runner.cache.lengths.fill_(N)  # the capture did not run the step: start the generation here
    graph.replay()  # the first step (fill N), untimed
    start.record()
    for _ in range(M - 1):
        graph.replay()
    end.record()
    end.synchronize()
    out["fast_real_generation_mean_step_s"] = start.elapsed_time(end) / 1e3 / (M - 1)
    out["fills_after_generation"] = int(runner.cache.lengths[0])
    bw = out["copy_bandwidth_Bps"]
    need = model_bytes_read(model, mean_fill, B)
    out["bytes_at_mean_fill"] = need
    out["floor_s_at_mean_fill"] = need["total"] / bw
    out["old_pct_of_floor"] = out["floor_s_at_mean_fill"] / out["old_step_s"]
    out["fast_pct_of_floor_mean"] = out["floor_s_at_mean_fill"] / out["fast_mean_step_s_trapezoid_3"]
    out["fast_pct_of_floor_at_640"] = need["total"] / bw / by_fill[640]
    # the one-KV-head child on both paths
    del runner, graph
    torch.cuda.empty_cache()
    child = model_of(blocks(1))
    cache = StaticKVCache(child, B, L)

    def old_child() -> None:
        cache.pos.fill_(L - 1)
        static_forward(child, token, cache)

    out["old_kv1_step_s"] = time_fn(old_child, torch.device("cuda"), iters=20, calls_per_sample=4)
    del cache
    runner = FastRunner(child, B, L)
    by_fill = time_decode_over_fills(lambda: runner.decode_step(tok), runner.cache.lengths, [N, 640, L - 1],
                                     torch.device("cuda"), iters=20)
    out["fast_kv1_mean_step_s"] = mean_over_fills(by_fill)
    out["speedup_kv1_old"] = out["old_step_s"] / out["old_kv1_step_s"]
    out["speedup_kv1_fast"] = out["fast_mean_step_s_trapezoid_3"] / out["fast_kv1_mean_step_s"]
    out["speedup_kv1_bytes"] = need["total"] / model_bytes_read(child, mean_fill, B)["total"]


def block_costs(out: dict) -> None:
    config = DeciLMConfig.from_blocks(blocks(3), **SMOL)
    scenarios = [Scenario("b256-p128-g1024", B, N, M), Scenario("b64-p128-g1024", 64, N, M),
                 Scenario("b1-p2048-g256", 1, 2048, 256)]
    cfg = CostConfig(scenarios=scenarios, dtype="bfloat16", iters=10, check_children=0)
    attention = [AttentionConfig("gqa", 3), AttentionConfig("gqa", 1), AttentionConfig("linear"),
                 AttentionConfig("no_op")]
    ffn = [FFNConfig("gated", 1536), FFNConfig("gated", 768), FFNConfig("linear"), FFNConfig("no_op")]
    t0 = time.time()
    table = measure_costs(config, attention, ffn, cfg, torch.device("cuda"), log=lambda *a: None)
    out["measure_costs_s"] = time.time() - t0
    children = {"parent": blocks(3), "kv1": blocks(1),
                "mixed": [BlockConfig(AttentionConfig("gqa", [3, 1][i % 2]) if i % 3 else AttentionConfig("no_op"),
                                      FFNConfig("gated", [1536, 768][i % 2])) for i in range(30)]}
    check = check_against_whole_models(config, table, children, cfg, torch.device("cuda"), log=lambda *a: None)
    out["table"] = table
    out["check"] = check
    out["table_text"] = costs_table(table, check)
    out["predicted_vs_measured_speedup"] = {}
    for s in scenarios:
        predicted = {m: predicted_costs(table, b)[f"decode_s/{s.name}"] for m, b in children.items()}
        measured = {r["model"]: r["decode_s"] for r in check if r["scenario"] == s.name}
        out["predicted_vs_measured_speedup"][s.name] = {
            m: {"predicted": predicted["parent"] / predicted[m], "measured": measured["parent"] / measured[m]}
            for m in children}
    print(out["table_text"], flush=True)


def generation(out: dict) -> None:
    torch.manual_seed(0)
    model = model_of(blocks(3))
    prompts = [torch.randint(0, 49152, (int(n),)).tolist() for n in torch.randint(64, 129, (256,))]
    generate(model, prompts[:8], max_new_tokens=4, temperature=1.0, top_p=0.9)  # compile / warm
    r = generate(model, prompts, max_new_tokens=256, temperature=1.0, top_p=0.9, eos_token_id=-1, seed=0)
    out["generate_256x256_tokens_per_s"] = r.tokens_per_s
    out["generate_seconds"] = r.seconds


# =============================================================================================
# --quick: the fused fast path vs the fast path before it, in one short device call
# =============================================================================================
QUICK = {"device": "cuda", "batch": B, "iters": 20, "compile_mode": None}  # --cpu-dry-run: cpu, 4 rows, 2 rounds (checks the script)


def quick_kernel(out: dict) -> None:
    """The RoPE-inside kernel (bf16, default launch settings) vs the PyTorch reference in fp32."""
    rows = []
    torch.manual_seed(0)
    for b, hq, hkv, d, L in ((256, 9, 3, 64, 1152), (256, 9, 1, 64, 1152), (1, 9, 3, 64, 2304), (4, 8, 1, 128, 333)):
        bf = dict(device=QUICK["device"], dtype=torch.bfloat16)
        qkv = torch.randn(b, (hq + 2 * hkv) * d, **bf)
        kc, vc = torch.randn(b, hkv, L, d, **bf), torch.randn(b, hkv, L, d, **bf)
        pos = torch.randint(0, L, (b,), device=QUICK["device"])
        pos[0] = L - 1
        inv_freq = 1.0 / 100000.0 ** (torch.arange(0, d, 2, device=QUICK["device"]).float() / d)
        cos, sin = rope_tables(pos, inv_freq, torch.bfloat16)
        want_k, want_v = kc.float(), vc.float()
        want = decode_attention_qkv_torch(qkv.float(), cos.float(), sin.float(), want_k, want_v, pos, hq, d ** -0.5)
        kc2, vc2 = kc.clone(), vc.clone()
        got = decode_attention_qkv_triton(qkv, cos, sin, kc2, vc2, pos, hq, d ** -0.5)
        rows.append({"shape": [b, hq, hkv, d, L], "max_abs_err": (got.float() - want).abs().max().item(),
                     "k_written_max_abs_err": (kc2.float() - want_k).abs().max().item(),
                     "v_written_max_abs_err": (vc2.float() - want_v).abs().max().item()})
    out["quick_kernel_vs_reference"] = rows
    out["quick_kernel_ok"] = all(r["max_abs_err"] < 0.03 and r["k_written_max_abs_err"] < 0.05
                                 and r["v_written_max_abs_err"] == 0 for r in rows)


def _one_split(step):
    """`step` with the split-KV kernel run as one split per (row, KV head): no merge kernel."""
    from puzzlenas.model import kernels

    def call() -> None:
        saved = kernels.TRITON_CONFIG["one_split_from"]
        kernels.TRITON_CONFIG["one_split_from"] = 1
        try:
            step()
        finally:
            kernels.TRITON_CONFIG["one_split_from"] = saved
    return call


def quick_decode(out: dict, kv: int, key: str) -> None:
    """Old fast path vs new (and new with one split) at fills 128 / 640 / 1151, interleaved; then
    one step of each from the same random cache, compared."""
    torch.manual_seed(0)
    B = QUICK["batch"]
    with torch.device(QUICK["device"]):
        model = DeciLMForCausalLM(DeciLMConfig.from_blocks(blocks(kv), **SMOL)).to(torch.bfloat16).eval()
    L, fills = N + M, [N, 640, N + M - 1]
    old = FastRunner(model, B, L, fused=False)
    new = FastRunner(model, B, L, fused=True, compile_mode=QUICK["compile_mode"])
    tok = torch.zeros(B, dtype=torch.long, device=QUICK["device"])
    variants = {"old": (old, lambda: old.decode_step(tok)), "new": (new, lambda: new.decode_step(tok)),
                "new_one_split": (new, _one_split(lambda: new.decode_step(tok)))}
    fns = [f for runner, step in variants.values() for f in at_fills(step, runner.cache.lengths, fills)]
    t0 = time.time()
    times = time_interleaved(fns, torch.device(QUICK["device"]), iters=QUICK["iters"], calls_per_sample=4)
    res: dict = {"compile_and_time_s": time.time() - t0, "new_compile_mode": QUICK["compile_mode"]}
    need = model_bytes_read(model, N + (M + 1) / 2, B)
    floor = need["total"] / out["copy_bandwidth_Bps"] if "copy_bandwidth_Bps" in out else None
    for i, name in enumerate(variants):
        by_fill = dict(zip(fills, times[3 * i:3 * i + 3]))
        mean = mean_over_fills(by_fill)
        res[name] = {"step_s_by_fill": {str(k): v for k, v in by_fill.items()}, "mean_step_s": mean,
                     "pct_of_floor": floor / mean if floor else None}
    res["floor_s_at_mean_fill"], res["bytes_at_mean_fill"] = floor, need
    res["speedup_new_vs_old"] = res["old"]["mean_step_s"] / res["new"]["mean_step_s"]
    res["speedup_new_one_split_vs_old"] = res["old"]["mean_step_s"] / res["new_one_split"]["mean_step_s"]
    # the same step on both paths from the same cache contents: logits and the K/V written
    with torch.no_grad():
        for k_old, v_old, k_new, v_new in zip(old.cache.k, old.cache.v, new.cache.k, new.cache.v):
            k_old.normal_()
            v_old.normal_()
            k_new.copy_(k_old)
            v_new.copy_(v_old)
        old.cache.lengths.copy_(torch.randint(N, L - 1, (B,), device=QUICK["device"]))
        old.cache.lengths[0] = L - 1
        new.cache.lengths.copy_(old.cache.lengths)
        at = old.cache.lengths.clone()
        tokens = torch.randint(0, 49152, (B,), device=QUICK["device"])
        a, b = old.decode_step(tokens).float(), new.decode_step(tokens).float()
        rows = torch.arange(B, device=QUICK["device"])

        def written(caches):  # (layers, B, Hkv, D): what the step wrote at each row's position
            return torch.stack([c[rows, :, at] for c in caches]).float()

        k_old, k_new, v_old, v_new = written(old.cache.k), written(new.cache.k), written(old.cache.v), written(new.cache.v)
        # layer 0 sees the same input on both paths (later layers differ by rounding)
        res["step_old_vs_new"] = {
            "logits_max_abs_diff": (a - b).abs().max().item(), "logits_max_abs": a.abs().max().item(),
            "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "layer0_k_written_max_abs_diff": (k_old[0] - k_new[0]).abs().max().item(),
            "layer0_v_written_equal": bool(torch.equal(v_old[0], v_new[0])),
            "k_written_max_abs_diff": (k_old - k_new).abs().max().item(),
            "v_written_max_abs_diff": (v_old - v_new).abs().max().item(),
            "k_written_max_abs": k_old.abs().max().item()}
    out[key] = res
    print(key, json.dumps({n: res[n]["mean_step_s"] for n in variants}), flush=True)


def quick_forward(out: dict) -> None:
    out["quick_forward_fp32_new"] = forward_check(fused=True, device=QUICK["device"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="correctness,bandwidth,tune,parent,blocks,generation")
    parser.add_argument("--quick", action="store_true",
                        help="the fused fast path vs the fast path before it only (sections quick_*; < 90 s)")
    parser.add_argument("--compile-mode", default=None,
                        help="--quick: torch.compile mode of the new path, e.g. max-autotune-no-cudagraphs "
                             "(GEMMs tuned per shape: minutes of compiling, not in the 90 s)")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    QUICK["compile_mode"] = args.compile_mode
    if args.quick:
        args.sections = "quick_kernel,bandwidth,quick_parent,quick_kv1,quick_forward"
    if args.cpu_dry_run:  # the quick sections' plumbing on a CPU (no timing worth reading)
        QUICK.update(device="cpu", batch=4, iters=2)
        args.sections = ",".join(s for s in args.sections.split(",") if s not in ("bandwidth", "quick_kernel"))
    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": {}}
    sections = {"correctness": correctness,
                "bandwidth": lambda o: o.update(copy_bandwidth_Bps=copy_bandwidth(torch.device("cuda"))),
                "tune": tune, "parent": parent_decode, "blocks": block_costs, "generation": generation,
                "quick_kernel": quick_kernel, "quick_parent": lambda o: quick_decode(o, 3, "quick_parent"),
                "quick_kv1": lambda o: quick_decode(o, 1, "quick_kv1"), "quick_forward": quick_forward}
    for name in args.sections.split(","):
        t0 = time.time()
        try:
            sections[name](out)
        except Exception:  # keep the other sections' numbers
            out["errors"][name] = traceback.format_exc()[-3000:]
            print(out["errors"][name], flush=True)
        out[f"section_s/{name}"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"[{name}] {time.time() - t0:.1f} s", json.dumps({k: v for k, v in out.items()
                                                               if k not in ("table", "check", "table_text")},
                                                              default=str)[:3000], flush=True)


if __name__ == "__main__":
    main()
