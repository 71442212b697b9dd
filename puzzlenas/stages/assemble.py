"""assemble: each solution (Puzzle's and the peers') + the trained library -> child-<name>/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import peers, search
from .base import RunDir, Stage
from .common import load_parent_for, solutions

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("assemble", upstream=(search.STAGE, peers.STAGE), per_child="child", table=None)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Assemble every child whose folder is not finished for its solution (a Nemotron-NAS checkpoint
    with the parent's tokenizer, its architecture table and its solution record)."""
    from ..assemble import assemble_child, pairs_from_record
    from ..checkpoint import atomic_write_json
    from ..library import read_space
    from ..model.info import architecture_table
    from ..model.parent import copy_tokenizer_files
    from ..search import speedup_text

    paths = RunDir(run_dir)
    records = solutions(run_dir, cfg)
    todo = [r for r in records if STAGE.why_not_done(cfg, run_dir, r)]
    if not todo:
        print(f"[assemble] done already: {len(records)} children")
        return run_dir
    parent = load_parent_for(cfg, run_dir, on_device=False)
    space = read_space(paths.space)
    for record in todo:
        out = STAGE.folder(run_dir, record)
        tmp = out.with_name(out.name + ".tmp")
        for folder in (out, tmp):
            if folder.exists():
                shutil.rmtree(folder)
        child = assemble_child(parent, paths.bld, pairs_from_record(record, space), tmp)
        copy_tokenizer_files(paths.parent, tmp)
        table = architecture_table(child.config)
        (tmp / "architecture.txt").write_text(table + "\n")
        atomic_write_json(tmp / "solution.json", record)
        STAGE.mark_done(cfg, run_dir, folder=tmp, record=record, target=record["target"])
        tmp.rename(out)
        print(f"[assemble] {out.name}: predicted speedup {speedup_text(record['predicted_speedup'])}")
        print(table)
    return run_dir
