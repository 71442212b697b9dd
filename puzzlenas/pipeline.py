"""The pipeline: a chain of stages, each writing one folder of the run directory.

Each stage's `run(cfg, run_dir) -> Path` writes its folder and finishes with a `DONE` marker
holding the hash of the config fields it depends on; a stage whose marker matches is
skipped, so a killed run resumes at the first unfinished stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from .checkpoint import atomic_write_json, atomic_write_text
from .config import RunConfig, config_hash, dump_yaml, load_run_config
from .dist import resolve_device

Stage = Callable[[RunConfig, Path], Path]


def stage_done(stage_dir: Path, fingerprint: str) -> bool:
    marker = stage_dir / "DONE"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("config_hash") == fingerprint
    except json.JSONDecodeError:
        return False


def mark_done(stage_dir: Path, fingerprint: str, **info) -> None:
    atomic_write_json(stage_dir / "DONE", {"config_hash": fingerprint,
                                           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info})


def skip_if_done(stage: str, out: Path, fingerprint: str, table: str | None = None) -> bool:
    """True (after saying so, and printing the stage's table) when `out` is finished for this config."""
    if not stage_done(out, fingerprint):
        return False
    print(f"[{stage}] done already: {out}")
    if table and (out / table).is_file():
        print((out / table).read_text(), end="")
    return True


# ---- stage: parent ----------------------------------------------------------------------------
def parent_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"parent": cfg.parent, "parent_dtype": cfg.parent_dtype})


def run_parent(cfg: RunConfig, run_dir: Path) -> Path:
    """Convert the parent into `run_dir/parent` (Nemotron-NAS layout, all-parent blocks)."""
    import shutil

    import torch

    from .model.info import architecture_table
    from .model.modeling import DeciLMConfig
    from .model.parent import convert_parent

    out = run_dir / "parent"
    fingerprint = parent_fingerprint(cfg)
    if stage_done(out, fingerprint):
        print(f"[parent] done already: {out}")
    else:
        if out.exists():
            shutil.rmtree(out)  # a half-written conversion: redo it, it is one step
        tmp = run_dir / "parent.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        convert_parent(cfg.parent, tmp, getattr(torch, cfg.parent_dtype))
        table = architecture_table(DeciLMConfig.from_pretrained(tmp))
        (tmp / "architecture.txt").write_text(table + "\n")
        mark_done(tmp, fingerprint, parent=cfg.parent)
        tmp.rename(out)
    print((out / "architecture.txt").read_text(), end="")
    return out


# ---- stage: data ------------------------------------------------------------------------------
def data_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"parent": parent_fingerprint(cfg), "data": cfg.data})


def load_data(cfg: RunConfig, run_dir: Path, verbose: bool = False):
    """The packed dataset of this run (built by the data stage, cached in run_dir/data)."""
    from transformers import AutoTokenizer

    from .data.config import DEFAULT_CACHE_DIR
    from .data.corpus import build_dataset

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "parent")
    cache = run_dir / "data" if Path(cfg.data.cache_dir) == Path(DEFAULT_CACHE_DIR) else cfg.data.cache_dir
    return build_dataset(cfg.data, tokenizer, cache_dir=cache, verbose=verbose)


def run_data(cfg: RunConfig, run_dir: Path) -> Path:
    """Tokenize and pack the corpus into train / validation / test rows (split by document)."""
    out = run_dir / "data"
    fingerprint = data_fingerprint(cfg)
    if skip_if_done("data", out, fingerprint):
        return out
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_data(cfg, run_dir, verbose=True)
    mark_done(out, fingerprint, tokens={s: dataset.num_tokens(s) for s in ("train", "validation", "test")})
    return out


# ---- stage: library ---------------------------------------------------------------------------
def library_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"data": data_fingerprint(cfg), "library": cfg.library, "seed": cfg.seed})


def run_library(cfg: RunConfig, run_dir: Path) -> Path:
    """The search space per layer and the calibration statistics that initialize it."""
    from safetensors.torch import save_file

    from .data.batches import token_batches
    from .library import calibration_statistics, search_space, space_table, write_space
    from .model.parent import load_parent

    out = run_dir / "library"
    fingerprint = library_fingerprint(cfg)
    if skip_if_done("library", out, fingerprint, "space.txt"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch

    parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype)).to(resolve_device(cfg.device))
    space = search_space(parent.config, cfg.library)
    dataset = load_data(cfg, run_dir)
    batches = token_batches(dataset.train, cfg.library.calibration_batch_size, cfg.library.calibration_tokens,
                            seed=cfg.seed)
    started = time.time()
    stats = calibration_statistics(parent, batches, cfg.library)
    save_file(stats, str(out / "calibration.safetensors"))
    write_space(out / "space.json", space)
    table = space_table(space)
    atomic_write_text(out / "space.txt", table + "\n")
    print(table)
    mark_done(out, fingerprint, calibration_tokens=batches.tokens_served,
              calibration_seconds=round(time.time() - started, 1))
    return out


# ---- stage: bld -------------------------------------------------------------------------------
def bld_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"library": library_fingerprint(cfg), "bld": cfg.bld})


def run_bld(cfg: RunConfig, run_dir: Path) -> Path:
    """Blockwise local distillation of every library variant (split over torchrun ranks)."""
    import torch
    from safetensors.torch import load_file

    from .dist import barrier, distributed_rank
    from .bld import BLDTrainer, collect_metrics, coupled_jobs, decoupled_jobs, library_table, run_jobs
    from .checkpoint import reset_if_stale
    from .data.batches import token_batches
    from .library import read_space
    from .model.parent import load_parent

    out = run_dir / "bld"
    fingerprint = bld_fingerprint(cfg)
    if skip_if_done("bld", out, fingerprint, "table.txt"):
        return out
    rank, world = distributed_rank()
    if rank == 0:
        reset_if_stale(out, fingerprint)
    barrier(world)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype)).to(device)
    parent.requires_grad_(False)
    stats = load_file(str(run_dir / "library" / "calibration.safetensors"))
    space = read_space(run_dir / "library" / "space.json")
    dataset = load_data(cfg, run_dir)
    layers = cfg.bld.layers if cfg.bld.layers is not None else list(range(len(space)))
    bad = [i for i in layers if not 0 <= i < len(space)]
    if bad:
        raise ValueError(f"bld.layers {bad} out of range: the parent has {len(space)} layers (0..{len(space) - 1})")
    train = token_batches(dataset.train, cfg.bld.batch_size, max(cfg.bld.tokens, 1), seed=cfg.seed)
    val = validation_batches(dataset, cfg.bld.validation_tokens, cfg.bld.batch_size)
    trainer = BLDTrainer(parent, stats, cfg.library, cfg.bld, out, dataset.seq_len, seed=cfg.seed)
    counts = _variant_param_counts(parent.config, space)
    if cfg.bld.mode in ("decoupled", "hybrid"):
        run_jobs(trainer, decoupled_jobs(space, layers), train, val, rank, world, counts)
        barrier(world)  # hybrid: coupled jobs start from every rank's decoupled results
    if cfg.bld.mode in ("coupled", "hybrid"):
        jobs = coupled_jobs(space, layers, cfg.bld.coupled_pairs, from_decoupled=cfg.bld.mode == "hybrid")
        run_jobs(trainer, jobs, train, val, rank, world, counts)
    barrier(world)
    if rank == 0:
        rows = collect_metrics(out)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        table = library_table(rows)
        atomic_write_text(out / "table.txt", table + "\n")
        print(table)
        mark_done(out, fingerprint, jobs=len(rows), world_size=world)
    barrier(world)
    return out


# ---- stage: scores ----------------------------------------------------------------------------
def scores_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"bld": bld_fingerprint(cfg), "scoring": cfg.scoring})


def validation_batches(dataset, tokens: int, batch_size: int, split: str = "validation") -> list:
    """The first `tokens` of a split (whole rows), in order, as (B, T) batches."""
    import torch

    rows = dataset.split(split)[: max(1, -(-tokens // dataset.seq_len))]
    if len(rows) == 0:
        raise ValueError(f"the {split} split is empty: add data or raise data.{split}_fraction")
    return [torch.from_numpy(rows[k:k + batch_size].astype("int64")) for k in range(0, len(rows), batch_size)]


def run_scores(cfg: RunConfig, run_dir: Path) -> Path:
    """Replace-1-block KL and LM loss of every trained library item (split over ranks)."""
    import torch

    from .bld import finished_jobs
    from .dist import barrier, distributed_rank
    from .library import read_space
    from .model.parent import load_parent
    from .scoring import score_items, scores_table, split_items

    out = run_dir / "scores"
    fingerprint = scores_fingerprint(cfg)
    if skip_if_done("scores", out, fingerprint, "table.txt"):
        return out
    rank, world = distributed_rank()
    if rank == 0:
        from .checkpoint import reset_if_stale

        reset_if_stale(out, fingerprint)
    barrier(world)
    device = resolve_device(cfg.device)
    parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype)).to(device)
    parent.requires_grad_(False)
    space = read_space(run_dir / "library" / "space.json")
    items = finished_jobs(run_dir / "bld", space)
    if not items:
        raise ValueError(f"{run_dir / 'bld'} holds no finished library items: run the bld stage first")
    mine = split_items(items, len(space), rank, world)
    batches = validation_batches(load_data(cfg, run_dir), cfg.scoring.tokens, cfg.scoring.batch_size)
    print(f"[scores] rank {rank}/{world}: {len(mine)} of {len(items)} items on {len(batches)} batches")
    results = score_items(parent, run_dir / "bld", mine, batches, cfg.scoring, out / f"progress-rank{rank}.json")
    part = out / f"part-rank{rank}.jsonl"
    atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in results.values()))
    barrier(world)
    if rank == 0:
        rows = [json.loads(line) for p in sorted(out.glob("part-rank*.jsonl")) for line in p.read_text().splitlines()]
        rows.sort(key=lambda r: (r["layer"], r["kind"], r["name"]))
        atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        table = scores_table(rows, "kl") + "\n\n" + scores_table(rows, "lm_loss_delta")
        atomic_write_text(out / "table.txt", table + "\n\n" + scores_table(rows, "kl", per_layer=True) + "\n")
        print(table)
        mark_done(out, fingerprint, items=len(rows), world_size=world)
    barrier(world)
    return out


# ---- stage: costs -----------------------------------------------------------------------------
def costs_fingerprint(cfg: RunConfig) -> str:
    # Costs depend on the shapes of the space and the device, not on the trained weights.
    return config_hash({"parent": parent_fingerprint(cfg), "library": cfg.library, "costs": cfg.costs,
                        "device": cfg.device})


def run_costs(cfg: RunConfig, run_dir: Path) -> Path:
    """Measured prefill / decode cost of every subblock shape, memory, and the whole-model check."""
    from .costs import (calibrate, calibrated_check, check_against_whole_models, costs_table, load_recorded_table,
                        measure_costs, random_children)
    from .library import read_space
    from .model.modeling import DeciLMConfig

    out = run_dir / "costs"
    fingerprint = costs_fingerprint(cfg)
    if skip_if_done("costs", out, fingerprint, "table.txt"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    config = DeciLMConfig.from_pretrained(run_dir / "parent")
    space = read_space(run_dir / "library" / "space.json")
    attention = [v.config for att, _ in space for v in att]
    ffn = [v.config for _, f in space for v in f]
    if cfg.costs.recorded:  # priced elsewhere (or earlier): the check below reports how well it fits here
        table = load_recorded_table(cfg.costs.recorded, attention, ffn, cfg.costs.scenarios)
    else:
        table = measure_costs(config, attention, ffn, cfg.costs, device)
    children = {"parent": config.blocks}
    for k, blocks in enumerate(random_children(space, cfg.costs.check_children, cfg.seed)):
        children[f"random-{k}"] = blocks
    check = check_against_whole_models(config, table, children, cfg.costs, device)
    if cfg.costs.calibrate and not cfg.costs.recorded:
        calibrate(table, check, cfg.costs.scenarios)
        check = calibrated_check(table, check, children)
    atomic_write_json(out / "costs.json", table)
    atomic_write_json(out / "check.json", check)
    text = costs_table(table, check)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    mark_done(out, fingerprint, device=table["device"].get("name"))
    return out


# ---- stage: search ----------------------------------------------------------------------------
def search_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"scores": scores_fingerprint(cfg), "costs": costs_fingerprint(cfg), "search": cfg.search})


def run_search_stage(cfg: RunConfig, run_dir: Path) -> Path:
    """The MIP of METHOD.md section 6 for every target; solutions saved as block_configs."""
    from .model.modeling import DeciLMConfig
    from .search import run_search, search_table

    out = run_dir / "search"
    fingerprint = search_fingerprint(cfg)
    if skip_if_done("search", out, fingerprint, "table.txt"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = DeciLMConfig.from_pretrained(run_dir / "parent")
    scores = [json.loads(line) for line in (run_dir / "scores" / "scores.jsonl").read_text().splitlines()]
    table = json.loads((run_dir / "costs" / "costs.json").read_text())
    records, front = run_search(scores, table, config.blocks, cfg.search, cfg.scoring.objective, cfg.costs.dtype,
                                config.num_attention_heads, config.hidden_size, seed=cfg.seed)
    records, scored = select_by_realized_kl(cfg, run_dir, records)
    atomic_write_text(out / "solutions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(out / "frontier.json", front)
    text = search_table(records, front)
    if scored:
        from .selection import candidates_table

        atomic_write_text(out / "candidates.jsonl", "".join(json.dumps(r) + "\n" for r in scored))
        text += "\n" + candidates_table(scored)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    mark_done(out, fingerprint, solutions=len(records))
    return out


def select_by_realized_kl(cfg: RunConfig, run_dir: Path, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Targets with candidates: each candidate assembled and scored, the best kept (`selection.py`)."""
    if not any("candidate" in r for r in records):
        return records, []
    import torch

    from .library import read_space
    from .model.parent import load_parent
    from .selection import select_candidates

    parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype)).to(resolve_device(cfg.device))
    batches = validation_batches(load_data(cfg, run_dir), cfg.search.select_tokens, cfg.search.select_batch_size)
    space = read_space(run_dir / "library" / "space.json")
    return select_candidates(records, parent.eval(), run_dir / "bld", space, batches, cfg.eval.logits_chunk)


# ---- stage: peers -----------------------------------------------------------------------------
def peers_fingerprint(cfg: RunConfig) -> str:
    # What the peers' architectures depend on: scores, costs and the targets' budgets (not how many
    # solutions or candidates Puzzle's search keeps), so tuning the search never redoes the peers' GKD.
    import dataclasses

    budgets = [{k: v for k, v in dataclasses.asdict(t).items() if k not in ("solutions", "candidates")}
               for t in cfg.search.targets]
    return config_hash({"scores": scores_fingerprint(cfg), "costs": costs_fingerprint(cfg), "targets": budgets,
                        "time_margin": cfg.search.time_margin, "peers": cfg.peers})


def run_peers(cfg: RunConfig, run_dir: Path) -> Path:
    """ShortGPT / Minitron-width / uniform-KV children at every search target (peers.methods)."""
    import torch

    from .library import read_space
    from .model.modeling import DeciLMConfig
    from .model.parent import load_parent
    from .peers import block_influence, build_peers, peers_table

    out = run_dir / "peers"
    if not cfg.peers.methods:
        print("[peers] none asked (peers.methods: shortgpt, minitron_width, uniform_kv)")
        return out
    fingerprint = peers_fingerprint(cfg)
    if skip_if_done("peers", out, fingerprint, "table.txt"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = DeciLMConfig.from_pretrained(run_dir / "parent")
    influence = None
    if "shortgpt" in cfg.peers.methods:
        parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype)).to(resolve_device(cfg.device))
        batches = validation_batches(load_data(cfg, run_dir), cfg.peers.tokens, cfg.peers.batch_size)
        influence = block_influence(parent.eval(), batches)
        atomic_write_json(out / "block_influence.json", {"block_influence": influence,
                                                         "tokens": sum(b.numel() for b in batches)})
        del parent
    scores = [json.loads(line) for line in (run_dir / "scores" / "scores.jsonl").read_text().splitlines()]
    table = json.loads((run_dir / "costs" / "costs.json").read_text())
    records, unreachable = build_peers(scores, table, config.blocks, read_space(run_dir / "library" / "space.json"),
                                       cfg.search, cfg.peers.methods, influence, cfg.scoring.objective,
                                       cfg.costs.dtype, config.num_attention_heads, config.hidden_size)
    atomic_write_text(out / "solutions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_json(out / "unreachable.json", unreachable)
    text = peers_table(records, unreachable)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    mark_done(out, fingerprint, peers=len(records), unreachable=len(unreachable))
    return out


# ---- stage: assemble --------------------------------------------------------------------------
def solutions(run_dir: Path, cfg: RunConfig) -> list[dict]:
    """Puzzle's solutions, then the peers' (when peers.methods asks for them)."""
    records = _read_jsonl(run_dir / "search" / "solutions.jsonl", "search")
    peers = run_dir / "peers" / "solutions.jsonl"
    if cfg.peers.methods and peers.is_file():
        records += _read_jsonl(peers, "peers")
    return records


def _read_jsonl(path: Path, stage: str) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is missing or corrupted ({err}); rerun its stage: --force {stage}") from err


def solution_fingerprint(cfg: RunConfig, record: dict) -> str:
    """What a child depends on: the search for Puzzle's children, the peers stage for a peer's."""
    return peers_fingerprint(cfg) if record.get("peer") else search_fingerprint(cfg)


def run_assemble(cfg: RunConfig, run_dir: Path) -> Path:
    """Each search solution + the trained library -> child-<name>/ (Nemotron-NAS checkpoint)."""
    import shutil

    import torch

    from .assemble import assemble_child, pairs_from_record
    from .model.info import architecture_table
    from .library import read_space
    from .model.parent import copy_tokenizer_files, load_parent
    from .search import speedup_text

    def fingerprint(record: dict) -> str:
        return config_hash({"search": solution_fingerprint(cfg, record)})

    records = solutions(run_dir, cfg)
    todo = [r for r in records if not stage_done(run_dir / f"child-{r['name']}", fingerprint(r))]
    if not todo:
        print(f"[assemble] done already: {len(records)} children")
        return run_dir
    parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype))
    space = read_space(run_dir / "library" / "space.json")
    for record in todo:
        out = run_dir / f"child-{record['name']}"
        tmp = run_dir / f"child-{record['name']}.tmp"
        for d in (out, tmp):
            if d.exists():
                shutil.rmtree(d)
        child = assemble_child(parent, run_dir / "bld", pairs_from_record(record, space), tmp)
        copy_tokenizer_files(run_dir / "parent", tmp)
        table = architecture_table(child.config)
        (tmp / "architecture.txt").write_text(table + "\n")
        atomic_write_json(tmp / "solution.json", record)
        mark_done(tmp, fingerprint(record), target=record["target"])
        tmp.rename(out)
        print(f"[assemble] {out.name}: predicted speedup {speedup_text(record['predicted_speedup'])}")
        print(table)
    return run_dir


# ---- stage: gkd -------------------------------------------------------------------------------
def run_gkd(cfg: RunConfig, run_dir: Path) -> Path:
    """Global distillation of every assembled child -> gkd-<name>/."""
    import shutil

    import torch

    from .dist import distributed_rank
    from .data.batches import token_batches
    from .gkd import GKDTrainer, parallelize
    from .model.modeling import DeciLMForCausalLM
    from .model.parent import copy_tokenizer_files, load_parent

    def fingerprint(record: dict) -> str:
        return config_hash({"search": solution_fingerprint(cfg, record), "gkd": cfg.gkd, "seed": cfg.seed})

    records = solutions(run_dir, cfg)
    todo = [r for r in records if not stage_done(run_dir / f"gkd-{r['name']}", fingerprint(r))]
    if not todo:
        print(f"[gkd] done already: {len(records)} children")
        return run_dir
    rank, world = distributed_rank()
    device = resolve_device(cfg.device)
    parent = load_parent(run_dir / "parent", getattr(torch, cfg.parent_dtype)).to(device)
    parent.requires_grad_(False)
    dataset = load_data(cfg, run_dir)
    chat_rows = gkd_chat_rows(cfg, run_dir, parent, dataset.seq_len, rank, world) if cfg.gkd.chat_fraction else None
    for record in todo:
        out = run_dir / f"gkd-{record['name']}"
        work = run_dir / f"gkd-{record['name']}.work"  # checkpoints live here until the child is done
        if out.exists():
            shutil.rmtree(out)
        child = DeciLMForCausalLM.from_pretrained(run_dir / f"child-{record['name']}", dtype=torch.float32).to(device)
        if world > 1:
            parallelize(child, parent)
        gkd_cfg = child_gkd_config(cfg, record)
        batches = token_batches(dataset.train, gkd_cfg.batch_size, max(gkd_cfg.tokens, 1), seed=cfg.seed + 1,
                                rank=rank, world_size=world)
        if chat_rows is not None:
            from .data.chat import MixedBatches

            batches = MixedBatches(batches, chat_rows, gkd_cfg.chat_fraction, seed=cfg.seed + 2 + rank)
        trainer = GKDTrainer(child, parent, gkd_cfg, work, dataset.seq_len, world_size=world)
        print(f"[gkd] {record['name']}: {trainer.steps} steps of {cfg.gkd.batch_size}x{dataset.seq_len} tokens"
              f"{f' x {world} ranks' if world > 1 else ''}")
        val = validation_batches(dataset, cfg.gkd.validation_tokens, cfg.gkd.batch_size)
        before = trainer.validation_loss(val)
        steps = trainer.train(batches)
        after = trainer.validation_loss(val)
        print(f"[gkd] {record['name']}: validation loss {before['loss']:.4f} -> {after['loss']:.4f} "
              f"(KL {before['kl']:.4f} -> {after['kl']:.4f}, cosine {before['cosine']:.4f} -> {after['cosine']:.4f})")
        history = {"validation_before": before, "validation_after": after, "steps": steps,
                   "tokens": trainer.steps * gkd_cfg.batch_size * dataset.seq_len * world}
        from .train import full_model_state

        state = full_model_state(child)  # a collective with several ranks: every rank calls it
        if rank == 0:
            final = DeciLMForCausalLM(child.config) if world > 1 else child
            if world > 1:
                final.load_state_dict(state)
            tmp = run_dir / f"gkd-{record['name']}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            final.to(getattr(torch, cfg.parent_dtype)).save_pretrained(tmp)
            copy_tokenizer_files(run_dir / "parent", tmp)
            atomic_write_json(tmp / "history.json", history)
            mark_done(tmp, fingerprint(record), steps=trainer.steps)
            tmp.rename(out)
            trainer.clear_checkpoint()
            if work.exists():
                shutil.rmtree(work)
        from .dist import barrier

        barrier(world)
    return run_dir


def child_gkd_config(cfg: RunConfig, record: dict):
    """The GKD settings of one child: the run's, except that a ShortGPT peer (no BLD-trained block)
    also gets the BLD's tokens when peers.equal_tokens, so every child has seen as many tokens."""
    import dataclasses

    if record.get("peer") == "shortgpt" and cfg.peers.equal_tokens:
        return dataclasses.replace(cfg.gkd, tokens=cfg.gkd.tokens + cfg.bld.tokens)
    return cfg.gkd


def gkd_chat_rows(cfg: RunConfig, run_dir: Path, parent, seq_len: int, rank: int, world: int):
    """The parent's chat transcripts packed into rows (written once by rank 0, cached)."""
    from transformers import AutoTokenizer

    from .dist import barrier
    from .data.chat import chat_requests, load_or_build_chat_rows, pack_transcripts, parent_transcripts

    g = cfg.gkd
    fingerprint = config_hash({"parent": parent_fingerprint(cfg), "data": cfg.data, "seed": cfg.seed,
                               "chat": [g.chat_requests, g.chat_max_new_tokens, g.chat_temperature]})
    path = run_dir / "gkd-chat" / "rows.safetensors"
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "parent")

    def build():
        started = time.time()
        requests = chat_requests(cfg.data, g.chat_requests, cfg.seed)
        transcripts = parent_transcripts(parent.eval(), tokenizer, requests, g.chat_max_new_tokens,
                                         g.chat_temperature, g.chat_batch_size, cfg.seed)
        rows = pack_transcripts(transcripts, seq_len, tokenizer.eos_token_id)
        print(f"[gkd] chat transcripts: {len(transcripts)} written by the parent, {rows.size:,} tokens, "
              f"{time.time() - started:.1f} s")
        return rows

    if rank == 0:
        rows = load_or_build_chat_rows(path, fingerprint, build)
    barrier(world)
    if rank != 0:
        rows = load_or_build_chat_rows(path, fingerprint, build)
    return rows


# ---- stage: eval ------------------------------------------------------------------------------
def eval_fingerprint(cfg: RunConfig) -> str:
    parts = {"search": search_fingerprint(cfg), "gkd": cfg.gkd, "eval": cfg.eval, "costs": cfg.costs}
    if cfg.peers.methods:  # only then, so that runs without peers keep their fingerprint
        parts["peers"] = peers_fingerprint(cfg)
    return config_hash(parts)


def run_eval(cfg: RunConfig, run_dir: Path) -> Path:
    """Perplexity, KL, agreement, downstream tasks and throughput of the parent and every child;
    speedups against the parent measured in the same process."""
    import torch

    from .eval.metrics import retention

    out = run_dir / "eval"
    fingerprint = eval_fingerprint(cfg)
    if skip_if_done("eval", out, fingerprint, "table.txt"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.parent_dtype)
    names = ["parent"] + [f"{kind}-{r['name']}" for r in solutions(run_dir, cfg) for kind in ("child", "gkd")]
    names = [n for n in names if (run_dir / n / "config.json").is_file()]
    # Each model's results are kept in eval/models/<name>.json under a fingerprint of the model, the
    # eval settings and the device, so that adding children (peers) evaluates only the new ones.
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    model_fp = {n: config_hash({"model": _done_hash(run_dir / n), "eval": cfg.eval, "costs": cfg.costs,
                                "device": device_name, "parent": _done_hash(run_dir / "parent"),
                                "data": data_fingerprint(cfg)})  # the test split the metrics are on
                for n in names}
    results, session_parent = {}, {}
    for n in names:
        cached = _read_json(out / "models" / f"{n}.json")
        if cached and cached.get("fingerprint") == model_fp[n]:
            results[n], session_parent[n] = cached["result"], cached.get("parent_throughput")
    todo = [n for n in names if n not in results]
    if todo:
        kept = len(names) - len(todo)
        todo = ["parent"] + [n for n in todo if n != "parent"]  # speedups: the parent measured in the same process
        print(f"[eval] {len(todo)} of {len(names)} models to evaluate ({kept} kept from eval/models)")

        def keep(n: str, r: dict, parent_result: dict) -> None:  # after each model: a killed eval resumes
            results[n], session_parent[n] = r, parent_result.get("throughput")
            atomic_write_json(out / "models" / f"{n}.json", {"fingerprint": model_fp[n], "result": r,
                                                              "parent_throughput": session_parent[n]})

        (out / "models").mkdir(exist_ok=True)
        evaluate_models(cfg, run_dir, todo, device, dtype, keep)
    results = {n: results[n] for n in names}
    for n in results:
        if n != "parent":
            results[n]["retention"] = retention(results[n], results["parent"])
            base = session_parent.get(n)
            if cfg.eval.throughput and base:
                results[n]["speedup"] = {
                    s: {k: base[s][k] / results[n]["throughput"][s][k]
                        for k in ("decode_step_s", "prefill_s", "generate_s")}
                    for s in results[n]["throughput"]}
    atomic_write_json(out / "results.json", results)
    text = eval_table(results)
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    mark_done(out, fingerprint, models=len(results))
    return out


def evaluate_models(cfg: RunConfig, run_dir: Path, names: list[str], device, dtype,
                    keep: Callable[[str, dict, dict], None]) -> None:
    """Metrics, tasks, samples, sizes and throughput of each named model (names[0] is the parent);
    keep(name, result, parent's result) after each."""
    import torch
    from transformers import AutoTokenizer

    from .costs import Scenario
    from .eval.metrics import final_hidden, lm_metrics, sample_completions
    from .model.inference import measure_generation
    from .model.info import count_model_params, layer_costs
    from .model.modeling import DeciLMForCausalLM

    batches = validation_batches(load_data(cfg, run_dir), cfg.eval.tokens, cfg.eval.batch_size, split="test")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "parent")
    throughput_dtype = getattr(torch, cfg.costs.dtype)
    parent = DeciLMForCausalLM.from_pretrained(run_dir / "parent", dtype=dtype).to(device).eval()
    parent_hidden = [final_hidden(parent, b.to(device)) for b in batches]  # (B, T, C) each, computed once
    results = {}
    for n in names:  # one child on the device at a time, next to the parent (large parents fit)
        model = parent if n == "parent" else \
            DeciLMForCausalLM.from_pretrained(run_dir / n, dtype=dtype).to(device).eval()
        results[n] = lm_metrics({n: model}, parent, batches, cfg.eval.logits_chunk, parent_hidden)[n]
        if cfg.eval.tasks:
            from .eval.tasks import evaluate_tasks

            results[n]["tasks"] = evaluate_tasks(model, tokenizer, cfg.eval.tasks, max_examples=cfg.eval.max_examples,
                                                 batch_size=cfg.eval.batch_size, device=device)
        results[n]["samples"] = sample_completions(model, tokenizer, cfg.eval)
        results[n]["params"] = count_model_params(model)
        results[n]["kv_bytes_per_token"] = sum(c.kv_cache_bytes_per_token for c in layer_costs(model.config,
                                                                                                cfg.costs.dtype))
        if cfg.eval.throughput:
            model.to(throughput_dtype)
            results[n]["throughput"] = {}
            for s in cfg.costs.scenarios:
                s = s if isinstance(s, Scenario) else Scenario(**s)
                results[n]["throughput"][s.name] = measure_generation(
                    model, s.batch_size, s.prompt_tokens, s.generate_tokens, iters=cfg.eval.throughput_iters)
            model.to(dtype)
        if model is not parent:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[eval] {n}: perplexity {results[n]['perplexity']:.2f}, KL {results[n]['kl_to_parent']:.4f}")
        keep(n, results[n], results["parent"])


def _done_hash(stage_dir: Path) -> str | None:
    return (_read_json(stage_dir / "DONE") or {}).get("config_hash")


def _read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or corrupted (then it is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def eval_table(results: dict) -> str:
    tasks = sorted({t for r in results.values() for t in r.get("tasks", {})})
    w = max([22, *map(len, results)])
    head = f"{'model':<{w}} {'params':>10} {'KV B/tok':>8} {'ppl':>8} {'KL':>7} {'agree':>6} " + \
        " ".join(f"{t[:14]:>14}" for t in tasks) + \
        f" {'decode tok/s':>12} {'peak GiB':>8} {'decode x':>8} {'retention':>9}"
    lines = [head]
    for n, r in results.items():
        speed = next(iter(r.get("speedup", {}).values()), {}).get("decode_step_s") if n != "parent" else 1.0
        ret = r.get("retention", {}).get("tasks_mean", 1.0 if n == "parent" else None)
        run = next(iter(r.get("throughput", {}).values()), {})  # the first scenario's generation benchmark
        tok_s, peak = run.get("decode_tokens_per_s"), run.get("peak_memory_bytes")
        lines.append(f"{n:<{w}} {r['params'] / 1e6:>9.1f}M {r['kv_bytes_per_token']:>8} {r['perplexity']:>8.2f} "
                     f"{r['kl_to_parent']:>7.4f} {r['top1_agreement']:>6.3f} "
                     + " ".join(f"{r.get('tasks', {}).get(t, {}).get('acc', float('nan')):>14.3f}" for t in tasks)
                     + f" {(f'{tok_s:,.0f}' if tok_s else '-'):>12} {(f'{peak / 2**30:.2f}' if peak else '-'):>8}"
                     + f" {(f'{speed:.2f}x' if speed else '-'):>8} {(f'{ret:.3f}' if ret is not None else '-'):>9}")
    lines.append("ppl / KL / agree: test split; task columns: accuracy; decode tok/s, peak GiB (CUDA only: weights + "
                 "KV cache + work space) and decode x (decode-step speedup over the parent): the generation "
                 "benchmark of the first scenario; retention: mean task-accuracy ratio child / parent")
    parent_tasks = results.get("parent", {}).get("tasks", {})
    if parent_tasks:  # how far apart two models' accuracies must be to mean something
        lines.append("task examples and the parent's standard error: " + ", ".join(
            f"{t} {r['n']} (+-{r['acc_stderr']:.3f})" for t, r in sorted(parent_tasks.items())
            if "n" in r and "acc_stderr" in r))
    return "\n".join(lines)


# ---- stage: report ----------------------------------------------------------------------------
def run_report(cfg: RunConfig, run_dir: Path) -> Path:
    """report/README.md with the frontier and per-layer plots and the parent-vs-children table."""
    from .eval.report import write_report

    out = run_dir / "report"
    fingerprint = config_hash({"eval": eval_fingerprint(cfg)})
    if skip_if_done("report", out, fingerprint):
        return out
    unreachable = run_dir / "peers" / "unreachable.json"
    path = write_report(run_dir, out, solutions(run_dir, cfg),
                        json.loads(unreachable.read_text()) if cfg.peers.methods and unreachable.is_file() else [],
                        frontier_key(cfg, run_dir))
    mark_done(out, fingerprint)
    print(f"[report] {path}")
    return out




def frontier_key(cfg: RunConfig, run_dir: Path) -> str | None:
    """The cost key the search's frontier was swept on: the first target's metric and scenario."""
    from .search import scenario_names, scenario_of

    if not cfg.search.targets:
        return None
    target = cfg.search.targets[0]
    table = json.loads((run_dir / "costs" / "costs.json").read_text())
    return f"{target.metric}_s/{scenario_of(table, scenario_names(target)[0])['name']}"


def _variant_param_counts(config, space) -> dict[str, int]:
    from .model.blocks import AttentionConfig, BlockConfig, FFNConfig
    from .model.info import attention_params, ffn_params

    counts = {}
    for attention, ffn in space:
        for v in attention:
            counts[v.name] = attention_params(config, BlockConfig(v.config, FFNConfig("no_op")))
        for v in ffn:
            counts[v.name] = ffn_params(config, BlockConfig(AttentionConfig("no_op"), v.config))
    return counts


STAGES: list[tuple[str, Stage]] = [("parent", run_parent), ("data", run_data), ("library", run_library),
                                   ("bld", run_bld), ("scores", run_scores),
                                   ("costs", run_costs), ("search", run_search_stage), ("peers", run_peers),
                                   ("assemble", run_assemble), ("gkd", run_gkd), ("eval", run_eval),
                                   ("report", run_report)]


def run_pipeline(config_path: str | Path | None, run_dir: Path | None = None, until: str | None = None,
                 force: list[str] = (), overrides: list[str] = ()) -> Path:
    """Run every stage in order, skipping finished ones; return the run directory."""
    import shutil

    cfg = load_run_config(config_path, overrides)
    names = [name for name, _ in STAGES]
    for name in [*force, *([until] if until else [])]:
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    run_dir = Path(run_dir) if run_dir else Path("runs") / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    with log_to(run_dir / "run.log", f"config {config_path or 'default preset'}, overrides {list(overrides)}, "
                                     f"until {until}, force {list(force)}"):
        print(f"puzzlenas run {cfg.name}: parent {cfg.parent} -> {run_dir}")
        for name, stage in STAGES:
            if name in force and (run_dir / name).exists():
                shutil.rmtree(run_dir / name, ignore_errors=True)  # torchrun: every rank removes it, first wins
            started = time.time()
            stage(cfg, run_dir)
            print(f"[{name}] {time.time() - started:.1f} s")
            if name == until:
                break
    return run_dir


class _Tee:
    """A stdout that also appends to a log file (progress bars go to stderr and stay out of it)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def log_to(path: Path, header: str):
    """Everything the run prints, appended to `path` with a dated header per invocation (rank 0
    only under torchrun); an error ends the log with its message."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if path.exists() and path.stat().st_nlink > 1:  # a hard-linked copy of a run: append to our own file
        atomic_write_text(path, path.read_text(encoding="utf-8"))
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} puzzlenas run: {header}\n")
        original = sys.stdout
        sys.stdout = _Tee(original, log)
        try:
            yield
        except BaseException as err:
            log.write(f"==== stopped: {type(err).__name__}: {err}\n")
            raise
        finally:
            sys.stdout = original
