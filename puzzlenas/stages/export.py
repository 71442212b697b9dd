"""export: every Puzzle child after GKD -> export-<name>/, a folder the run's `serving.runtime` loads.

The pipeline's last stage: `puzzlenas run` ends with servable folders. Peers are not exported
(they are baselines). Bookkeeping lives in export/, so that the export folders hold only what a
runtime loads. (`puzzlenas export MODEL OUT --runtime R` exports any one model.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import eval as eval_stage
from .base import RunDir, Stage
from .common import solutions

if TYPE_CHECKING:
    from ..config import RunConfig


def serving_runtime(cfg: RunConfig) -> str:
    """The run's `serving.runtime`."""
    return cfg.serving.runtime


def exported_children(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Puzzle's children (not the peers') that went through GKD."""
    return [r["name"] for r in solutions(run_dir, cfg)
            if not r.get("peer") and (RunDir(run_dir).child("gkd", r["name"]) / "config.json").is_file()]


STAGE = Stage("export", config=(("runtime", serving_runtime), "parent"), upstream=(eval_stage.STAGE,),
              extra_inputs=lambda cfg, run_dir: {f"gkd-{n}": RunDir(run_dir).child("gkd", n)
                                                 for n in exported_children(cfg, run_dir)},
              table="exports.txt")


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Export every child (skipped when export/ is done for these children); a child the runtime
    cannot run is skipped with the reason, in export/exports.txt."""
    from ..checkpoint import atomic_write_text
    from ..export import ExportError, export_child, serving_snippet

    out = run_dir / "export"
    if STAGE.why_not_done(cfg, run_dir) is None:
        print(f"[export] done already: {out}")
        return out
    runtime = serving_runtime(cfg)
    results_path = RunDir(run_dir).eval / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    lines = []
    for name in exported_children(cfg, run_dir):
        target = RunDir(run_dir).child("export", name)
        try:
            export_child(RunDir(run_dir).child("gkd", name), target, runtime, parent=cfg.parent,
                         evaluation=results.get(f"gkd-{name}"), overwrite=True)
            lines.append(f"{target.name}: {runtime}: {serving_snippet(runtime, target.name)}")
        except ExportError as err:
            if target.exists():
                shutil.rmtree(target)  # an export of an earlier, different child
            lines.append(f"{target.name}: not written: {err}")
        print(f"[export] {lines[-1]}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "exports.txt", "\n".join(lines) + "\n")
    STAGE.mark_done(cfg, run_dir, runtime=runtime)
    return out
