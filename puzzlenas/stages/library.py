"""library: the search space per layer, and the calibration statistics that initialize it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import data, teacher
from .base import RunDir, Stage
from .common import load_data, load_parent_for

if TYPE_CHECKING:
    from ..config import RunConfig

def runtime_narrowing(cfg: RunConfig) -> str | None:
    """The serving runtime, where it may narrow this library config's space (None: it cannot, and the
    fingerprint stays what it was before `serving` existed)."""
    from ..sections import runtime_narrows_library

    runtime = cfg.serving.runtime
    return runtime if runtime_narrows_library(runtime, cfg.library) else None


STAGE = Stage("library", config=("library", "seed", ("runtime", runtime_narrowing)), upstream=(data.STAGE, teacher.STAGE),
              table="space.txt")


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write library/space.json (+ space.txt) and library/calibration.safetensors."""
    from safetensors.torch import save_file

    from ..checkpoint import atomic_write_text
    from ..data.batches import token_batches
    from ..library import calibration_statistics, excluded_by_runtime, search_space, space_table, write_space

    paths = RunDir(run_dir)
    paths.library.mkdir(parents=True, exist_ok=True)
    parent_model = load_parent_for(cfg, run_dir)
    runtime = cfg.serving.runtime
    space = search_space(parent_model.config, cfg.library, runtime)
    excluded = excluded_by_runtime(parent_model.config, cfg.library, runtime)
    if excluded:
        print(f"[library] serving.runtime = {runtime}: left out {', '.join(excluded)} (the runtime cannot run "
              f"them; serving.runtime: hf keeps every block)")
    batches = token_batches(load_data(cfg, run_dir).train, cfg.library.calibration_batch_size,
                            cfg.library.calibration_tokens, seed=cfg.seed)
    started = time.time()
    stats = calibration_statistics(parent_model, batches, cfg.library)
    save_file(stats, str(paths.calibration))
    write_space(paths.space, space)
    table = space_table(space)
    atomic_write_text(paths.library / "space.txt", table + "\n")
    print(table)
    STAGE.mark_done(cfg, run_dir, calibration_tokens=batches.tokens_served,
                    calibration_seconds=round(time.time() - started, 1))
    return paths.library
