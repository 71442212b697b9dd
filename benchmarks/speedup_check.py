"""Is the cost model right? Predicted vs measured speedup of the children the search picks.

For each chosen child (and the parent), build the model with random weights in the
deployment dtype, run the end-to-end generation benchmark on the static-cache path
(prefill N tokens, M decode steps, batch b; CUDA graphs on GPU), and compare the measured
speedup over the parent with the speedup the search predicted from the per-block cost table.

A run directory (its costs/ and search/ stages finished, on this same device):
    python benchmarks/speedup_check.py --run runs/default --out check.json
A Llama-3.1-8B-shaped parent with random weights and synthetic block scores (the check is
about costs, not quality; scores only steer which children are picked):
    python benchmarks/speedup_check.py --synthetic llama-3.1-8b-shaped --out check-8b.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from puzzlenas.model.blocks import BlockConfig
from puzzlenas.costs import CostConfig, Scenario, measure_costs
from puzzlenas.model.inference import measure_generation
from puzzlenas.library import LibraryConfig, search_space
from puzzlenas.model.modeling import DeciLMConfig, DeciLMForCausalLM
from puzzlenas.search import SearchConfig, Target, run_search


def build(config: DeciLMConfig, blocks: list[BlockConfig], dtype: torch.dtype) -> DeciLMForCausalLM:
    child = DeciLMConfig(**{**config.to_dict(), "num_hidden_layers": len(blocks),
                            "block_configs": [b.to_nas_dict(config.num_attention_heads, config.hidden_size)
                                              for b in blocks]})
    with torch.device("cuda"):
        model = DeciLMForCausalLM(child)
    return model.to(dtype).eval()


def llama8b_config() -> DeciLMConfig:
    return DeciLMConfig.from_blocks(
        [BlockConfig.parent(8, 14336)] * 32, vocab_size=128256, hidden_size=4096, num_attention_heads=32,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})


def synthetic_scores(config: DeciLMConfig, lib: LibraryConfig, seed: int) -> list[dict]:
    """Scores that grow with how much a variant removes, with per-layer noise (a plausible library)."""
    rng = random.Random(seed)
    rows = []
    for i, (att, ffn) in enumerate(search_space(config, lib)):
        for v in att + ffn:
            if v.is_parent:
                s = 0.0
            elif v.config.kind == "no_op":
                s = 0.05
            elif v.config.kind == "linear":
                s = 0.03
            elif v.subblock == "attention":
                s = 0.01 * (1 - v.config.num_kv_heads / att[0].config.num_kv_heads)
            else:
                s = 0.04 * (1 - v.config.intermediate_size / ffn[0].config.intermediate_size)
            s *= rng.uniform(0.5, 1.5) * (2.0 if i in (0, config.num_hidden_layers - 1) else 1.0)
            rows.append({"layer": i, "name": v.name, "kind": v.subblock, "variants": [v.to_json()], "kl": s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory with costs/ and search/")
    parser.add_argument("--synthetic", default=None, help="llama-3.1-8b-shaped")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--generate", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16
    if args.run:
        config = DeciLMConfig.from_pretrained(args.run / "parent")
        table = json.loads((args.run / "costs" / "costs.json").read_text())
        records = [json.loads(line) for line in (args.run / "search" / "solutions.jsonl").read_text().splitlines()]
    else:
        config = llama8b_config()
        scenario = Scenario(f"b{args.batch_size}-p{args.prompt}-g{args.generate}", args.batch_size, args.prompt,
                            args.generate)
        lib = LibraryConfig()
        space = search_space(config, lib)
        started = time.time()
        table = measure_costs(config, [v.config for v in space[0][0]], [v.config for v in space[0][1]],
                              CostConfig(scenarios=[scenario], iters=args.iters), torch.device("cuda"))
        print(f"cost table measured in {time.time() - started:.0f} s")
        search = SearchConfig(targets=[Target("decode-1.5x", speedup=1.5), Target("decode-2x", speedup=2.0),
                                       Target("generate-2x", metric="generate", speedup=2.0)], frontier=[])
        records, _ = run_search(synthetic_scores(config, lib, 0), table, config.blocks, search, "kl", "bfloat16",
                                config.num_attention_heads, config.hidden_size)
    rows = []
    parent_measured = {}
    for s in table["device"]["scenarios"]:
        model = build(config, config.blocks, dtype)
        parent_measured[s["name"]] = measure_generation(model, s["batch_size"], s["prompt_tokens"],
                                                        s["generate_tokens"], iters=args.iters)
        del model
        torch.cuda.empty_cache()
    for r in records:
        blocks = [BlockConfig.from_nas_dict(b, config.num_attention_heads, config.hidden_size)
                  for b in r["block_configs"]]
        model = build(config, blocks, dtype)
        for s in table["device"]["scenarios"]:
            m = measure_generation(model, s["batch_size"], s["prompt_tokens"], s["generate_tokens"], iters=args.iters)
            p = parent_measured[s["name"]]
            for metric, key in (("decode", "decode_step_s"), ("prefill", "prefill_s"), ("generate", "generate_s")):
                predicted = r["predicted_speedup"][f"{metric}_s/{s['name']}"]
                measured = p[key] / m[key]
                rows.append({"child": r["name"], "scenario": s["name"], "metric": metric,
                             "predicted_speedup": round(predicted, 4), "measured_speedup": round(measured, 4),
                             "error": round(predicted / measured - 1, 4),
                             "measured_tokens_per_s": round((s["batch_size"] if metric == "decode" else
                                                             s["batch_size"] * (s["prompt_tokens"] if metric == "prefill"
                                                                                else s["generate_tokens"])) / m[key]),
                             "peak_memory_gib": round(m["peak_memory_bytes"] / 2**30, 2)})
        del model
        torch.cuda.empty_cache()
    print(f"{'child':<14} {'scenario':<16} {'metric':<9} {'predicted':>9} {'measured':>9} {'error':>7}")
    for row in rows:
        print(f"{row['child']:<14} {row['scenario']:<16} {row['metric']:<9} {row['predicted_speedup']:>8.3f}x "
              f"{row['measured_speedup']:>8.3f}x {row['error']:>+7.1%}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "parent": str(args.run or args.synthetic), "dtype": "bfloat16", "rows": rows,
              "parent_measured": parent_measured, "solutions": [{k: r[k] for k in ("name", "names", "objective")}
                                                                for r in records]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
