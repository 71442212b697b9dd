"""Search (MIP) solve time on a Puzzle-sized synthetic instance, on the CPU.

The instance: 80 layers (Llama-3.1-70B's depth) x 81 choices per layer (9 attention variants
x 9 FFN variants), costs of a 70B-shaped layer in FP8 (hidden 8192, 64 query heads of dim 128,
FFN 28672), scores shaped like replace-1-block KL (zero for the parent block, growing as a
block shrinks, the first and last layers most sensitive, with per-variant noise). Three budgets:

  memory at batch 64 x 4096 tokens (GiB): weights + KV cache <= --memory x the parent's
  throughput (decode step at batch 64, s): sum of decode times <= the parent's / --speedup
      (i.e. b * seq / sum runtime >= speedup x the parent's tokens/s, METHOD.md section 6)
  latency (prefill of 4096 tokens, s): sum of prefill times <= --latency x the parent's

Timed, per instance (seed): one MIP solve (problem compile + HiGHS + exact re-check), the same
at mip_rel_gap 0, 5 diverse solutions (alpha 0.8), the greedy and random ablations, and the
diagnosis of infeasible budgets (memory below what any architecture reaches). Then one MIP solve for each point of a
grid of budgets (memory x throughput x latency), to show the time does not hinge on one setting.

    python benchmarks/search_speed.py --out search_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import numpy as np
import scipy

from puzzlenas.mip import (Choice, Constraint, InfeasibleBudgetError, SearchProblem, solve_diverse,
                              solve_greedy, solve_mip, solve_random)

HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB = 8192, 64, 128, 28672, 128256
BATCH, CONTEXT, PREFILL_TOKENS = 64, 4096, 4096
HBM_BYTES_PER_S, FLOPS_PER_S, LAUNCH_S = 3.35e12, 1.98e15, 4e-6  # H100 SXM, FP8 dense
# Attention: KV heads (GQA), then linear, no-op. FFN: width ratios, then linear, no-op.
ATTENTION = [("kv8", 8), ("kv6", 6), ("kv5", 5), ("kv4", 4), ("kv3", 3), ("kv2", 2), ("kv1", 1),
             ("linear", "linear"), ("noop", "noop")]
FFN_RATIOS = [("1", 1.0), ("0.875", 0.875), ("0.75", 0.75), ("0.5", 0.5), ("0.25", 0.25), ("0.2", 0.2),
              ("0.1", 0.1), ("linear", "linear"), ("noop", "noop")]


def attention_costs(kind) -> dict[str, float]:
    if kind == "noop":
        return {"params": 0.0, "kv": 0.0, "attn_flops": 0.0}
    if kind == "linear":
        return {"params": float(HIDDEN * HIDDEN), "kv": 0.0, "attn_flops": 0.0}
    params = 2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * kind * HEAD_DIM
    # prefill attention (QK^T and AV over a causal 4096 context) does not shrink with fewer KV heads
    return {"params": float(params), "kv": float(2 * kind * HEAD_DIM), "attn_flops": 2.0 * HEADS * HEAD_DIM *
            PREFILL_TOKENS ** 2}


def ffn_params(kind) -> float:
    if kind == "noop":
        return 0.0
    if kind == "linear":
        return float(HIDDEN * HIDDEN)
    return float(3 * HIDDEN * round(kind * FFN / 256) * 256)


def layer_choices(i: int, layers: int, rng: np.random.Generator) -> list[Choice]:
    # Sensitivity: the first and last layers matter most (as replace-1-block scores show).
    edge = min(i, layers - 1 - i) / (layers / 2)
    sens = 0.2 + 1.5 * (1 - edge) ** 3 + 0.3 * rng.random()
    choices = []
    for a_name, a in ATTENTION:
        ac = attention_costs(a)
        a_frac = 1.0 if a == "noop" else 0.7 if a == "linear" else (1 - a / 8) * 0.4
        for f_name, f in FFN_RATIOS:
            fp = ffn_params(f)
            f_frac = 1.0 if f == "noop" else 0.8 if f == "linear" else (1 - f) ** 1.5
            params = ac["params"] + fp  # FP8: one byte per parameter
            noise = rng.lognormal(0, 0.15, size=3)
            score = sens * (0.03 * a_frac * noise[0] + 0.05 * f_frac * noise[1]) * (a_frac + f_frac > 0)
            # decode is memory bound (weights + the batch's KV cache), prefill compute bound; the
            # same kernel noise (measurement jitter, a kernel that tiles badly) hits both
            launches = LAUNCH_S * ((a != "noop") + (f != "noop"))
            jitter = noise[2] ** 0.3
            decode = ((params + BATCH * CONTEXT * ac["kv"]) / HBM_BYTES_PER_S + launches) * jitter
            prefill = (2 * params * PREFILL_TOKENS + ac["attn_flops"]) / FLOPS_PER_S * jitter + launches
            choices.append(Choice(f"attn_{a_name}+ffn_{f_name}", float(score),
                                  {"params_bytes": params, "kv_bytes_per_token": ac["kv"],
                                   "decode_s": float(decode), "prefill_s": float(prefill)}))
    return choices


def make_problem(seed: int, layers: int, memory: float, speedup: float, latency: float) -> SearchProblem:
    rng = np.random.default_rng(seed)
    space = [layer_choices(i, layers, rng) for i in range(layers)]
    fixed_gib = 2 * VOCAB * HIDDEN / 2**30  # embeddings + LM head, FP8
    mem_terms = {"params_bytes": 2.0**-30, "kv_bytes_per_token": BATCH * CONTEXT / 2**30}
    parent = [layer[0] for layer in space]  # attn_kv8+ffn_1 is the parent block

    def total(terms: dict[str, float], fixed: float = 0.0) -> float:
        return fixed + sum(sum(m * c.costs[k] for k, m in terms.items()) for c in parent)

    return SearchProblem(space, [
        Constraint(f"memory at batch {BATCH} x {CONTEXT} tokens", mem_terms,
                   upper=memory * total(mem_terms, fixed_gib), fixed=fixed_gib, unit="GiB"),
        Constraint(f"throughput {speedup}x parent (decode step at batch {BATCH})", {"decode_s": 1.0},
                   upper=total({"decode_s": 1.0}) / speedup, unit="s"),
        Constraint(f"latency (prefill {PREFILL_TOKENS} tokens)", {"prefill_s": 1.0},
                   upper=latency * total({"prefill_s": 1.0}), unit="s"),
    ])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def timed_cpu(fn):
    """(result, wall s, CPU s of this process): the CPU time shows what other jobs on the machine cost."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run(seed: int, args) -> dict:
    problem = make_problem(seed, args.layers, args.memory, args.speedup, args.latency)
    best, t_mip, cpu_mip = timed_cpu(lambda: solve_mip(problem))
    exact, t_exact = timed(lambda: solve_mip(problem, mip_rel_gap=0.0))
    diverse, t_diverse = timed(lambda: solve_diverse(problem, 5, alpha=0.8))
    greedy, t_greedy = timed(lambda: solve_greedy(problem))
    rand, t_rand = timed(lambda: solve_random(problem, seed=seed, tries=1000))
    # Diagnosis of infeasible budgets: memory at 0.9x the smallest any architecture reaches (the
    # cheapest choice everywhere), so the error must measure each budget's best with the others met.
    mem = problem.constraints[0]
    smallest = mem.fixed + sum(min(sum(m * c.costs[k] for k, m in mem.terms.items()) for c in layer)
                               for layer in problem.layers)
    tight = SearchProblem(problem.layers, [dataclasses.replace(mem, upper=0.9 * smallest),
                                           *problem.constraints[1:]])
    start = time.perf_counter()
    try:
        solve_mip(tight)
        infeasible_message = None
    except InfeasibleBudgetError as err:
        infeasible_message = str(err)
    t_infeasible = time.perf_counter() - start
    unconstrained = sum(min(c.score for c in layer) for layer in problem.layers)
    slack = {c.name: (c.upper - best.constraint_values[c.name]) / c.upper for c in problem.constraints}
    return {
        "seed": seed,
        "mip_s": t_mip, "mip_cpu_s": cpu_mip, "mip_objective": best.objective,
        "mip_gap0_s": t_exact, "mip_gap0_objective": exact.objective,
        "diverse5_s": t_diverse, "diverse5_each_s": [s.solve_seconds for s in diverse],
        "diverse5_objectives": [s.objective for s in diverse],
        "diverse5_layers_changed_vs_first": [sum(a != b for a, b in zip(s.choice_index, diverse[0].choice_index))
                                             for s in diverse],
        "greedy_s": t_greedy, "greedy_objective": greedy.objective,
        "random1000_s": t_rand, "random1000_objective": None if rand is None else rand.objective,
        "infeasible_diagnosis_s": t_infeasible, "infeasible_message": infeasible_message,
        "unconstrained_objective": unconstrained,
        "relative_slack": slack,
        "distinct_choices_used": len(set(best.names)),
        "parent_blocks_kept": sum(j == 0 for j in best.choice_index),
    }


def budget_grid(layers: int) -> list[dict]:
    """One MIP solve per (memory, speedup, latency) budget setting on the seed-0 instance."""
    out = []
    for memory in (0.4, 0.5, 0.6, 0.7):
        for speedup in (1.5, 2.17, 3.0):
            for latency in (0.5, 0.6, 0.7):
                problem = make_problem(0, layers, memory, speedup, latency)
                wall, cpu = time.perf_counter(), time.process_time()
                try:
                    objective = solve_mip(problem).objective
                except InfeasibleBudgetError:
                    objective = None
                out.append({"memory": memory, "speedup": speedup, "latency": latency,
                            "mip_s": time.perf_counter() - wall, "mip_cpu_s": time.process_time() - cpu,
                            "objective": objective})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=3, help="instances (seeds 0..N-1)")
    ap.add_argument("--memory", type=float, default=0.5, help="memory budget, fraction of the parent's")
    ap.add_argument("--speedup", type=float, default=2.17, help="decode throughput target, x the parent's")
    ap.add_argument("--latency", type=float, default=0.6, help="prefill latency budget, fraction of the parent's")
    ap.add_argument("--no-grid", action="store_true", help="skip the grid of budgets")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    results = [run(seed, args) for seed in range(args.seeds)]
    grid = [] if args.no_grid else budget_grid(args.layers)
    print(f"{args.layers} layers x {len(ATTENTION) * len(FFN_RATIOS)} choices, 3 budgets; "
          f"{os.cpu_count()} CPUs, scipy {scipy.__version__} (HiGHS)\n")
    head = f"{'seed':>4}  {'MIP s':>7}  {'(CPU s)':>7}  {'gap0 s':>7}  {'5 diverse s':>11}  {'greedy s':>8}  {'random s':>8}  " \
           f"{'infeas. s':>9}  {'obj MIP':>8}  {'obj greedy':>10}  {'obj random':>10}  min slack"
    print(head)
    for r in results:
        rand = "-" if r["random1000_objective"] is None else f"{r['random1000_objective']:.4f}"
        print(f"{r['seed']:>4}  {r['mip_s']:7.3f}  {r['mip_cpu_s']:7.3f}  {r['mip_gap0_s']:7.3f}  {r['diverse5_s']:11.3f}  "
              f"{r['greedy_s']:8.3f}  {r['random1000_s']:8.3f}  {r['infeasible_diagnosis_s']:9.3f}  "
              f"{r['mip_objective']:8.4f}  {r['greedy_objective']:10.4f}  {rand:>10}  "
              f"{min(r['relative_slack'].values()):.2e}")
    r0 = results[0]
    for r in results:
        print(f"seed {r['seed']}: the 5 diverse solves took {[round(t, 2) for t in r['diverse5_each_s']]} s")
    print(f"\nseed 0: diverse objectives {[round(o, 4) for o in r0['diverse5_objectives']]}, layers changed vs "
          f"the first {r0['diverse5_layers_changed_vs_first']}; parent blocks kept {r0['parent_blocks_kept']}/"
          f"{args.layers}; {r0['distinct_choices_used']} distinct choices; relative slack "
          f"{ {k: f'{v:.2e}' for k, v in r0['relative_slack'].items()} }")
    if r0["infeasible_message"]:
        print(f"\nmemory budget at 0.9x the smallest reachable -> {r0['infeasible_message']}")
    summary = {k: {"median": statistics.median(r[k] for r in results), "max": max(r[k] for r in results)}
               for k in ("mip_s", "mip_cpu_s", "mip_gap0_s", "diverse5_s", "greedy_s", "random1000_s", "infeasible_diagnosis_s")}
    print("\nmedian / max over seeds: " + ", ".join(f"{k} {v['median']:.3f} / {v['max']:.3f}"
                                                    for k, v in summary.items()))
    if grid:
        feasible = [g for g in grid if g["objective"] is not None]
        print(f"\nbudget grid (seed 0): memory (0.4, 0.5, 0.6, 0.7) x speedup (1.5, 2.17, 3) x latency "
              f"(0.5, 0.6, 0.7), {len(grid)} settings, {len(feasible)} feasible; MIP (or infeasibility diagnosis):")
        for key in ("mip_s", "mip_cpu_s"):
            times = sorted(g[key] for g in grid)
            summary[f"grid_{key}"] = {"median": statistics.median(times), "max": times[-1]}
            print(f"  {key}: median {statistics.median(times):.3f}, 90th percentile "
                  f"{times[int(0.9 * (len(times) - 1))]:.3f}, max {times[-1]:.3f}")
        print(f"  slowest: {max(grid, key=lambda g: g['mip_s'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                       "processor": platform.processor(), "scipy": scipy.__version__},
                       "summary": summary, "results": results, "grid": grid}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
