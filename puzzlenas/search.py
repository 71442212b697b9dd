"""The search stage: from scores (quality) and costs (device) to one architecture per target.

Each layer's choices are (attention, FFN) pairs. With a decoupled library a pair's score is
the sum of its two replace-1-block scores and its cost the sum of its two subblocks' measured
costs; with a coupled library (coupled or hybrid BLD) the pairs are the coupled items with
their own scores. Targets become linear budgets of the MIP (`search.py`): a speedup or a
throughput per scenario and metric (decode step, prefill, or whole generation), a latency,
a memory budget (parameters + KV cache at the scenario's batch and length), a parameter
budget. Every solution is saved as Nemotron-NAS `block_configs` with its predicted costs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .model.blocks import BlockConfig
from .costs import predicted_costs, subblock_key
from .model.info import DTYPE_BYTES
from .library import Variant
from .mip import (Choice, Constraint, InfeasibleBudgetError, SearchProblem, Solution, solve_diverse,
                     solve_greedy, solve_mip, solve_random, sweep)
from .sections import METHODS, METRICS, SearchConfig, Target  # noqa: F401  (re-exported)


# =============================================================================================
@dataclass(frozen=True)
class PairChoice:
    """What a Choice's name stands for."""

    attention: Variant
    ffn: Variant

    @property
    def block(self) -> BlockConfig:
        return BlockConfig(self.attention.config, self.ffn.config)


def layer_choices(scores: list[dict], cost_table: dict, num_layers: int, objective: str,
                  param_dtype_bytes: int) -> tuple[list[list[Choice]], list[dict[str, PairChoice]]]:
    """Choices per layer: coupled items where the library has them, else all decoupled pairs."""
    by_layer: dict[int, list[dict]] = {}
    for r in scores:
        by_layer.setdefault(r["layer"], []).append(r)
    layers, meaning = [], []
    for i in range(num_layers):
        rows = by_layer.get(i, [])
        coupled = [r for r in rows if r["kind"] == "coupled"]
        pairs: list[tuple[Variant, Variant, float]] = []
        if coupled:
            for r in coupled:
                a, f = (Variant.from_json(v) for v in r["variants"])
                pairs.append((a, f, r[objective]))
            parent_att = next((Variant.from_json(v) for r in rows for v in r["variants"]
                               if v["subblock"] == "attention" and v["is_parent"]), None)
            parent_ffn = next((Variant.from_json(v) for r in rows for v in r["variants"]
                               if v["subblock"] == "ffn" and v["is_parent"]), None)
            if parent_att and parent_ffn and not any(a.is_parent and f.is_parent for a, f, _ in pairs):
                pairs.append((parent_att, parent_ffn, 0.0))
        else:
            att = [(Variant.from_json(r["variants"][0]), r[objective]) for r in rows if r["kind"] == "attention"]
            ffn = [(Variant.from_json(r["variants"][0]), r[objective]) for r in rows if r["kind"] == "ffn"]
            pairs = [(a, f, sa + sf) for a, sa in att for f, sf in ffn]
        if not pairs:
            raise ValueError(f"layer {i} has no scored library items; rerun the scores stage")
        choices, names = [], {}
        for a, f, score in pairs:
            name = f"{a.name}+{f.name}"
            costs = _pair_costs(cost_table, a, f)
            choices.append(Choice(name, float(max(score, 0.0)), costs))  # tiny negative KL is noise
            names[name] = PairChoice(a, f)
        layers.append(choices)
        meaning.append(names)
    return layers, meaning


def _pair_costs(table: dict, a: Variant, f: Variant) -> dict[str, float]:
    att, ffn = table["attention"][subblock_key(a.config)], table["ffn"][subblock_key(f.config)]
    costs = {k: float(att[k]) + float(ffn[k]) for k in att}
    return costs


def scenario_names(target: "Target") -> list[str | None]:
    """The scenarios a target's budgets hold in (None: the first measured one)."""
    return list(target.scenario) if isinstance(target.scenario, list) else [target.scenario]


def target_variants(target: "Target") -> list["Target"]:
    """The problems a target is solved as: itself, or (scenario_mode best) one per scenario."""
    if target.scenario_mode == "best" and isinstance(target.scenario, list):
        return [dataclasses.replace(target, scenario=name) for name in target.scenario]
    return [target]


def scenario_of(table: dict, name: str | None) -> dict:
    scenarios = table["device"]["scenarios"]
    if name is None:
        return scenarios[0]
    for s in scenarios:
        if s["name"] == name:
            return s
    raise ValueError(f"search target scenario {name!r} is not among the measured ones: "
                     f"{[s['name'] for s in scenarios]}; add it to costs.scenarios")


def target_constraints(target: Target, table: dict, parent_blocks: list[BlockConfig], dtype: str,
                       time_margin: float = 0.0) -> list[Constraint]:
    """The budgets of one target as linear constraints over the per-layer costs, in each of its
    scenarios; time budgets divided by (1 + time_margin)."""
    rows = [row for name in scenario_names(target)
            for row in _scenario_constraints(target, scenario_of(table, name), table, parent_blocks, time_margin)]
    if target.params is not None:
        nbytes = DTYPE_BYTES[dtype]
        rows.append(Constraint("parameters", {"params_bytes": 1 / nbytes}, target.params,
                               table["fixed"]["params_bytes"] / nbytes, "params"))
    if not rows:
        raise ValueError(f"search target {target.name} sets no budget: give speedup, throughput, latency_s, "
                         f"memory_gib or params")
    return rows


def _scenario_constraints(target: Target, s: dict, table: dict, parent_blocks: list[BlockConfig],
                          time_margin: float) -> list[Constraint]:
    """A target's time and memory budgets in one scenario."""
    aim = 1 + time_margin
    margin_note = f", aiming {time_margin:.0%} above" if time_margin else ""
    key = f"{target.metric}_s/{s['name']}"
    fixed = table["fixed"]
    parent_time = predicted_costs(table, parent_blocks)[key]
    work = metric_work(target.metric, s)
    rows = []
    if target.speedup is not None:
        rows.append(Constraint(f"{target.metric} time, {s['name']} (>= {target.speedup}x the parent{margin_note})",
                               {key: 1.0}, parent_time / target.speedup / aim, fixed[key], "s"))
    if target.throughput is not None:
        rows.append(Constraint(f"{target.metric} throughput, {s['name']} (>= {target.throughput:g} tok/s{margin_note})",
                               {key: 1.0}, work / target.throughput / aim, fixed[key], "s"))
    if target.latency_s is not None:
        rows.append(Constraint(f"{target.metric} latency, {s['name']}{margin_note.replace(', aiming', ' (aiming')}"
                               + (")" if margin_note else ""), {key: 1.0}, target.latency_s / aim, fixed[key], "s"))
    if target.memory_gib is not None:
        tokens = s["batch_size"] * (s["prompt_tokens"] + s["generate_tokens"])
        rows.append(Constraint(f"memory, {s['name']} (params + KV of {tokens} tokens)",
                               {"params_bytes": 1 / 2**30, "kv_bytes_per_token": tokens / 2**30},
                               target.memory_gib, fixed["params_bytes"] / 2**30, "GiB"))
    return rows


def metric_work(metric: str, s: dict) -> int:
    """Tokens one unit of the metric's time serves in scenario s (a scenario dict)."""
    return {"decode": s["batch_size"], "prefill": s["batch_size"] * s["prompt_tokens"],
            "generate": s["batch_size"] * s["generate_tokens"]}[metric]


def has_time_budget(target: Target) -> bool:
    return any(v is not None for v in (target.speedup, target.throughput, target.latency_s))


def record_scenarios(record: dict, target: Target, table: dict) -> list[dict]:
    """The scenarios (dicts of the cost table) a solution's time budgets hold in: its own (scenario_mode
    best) or its target's."""
    names = [record["scenario"]] if record.get("scenario") else scenario_names(target)
    return [scenario_of(table, name) for name in names]


def measured_shortfall(target: Target, scenarios: list[dict], child: dict[str, float], parent: dict[str, float],
                       margin: float = 0.0) -> float | None:
    """How far measured times fall short of a target's time budgets, each raised by `margin`: the
    largest required / achieved over its speedup, throughput and latency budgets in every scenario
    (<= 1: all met; 1.03: 3% too slow). child / parent: measured seconds by cost key
    ("decode_s/<scenario>"). None: the target has no time budget."""
    worst = None
    for s in scenarios:
        key = f"{target.metric}_s/{s['name']}"
        t = child[key]
        ratios = []
        if target.speedup is not None:  # wanted speedup / achieved (parent time / child time)
            ratios.append(target.speedup * (1 + margin) * t / parent[key])
        if target.throughput is not None:
            ratios.append(target.throughput * (1 + margin) * t / metric_work(target.metric, s))
        if target.latency_s is not None:
            ratios.append(t * (1 + margin) / target.latency_s)
        worst = max([worst, *ratios] if worst is not None else ratios) if ratios else worst
    return worst


def raised_margin(margin: float, shortfall: float) -> float:
    """The time margin that would have met the budgets had the prediction erred the same way: the
    aim (1 + margin) scaled by the measured shortfall (at most 0.49: search.time_margin's bound)."""
    return min((1 + margin) * shortfall - 1 + 1e-3, 0.49)


def solve_target(problem: SearchProblem, target: Target, cfg: SearchConfig, seed: int) -> list[Solution]:
    if cfg.method == "greedy":
        return [solve_greedy(problem)]
    if cfg.method == "random":
        solution = solve_random(problem, seed=seed)
        if solution is None:
            raise InfeasibleBudgetError(f"target {target.name}: no random architecture of the library met the "
                                        f"budgets; use method mip to see the best achievable",
                                        upper={}, best_alone={}, best_given_others={}, violated=[], units={})
        return [solution]
    n = max(target.solutions, target.candidates)
    if n == 1:
        return [solve_mip(problem, time_limit=cfg.time_limit_s)]
    return solve_diverse(problem, n, alpha=cfg.alpha, time_limit=cfg.time_limit_s)


def _speedup_hint(problem: SearchProblem, target: Target, err: InfeasibleBudgetError, time_margin: float) -> str:
    """For a speedup budget, the best achievable speedup (what the user asked in)."""
    if target.speedup is None:
        return ""
    rows = [c for c in problem.constraints if "x the parent" in c.name]
    row = next((c for c in rows if c.name in err.violated), rows[0])  # with several scenarios: one that fails
    parent_time = row.upper * target.speedup * (1 + time_margin)
    best = err.best_given_others.get(row.name) or err.best_alone.get(row.name)
    if not best:
        return ""
    scenario = row.name.split(", ", 1)[1].split(" (")[0]
    aiming = f", aiming {time_margin:.0%} above: search.time_margin" if time_margin else ""
    return (f"\nbest achievable {target.metric} speedup in this library on {scenario}: {parent_time / best:.2f}x "
            f"(asked {target.speedup:g}x{aiming}); lower search.targets[{target.name}].speedup or widen the library")


def solution_record(target: Target, k: int, solution: Solution, meaning: list[dict[str, PairChoice]],
                    table: dict, parent_blocks: list[BlockConfig], num_heads: int, hidden: int) -> dict:
    """A saved solution: block configs, names, objective, predicted costs and speedups."""
    blocks = [meaning[i][name].block for i, name in enumerate(solution.names)]
    predicted = predicted_costs(table, blocks)
    parent = predicted_costs(table, parent_blocks)
    speedups = {k2: parent[k2] / predicted[k2] for k2 in predicted if "_s/" in k2 and predicted[k2] > 0}
    return {"target": target.name, "index": k, "name": f"{target.name}" + (f"-{k}" if k else ""),
            "method": solution.method, "objective": solution.objective, "names": solution.names,
            "block_configs": [b.to_nas_dict(num_heads, hidden) for b in blocks],
            "constraint_values": solution.constraint_values, "predicted": predicted,
            "predicted_speedup": speedups, "solve_seconds": solution.solve_seconds, "note": solution.note}


def frontier(problem_layers: list[list[Choice]], table: dict, parent_blocks: list[BlockConfig],
             target: Target, speedups: list[float], dtype: str) -> list[dict]:
    """Best objective for each speedup of `target`'s metric and scenario (None where infeasible)."""
    if not speedups:
        return []
    probe = Target(name="frontier", scenario=scenario_names(target)[0], metric=target.metric, speedup=1.0)
    (row,) = target_constraints(probe, table, parent_blocks, dtype)
    parent_time = row.upper
    problem = SearchProblem(problem_layers, [row])
    results = sweep(problem, row.name, [parent_time / s for s in speedups])
    return [{"speedup": s, "objective": (r.objective if r is not None else None),
             "names": (r.names if r is not None else None)} for s, r in zip(speedups, results)]


def speedup_text(speedups: dict[str, float]) -> str:
    """'decode 1.57x, ...' from {'decode_s/b256': 1.57, ...}; the scenario named when there are several."""
    several = len({k.split("/", 1)[1] for k in speedups}) > 1
    return ", ".join(f"{k.split('/')[0].replace('_s', '')}{' ' + k.split('/', 1)[1] if several else ''} {v:.2f}x"
                     for k, v in speedups.items())


def search_table(records: list[dict], front: list[dict]) -> str:
    lines = [f"{'solution':<16} {'method':<7} {'sum score':>10}  predicted speedup (per cost key)"]
    for r in records:
        sp = speedup_text(r["predicted_speedup"])
        if "measured_key" in r:  # timed on the device (stages/search.py)
            sp += (f"; measured {r['measured_key'].split('_s/')[0]} {r['measured_speedup'][r['measured_key']]:.2f}x"
                   + ("" if r["meets_measured"] else " (short of the budget)"))
        lines.append(f"{r['name']:<16} {r['method']:<7} {r['objective']:>10.4f}  {sp}")
        kinds = _count_kinds(r["names"])
        lines.append(f"{'':<16} " + ", ".join(f"{n} x{c}" for n, c in kinds))
    if front:
        lines.append("frontier (" + ("decode" if front else "") + "):  " + "  ".join(
            f"{f['speedup']:.2f}x: {f['objective']:.4f}" if f["objective"] is not None else f"{f['speedup']:.2f}x: -"
            for f in front))
    return "\n".join(lines)


def _count_kinds(names: list[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for n in names:
        for part in n.split("+"):
            counts[part] = counts.get(part, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def run_search(scores: list[dict], table: dict, parent_blocks: list[BlockConfig], cfg: SearchConfig,
               objective: str, dtype: str, num_heads: int, hidden: int, seed: int = 0,
               log=print, margins: dict[str, float] | None = None,
               only: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Solve every target (or the ones named in `only`: no frontier then); returns (solution
    records, frontier). margins: a target's own time margin (default search.time_margin), raised
    when its children measured slower than predicted (stages/search.py)."""
    layers, meaning = layer_choices(scores, table, len(parent_blocks), objective, DTYPE_BYTES[dtype])
    records = []
    for target in cfg.targets:
        if only is not None and target.name not in only:
            continue
        margin = (margins or {}).get(target.name, cfg.time_margin)
        found, errors, variants = [], [], target_variants(target)
        for variant in variants:
            problem = SearchProblem(layers, target_constraints(variant, table, parent_blocks, dtype, margin))
            try:
                found.append((variant, solve_target(problem, variant, cfg, seed)))
            except InfeasibleBudgetError as err:
                where = f" on {variant.scenario}" if variant is not target else ""
                err.args = (f"search target {target.name}{where}: {err}"
                            f"{_speedup_hint(problem, variant, err, margin)}",)
                errors.append(err)
        if not found:
            if len(errors) > 1:  # scenario_mode best: no scenario works
                errors[0].args = ("\n".join(str(e) for e in errors),)
            raise errors[0]
        variant, solutions = min(found, key=lambda f: f[1][0].objective)  # best: the lowest summed score
        for k, solution in enumerate(solutions):
            record = solution_record(variant, k, solution, meaning, table, parent_blocks, num_heads, hidden)
            if variant is not target:
                record.update(scenario=variant.scenario, scenarios_tried=[
                    {"scenario": v.scenario, "objective": next((sol[0].objective for w, sol in found if w is v), None)}
                    for v in variants])
            if target.candidates > 1:  # one child, picked later among these by realized KL
                record.update(name=f"{target.name}~{k}", candidate=k)
            if margin != cfg.time_margin:
                record["time_margin"] = margin
            records.append(record)
    if only is not None or not cfg.targets:
        return records, []
    return records, frontier(layers, table, parent_blocks, cfg.targets[0], cfg.frontier, dtype)
