"""peers: ShortGPT / Minitron-width / uniform-KV children at every search target (peers.methods)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from . import costs, scores
from .base import RunDir, Stage
from .common import load_data, load_parent_for, validation_batches

if TYPE_CHECKING:
    from ..config import RunConfig


def target_budgets(cfg: RunConfig) -> list[dict]:
    """What the peers' architectures depend on: the targets' budgets, not how many solutions or
    candidates Puzzle's search keeps (so tuning the search never redoes the peers' GKD)."""
    return [{k: v for k, v in dataclasses.asdict(t).items() if k not in ("solutions", "candidates")}
            for t in cfg.search.targets]


STAGE = Stage("peers", config=(("targets", target_budgets), "search.time_margin", "peers"),
              upstream=(scores.STAGE, costs.STAGE), when=lambda cfg: bool(cfg.peers.methods),
              unasked="none asked (peers.methods: shortgpt, minitron_width, uniform_kv)")


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write peers/solutions.jsonl (children in the search's record format) and unreachable.json."""
    from ..checkpoint import atomic_write_json, atomic_write_text, write_jsonl
    from ..library import read_space
    from ..model.modeling import DeciLMConfig
    from ..peers import block_influence, build_peers, peers_table

    paths = RunDir(run_dir)
    out = paths.peer_solutions.parent
    out.mkdir(parents=True, exist_ok=True)
    config = DeciLMConfig.from_pretrained(paths.parent)
    influence = None
    if "shortgpt" in cfg.peers.methods:
        parent = load_parent_for(cfg, run_dir)
        batches = validation_batches(load_data(cfg, run_dir), cfg.peers.tokens, cfg.peers.batch_size)
        influence = block_influence(parent.eval(), batches)
        atomic_write_json(out / "block_influence.json", {"block_influence": influence,
                                                         "tokens": sum(b.numel() for b in batches)})
        del parent
    records, unreachable = build_peers(scores.read_scores(run_dir), costs.read_costs(run_dir), config.blocks,
                                       read_space(paths.space), cfg.search, cfg.peers.methods, influence,
                                       cfg.scoring.objective, cfg.costs.dtype, config.num_attention_heads,
                                       config.hidden_size, cfg.peers.targets)
    write_jsonl(paths.peer_solutions, records)
    atomic_write_json(paths.unreachable, unreachable)
    text = peers_table(records, unreachable)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    STAGE.mark_done(cfg, run_dir, peers=len(records), unreachable=len(unreachable))
    return out
