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
from puzzlenas.model.fast import FastRunner, generate
from puzzlenas.model.inference import (StaticKVCache, decode_positions, mean_over_fills, static_forward,
                                       time_decode_over_fills, time_fn)
from puzzlenas.model.kernels import decode_attention_torch, decode_attention_triton
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
    mixed = [BlockConfig(AttentionConfig("gqa", 3), FFNConfig("gated", 1536)),
             BlockConfig(AttentionConfig("gqa", 1), FFNConfig("gated", 768)),
             BlockConfig(AttentionConfig("linear"), FFNConfig("linear")),
             BlockConfig(AttentionConfig("no_op"), FFNConfig("gated", 1536)),
             BlockConfig(AttentionConfig("gqa", 9), FFNConfig("no_op"))]
    torch.manual_seed(0)
    model = model_of(mixed, torch.float32)
    ids = torch.randint(0, 49152, (4, 40), device="cuda")
    runner = FastRunner(model, 4, 40)
    with torch.no_grad():
        got = [runner.prefill(ids[:, :30])] + [runner.decode_step(ids[:, 30 + j]) for j in range(9)]
        want = model(ids).logits[:, 29:39]
    err = (torch.stack(got, 1) - want).abs().max().item()
    out["fast_path_vs_forward_fp32_max_abs_err"] = err
    out["fast_path_vs_forward_logit_scale"] = want.abs().max().item()


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="correctness,bandwidth,tune,parent,blocks,generation")
    args = parser.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": {}}
    sections = {"correctness": correctness,
                "bandwidth": lambda o: o.update(copy_bandwidth_Bps=copy_bandwidth(torch.device("cuda"))),
                "tune": tune, "parent": parent_decode, "blocks": block_costs, "generation": generation}
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
