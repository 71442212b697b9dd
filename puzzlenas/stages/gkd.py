"""gkd: global distillation of every assembled child against the parent -> gkd-<name>/."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import assemble, data, parent
from . import teacher as teacher_stage
from .base import RunDir, Stage, content_id
from .common import load_data, load_parent_for, passes, passes_lines, solutions, train_batches, validation_batches

if TYPE_CHECKING:
    from ..config import RunConfig

STAGE = Stage("gkd", config=("gkd", "seed"), upstream=(assemble.STAGE,), per_child="gkd", table=None,
              all_ranks=True)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Distill every child whose gkd-<name>/ is not finished; checkpoints in gkd-<name>.work/.
    Under torchrun every rank takes part in every child: rank 0 judges which children are left,
    the parent is prepared once for all of them (replicated, or sharded with FSDP2), rank 0
    writes each child."""
    from ..dist import distributed_rank, rank_zero_value, resolve_device
    from ..gkd import choose_parallel, shard_layers
    from ..model.info import total_params
    from ..model.modeling import DeciLMConfig

    records = solutions(run_dir, cfg)
    rank, world = distributed_rank()
    left = rank_zero_value([r["name"] for r in records if STAGE.why_not_done(cfg, run_dir, r)] if rank == 0 else None)
    todo = [r for r in records if r["name"] in left]
    if not todo:
        print(f"[gkd] done already: {len(records)} children")
        return run_dir
    device = resolve_device(cfg.device)
    teacher = load_parent_for(cfg, run_dir, on_device=False, frozen=True)
    largest = max(total_params(DeciLMConfig.from_pretrained(assemble.STAGE.folder(run_dir, r))) for r in todo)
    parent_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    mode = rank_zero_value(choose_parallel(cfg.gkd.parallel, world, largest, parent_bytes, device))
    if world > 1:
        print(f"[gkd] {world} ranks, {'children replicated (data parallel)' if mode == 'ddp' else 'FSDP2'}: "
              f"largest child {largest / 1e6:,.1f}M parameters, parent {parent_bytes / 2**30:.2f} GiB")
    dataset = load_data(cfg, run_dir)
    if mode != "fsdp" or cfg.gkd.chat_fraction:  # the chat transcripts are written by the whole parent
        teacher = teacher.to(device)
    chat_rows = chat_rows_for(cfg, run_dir, teacher, dataset.seq_len, rank, world) if cfg.gkd.chat_fraction else None
    prompts = on_policy_prompts_for(cfg, run_dir, teacher, dataset.seq_len, rank) if cfg.gkd.on_policy_fraction else None
    if mode == "fsdp":
        shard_layers(teacher)  # once, for every child (a second fully_shard of a module fails)
        teacher = teacher.to(device)
    for record in todo:
        distill_child(cfg, run_dir, record, teacher, dataset, chat_rows, mode, device, prompts)
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # the last child's weights and optimizer state are gone
    return run_dir


def distill_child(cfg: RunConfig, run_dir: Path, record: dict, teacher, dataset, chat_rows, mode: str,
                  device, prompts=None) -> None:
    """One child through GKD on every rank; rank 0 writes gkd-<name>/ (via .tmp, DONE last).
    prompts: the on-policy phase's (onpolicy.OnPolicyPrompts), None without that phase."""
    import torch

    from ..checkpoint import atomic_write_json
    from ..dist import barrier, distributed_rank
    from ..gkd import GKDTrainer, shard_layers
    from ..integrity import load_model_checked
    from ..model.modeling import DeciLMForCausalLM
    from ..model.parent import copy_tokenizer_files
    from ..train import full_model_state

    rank, world = distributed_rank()
    out = STAGE.folder(run_dir, record)
    work = out.with_name(out.name + ".work")  # checkpoints live here until the child is done
    if rank == 0 and out.exists():
        shutil.rmtree(out)
    barrier(world)
    child_dir = assemble.STAGE.folder(run_dir, record)
    child = load_model_checked(child_dir, torch.float32)  # on the CPU; unreadable or non-finite weights named
    if mode == "fsdp":
        shard_layers(child)  # the shards go to this rank's device
    child = child.to(device)
    gkd_cfg = child_gkd_config(cfg, record)
    batches = train_batches(cfg, dataset, gkd_cfg.batch_size, max(gkd_cfg.tokens, 1), seed=cfg.seed + 1,
                            rank=rank, world=world, teacher_share=gkd_cfg.teacher_share)
    if chat_rows is not None:
        from ..data.chat import MixedBatches

        batches = MixedBatches(batches, chat_rows, gkd_cfg.chat_fraction, seed=cfg.seed + 2 + rank)
    # a checkpoint of another child (rebuilt since GKD was killed) or other data starts over
    identity = f"{STAGE.fingerprint(cfg, record)}/{content_id(child_dir)}/{data.STAGE.fingerprint(cfg)}"
    if teacher_stage.STAGE.active(cfg):  # the teacher's rows are part of the data
        identity += f"/{teacher_stage.STAGE.fingerprint(cfg)}"
    trainer = GKDTrainer(child, teacher, gkd_cfg, work, dataset.seq_len, world_size=world, fingerprint=identity,
                         data_parallel=mode == "ddp")
    print(f"[gkd] {record['name']}: {trainer.steps} steps of {cfg.gkd.batch_size}x{dataset.seq_len} tokens"
          f"{f' x {world} ranks' if world > 1 else ''}")
    val = validation_batches(dataset, cfg.gkd.validation_tokens, cfg.gkd.batch_size)
    before = trainer.validation_loss(val)
    if trainer.on_policy_steps:
        print(f"[gkd] {record['name']}: the last {trainer.on_policy_steps} steps on-policy, prompts: "
              f"{prompts.kinds() if prompts is not None else 'openings of training rows'}")
    steps = trainer.train(batches, prompts)
    after = trainer.validation_loss(val)
    print(f"[gkd] {record['name']}: validation loss {before['loss']:.4f} -> {after['loss']:.4f} "
          f"(KL {before['kl']:.4f} -> {after['kl']:.4f}, cosine {before['cosine']:.4f} -> {after['cosine']:.4f})")
    tokens = trainer.steps * gkd_cfg.batch_size * dataset.seq_len * world
    # the on-policy steps train on the child's samples, not on the rows (their openings are prompts)
    read_tokens = (trainer.steps - trainer.on_policy_steps) * gkd_cfg.batch_size * dataset.seq_len * world
    label = f"GKD {record['name']}" + (f" ({1 - gkd_cfg.chat_fraction:.0%} of its rows; the rest chat transcripts)"
                                       if chat_rows is not None else "") + \
        (f", off-policy steps ({trainer.on_policy_steps} on-policy steps not counted)" if trainer.on_policy_steps else "")
    read = [passes(cfg, dataset, label, round(read_tokens * (1 - gkd_cfg.chat_fraction)) if chat_rows is not None
                   else read_tokens, teacher_share=gkd_cfg.teacher_share),
            passes(cfg, dataset, "GKD validation", gkd_cfg.validation_tokens, "validation", first=True)]
    if rank == 0:
        print("\n".join(f"[gkd] {line}" for line in passes_lines(read).splitlines()))
    history = {"validation_before": before, "validation_after": after, "steps": steps, "tokens": tokens,
               "passes": read}
    if trainer.on_policy_steps:  # its per-step losses are in "steps" (phase "on_policy")
        phase = [h for h in steps if h.get("phase") == "on_policy"]
        history["on_policy"] = {"steps": trainer.on_policy_steps, "first_step": trainer.on_policy_start + 1,
                                "divergence": gkd_cfg.on_policy_divergence,
                                "generated_tokens_rank0": round(sum(h["generated_tokens"] for h in phase))}
    state = full_model_state(child) if mode == "fsdp" else None  # a collective: every rank calls it
    if rank == 0:
        final = child
        if mode == "fsdp":
            final = DeciLMForCausalLM(child.config)
            final.load_state_dict(state)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        final.to(getattr(torch, cfg.parent_dtype)).save_pretrained(tmp)
        copy_tokenizer_files(RunDir(run_dir).parent, tmp)
        atomic_write_json(tmp / "history.json", history)
        STAGE.mark_done(cfg, run_dir, folder=tmp, record=record, steps=trainer.steps)
        tmp.rename(out)
        trainer.clear_checkpoint()
        if work.exists():
            shutil.rmtree(work)
    barrier(world)


def child_gkd_config(cfg: RunConfig, record: dict):
    """The GKD settings of one child: the run's, except that a ShortGPT peer (no BLD-trained block)
    also gets the BLD's tokens when peers.equal_tokens, so every child has seen as many tokens."""
    if record.get("peer") == "shortgpt" and cfg.peers.equal_tokens:
        return dataclasses.replace(cfg.gkd, tokens=cfg.gkd.tokens + cfg.bld.tokens)
    return cfg.gkd


def on_policy_prompts_for(cfg: RunConfig, run_dir: Path, teacher, seq_len: int, rank: int):
    """The on-policy phase's prompts for this rank: the teacher corpus' topic x text-kind seeds and
    the openings of the training rows, and for a parent with a chat template, when the GKD mix
    holds chat rows (gkd.chat_fraction > 0 or a teacher source that writes chat answers), chat
    requests in its template (over the topics and the training documents) at
    gkd.on_policy_chat_share. Prompts longer than half a row are left out."""
    from transformers import AutoTokenizer

    from ..data.chat import chat_requests
    from ..data.teacher import TeacherConfig, prompt_pool, stop_ids
    from ..onpolicy import OnPolicyPrompts

    g = cfg.gkd
    tokenizer = AutoTokenizer.from_pretrained(RunDir(run_dir).parent)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    mix_has_chat = g.chat_fraction > 0 or (teacher_stage.STAGE.active(cfg) and cfg.teacher.chat_share > 0)
    pool = prompt_pool(tokenizer, None, TeacherConfig(seed=cfg.seed))  # topics only: no corpus read here
    fits = seq_len // 2

    def short(ids):
        return [list(p) for p in ids if 0 < len(p) <= fits]

    chat = []
    if has_template and mix_has_chat and g.on_policy_chat_share > 0:
        def render(request: str) -> list[int]:
            text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                 add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        chat = short([p.ids for p in pool["chat"]] + [render(r) for r in chat_requests(cfg.data, 256, cfg.seed)])
    return OnPolicyPrompts(seeds=short(p.ids for p in pool["topic"]), chat=chat, chat_share=g.on_policy_chat_share,
                           prompt_tokens=min(g.on_policy_prompt_tokens, fits), stop_ids=stop_ids(teacher, tokenizer),
                           seed=cfg.seed, rank=rank)


def chat_rows_for(cfg: RunConfig, run_dir: Path, teacher, seq_len: int, rank: int, world: int):
    """The parent's chat transcripts packed into rows (written once by rank 0, cached in gkd-chat/)."""
    from transformers import AutoTokenizer

    from ..config import config_hash
    from ..data.chat import chat_requests, load_or_build_chat_rows, pack_transcripts, parent_transcripts
    from ..dist import barrier

    g = cfg.gkd
    fingerprint = config_hash({"parent": parent.STAGE.fingerprint(cfg), "data": cfg.data, "seed": cfg.seed,
                               "chat": [g.chat_requests, g.chat_max_new_tokens, g.chat_temperature]})
    paths = RunDir(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths.parent)

    def build():
        started = time.time()
        requests = chat_requests(cfg.data, g.chat_requests, cfg.seed)
        transcripts = parent_transcripts(teacher.eval(), tokenizer, requests, g.chat_max_new_tokens,
                                         g.chat_temperature, g.chat_batch_size, cfg.seed)
        rows = pack_transcripts(transcripts, seq_len, tokenizer.eos_token_id)
        print(f"[gkd] chat transcripts: {len(transcripts)} written by the parent, {rows.size:,} tokens, "
              f"{time.time() - started:.1f} s")
        return rows

    if rank == 0:
        rows = load_or_build_chat_rows(paths.chat_rows, fingerprint, build)
    barrier(world)
    if rank != 0:
        rows = load_or_build_chat_rows(paths.chat_rows, fingerprint, build)
    return rows
