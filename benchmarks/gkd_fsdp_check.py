"""GKD with FSDP2 over NCCL on several GPUs: correctness, kill/resume and throughput.

Run with torchrun on a machine with >= 2 GPUs (no weights needed: SmolLM2-135M-shaped models
with random weights; the child is a mixed Nemotron-NAS architecture):

    torchrun --nproc_per_node 2 benchmarks/gkd_fsdp_check.py --out results.json

1. W ranks train the child for STEPS steps with checkpoints, are stopped after KILL steps (the
   batches run out, as in a killed run), and resume from the checkpoint to STEPS;
2. rank 0 then trains a fresh copy alone on the concatenated batches (one rank, batch W x B);
   the two final weights must agree (run with --autocast off for fp32; the relative difference
   of each parameter's update is reported);
3. tokens/s of W ranks vs one GPU for the same per-rank batch (no checkpoints while timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from puzzlenas import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzlenas.dist import distributed_rank
from puzzlenas.gkd import GKDConfig, GKDTrainer, parallelize
from puzzlenas.train import full_model_state

HIDDEN, HEADS, KV, FFN, VOCAB, LAYERS = 576, 9, 3, 1536, 49152, 30
if os.environ.get("GKD_CHECK_TINY"):  # a dry run of this script on CPU (gloo)
    HIDDEN, FFN, VOCAB, LAYERS = 72, 96, 256, 4


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model(blocks: list[BlockConfig], seed: int, device) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    config = DeciLMConfig.from_blocks(blocks, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                      tie_word_embeddings=True)
    return DeciLMForCausalLM(config).to(device)


def child_blocks() -> list[BlockConfig]:
    kinds = [(AttentionConfig("gqa", KV), FFNConfig("gated", FFN)), (AttentionConfig("gqa", 1), FFNConfig("gated", FFN // 2)),
             (AttentionConfig("linear"), FFNConfig("gated", FFN)), (AttentionConfig("no_op"), FFNConfig("linear"))]
    return [BlockConfig(*kinds[i % len(kinds)]) for i in range(LAYERS)]


def batches(rank: int, steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(steps)]


def gkd_config(args, world: int, batch: int | None = None, checkpoints: bool = True) -> GKDConfig:
    batch = batch or args.batch
    return GKDConfig(tokens=args.steps * batch * args.seq * world, batch_size=batch, lr=3e-4, warmup_fraction=0.0,
                     checkpoint_every=1 if checkpoints else 10**9, autocast=args.autocast)


def pair(device) -> tuple[DeciLMForCausalLM, DeciLMForCausalLM]:
    """(parent, child), the same on every rank (seeded, built on the CPU)."""
    parent = model([BlockConfig(AttentionConfig("gqa", KV), FFNConfig("gated", FFN))] * LAYERS, 0, device)
    parent.requires_grad_(False)
    return parent, model(child_blocks(), 1, device)


def timed_train(trainer: GKDTrainer, data: list[torch.Tensor], warmup: int = 2) -> float:
    """Tokens/s of trainer.train over data after `warmup` untimed steps (all ranks together)."""
    trainer.train(data[:warmup])
    sync()
    started = time.perf_counter()
    trainer.train(data)  # continues at step `warmup`
    sync()
    rows = sum(b.shape[0] for b in data[warmup:]) * trainer.world
    return rows * data[0].shape[1] / (time.perf_counter() - started)


def distributed_run(args, rank: int, world: int, device, work: Path) -> tuple[dict, float]:
    """Train with `world` ranks, stopped after args.kill steps, resumed to args.steps; then time it."""
    mine = batches(rank, args.steps, args.batch, args.seq)
    log = lambda *a: print(f"[rank {rank}]", *a)  # noqa: E731
    for stop in (args.kill, args.steps):  # the first pass ends like a killed run
        parent, child = pair(device)
        parallelize(child, parent)
        trainer = GKDTrainer(child, parent, gkd_config(args, world), work, args.seq, world_size=world, log=log)
        trainer.train(mine[:stop])
        if stop == args.kill:
            dist.barrier()
            args.resumed_from = json.loads((work / "ckpt.json").read_text())["step"]
    state = full_model_state(child)
    parent, child = pair(device)
    parallelize(child, parent)
    trainer = GKDTrainer(child, parent, gkd_config(args, world, checkpoints=False), work / "timing", args.seq,
                         world_size=world, log=lambda *a: None)
    return state, timed_train(trainer, mine)


def single_run(args, world: int, device, work: Path) -> tuple[dict, float]:
    """One GPU on the ranks' batches concatenated (the reference), and one GPU's tokens/s."""
    parent, child = pair(device)
    joined = [torch.cat(parts) for parts in zip(*(batches(r, args.steps, args.batch, args.seq) for r in range(world)))]
    GKDTrainer(child, parent, gkd_config(args, 1, batch=args.batch * world, checkpoints=False), work, args.seq,
               log=print).train(joined)
    reference = {k: v.detach().float().cpu() for k, v in child.state_dict().items()}
    parent, child = pair(device)
    trainer = GKDTrainer(child, parent, gkd_config(args, 1, checkpoints=False), work / "timing", args.seq,
                         log=lambda *a: None)
    return reference, timed_train(trainer, batches(0, args.steps, args.batch, args.seq))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kill", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--autocast", default="off", help="off: fp32, for the equality check; auto: bf16")
    ap.add_argument("--work", default="/tmp/gkd_fsdp_check")
    ap.add_argument("--out", default="gkd_fsdp_check.json")
    args = ap.parse_args()
    rank, world = distributed_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    work = Path(args.work)
    if rank == 0 and work.exists():
        shutil.rmtree(work)
    dist.barrier()
    state, rate_world = distributed_run(args, rank, world, device, work / "sharded")
    dist.barrier()
    if rank == 0:
        reference, rate_one = single_run(args, world, device, work / "single")
        start = {k: v.float().cpu() for k, v in model(child_blocks(), 1, "cpu").state_dict().items()}
        rows = []
        for name, ref in reference.items():
            if name not in state:  # a tied head: the same tensor as the embedding
                continue
            ours = state[name].float().cpu()
            moved = (ref - start[name]).norm().item()
            rows.append({"name": name, "max_abs_diff": (ours - ref).abs().max().item(),
                         "relative_diff": (ours - ref).norm().item() / max(moved, 1e-12), "update_norm": moved})
        worst = max(rows, key=lambda r: r["relative_diff"])
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "world_size": world, "torch": torch.__version__,
                  "autocast": args.autocast,
                  "steps": args.steps, "killed_after": args.kill, "resumed_from_step": args.resumed_from,
                  "batch_per_rank": args.batch, "seq": args.seq,
                  "tokens_per_s_world": rate_world, "tokens_per_s_one_gpu": rate_one,
                  "scaling": rate_world / rate_one,
                  "worst_relative_diff": worst["relative_diff"], "worst_param": worst["name"],
                  "median_relative_diff": sorted(r["relative_diff"] for r in rows)[len(rows) // 2]}
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps({**result, "params": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
