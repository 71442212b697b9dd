"""search: the MIP of METHOD.md section 6 for every target; solutions saved as block_configs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import costs, scores
from .base import RunDir, Stage
from .common import load_data, load_parent_for, passes, train_batches, validation_batches, write_passes

if TYPE_CHECKING:
    from ..config import RunConfig


def measured_settings(cfg: RunConfig) -> dict | None:
    """What the search's measurement adds to its fingerprint: None where it does not measure."""
    if not measuring(cfg):
        return None
    return {k: getattr(cfg.search, k) for k in cfg.search.MEASURE_FIELDS if k != "measure"}


def selection_gkd_settings(cfg: RunConfig) -> str | None:
    """What the candidates' short GKD adds to the fingerprint (its GKD settings come from the gkd
    section: a new gkd.lr must redo the selection): None without a short GKD."""
    return repr(short_gkd_config(cfg)) if cfg.search.select_gkd_tokens else None


STAGE = Stage("search", config=("search", ("measured", lambda cfg: measured_settings(cfg)),
                                ("selection_gkd", selection_gkd_settings)),
              upstream=(scores.STAGE, costs.STAGE))


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write search/solutions.jsonl (one record per child), frontier.json and, with candidates,
    candidates.jsonl."""
    from ..checkpoint import atomic_write_json, atomic_write_text, write_jsonl
    from ..model.modeling import DeciLMConfig
    from ..search import run_search, search_table

    paths = RunDir(run_dir)
    out = paths.solutions.parent
    out.mkdir(parents=True, exist_ok=True)
    config = DeciLMConfig.from_pretrained(paths.parent)
    table = costs.read_costs(run_dir)
    library_scores = scores.read_scores(run_dir)

    def solve(margins: dict[str, float] | None = None, only: set[str] | None = None):
        return run_search(library_scores, table, config.blocks, cfg.search, cfg.scoring.objective, cfg.costs.dtype,
                          config.num_attention_heads, config.hidden_size, seed=cfg.seed, margins=margins, only=only)

    records, front = solve()
    if measuring(cfg):
        records = measure_children(cfg, config, table, records, solve)
    records, scored = select_by_realized_kl(cfg, run_dir, records)
    write_jsonl(paths.solutions, records)
    atomic_write_json(out / "frontier.json", front)
    text = search_table(records, front)
    if scored:
        from ..selection import candidates_table

        write_jsonl(out / "candidates.jsonl", scored)
        text += "\n" + candidates_table(scored, records)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    STAGE.mark_done(cfg, run_dir, solutions=len(records))
    return out


def measuring(cfg: RunConfig) -> bool:
    """search.measure, auto resolved: on CUDA."""
    from ..dist import resolve_device

    if cfg.search.measure == "auto":
        return resolve_device(cfg.device).type == "cuda"
    return bool(cfg.search.measure)


def measure_children(cfg: RunConfig, config, table: dict, records: list[dict], solve) -> list[dict]:
    """The records with their measured times and speedups (`measured_s`, `measured_speedup`,
    `measured_shortfall`, `meets_measured`). A target none of whose records meets its time budgets
    when measured (with search.measured_margin to spare) is solved again, its time margin raised by
    the smallest shortfall, up to search.measure_rounds times. solve(margins, only) -> (records, _)."""
    from ..mip import InfeasibleBudgetError
    from ..search import has_time_budget, raised_margin

    targets = {t.name: t for t in cfg.search.targets}
    margins = {name: cfg.search.time_margin for name in targets}
    todo = {name for name, t in targets.items() if has_time_budget(t)}
    for round_ in range(cfg.search.measure_rounds + 1):
        for name in sorted(todo):
            _measure_target(cfg, config, table, targets[name], [r for r in records if r["target"] == name])
        failing = {n for n in todo if not any(r["meets_measured"] for r in records if r["target"] == n)}
        if not failing or round_ == cfg.search.measure_rounds:
            break
        for name in sorted(failing):
            closest = min(r["measured_shortfall"] for r in records if r["target"] == name)
            print(f"[search] {name}: no child measured fast enough (the closest {closest - 1:.1%} short of the "
                  f"budget + {cfg.search.measured_margin:.1%}); solving again with time margin "
                  f"{margins[name]:.1%} -> {raised_margin(margins[name], closest):.1%}")
            margins[name] = raised_margin(margins[name], closest)
        try:
            redone, _ = solve(margins, failing)
        except InfeasibleBudgetError as err:
            print(f"[search] warning: re-solving with the raised margin is infeasible ({err}); keeping the measured children")
            break
        order = list(targets)
        records = sorted([r for r in records if r["target"] not in failing] + redone,
                         key=lambda r: order.index(r["target"]))  # stable: each target's order kept
        todo = failing
    for name in sorted(todo):
        if not any(r["meets_measured"] for r in records if r["target"] == name):
            print(f"[search] warning: {name}: no child meets its time budget when measured (closest: "
                  f"{min(r['measured_shortfall'] for r in records if r['target'] == name) - 1:+.1%}); the closest "
                  f"is kept. Raise search.time_margin or search.measure_rounds, or lower the target")
    return records


def measurement_groups(sizes: dict[str, float], parent: float, budget: float) -> list[list[str]]:
    """The records (name -> bytes it takes to time) split, in order, into groups that fit `budget`
    beside the parent (timed in every group: each group's speedups against its own parent timing).
    A record too large to share still gets a group of its own."""
    groups: list[list[str]] = []
    used = parent
    for name, size in sizes.items():
        if not groups or used + size > budget:
            groups.append([])
            used = parent
        groups[-1].append(name)
        used += size
    return groups


def _timing_bytes(table: dict, blocks, scenarios) -> float:
    """What timing one model holds on the device: its weights and the fast path's fused copies (2x the
    parameter bytes) and the KV cache of the largest scenario (b x (prompt + generated) tokens)."""
    from ..costs import predicted_costs

    costs = predicted_costs(table, blocks)
    tokens = max(s.batch_size * (s.prompt_tokens + s.generate_tokens) for s in scenarios)
    return 2 * costs["params_bytes"] + costs["kv_bytes_per_token"] * tokens


def _measure_target(cfg: RunConfig, config, table: dict, target, group: list[dict]) -> None:
    """Time the parent and a target's records in alternation (in groups that fit the device beside
    the parent); annotate the records in place."""
    import torch

    from ..costs import measure_whole_models
    from ..dist import resolve_device
    from ..model.blocks import BlockConfig
    from ..search import measured_shortfall, record_scenarios

    device = resolve_device(cfg.device)
    names = {s["name"] for r in group for s in record_scenarios(r, target, table)}
    scenarios = [s for s in cfg.costs.scenarios if s.name in names]
    blocks = {r["name"]: [BlockConfig.from_nas_dict(b, config.num_attention_heads, config.hidden_size)
                          for b in r["block_configs"]] for r in group}
    budget = 0.7 * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    sizes = {n: _timing_bytes(table, b, scenarios) for n, b in blocks.items()}
    times, parents = {}, {}
    for names_ in measurement_groups(sizes, _timing_bytes(table, config.blocks, scenarios), budget):
        measured = measure_whole_models(config, {"parent": config.blocks, **{n: blocks[n] for n in names_}},
                                        scenarios, cfg.costs, device, iters=cfg.search.measure_iters)
        parent = measured.pop("parent")
        times.update(measured)
        parents.update({n: parent for n in names_})
    for r in group:
        mine, parent, own = times[r["name"]], parents[r["name"]], record_scenarios(r, target, table)
        shortfall = measured_shortfall(target, own, mine, parent, cfg.search.measured_margin)
        key = f"{target.metric}_s/{own[0]['name']}"
        r.update(measured_s=mine, measured_speedup={k: parent[k] / v for k, v in mine.items() if v > 0},
                 measured_shortfall=shortfall, meets_measured=shortfall <= 1, measured_key=key)
        print(f"[search] {r['name']}: {target.metric} {r['measured_speedup'][key]:.3f}x measured, "
              f"{r['predicted_speedup'][key]:.3f}x predicted: {'meets' if shortfall <= 1 else 'misses'} its "
              f"budget + {cfg.search.measured_margin:.1%}")


def select_by_realized_kl(cfg: RunConfig, run_dir: Path, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Targets with candidates: each candidate assembled and scored, the best kept (`selection.py`)."""
    if not any("candidate" in r for r in records):
        return records, []
    from ..library import read_space
    from ..selection import select_candidates

    parent = load_parent_for(cfg, run_dir, frozen=True)
    dataset = load_data(cfg, run_dir)
    batches = validation_batches(dataset, cfg.search.select_tokens, cfg.search.select_batch_size)
    read = [passes(cfg, dataset, "candidate selection, each candidate", cfg.search.select_tokens, "validation",
                   first=True)]
    repair = None
    if cfg.search.select_gkd_tokens:
        repair, tokens = short_gkd(cfg, dataset, parent)
        read.append(passes(cfg, dataset, "candidate selection's short GKD, each candidate", tokens,
                           teacher_share=cfg.gkd.teacher_share))
    write_passes(RunDir(run_dir).solutions.parent, "search", read)
    space = read_space(RunDir(run_dir).space)
    return select_candidates(records, parent.eval(), RunDir(run_dir).bld, space, batches, cfg.eval.logits_chunk,
                             repair=repair)


def short_gkd(cfg: RunConfig, dataset, teacher):
    """(repair(child): search.select_gkd_tokens of GKD on the child in place, its tokens). The run's
    GKD settings without chat transcripts, on-policy phase or checkpoints; every candidate reads the
    same batches, so that they are compared on equal footing. Compiled when the run's GKD will be
    (gkd.compile auto: its tokens decide): the graphs of the candidates' block kinds, compiled for
    the first candidate, serve the others and the run's GKD in this process."""
    import tempfile

    from ..gkd import GKDTrainer

    gkd_cfg = short_gkd_config(cfg)

    def repair(child) -> None:
        child.float()  # fp32 master weights, as GKD trains them
        with tempfile.TemporaryDirectory() as work:
            trainer = GKDTrainer(child, teacher, gkd_cfg, Path(work), dataset.seq_len, log=lambda *_: None,
                                 compile_tokens=cfg.gkd.tokens)
            trainer.train(train_batches(cfg, dataset, gkd_cfg.batch_size, gkd_cfg.tokens, seed=cfg.seed + 1,
                                        teacher_share=gkd_cfg.teacher_share))

    steps = -(-gkd_cfg.tokens // (gkd_cfg.batch_size * dataset.seq_len))
    return repair, steps * gkd_cfg.batch_size * dataset.seq_len


def short_gkd_config(cfg: RunConfig):
    """The run's GKD settings for the candidates' short GKD: select_gkd_tokens, no chat
    transcripts, no on-policy phase, no checkpoints."""
    import dataclasses

    return dataclasses.replace(cfg.gkd, tokens=cfg.search.select_gkd_tokens, chat_fraction=0.0,
                               on_policy_fraction=0.0, checkpoint_every=10**9)


def frontier_key(cfg: RunConfig, run_dir: Path) -> str:
    """The cost key the search's frontier was swept on: the first target's metric and scenario."""
    from ..search import scenario_names, scenario_of

    target = cfg.search.targets[0]
    return f"{target.metric}_s/{scenario_of(costs.read_costs(run_dir), scenario_names(target)[0])['name']}"
