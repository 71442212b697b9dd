"""parent: convert the parent into the Nemotron-NAS layout with all-parent blocks (run_dir/parent)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .base import RunDir, Stage

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("parent", config=("parent", "parent_dtype"), table="architecture.txt")


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Convert `cfg.parent` into `run_dir/parent` and print its architecture table."""
    import torch

    from ..model.info import architecture_table
    from ..model.modeling import DeciLMConfig
    from ..model.parent import convert_parent

    out, tmp = RunDir(run_dir).parent, run_dir / "parent.tmp"
    for folder in (out, tmp):  # a half-written conversion: redo it, it is one step
        if folder.exists():
            shutil.rmtree(folder)
    convert_parent(cfg.parent, tmp, getattr(torch, cfg.parent_dtype))
    table = architecture_table(DeciLMConfig.from_pretrained(tmp))
    (tmp / "architecture.txt").write_text(table + "\n")
    STAGE.mark_done(cfg, run_dir, folder=tmp, parent=cfg.parent)
    tmp.rename(out)
    print(table)
    return out
