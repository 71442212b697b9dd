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


def load_data(cfg: RunConfig, run_dir: Path, verbose: bool = False, teacher: bool = True):
    """The packed dataset of this run (built by the data stage, cached in run_dir/data), with the
    teacher stage's rows in its train and validation splits when data.sources has a teacher
    source (`teacher=False`: the corpus alone, as the data and teacher stages read it)."""
    from transformers import AutoTokenizer

    from ..data.config import DEFAULT_CACHE_DIR
    from ..data.corpus import build_dataset

    paths = RunDir(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths.parent)
    cache = paths.data if Path(cfg.data.cache_dir) == Path(DEFAULT_CACHE_DIR) else cfg.data.cache_dir
    dataset = build_dataset(cfg.data, tokenizer, cache_dir=cache, verbose=verbose)
    from .teacher import STAGE as TEACHER

    if teacher and TEACHER.active(cfg):
        dataset = with_teacher_rows(dataset, RunDir(run_dir).root / TEACHER.name, cfg.teacher.train_share)
    return dataset


def with_teacher_rows(dataset, folder: Path, density: float = 0.0):
    """The dataset with teacher/rows.safetensors joined (data/teacher.join_teacher_rows)."""
    from safetensors.numpy import load_file

    from ..data.teacher import join_teacher_rows
    from ..integrity import verify_artifact

    verify_artifact(folder)  # damaged since it was written: the file and `--force teacher`
    try:
        rows = load_file(str(folder / "rows.safetensors"))
        info = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} holds no teacher rows ({err}): run the teacher stage first "
                         f"(puzzlenas teacher RUN, or --force teacher)") from err
    return join_teacher_rows(dataset, rows["train"], rows["validation"], info, density)


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


def train_batches(cfg: RunConfig, dataset, batch_size: int, tokens: int, seed: int, rank: int = 0, world: int = 1,
                  teacher_share: float | None = None):
    """`tokens` training tokens in (B, T) batches (data/batches.token_batches); with teacher rows
    and a teacher share > 0 (`teacher_share`, default teacher.train_share), round(share x B) rows
    of every batch are the teacher's."""
    from ..data.batches import token_batches

    info = dataset.meta.get("teacher")
    share = (cfg.teacher.train_share if teacher_share is None else teacher_share) if info else 0.0
    if not share:
        return token_batches(dataset.train, batch_size, tokens, seed=seed, rank=rank, world_size=world)
    from ..data.chat import MixedBatches

    corpus_rows = dataset.train[: len(dataset.train) - info["train_rows"]]
    teacher_rows = dataset.train[len(corpus_rows):]
    return MixedBatches(token_batches(corpus_rows, batch_size, tokens, seed=seed, rank=rank, world_size=world),
                        teacher_rows, share, seed=seed + 7919 + rank)


def source_tokens(dataset, split: str) -> dict[str, int]:
    """Tokens of each source in a split (the data stage's counts; teacher rows as joined)."""
    stats = dataset.meta.get("source_stats", {})
    return {src: int(st[split]["tokens"]) for src, st in stats.items() if st[split]["tokens"]}


def passes(cfg: RunConfig, dataset, what: str, tokens: int, split: str = "train", first: bool = False,
           share: dict[str, float] | None = None, teacher_share: float | None = None) -> dict:
    """How many passes over each source of `split` reading `tokens` tokens made: {what, split,
    tokens, sources: {source: [tokens read, tokens in the split, passes]}}.

    first: the first `tokens` of the split in order (validation reads), else drawn at random
    (training); share: each source's share of the rows read, when not its share of the split
    (teacher_share, default teacher.train_share: the teacher rows' share of every batch)."""
    available = source_tokens(dataset, split)
    total = sum(available.values()) or 1
    teacher_share = cfg.teacher.train_share if teacher_share is None else teacher_share
    if share is None and split == "train" and dataset.meta.get("teacher") and teacher_share:
        spec = dataset.meta["teacher"]["spec"]
        corpus = total - available.get(spec, 0)
        share = {s: (teacher_share if s == spec else (1 - teacher_share) * n / max(corpus, 1))
                 for s, n in available.items()}
    if first:  # whole rows from the start: the corpus part in source order, teacher rows interleaved
        read = prefix_source_tokens(dataset, split, tokens)
    else:
        read = {s: tokens * (share[s] if share else n / total) for s, n in available.items()}
    return {"what": what, "split": split, "tokens": int(tokens),
            "sources": {s: [int(read.get(s, 0)), n, round(read.get(s, 0) / n, 3)] for s, n in available.items()}}


def prefix_source_tokens(dataset, split: str, tokens: int) -> dict[str, int]:
    """Tokens of each source among the first `tokens` (whole rows) of a split."""
    import numpy as np

    seq_len, rows = dataset.seq_len, dataset.split(split)
    n_rows = min(len(rows), max(1, -(-tokens // seq_len)))
    info = dataset.meta.get("teacher") or {}
    teacher_at = set(info.get("validation_rows_at", [])) if split == "validation" else set()
    if split == "train" and info:
        teacher_at = set(range(len(rows) - info["train_rows"], len(rows)))
    # the corpus rows cut one stream made of the sources in order: source s holds [start, end)
    stats = dataset.meta.get("source_stats", {})
    corpus_sources = [s for s in dataset.meta.get("sources", stats) if s in stats and s != info.get("spec")]
    bounds = np.cumsum([0] + [stats[s][split]["tokens"] for s in corpus_sources])
    out: dict[str, int] = {}
    corpus_row = 0
    for r in range(n_rows):
        if r in teacher_at:
            out[info["spec"]] = out.get(info["spec"], 0) + seq_len
            continue
        a, b = corpus_row * seq_len, (corpus_row + 1) * seq_len
        for k, s in enumerate(corpus_sources):
            overlap = min(b, bounds[k + 1]) - max(a, bounds[k])
            if overlap > 0:
                out[s] = out.get(s, 0) + int(overlap)
        corpus_row += 1
    return out


def passes_lines(records: list[dict]) -> str:
    """Passes made over each source, one line per read: 'what: source tokens read / in split = passes'."""
    lines = []
    for r in records:
        parts = [f"{src} {read:,}/{n:,} = {p:.3g}" for src, (read, n, p) in r["sources"].items()]
        lines.append(f"{r['what']} ({r['tokens']:,} tokens of {r['split']}): passes over each source: "
                     + "; ".join(parts))
    return "\n".join(lines)


def write_passes(folder: Path, stage: str, records: list[dict]) -> None:
    """folder/passes.json, and the lines in the stage's log."""
    from ..checkpoint import atomic_write_json

    atomic_write_json(folder / "passes.json", records)
    for line in passes_lines(records).splitlines():
        print(f"[{stage}] {line}")
