"""report: report/README.md with the frontier and per-layer plots and the parent-vs-children table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import eval as eval_stage
from .base import RunDir, Stage
from .common import solutions

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("report", upstream=(eval_stage.STAGE,), table=None)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write report/README.md, frontier.png and layers.png."""
    from ..eval.report import write_report
    from .search import frontier_key

    paths = RunDir(run_dir)
    unreachable = json.loads(paths.unreachable.read_text()) if cfg.peers.methods and paths.unreachable.is_file() \
        else []
    path = write_report(run_dir, paths.report, solutions(run_dir, cfg), unreachable, frontier_key(cfg, run_dir))
    STAGE.mark_done(cfg, run_dir)
    print(f"[report] {path}")
    return paths.report
