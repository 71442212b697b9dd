"""What several stages load from a run directory: the parent, the packed data, held-out batches,
the children's solutions. Method code is imported inside each function (torch among it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import read_jsonl
from .base import RunDir

if TYPE_CHECKING:
    from ..config import RunConfig


def load_parent_for(cfg: RunConfig, run_dir: Path, on_device: bool = True, frozen: bool = False):
    """The run's converted parent in `parent_dtype`, on the run's device (or the CPU)."""
    import torch

    from ..dist import resolve_device
    from ..model.parent import load_parent

    parent = load_parent(RunDir(run_dir).parent, getattr(torch, cfg.parent_dtype))
    if on_device:
        parent = parent.to(resolve_device(cfg.device))
    if frozen:
        parent.requires_grad_(False)
    return parent


def load_data(cfg: RunConfig, run_dir: Path, verbose: bool = False):
    """The packed dataset of this run (built by the data stage, cached in run_dir/data)."""
    from transformers import AutoTokenizer

    from ..data.config import DEFAULT_CACHE_DIR
    from ..data.corpus import build_dataset

    paths = RunDir(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths.parent)
    cache = paths.data if Path(cfg.data.cache_dir) == Path(DEFAULT_CACHE_DIR) else cfg.data.cache_dir
    return build_dataset(cfg.data, tokenizer, cache_dir=cache, verbose=verbose)


def validation_batches(dataset, tokens: int, batch_size: int, split: str = "validation") -> list:
    """The first `tokens` of a split (whole rows), in order, as (B, T) batches."""
    import torch

    rows = dataset.split(split)[: max(1, -(-tokens // dataset.seq_len))]
    if len(rows) == 0:
        raise ValueError(f"the {split} split is empty: add data or raise data.{split}_fraction")
    return [torch.from_numpy(rows[k:k + batch_size].astype("int64")) for k in range(0, len(rows), batch_size)]


def read_table(path: Path, stage: str):
    """A stage's JSON artifact; a missing or corrupted one names the stage to rerun."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is missing or corrupted ({err}); rerun its stage: --force {stage}") from err


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or corrupted (then it is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def solutions(run_dir: Path, cfg: RunConfig) -> list[dict]:
    """Puzzle's solutions, then the peers' (when peers.methods asks for them)."""
    paths = RunDir(run_dir)
    records = read_jsonl(paths.solutions, "search")
    if cfg.peers.methods and paths.peer_solutions.is_file():
        records += read_jsonl(paths.peer_solutions, "peers")
    return records
