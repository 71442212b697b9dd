"""bld: blockwise local distillation of every library variant (jobs split over torchrun ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import library
from .base import RunDir, Stage
from .common import load_data, load_parent_for, passes, train_batches, validation_batches, write_passes

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("bld", config=("bld",), upstream=(library.STAGE,), all_ranks=True)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Train every (layer, variant) job into bld/layers/; the metrics table when all ranks are done."""
    import torch

    from ..bld import BLDTrainer, collect_metrics, coupled_jobs, decoupled_jobs, library_table, run_jobs
    from ..checkpoint import atomic_write_text, reset_if_stale, write_jsonl
    from ..dist import barrier, distributed_rank
    from ..integrity import load_weights, rerun_hint
    from ..library import read_space

    paths = RunDir(run_dir)
    out = paths.bld
    rank, world = distributed_rank()
    if rank == 0:
        reset_if_stale(out, STAGE.fingerprint(cfg))
    barrier(world)
    torch.manual_seed(cfg.seed)
    parent = load_parent_for(cfg, run_dir, frozen=True)
    stats = load_weights(paths.calibration, rerun_hint(paths.library))
    space = read_space(paths.space)
    dataset = load_data(cfg, run_dir)
    layers = cfg.bld.layers if cfg.bld.layers is not None else list(range(len(space)))
    bad = [i for i in layers if not 0 <= i < len(space)]
    if bad:
        raise ValueError(f"bld.layers {bad} out of range: the parent has {len(space)} layers (0..{len(space) - 1})")
    train = train_batches(cfg, dataset, cfg.bld.batch_size, max(cfg.bld.tokens, 1), seed=cfg.seed)
    val = validation_batches(dataset, cfg.bld.validation_tokens, cfg.bld.batch_size)
    trainer = BLDTrainer(parent, stats, cfg.library, cfg.bld, out, dataset.seq_len, seed=cfg.seed)
    counts = variant_param_counts(parent.config, space)
    if cfg.bld.mode in ("decoupled", "hybrid"):
        run_jobs(trainer, decoupled_jobs(space, layers), train, val, rank, world, counts)
        barrier(world)  # hybrid: coupled jobs start from every rank's decoupled results
    if cfg.bld.mode in ("coupled", "hybrid"):
        jobs = coupled_jobs(space, layers, cfg.bld.coupled_pairs, from_decoupled=cfg.bld.mode == "hybrid")
        run_jobs(trainer, jobs, train, val, rank, world, counts)
    barrier(world)
    if rank == 0:
        rows = collect_metrics(out)
        write_jsonl(out / "metrics.jsonl", rows)
        table = library_table(rows)
        atomic_write_text(out / "table.txt", table + "\n")
        print(table)
        write_passes(out, "bld", [passes(cfg, dataset, "BLD, each variant", cfg.bld.tokens),
                                  passes(cfg, dataset, "BLD validation", cfg.bld.validation_tokens, "validation",
                                         first=True)])
        STAGE.mark_done(cfg, run_dir, jobs=len(rows), world_size=world)
    barrier(world)
    return out


def variant_param_counts(config, space) -> dict[str, int]:
    """Parameters of every variant of the space, by name (for the BLD table)."""
    from ..model.blocks import AttentionConfig, BlockConfig, FFNConfig
    from ..model.info import attention_params, ffn_params

    counts = {}
    for attention, ffn in space:
        for v in attention:
            counts[v.name] = attention_params(config, BlockConfig(v.config, FFNConfig("no_op")))
        for v in ffn:
            counts[v.name] = ffn_params(config, BlockConfig(AttentionConfig("no_op"), v.config))
    return counts
