"""search: the MIP of METHOD.md section 6 for every target; solutions saved as block_configs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import costs, scores
from .base import RunDir, Stage
from .common import load_data, load_parent_for, passes, validation_batches, write_passes

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("search", config=("search",), upstream=(scores.STAGE, costs.STAGE))


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
    records, front = run_search(scores.read_scores(run_dir), costs.read_costs(run_dir), config.blocks, cfg.search,
                                cfg.scoring.objective, cfg.costs.dtype, config.num_attention_heads,
                                config.hidden_size, seed=cfg.seed)
    records, scored = select_by_realized_kl(cfg, run_dir, records)
    write_jsonl(paths.solutions, records)
    atomic_write_json(out / "frontier.json", front)
    text = search_table(records, front)
    if scored:
        from ..selection import candidates_table

        write_jsonl(out / "candidates.jsonl", scored)
        text += "\n" + candidates_table(scored)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    STAGE.mark_done(cfg, run_dir, solutions=len(records))
    return out


def select_by_realized_kl(cfg: RunConfig, run_dir: Path, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Targets with candidates: each candidate assembled and scored, the best kept (`selection.py`)."""
    if not any("candidate" in r for r in records):
        return records, []
    from ..library import read_space
    from ..selection import select_candidates

    parent = load_parent_for(cfg, run_dir)
    dataset = load_data(cfg, run_dir)
    batches = validation_batches(dataset, cfg.search.select_tokens, cfg.search.select_batch_size)
    write_passes(RunDir(run_dir).solutions.parent, "search", [passes(
        cfg, dataset, "candidate selection, each candidate", cfg.search.select_tokens, "validation", first=True)])
    space = read_space(RunDir(run_dir).space)
    return select_candidates(records, parent.eval(), RunDir(run_dir).bld, space, batches, cfg.eval.logits_chunk)


def frontier_key(cfg: RunConfig, run_dir: Path) -> str:
    """The cost key the search's frontier was swept on: the first target's metric and scenario."""
    from ..search import scenario_names, scenario_of

    target = cfg.search.targets[0]
    return f"{target.metric}_s/{scenario_of(costs.read_costs(run_dir), scenario_names(target)[0])['name']}"
