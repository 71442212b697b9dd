"""Peers: what users reach for instead of Puzzle, built at the same budgets for a fair comparison.

- shortgpt: ShortGPT (Men et al., 2024) drops whole layers, lowest Block Influence first:
  BI_i = 1 - mean over tokens of cos(x_i, y_i), x_i the residual stream entering layer i and
  y_i the stream leaving it (measured on held-out text with the parent).
- minitron_width: Minitron-style uniform width pruning: every layer's FFN gets the same
  narrower width (channels kept by activation importance: the library's Channel Contribution
  initialization, then the same BLD), attention kept. The hidden size stays (the child format
  keeps it), so this is Minitron's MLP axis.
- uniform_kv: every layer's attention keeps the same, smaller number of KV heads (mean-pooled,
  then BLD), FFN kept.

Each peer must meet every search target's budgets on the same measured cost table with the
same time margin as Puzzle's children. ShortGPT drops as few layers as meet them; a uniform
peer takes, among its uniform choices that meet them, the one with the smallest summed
replace-1-block score (the choice most favourable to the peer). A peer that no choice of its
family can fit is reported with the best speedup it reaches, and gets no child. The peers'
children then go through the same assemble, GKD and eval stages as Puzzle's; ShortGPT's GKD also
gets the BLD's tokens (it has no block to distill locally), so the report compares them at equal
measured speedup and equal training tokens (`peers.equal_tokens`).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .activations import visit_parent_layers
from .model.blocks import BlockConfig
from .costs import predicted_costs
from .model.info import DTYPE_BYTES
from .library import Variant
from .mip import SearchProblem, evaluate_architectures
from .search import (SearchConfig, Target, layer_choices, scenario_names, scenario_of, solution_record,
                           speedup_text, target_constraints, target_variants)
from .sections import PEER_METHODS, PeersConfig  # noqa: F401  (re-exported)



@torch.no_grad()
def block_influence(parent, batches: list[torch.Tensor]) -> list[float]:
    """ShortGPT's Block Influence of every parent layer: 1 - mean over tokens of cos(x_i, y_i)."""
    num_layers = parent.config.num_hidden_layers
    device = parent.model.embed_tokens.weight.device
    sums = torch.zeros(num_layers, dtype=torch.float64)
    tokens = 0

    def visit(i, acts, ctx) -> None:
        cos = F.cosine_similarity(acts.x.float(), acts.y.float(), dim=-1)  # (B, T)
        sums[i] += cos.double().sum().cpu()

    for batch in batches:
        visit_parent_layers(parent, batch.to(device), num_layers - 1, visit)
        tokens += batch.numel()
    return (1.0 - sums / tokens).tolist()


# =============================================================================================
# Each family's candidate architectures (per layer: a pair name "attention+ffn")
# =============================================================================================
def _parent_pair(attention: list[Variant], ffn: list[Variant]) -> tuple[Variant, Variant]:
    return next(v for v in attention if v.is_parent), next(v for v in ffn if v.is_parent)


def shortgpt_candidates(space, influence: list[float]) -> list[tuple[str, list[str]]]:
    """Drop the n layers of lowest Block Influence, for n = 1 .. L - 1 (in that order)."""
    names = []
    for i, (attention, ffn) in enumerate(space):
        noop_a = next((v for v in attention if v.config.kind == "no_op"), None)
        noop_f = next((v for v in ffn if v.config.kind == "no_op"), None)
        if noop_a is None or noop_f is None:
            raise ValueError(f"peer shortgpt drops whole layers, but layer {i}'s library has no no-op "
                             f"{'attention' if noop_a is None else 'FFN'}; add no_op to library.attention and "
                             f"library.ffn (the defaults have it)")
        a, f = _parent_pair(attention, ffn)
        names.append((f"{a.name}+{f.name}", f"{noop_a.name}+{noop_f.name}"))
    order = sorted(range(len(space)), key=lambda i: influence[i])
    out = []
    for n in range(1, len(space)):
        dropped = set(order[:n])
        out.append((f"{n} layer{'s' if n > 1 else ''} dropped: {sorted(dropped)}",
                    [drop if i in dropped else keep for i, (keep, drop) in enumerate(names)]))
    return out


def uniform_candidates(space, subblock: str) -> list[tuple[str, list[str]]]:
    """Every layer takes the same smaller GQA (attention) or gated FFN width; the other subblock the parent's."""
    kind = "gqa" if subblock == "attention" else "gated"
    per_layer = []
    for attention, ffn in space:
        own = attention if subblock == "attention" else ffn
        per_layer.append({v.name for v in own if v.config.kind == kind and not v.is_parent})
    common = sorted(set.intersection(*per_layer)) if per_layer else []
    out = []
    for name in common:
        archs = []
        for attention, ffn in space:
            a, f = _parent_pair(attention, ffn)
            archs.append(f"{name}+{f.name}" if subblock == "attention" else f"{a.name}+{name}")
        out.append((f"every layer {name}", archs))
    return out


def candidates(method: str, space, influence: list[float] | None) -> list[tuple[str, list[str]]]:
    if method == "shortgpt":
        return shortgpt_candidates(space, influence)
    return uniform_candidates(space, "ffn" if method == "minitron_width" else "attention")


# =============================================================================================
# Picking each peer at each target
# =============================================================================================
def decoupled_scores(scores: list[dict]) -> list[dict]:
    rows = [r for r in scores if r["kind"] in ("attention", "ffn")]
    if not rows:
        raise ValueError("peers need replace-1-block scores of single subblocks (decoupled or hybrid BLD); "
                         "this run's library is coupled only: set bld.mode to decoupled or hybrid")
    return rows


def build_peers(scores: list[dict], table: dict, parent_blocks: list[BlockConfig], space, search: SearchConfig,
                methods: list[str], influence: list[float] | None, objective: str, dtype: str, num_heads: int,
                hidden: int, only_targets: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(records of the peers that fit, one per method and target; the ones that cannot fit, with why).
    only_targets: the names of the targets that get peers (None or empty: every target)."""
    layers, meaning = layer_choices(decoupled_scores(scores), table, len(parent_blocks), objective,
                                    DTYPE_BYTES[dtype])
    index = [{c.name: j for j, c in enumerate(layer)} for layer in layers]
    records, unreachable = [], []
    for target in search.targets:
        if only_targets and target.name not in only_targets:
            continue
        variants = target_variants(target)  # scenario_mode best: a peer may fit in any one scenario
        problems = [SearchProblem(layers, target_constraints(v, table, parent_blocks, dtype, search.time_margin))
                    for v in variants]
        for method in methods:
            options = candidates(method, space, influence)
            if not options:
                unreachable.append({"method": method, "target": target.name,
                                    "why": "the library has no uniform variant of this kind in every layer"})
                continue
            indices = [[index[i][n] for i, n in enumerate(names)] for _, names in options]
            checks = [evaluate_architectures(problem, indices, method) for problem in problems]
            # (option index, summed score, scenario variant, solution) of every fit
            fitting = [(j, sol.objective, v, sol) for v, checked in zip(variants, checks)
                       for j, (sol, ok) in enumerate(checked) if ok]
            if not fitting:
                unreachable.append(_unreachable(method, target, options, checks[0], problems[0], meaning, table,
                                                parent_blocks))
                continue
            # shortgpt: the fewest layers dropped; uniform: the smallest summed score
            j, _, variant, solution = min(fitting, key=lambda f: f[0] if method == "shortgpt" else f[1])
            record = solution_record(variant, 0, solution, meaning, table, parent_blocks, num_heads, hidden)
            record.update(name=f"{method}-{target.name}", method=method, peer=method, description=options[j][0])
            if variant is not target:
                record["scenario"] = variant.scenario
            records.append(record)
    return records, unreachable


def _unreachable(method: str, target: Target, options, checked, problem: SearchProblem, meaning, table: dict,
                 parent_blocks) -> dict:
    """Why no architecture of `method` meets `target`: the budget its closest architecture misses
    and, for a target with a time budget, the best speedup the family reaches on its metric."""
    rows = problem.constraints
    # closest = the smallest worst ratio of budget value to budget over the family's architectures
    ratio = [max(sol.constraint_values[c.name] / c.upper for c in rows) for sol, _ in checked]
    k = min(range(len(options)), key=ratio.__getitem__)
    sol = checked[k][0]
    missed = [f"{c.name}: {sol.constraint_values[c.name]:.4g} > {c.upper:.4g} {c.unit}".rstrip()
              for c in rows if sol.constraint_values[c.name] > c.upper]
    out = {"method": method, "target": target.name, "closest": options[k][0], "missed": missed}
    why = f"no {method} architecture meets {target.name}; the closest ({options[k][0]}) misses " + "; ".join(missed)
    if target.speedup is not None or target.throughput is not None or target.latency_s is not None:
        parent = predicted_costs(table, parent_blocks)
        children = [predicted_costs(table, [meaning[i][n].block for i, n in enumerate(names)]) for _, names in options]
        reach = []  # (scenario, best speedup, its architecture) in each of the target's scenarios
        for name in scenario_names(target):
            key = f"{target.metric}_s/{scenario_of(table, name)['name']}"
            speedups = [parent[key] / c[key] for c in children]
            best = max(range(len(options)), key=speedups.__getitem__)
            reach.append((key.split("/", 1)[1], speedups[best], options[best][0]))
        # "all": the binding (slowest) scenario; "best": any one would do, so the fastest
        pick = max if target.scenario_mode == "best" and isinstance(target.scenario, list) else min
        scenario, out["best_speedup"], out["fastest"] = pick(reach, key=lambda r: r[1])
        why += (f"; the fastest ({out['fastest']}) reaches {out['best_speedup']:.2f}x predicted {target.metric} "
                f"speedup on {scenario}")
    out["why"] = why
    return out


def peers_table(records: list[dict], unreachable: list[dict]) -> str:
    lines = [f"{'peer':<28} {'sum score':>10}  predicted speedup   architecture"]
    for r in records:
        sp = speedup_text(r["predicted_speedup"])
        lines.append(f"{r['name']:<28} {r['objective']:>10.4f}  {sp}   {r['description']}")
    for u in unreachable:
        lines.append(f"{u['method'] + '-' + u['target']:<28} {'-':>10}  cannot fit: {u['why']}")
    return "\n".join(lines)
