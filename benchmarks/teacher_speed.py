"""Where the teacher stage's time goes: one batch of the GPU preset's shape (512 prompts, 256 new
tokens) on the fast path with the preset's sampling (the nucleus by a sort, and on CUDA by the
threshold kernel of model/nucleus.py), then with cheaper sampling; the samplers alone on one
step's logits (time_interleaved, CUDA graphs), whether the kernel's draws lie in the sorted
nucleus, and the filters (degenerate check, MinHash) per sample. Reads a run directory's parent (the parent stage's
output) and the teacher corpus' prompt pool. Prints a table and writes JSON.

    python benchmarks/teacher_speed.py RUN_DIR --out teacher_speed.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, device) -> float:
    """Wall seconds of one call (a whole generation: long enough for the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="teacher_speed.json")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from puzzlenas.config import load_run_config
    from puzzlenas.data.teacher import NearDuplicateIndex, TeacherConfig, degenerate_reason, prompt_pool
    from puzzlenas.model import fast
    from puzzlenas.model.modeling import DeciLMForCausalLM

    run = args.run_dir
    cfg = load_run_config(f"{run}/config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DeciLMForCausalLM.from_pretrained(f"{run}/parent", dtype=torch.bfloat16).to(device).eval()
    tok = AutoTokenizer.from_pretrained(f"{run}/parent")
    tcfg = TeacherConfig(tokens=10_000_000, batch_size=args.batch)
    pool = prompt_pool(tok, cfg.data, tcfg)
    prompts = [list(p.ids) for kind in pool.values() for p in kind][: args.batch]
    stops = [tok.eos_token_id]
    rows = {}

    def gen(temperature, top_p):
        return fast.generate(model, prompts, args.new, temperature, top_p, eos_token_id=stops,
                             batch_size=len(prompts), seed=0)

    gen(1.0, 0.95)  # compile, warm
    default_nucleus = fast.NUCLEUS  # "threshold": the preset's sampler on CUDA
    variants = (("T1 top-p 0.95, sort", 1.0, 0.95, "sort"), ("T1 top-p 0.95, threshold kernel", 1.0, 0.95, "threshold"),
                ("T1 top-p 1.0", 1.0, 1.0, "sort"), ("greedy", 0.0, 1.0, "sort"))
    if device.type != "cuda":  # the kernel runs on CUDA only; elsewhere that row would time the sort again
        variants = tuple(v for v in variants if v[3] == "sort")
    for name, t, p, nucleus in variants:
        fast.NUCLEUS = nucleus
        if nucleus != "sort":
            gen(t, p)  # compile the kernel, capture its graph
        result = [None]
        s = timed(lambda: result.__setitem__(0, gen(t, p)), device)
        r = result[0]
        rows[name] = {"seconds": round(s, 3), "generated_tokens": r.generated_tokens,
                      "tokens_per_s": round(r.generated_tokens / s), "ms_per_step": round(1000 * s / args.new, 3)}
        print(f"{name:26s} {s:7.2f} s  {r.generated_tokens:8d} tokens  {r.generated_tokens / s:9.0f} tok/s  "
              f"{1000 * s / args.new:6.2f} ms/step", flush=True)
        if p == 0.95 and nucleus == "sort":
            outs = r.tokens  # the filters below run on the preset's samples
    fast.NUCLEUS = "sort"  # fast.sample below: the sort (the kernel has its own row)

    # the samplers alone on one step's logits (B, V): timed in alternation, in CUDA graphs on a GPU
    from puzzlenas.model.inference import time_interleaved

    runner = fast.FastRunner(model, len(prompts), 64)
    logits = runner.prefill(torch.full((len(prompts), 64), tok.eos_token_id, device=device))  # (B, V)
    samplers = {"top_p_sort": lambda: fast.sample(logits, 1.0, 0.95), "no_top_p": lambda: fast.sample(logits, 1.0, 1.0)}
    if device.type == "cuda":
        from puzzlenas.model.nucleus import nucleus_sample

        samplers["top_p_threshold_kernel"] = lambda: nucleus_sample(logits, 1.0, 0.95)
    seconds = time_interleaved(list(samplers.values()), device)
    rows["sampler_ms"] = {name: round(1000 * s, 3) for name, s in zip(samplers, seconds)}
    if device.type == "cuda":  # every token the kernel draws lies in its row's nucleus as the sort defines it
        probs = torch.softmax(logits.float(), -1)
        sorted_p, _ = probs.sort(-1, descending=True)
        last = ((sorted_p.cumsum(-1) - sorted_p) < 0.95).sum(-1) - 1  # index of the nucleus' last token
        floor = sorted_p.gather(-1, last[:, None])[:, 0]  # (B,) the smallest probability inside
        drawn = torch.stack([nucleus_sample(logits, 1.0, 0.95) for _ in range(20)], 1)  # (B, 20)
        inside = probs.gather(-1, drawn) >= floor[:, None] * (1 - 1e-5)
        rows["threshold_kernel_draws_inside_nucleus"] = float(inside.float().mean())
    print(rows["sampler_ms"], rows.get("threshold_kernel_draws_inside_nucleus"), flush=True)
    fast.NUCLEUS = default_nucleus

    index = NearDuplicateIndex(tcfg.near_duplicate_jaccard, 0)
    t0 = time.perf_counter()
    for o in outs:
        reason = degenerate_reason(o, tcfg)
        if reason is None:
            index.add_if_new(o, index.signature(o))
    filt = time.perf_counter() - t0
    rows["filters_ms_per_sample"] = round(1000 * filt / len(outs), 3)
    print(f"filters: {1000 * filt / len(outs):.2f} ms per sample", flush=True)
    rows["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows["torch"] = torch.__version__
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
