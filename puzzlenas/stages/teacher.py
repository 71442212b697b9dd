"""teacher: the parent writes a corpus (data.sources' teacher:TOKENS), joined to train and validation.

Runs only when data.sources names a teacher source. The parent samples text from diverse seeds
(data/teacher.py: openings of training documents, topics x text kinds, unconditional samples and,
for instruct parents, chat answers through its chat template) on the fast generation path. The
shards are cached under the data cache folder (data.cache_dir, `teacher-<key>/`) by a key over the
parent's weights, the prompts and the sampling settings: a second run, from any run directory,
reuses them, and a killed generation resumes at its first missing shard.

Output: teacher/rows.safetensors (int32 `train` and `validation` rows of data.seq_len tokens),
meta.json, table.txt. `common.load_data` appends the train rows to the corpus' train split and
interleaves the held-out rows (`teacher.validation_fraction` of the samples, chosen by a hash of
their index) with the validation split, so BLD, the replace-1-block scores, candidate selection and
GKD train and measure on teacher text too. The test split (eval) never holds teacher text.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import data
from .base import RunDir, Stage

if TYPE_CHECKING:
    from ..config import RunConfig


def teacher_spec(cfg: RunConfig) -> str | None:
    """The run's `teacher:...` source, or None (torch-free: decides whether the stage runs)."""
    from ..data.specs import parse_source

    specs = [parse_source(s).spec for s in cfg.data.sources if parse_source(s).kind == "teacher"]
    if len(specs) > 1:
        raise ValueError(f"data.sources has {len(specs)} teacher sources {specs}; give one, e.g. 'teacher:1M'")
    return specs[0] if specs else None


STAGE = Stage("teacher", config=("teacher",), upstream=(data.STAGE,), when=lambda cfg: teacher_spec(cfg) is not None,
              unasked="no teacher source in data.sources (e.g. teacher:1M)", all_ranks=True)


def held_out(index: int, seed: int, fraction: float) -> bool:
    """Whether teacher sample `index` is held out for validation: a hash of (seed, index), so the
    choice of a sample never changes when the corpus is extended with more shards."""
    u = int.from_bytes(hashlib.sha1(f"teacher-validation/{seed}/{index}".encode()).digest()[:8], "big") / 2.0 ** 64
    return u < fraction


def pick_generate(engine: str):
    """The generation function of `teacher.engine` (auto: the fast path, on CUDA and on the CPU)."""
    from ..data.teacher import fast_generate_batch, generate_batch

    return generate_batch if engine == "static" else fast_generate_batch


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Generate (or read from the cache) the teacher corpus; write its rows into teacher/. Under
    torchrun every rank generates its share of the shards on its own GPU (data/teacher.py:
    generate_teacher_corpus); rank 0 alone writes teacher/."""
    return write_corpus(cfg, run_dir)


def write_corpus(cfg: RunConfig, run_dir: Path) -> Path:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from ..checkpoint import atomic_save_tensors, atomic_write_json, atomic_write_text
    from ..data.teacher import TeacherConfig, generate_teacher_corpus, pack_samples, resolve_teacher_tokens
    from ..dist import distributed_rank
    from .common import load_data, load_parent_for

    paths = RunDir(run_dir)
    out = run_dir / STAGE.name
    rank, world = distributed_rank()
    section = cfg.teacher
    spec = teacher_spec(cfg)
    corpus_data = load_data(cfg, run_dir, teacher=False)
    wanted = resolve_teacher_tokens(spec, corpus_data.num_tokens("train"))  # train tokens asked for
    total = int(np.ceil(wanted / (1.0 - section.validation_fraction)))  # plus the held-out share
    settings = {k: v for k, v in asdict(section).items() if k not in ("engine", "validation_fraction", "train_share")}
    teacher_cfg = TeacherConfig(tokens=total, **settings)
    parent = load_parent_for(cfg, run_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths.parent)
    generate = pick_generate(section.engine)
    started = time.time()
    corpus = generate_teacher_corpus(parent, tokenizer, teacher_cfg, Path(cfg.data.cache_dir).expanduser(),
                                     data_cfg=cfg.data, log=lambda m: print(f"[teacher] {m}"), generate=generate,
                                     rank=rank, world=world)
    seconds = time.time() - started
    del parent
    if rank != 0:  # rank 0 writes teacher/; the pipeline's barrier holds the others until it has
        return out
    out.mkdir(parents=True, exist_ok=True)
    val_idx = [i for i in range(len(corpus.samples)) if held_out(i, section.seed, section.validation_fraction)]
    val_set = set(val_idx)
    train_samples = [s for i, s in enumerate(corpus.samples) if i not in val_set]
    val_samples = [corpus.samples[i] for i in val_idx]
    eos = int(tokenizer.eos_token_id)
    seq_len = corpus_data.seq_len
    train_rows = pack_samples(train_samples, seq_len, eos)  # (N, seq_len)
    val_tokens = sum(len(s) + 1 for s in val_samples)
    val_rows = pack_samples(val_samples, seq_len, eos) if val_tokens >= seq_len else \
        np.zeros((0, seq_len), np.int32)
    atomic_save_tensors({"train": torch.from_numpy(train_rows), "validation": torch.from_numpy(val_rows)},
                        out / "rows.safetensors")
    kinds = {k: v for k, v in corpus.meta["kinds"].items() if v}
    meta = {**corpus.meta, "spec": spec, "train_tokens_asked": wanted, "seq_len": seq_len, "seconds": round(seconds, 1),
            "train_rows": int(train_rows.shape[0]), "validation_rows": int(val_rows.shape[0]),
            "train_samples": len(train_samples), "validation_samples": len(val_samples),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "engine": getattr(generate, "__name__", str(generate)), "cache": str(corpus.path)}
    atomic_write_json(out / "meta.json", meta)
    table = teacher_table(meta, kinds)
    atomic_write_text(out / "table.txt", table + "\n")
    print(table)
    STAGE.mark_done(cfg, run_dir, tokens=corpus.tokens, train_rows=int(train_rows.shape[0]),
                    validation_rows=int(val_rows.shape[0]))
    return out


def teacher_table(meta: dict, kinds: dict) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in sorted(meta["drops"].items())) or "none"
    return "\n".join([
        f"teacher corpus ({meta['spec']}): {meta['tokens']:,} tokens in {meta['samples']:,} samples "
        f"({meta['shards']} shards, {meta['shards_reused']} reused from {meta['cache']})",
        f"  seed kinds: {', '.join(f'{k} {v}' for k, v in kinds.items())}; dropped: {drops}",
        f"  rows of {meta.get('seq_len', '')}: train {meta['train_rows']:,} ({meta['train_samples']:,} samples), "
        f"validation {meta['validation_rows']:,} ({meta['validation_samples']:,} samples); test none",
        f"  generation: {meta['generated_tokens_per_s']:,.0f} generated tokens/s over {meta['generate_seconds']:.1f} s "
        f"of new shards ({meta['engine']}); stage {meta['seconds']:.1f} s",
    ])
