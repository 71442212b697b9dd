"""Each target's child picked among diverse MIP candidates by realized KL (`candidates` of a target).

The MIP minimizes the *sum* of replace-1-block scores, a proxy: damage is not additive, and on
the bundled parent (CPU preset) candidates whose sums lie within 1% of each other differ by up to 60% in the
KL(parent || child) they realize once assembled (benchmarks/RESULTS.md). Each candidate is
assembled in memory from the parent and the BLD library and scored on held-out tokens; the one
with the lowest realized KL becomes the target's child, named after the target, carrying the
other candidates' numbers in `selected_from`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .assemble import assemble_child, pairs_from_record
from .eval.metrics import final_hidden, lm_metrics
from .model.modeling import DeciLMForCausalLM


def realized_kl(parent: DeciLMForCausalLM, bld_dir: Path, space, record: dict, batches: list[torch.Tensor],
                parent_hidden: list[torch.Tensor], chunk: int,
                repair: Callable[[DeciLMForCausalLM], None] | None = None) -> dict[str, float]:
    """KL to the parent, perplexity and agreement of one candidate, assembled in memory next to
    the parent (its BLD weights are read from disk, the parent's blocks copied). repair: trains
    the assembled child in place before it is measured (a short GKD: search.select_gkd_tokens);
    the KL as assembled is then kept as "assembled_kl"."""
    device = parent.model.embed_tokens.weight.device
    with torch.no_grad():
        child = assemble_child(parent, bld_dir, pairs_from_record(record, space)).to(device).eval()
        metrics = lm_metrics({"child": child}, parent, batches, chunk, parent_hidden)["child"]
    if repair is None:
        return metrics
    repair(child)
    with torch.no_grad():
        repaired = lm_metrics({"child": child.eval()}, parent, batches, chunk, parent_hidden)["child"]
    return {**repaired, "assembled_kl": metrics["kl_to_parent"]}


def select_candidates(records: list[dict], parent: DeciLMForCausalLM, bld_dir: Path, space,
                      batches: list[torch.Tensor], chunk: int, log=print,
                      repair: Callable[[DeciLMForCausalLM], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(the records with each target's candidates replaced by its best one; every candidate with
    its realized metrics). Records without candidates pass through unchanged. repair: see
    `realized_kl` (each candidate then judged after it)."""
    if not any("candidate" in r for r in records):
        return records, []
    device = parent.model.embed_tokens.weight.device
    with torch.no_grad():
        parent_hidden = [final_hidden(parent, b.to(device)) for b in batches]  # (B, T, C) each, once
    scored = []
    for record in (r for r in records if "candidate" in r):
        started = time.perf_counter()
        m = realized_kl(parent, bld_dir, space, record, batches, parent_hidden, chunk, repair)
        scored.append({**record, "realized_kl": m["kl_to_parent"], "realized_perplexity": m["perplexity"],
                       "realized_tokens": m["tokens"],
                       **({"assembled_kl": m["assembled_kl"]} if "assembled_kl" in m else {})})
        log(f"[search] {record['name']}: sum of scores {record['objective']:.4f}, realized KL "
            f"{m['kl_to_parent']:.4f}" + (f" after a short GKD (as assembled {m['assembled_kl']:.4f})"
                                         if "assembled_kl" in m else "") + f", perplexity {m['perplexity']:.2f}, "
            f"{time.perf_counter() - started:.1f} s")
    chosen = {}
    for target in dict.fromkeys(r["target"] for r in scored):
        group = [r for r in scored if r["target"] == target]
        # measured speed first (stages/search.py): only candidates that meet their budget when measured
        eligible = [r for r in group if r.get("meets_measured", True)] or group
        best = min(eligible, key=lambda r: r["realized_kl"])
        chosen[target] = {**{k: v for k, v in best.items() if k != "candidate"}, "name": target,
                          "selected_from": [{"candidate": r["candidate"], "objective": r["objective"],
                                             "realized_kl": r["realized_kl"],
                                             "realized_perplexity": r["realized_perplexity"],
                                             **({"assembled_kl": r["assembled_kl"]} if "assembled_kl" in r else {}),
                                             **({"measured_speedup": r["measured_speedup"],
                                                 "meets_measured": r["meets_measured"]}
                                                if "meets_measured" in r else {}),
                                             "chosen": r is best} for r in group]}
    final = []
    for record in records:  # the targets' order kept: a target's child where its first candidate was
        if "candidate" not in record:
            final.append(record)
        elif record["candidate"] == 0:
            final.append(chosen[record["target"]])
    return final, scored


def candidates_table(scored: list[dict], chosen: list[dict] | None = None) -> str:
    """One line per candidate; chosen: the final records (their `selected_from` marks the choice)."""
    picked = {(r["target"], s["candidate"]) for r in chosen or [] for s in r.get("selected_from", ()) if s["chosen"]}
    repaired = any("assembled_kl" in r for r in scored)
    lines = [f"{'candidate':<20} {'sum score':>10} " + (f"{'assembled KL':>12} " if repaired else "")
             + f"{'realized KL':>12} {'perplexity':>11} {'measured':>9}"]
    for r in scored:
        measured = r["measured_speedup"][r["measured_key"]] if "meets_measured" in r else None
        speed = f"{measured:>8.3f}x" + ("" if r["meets_measured"] else " (too slow)") if measured else f"{'-':>9}"
        lines.append(f"{r['name']:<20} {r['objective']:>10.4f} " + (f"{r['assembled_kl']:>12.4f} " if repaired else "")
                     + f"{r['realized_kl']:>12.4f} "
                     f"{r['realized_perplexity']:>11.2f} {speed}"
                     + ("  <- chosen" if (r["target"], r["candidate"]) in picked else ""))
    lines.append((f"realized KL(parent || child) on {scored[0]['realized_tokens']:,} held-out tokens"
                  + (", after each candidate's short GKD (search.select_gkd_tokens)" if repaired else ""))
                 if scored else "")
    return "\n".join(lines)
