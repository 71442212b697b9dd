"""BLD throughput and model FLOP utilisation (MFU) on one GPU.

Two measurements, for the bundled SmolLM2-135M and for a Llama-3.1-8B-shaped parent with
random weights (hidden 4096, 32 heads / 8 KV heads, FFN 14336, vocab 128256):

1. single jobs: one BLD optimizer step of one variant (full-width FFN, narrow FFN, fewer KV
   heads, linear) on the parent's own activations, timed with CUDA events after warm-up;
2. a whole decoupled round: every variant of the default space for the first `--layers`
   layers trained together, the frozen parent forward included (what `puzzlenas run` does).

Model FLOPs: 6 x (trained matmul parameters) x tokens for each job, plus 4 x (parent FFN
parameters) x tokens for attention jobs (the frozen parent FFN's forward and input gradient),
plus causal attention (3 x forward), plus 2 x (parent parameters) x tokens for the parent's
forward in the whole-round measurement. MFU = model FLOPs / time / the card's dense bf16 peak.

    python benchmarks/bld_throughput.py --parent smollm2-135m --out smollm2.json
    python benchmarks/bld_throughput.py --parent llama-3.1-8b-shaped --layers 2 --out llama8b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from puzzlenas import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzlenas.activations import parent_layer_activations
from puzzlenas.bld import BLDConfig, BLDTrainer, Job, decoupled_jobs
from puzzlenas.library import LibraryConfig, Variant, search_space
from puzzlenas.model.parent import load_parent

DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def llama8b_shaped(layers: int) -> DeciLMForCausalLM:
    blocks = [BlockConfig.parent(8, 14336)] * layers
    config = DeciLMConfig.from_blocks(
        blocks, vocab_size=128256, hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, max_position_embeddings=131072)
    with torch.device("cuda"):
        model = DeciLMForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def job_flops(job: Job, config: DeciLMConfig, tokens: int, seq_len: int) -> float:
    H, Hq, D = config.hidden_size, config.num_attention_heads, config.head_dim
    parent = config.blocks[job.layer]
    flops = 0.0
    for v in job.variants:
        if not v.trainable:
            continue
        c = v.config
        if v.subblock == "ffn":
            flops += 6 * (3 * H * c.intermediate_size if c.kind == "gated" else H * H) * tokens
        elif c.kind == "gqa":
            flops += 6 * (2 * H * Hq * D + 2 * H * c.num_kv_heads * D) * tokens
            flops += 3 * 4 * tokens * seq_len / 2 * Hq * D  # causal QK^T and PV, forward + backward
        else:
            flops += 6 * H * H * tokens
    if job.kind == "attention":  # frozen parent FFN: forward + gradient w.r.t. its input
        flops += 4 * 3 * H * parent.ffn.intermediate_size * tokens
    return flops


def parent_forward_flops(config: DeciLMConfig, layers: int, tokens: int, seq_len: int) -> float:
    b = config.blocks[0]
    H, Hq, D = config.hidden_size, config.num_attention_heads, config.head_dim
    per_layer = 2 * (2 * H * Hq * D + 2 * H * b.attention.num_kv_heads * D + 3 * H * b.ffn.intermediate_size)
    return layers * (per_layer * tokens + 4 * tokens * seq_len / 2 * Hq * D)


def time_single_jobs(parent, trainer: BLDTrainer, jobs: list[Job], ids, steps: int, seq_len: int) -> list[dict]:
    acts, ctx = parent_layer_activations(parent, ids, [0])
    rows = []
    for job in jobs:
        state = trainer.build(job)
        for _ in range(3):  # warm-up (allocator, cuBLAS heuristics, fused AdamW)
            trainer.train_step(state, acts[0], ctx)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            trainer.train_step(state, acts[0], ctx)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / steps
        flops = job_flops(job, parent.config, ids.numel(), seq_len)
        rows.append({"job": job.name, "ms_per_step": round(seconds * 1e3, 3),
                     "tokens_per_s": round(ids.numel() / seconds), "tflops": round(flops / seconds / 1e12, 1),
                     "mfu": round(flops / seconds / peak_flops(), 4) if peak_flops() else None})
        del state
        torch.cuda.empty_cache()
    return rows


def time_round(parent, trainer: BLDTrainer, jobs: list[Job], batches: list[torch.Tensor], seq_len: int) -> dict:
    states = [trainer.build(j) for j in jobs]
    training = [s for s in states if s.optimizer is not None]
    trainer.steps = len(batches) + 2
    trainer._train(training, batches[:2])  # warm-up steps
    for s in training:
        s.step = 0
    torch.cuda.synchronize()
    started = time.perf_counter()
    trainer._train(training, batches)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(b.numel() for b in batches)
    layers = max(j.layer for j in jobs) + 1
    flops = sum(job_flops(s.job, parent.config, tokens, seq_len) for s in training)
    flops += parent_forward_flops(parent.config, layers, tokens, seq_len)
    return {"jobs": len(training), "layers": layers, "steps": len(batches), "seconds": round(seconds, 3),
            "tokens_per_s_per_job": round(tokens / seconds), "job_tokens_per_s": round(tokens * len(training) / seconds),
            "tflops": round(flops / seconds / 1e12, 1),
            "mfu": round(flops / seconds / peak_flops(), 4) if peak_flops() else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", default="smollm2-135m", help="smollm2-135m, llama-3.1-8b-shaped, or a path")
    parser.add_argument("--layers", type=int, default=4, help="layers in the whole-round measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.parent == "llama-3.1-8b-shaped":
        parent = llama8b_shaped(args.layers)
    else:
        parent = load_parent(args.parent, torch.bfloat16).cuda()
    parent.requires_grad_(False)
    config = parent.config
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    cfg = BLDConfig(tokens=10**9, batch_size=args.batch_size, autocast="bf16")
    lib = LibraryConfig(linear_ffn_init="product")
    trainer = BLDTrainer(parent, None, lib, cfg, out_dir=None, seq_len=args.seq_len, log=lambda *a: None)
    trainer.steps = 10**6  # a long schedule: the timed steps sit in the warm-up/plateau
    full = config.blocks[0].ffn.intermediate_size
    kv = config.blocks[0].attention.num_kv_heads
    single = [Job(0, None, Variant(f"ffn_{full} (full width)", "ffn", FFNConfig("gated", full))),
              Job(0, None, Variant(f"ffn_{full // 2}", "ffn", FFNConfig("gated", full // 2))),
              Job(0, None, Variant("ffn_linear", "ffn", FFNConfig("linear"))),
              Job(0, Variant(f"attn_kv{max(1, kv // 2)}", "attention", AttentionConfig("gqa", max(1, kv // 2))), None),
              Job(0, Variant("attn_linear", "attention", AttentionConfig("linear")), None)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "parent": args.parent,
              "batch": [args.batch_size, args.seq_len], "dtype": "bf16 autocast, fp32 master weights, fused AdamW",
              "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "single_jobs": time_single_jobs(parent, trainer, single, ids, args.steps, args.seq_len)}
    space = search_space(config, LibraryConfig())
    jobs = decoupled_jobs(space, range(min(args.layers, config.num_hidden_layers)))
    batches = [torch.randint(0, config.vocab_size, ids.shape, device="cuda") for _ in range(args.steps)]
    result["decoupled_round"] = time_round(parent, trainer, jobs, batches, args.seq_len)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
