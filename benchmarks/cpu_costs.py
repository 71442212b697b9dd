"""The CPU cost model on the bundled parent: single-copy vs stacked block timings, and the block
sum against whole models before and after calibration.

    python benchmarks/cpu_costs.py --out benchmarks/results/cpu_costs.json

1. decode-step time per copy of an FFN (1536) and a GQA (kv=3) block when K independent copies
   run in a row (K = 1 is a block timed alone, its weights in the caches);
2. the parent and two random children of the CPU preset's space measured end to end vs the sum of
   their blocks, with `stack_layers` 1 and auto, then calibrated (`costs.calibrate`).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzlenas.costs import (CostConfig, Scenario, calibrate, calibrated_check, check_against_whole_models,
                             measure_costs, random_children, time_layer)
from puzzlenas.library import LibraryConfig, search_space
from puzzlenas.model.parent import load_parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="cpu_costs.json")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    parent = load_parent("smollm2-135m")
    config = parent.config
    scenario = Scenario("b8-p64-g32", 8, 64, 32)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "scenario": vars(scenario), "per_copy_decode_us": {}, "check": {}}
    for name, block in (("ffn 1536", BlockConfig(AttentionConfig("no_op"), FFNConfig("gated", 1536))),
                        ("gqa kv=3", BlockConfig(AttentionConfig("gqa", 3), FFNConfig("no_op")))):
        result["per_copy_decode_us"][name] = {
            k: time_layer(config, block, scenario, torch.float32, cpu, iters=7, copies=k)["decode"] * 1e6
            for k in (1, 4, 16, 30)}
        print(name, {k: f"{v:.0f} us" for k, v in result["per_copy_decode_us"][name].items()})
    space = search_space(parent.config, LibraryConfig(ffn_ratios=[1.0, 0.5], ffn_linear=False, attention_linear=False))
    attention = [v.config for att, _ in space for v in att]
    ffn = [v.config for _, f in space for v in f]
    children = {"parent": config.blocks}
    pairs = [([v for v in att], [v for v in f]) for att, f in space]
    for k, blocks in enumerate(random_children(pairs, 2, seed=0)):
        children[f"random-{k}"] = blocks
    for stack in (1, "auto"):
        cfg = CostConfig(scenarios=[scenario], dtype="float32", iters=5, stack_layers=stack)
        table = measure_costs(config, attention, ffn, cfg, cpu, log=lambda *a: None)
        check = check_against_whole_models(config, table, children, cfg, cpu, log=lambda *a: None)
        fits = calibrate(table, check, [scenario])
        rows = calibrated_check(table, check, children)
        result["check"][str(stack)] = {"fits": fits, "rows": rows}
        for r in rows:
            print(f"stack {stack}: {r['model']:<9} decode measured {r['decode_s'] * 1e3:.1f} ms, block sum "
                  f"{r['decode_s_predicted'] * 1e3:.1f} ({r['decode_s_error']:+.1%}), calibrated "
                  f"{r['decode_s_calibrated'] * 1e3:.1f} ({r['decode_s_calibrated_error']:+.1%})")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
