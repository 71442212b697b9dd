"""data: tokenize and pack the corpus into train / validation / test rows, split by document."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import parent
from .base import RunDir, Stage
from .common import load_data

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("data", config=("data",), upstream=(parent.STAGE,), table=None)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Build (or find in the cache) the packed dataset; its token counts go into the DONE marker."""
    out = RunDir(run_dir).data
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_data(cfg, run_dir, verbose=True, teacher=False)
    STAGE.mark_done(cfg, run_dir, tokens={s: dataset.num_tokens(s) for s in ("train", "validation", "test")})
    return out
