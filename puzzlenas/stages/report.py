"""report: report/README.md: targets missed when measured, plots (frontier, predicted vs measured speedup, losses) and tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import eval as eval_stage
from .base import RunDir, Stage
from .common import solutions

if TYPE_CHECKING:
    from ..config import RunConfig

# search.targets is read (missed targets, target lines) but not declared: the search stage is
# upstream and declares it, so a changed target changes this stage's fingerprint through it.
STAGE = Stage("report", upstream=(eval_stage.STAGE,), table="summary.txt")


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write report/README.md and its plots; print the targets missed when measured."""
    from ..checkpoint import atomic_write_text
    from ..eval.report import load_context, missed_lines, write_report
    from .search import frontier_key

    paths = RunDir(run_dir)
    unreachable = json.loads(paths.unreachable.read_text()) if cfg.peers.methods and paths.unreachable.is_file() \
        else []
    records = solutions(run_dir, cfg)
    targets = [dataclasses.asdict(t) for t in cfg.search.targets]
    path = write_report(run_dir, paths.report, records, unreachable, frontier_key(cfg, run_dir), targets)
    missed = missed_lines(load_context(run_dir, records, unreachable, targets=targets))
    summary = [f"[report] WARNING: {line}" for line in missed] or ["[report] every speedup target met when measured"]
    atomic_write_text(paths.report / "summary.txt", "\n".join(summary + [f"[report] {path}"]) + "\n")
    STAGE.mark_done(cfg, run_dir)
    print("\n".join(summary + [f"[report] {path}"]))
    return paths.report
