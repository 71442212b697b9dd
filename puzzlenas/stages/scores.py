"""scores: replace-1-block KL and LM loss of every trained library item (split over torchrun ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import bld
from .base import RunDir, Stage
from ..checkpoint import read_jsonl
from .common import load_data, load_parent_for, passes, validation_batches, write_passes

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("scores", config=("scoring",), upstream=(bld.STAGE,), all_ranks=True)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Score this rank's share of the items into part-rank<k>.jsonl; rank 0 merges scores.jsonl."""
    from ..bld import finished_jobs
    from ..checkpoint import atomic_write_text, reset_if_stale, write_jsonl
    from ..dist import barrier, distributed_rank
    from ..library import read_space
    from ..scoring import score_items, scores_table, split_items

    paths = RunDir(run_dir)
    out = paths.scores.parent
    rank, world = distributed_rank()
    if rank == 0:
        reset_if_stale(out, STAGE.fingerprint(cfg))
    barrier(world)
    parent = load_parent_for(cfg, run_dir, frozen=True)
    space = read_space(paths.space)
    items = finished_jobs(paths.bld, space)
    if not items:
        raise ValueError(f"{paths.bld} holds no finished library items: run the bld stage first")
    mine = split_items(items, len(space), rank, world)
    dataset = load_data(cfg, run_dir)
    batches = validation_batches(dataset, cfg.scoring.tokens, cfg.scoring.batch_size)
    print(f"[scores] rank {rank}/{world}: {len(mine)} of {len(items)} items on {len(batches)} batches")
    results = score_items(parent, paths.bld, mine, batches, cfg.scoring, out / f"progress-rank{rank}.json")
    write_jsonl(out / f"part-rank{rank}.jsonl", list(results.values()))
    barrier(world)
    if rank == 0:
        rows = [row for part in sorted(out.glob("part-rank*.jsonl")) for row in read_jsonl(part, "scores")]
        rows.sort(key=lambda r: (r["layer"], r["kind"], r["name"]))
        write_jsonl(paths.scores, rows)
        table = scores_table(rows, "kl") + "\n\n" + scores_table(rows, "lm_loss_delta")
        atomic_write_text(out / "table.txt", table + "\n\n" + scores_table(rows, "kl", per_layer=True) + "\n")
        print(table)
        write_passes(out, "scores", [passes(cfg, dataset, "replace-1-block scores, each item", cfg.scoring.tokens,
                                            "validation", first=True)])
        STAGE.mark_done(cfg, run_dir, items=len(rows), world_size=world)
    barrier(world)
    return out


def read_scores(run_dir: Path) -> list[dict]:
    return read_jsonl(RunDir(run_dir).scores, "scores")
