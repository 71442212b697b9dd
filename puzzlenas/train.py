"""Trainer plumbing shared by BLD (bld.py) and GKD (gkd.py).

- the learning-rate schedule: linear warm-up, then cosine decay to a floor;
- AdamW with two parameter groups (no weight decay on norms and biases);
- the autocast context (bf16 on CUDA by default, off on CPU);
- gradient clipping (also over FSDP2-sharded parameters) and the non-finite loss check;
- `TrainingCheckpoint`: model + optimizer + scheduler + step + RNG states as safetensors + JSON,
  stamped with the fingerprint of the settings it was made with, for any number of ranks.

The trainers read their optimizer settings from their config sections (BLDConfig, GKDConfig):
lr, betas, weight_decay, warmup_fraction, min_lr_fraction, grad_clip, autocast.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .checkpoint import (atomic_save_tensors, atomic_write_json, optimizer_state_from_tensors,
                         optimizer_state_tensors)


class TrainingError(RuntimeError):
    """Training that cannot go on (a non-finite loss...); BLDError and GKDError are kinds of it."""


def settings_fingerprint(*parts: Any) -> str:
    """A short stable hash of settings (dataclasses, dicts, numbers, strings) for checkpoints."""
    data = [{k: v for k, v in dataclasses.asdict(p).items() if k not in _inert(p)}
            if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inert(section) -> tuple[str, ...]:
    """A section's fields that change nothing computed (sections.OptimizerConfig.inert_fields)."""
    inert = getattr(section, "inert_fields", None)
    return inert() if callable(inert) else getattr(section, "RUN_ONLY", ())


# =============================================================================================
# Schedule, optimizer, autocast
# =============================================================================================
def warmup_cosine(step: int, total_steps: int, warmup_fraction: float, min_lr_fraction: float) -> float:
    """The lr multiplier at `step`: linear warm-up over warmup_fraction of the steps, then a cosine
    from 1 down to min_lr_fraction at the last step (and flat after it)."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_fraction + (1 - min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine` over `total_steps`, with cfg's warmup_fraction and min_lr_fraction."""
    schedule = functools.partial(warmup_cosine, total_steps=total_steps, warmup_fraction=cfg.warmup_fraction,
                                 min_lr_fraction=cfg.min_lr_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def adamw(params: Iterable[nn.Parameter], cfg, device: torch.device, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW with cfg's lr, betas and weight_decay; matrices decay, norms and biases (1-D) do not."""
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas), **_adamw_kernel(device, sharded))


def _adamw_kernel(device: torch.device, sharded: bool) -> dict:
    """Fused AdamW on a GPU. With FSDP2 the parameters mix sharded DTensors (decoder layers)
    and plain replicated tensors (embedding, final norm, head), which the fused and foreach
    kernels refuse to take in one call (seen over NCCL on 2 H100s), so they step one by one."""
    if sharded:
        return {"foreach": False, "fused": False}
    return {"fused": device.type == "cuda"}


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 for `bf16`, and for `auto` on CUDA; None (full precision) otherwise."""
    use_bf16 = setting == "bf16" or (setting == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `autocast_dtype`'s answer (explicitly off when None)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


# =============================================================================================
# Gradients and losses
# =============================================================================================
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, sharded: bool = False) -> None:
    """Scale gradients so that their global L2 norm is at most max_norm. `sharded`: the model is
    FSDP2-sharded over ranks (a collective: every rank calls it)."""
    params = [p for p in {id(p): p for p in params}.values() if p.grad is not None]
    if not sharded:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    # Each rank sums the squares of its own shards, one all-reduce adds them up; replicated
    # gradients (equal on every rank once averaged) are counted once.
    device = params[0].grad.device
    sharded_sq = torch.zeros((), device=device)
    replicated_sq = torch.zeros((), device=device)
    for p in params:
        if isinstance(p.grad, DTensor):
            sharded_sq += p.grad.to_local().float().pow(2).sum()
        else:
            replicated_sq += p.grad.float().pow(2).sum()
    dist.all_reduce(sharded_sq)
    total = (sharded_sq + replicated_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale)


def non_finite(losses: dict[str, torch.Tensor | float]) -> list[str]:
    """The names whose loss is NaN or infinite (tensors: one device sync for all of them)."""
    floats = {k: v for k, v in losses.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v for k, v in losses.items() if isinstance(v, torch.Tensor)}
    bad = {k for k, v in floats.items() if not math.isfinite(v)}
    if tensors:
        finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in tensors.values()])).tolist()
        bad |= {k for k, ok in zip(tensors, finite) if not ok}
    return [k for k in losses if k in bad]


def raise_if_non_finite(losses: dict[str, torch.Tensor | float], step: int, section: str, lr: float,
                        error: type[TrainingError] = TrainingError) -> None:
    """Stop before a non-finite loss reaches a checkpoint, naming what diverged and the fix."""
    bad = non_finite(losses)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise error(f"non-finite loss at step {step} in {shown}. Lower {section}.lr (now {lr:g}) or use "
                    f"{section}.autocast=off; the checkpoints written before this step are kept, and a rerun "
                    f"resumes from them")


# =============================================================================================
# Checkpoints
# =============================================================================================
def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict (on rank 0), also when the model is sharded with FSDP2 over ranks:
    then a collective that every rank calls, and only rank 0 gets the tensors (on the CPU)."""
    if _is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in its state_dict's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state of an unsharded model, the optimizer's keyed by parameter name
    (the layout torch.distributed.checkpoint's full state dicts have)."""
    names = _parameter_names(model, optimizer)
    osd = optimizer.state_dict()
    state = {names[i]: entries for i, entries in osd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return model.state_dict(), {"state": state, "param_groups": groups}


def _load_local_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of `_local_state`."""
    index = {n: i for i, n in enumerate(_parameter_names(model, optimizer))}
    state = {index[n]: entries for n, entries in optim_state["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]]
    model.load_state_dict(model_state)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_states(world_size: int) -> dict[str, torch.Tensor]:
    """This process's CPU (and CUDA) generator states; with several ranks every rank's, gathered
    (a collective)."""
    local = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        local["cuda"] = torch.cuda.get_rng_state()
    if world_size == 1:
        return {f"rng.0.{k}": v for k, v in local.items()}
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for key, state in local.items():
        parts = [torch.empty_like(state, device=device) for _ in range(world_size)]
        dist.all_gather(parts, state.to(device))
        out.update({f"rng.{r}.{key}": p.cpu() for r, p in enumerate(parts)})
    return out


def _restore_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    if f"rng.{rank}.cpu" in tensors:
        torch.set_rng_state(tensors[f"rng.{rank}.cpu"])
    if f"rng.{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"])


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage (tied embeddings): keep the first name of each tensor;
    the other names become aliases {alias: kept name}."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in tensors.items():
        key = (v.data_ptr(), v.shape, v.dtype, v.device) if v.numel() else (k,)
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v
    return out, aliases


def _misfit(model: nn.Module, saved: dict[str, torch.Tensor]) -> str:
    """What keeps a saved full state dict from loading into `model` ("" when it fits); checked
    before anything is loaded, so a model is never left half loaded. (FSDP2 keeps the names,
    and a sharded parameter's shape is the whole tensor's.)"""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        parts = [f"{len(names)} {what}, e.g. {names[0]}" for names, what in ((missing, "missing"),
                                                                             (unexpected, "unexpected")) if names]
        return "tensors " + "; ".join(parts)
    wrong = [k for k in own if own[k] != tuple(saved[k].shape)]
    return f"{len(wrong)} tensors of other shapes, e.g. {wrong[0]}: {tuple(saved[wrong[0]].shape)} saved, " \
           f"{own[wrong[0]]} here" if wrong else ""


def _tensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


class TrainingCheckpoint:
    """The checkpoint of one training run in `directory`: ckpt.safetensors (the model's full
    state as `model.<name>`, the optimizer's state keyed by parameter name as
    `opt.<name>.<key>`, the RNG states as `rng.<rank>.<cpu|cuda>`) and ckpt.json (step,
    scheduler, optimizer param groups, the settings' fingerprint, what the trainer adds).

    world_size 1: this process alone trains the model and writes the files (also inside a
    torchrun job whose ranks train different models, as BLD's jobs do). world_size > 1: the
    ranks train one model together, sharded over them (FSDP2) or, with `sharded=False`,
    replicated on each (data parallel); `save` and `load` are collectives that every rank
    calls. The full (unsharded) state is gathered on rank 0 (replicated: rank 0's copy), which
    alone writes it, then a barrier; on resume every rank reads the files and takes its part. One format for both, so a
    run killed with W ranks resumes with any number of ranks. (For very large models the gather
    needs the whole optimizer state in rank 0's CPU memory.)

    The data position is the step: the trainers draw batches from deterministic streams and
    skip the first `step` batches when they resume.
    """

    FILES = ("ckpt.safetensors", "ckpt.json")

    def __init__(self, directory: Path, fingerprint: str, world_size: int = 1, label: str = "checkpoint",
                 log: Callable[[str], Any] = print, sharded: bool = True):
        self.directory, self.fingerprint, self.world = Path(directory), fingerprint, world_size
        self.sharded = sharded and world_size > 1  # else every rank holds the whole model
        self.label, self.log = label, log

    @property
    def tensors_path(self) -> Path:
        return self.directory / "ckpt.safetensors"

    @property
    def meta_path(self) -> Path:
        return self.directory / "ckpt.json"

    def _rank(self) -> int:
        if self.world == 1:
            return 0
        import torch.distributed as dist

        return dist.get_rank()

    def exists(self) -> bool:
        return self.meta_path.is_file() and self.tensors_path.is_file()

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
             extra: dict | None = None) -> None:
        """Write the state after `step` optimizer steps (and the trainer's JSON-able `extra`).
        With several ranks a collective: rank 0 writes, no rank returns before the files are
        complete."""
        if not self.sharded:
            model_state, optim_state = _local_state(model, optimizer)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            # With cpu_offload only rank 0 receives the gathered tensors.
            model_state, optim_state = get_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = _rng_states(self.world)
        if self._rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            tensors = {f"model.{k}": v.detach() for k, v in model_state.items()}
            tensors.update(optimizer_state_tensors(optim_state["state"]))
            tensors.update(rng)
            tensors, aliases = _dedupe(tensors)
            # The step in both files: a kill between the two writes leaves a pair that disagrees.
            atomic_save_tensors(tensors, self.tensors_path, metadata={"step": str(step)})
            meta = {"fingerprint": self.fingerprint, "step": step, "world_size": self.world,
                    "param_groups": optim_state["param_groups"], "scheduler": scheduler.state_dict(),
                    "aliases": aliases, "extra": extra or {}}
            atomic_write_json(self.meta_path, meta, indent=None)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank runs ahead of a checkpoint that is still being written

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict | None:
        """Restore the saved state into model, optimizer and scheduler (and this rank's RNG).
        Returns {"step", "world_size", "extra"}, or None when there is nothing to resume: no
        checkpoint, one made with other settings, or an unreadable one (the last two said in
        one line; training then starts over and its next checkpoint replaces the files)."""
        from safetensors.torch import load_file

        if not self.exists():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
            if meta.get("fingerprint") != self.fingerprint:
                self.log(f"  {self.label} in {self.directory} was made with other settings "
                         f"(fingerprint {meta.get('fingerprint')}, now {self.fingerprint}); starting over")
                return None
            written_at = _tensors_metadata(self.tensors_path).get("step")
            if written_at is not None and int(written_at) != meta["step"]:
                raise ValueError(f"ckpt.safetensors holds step {written_at}, ckpt.json step {meta['step']}")
            tensors = load_file(str(self.tensors_path))
            for alias, kept in meta["aliases"].items():
                tensors[alias] = tensors[kept]  # one tensor, two names (tied embeddings)
            model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
            optim_state = {"state": optimizer_state_from_tensors(tensors), "param_groups": meta["param_groups"]}
            misfit = _misfit(model, model_state)
            if misfit:  # e.g. a child assembled anew with other blocks since the checkpoint
                self.log(f"  {self.label} in {self.directory} is of another model ({misfit}); starting over")
                return None
        except Exception as err:  # torn by a kill: this run starts over, nothing else is lost
            self.log(f"  unreadable {self.label} in {self.directory} ({type(err).__name__}: {err}); starting over")
            return None
        try:
            if not self.sharded:
                _load_local_state(model, optimizer, model_state, optim_state)
            else:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                               options=StateDictOptions(full_state_dict=True))
            scheduler.load_state_dict(meta["scheduler"])
        except Exception as err:  # the model may be half loaded now: going on would train a mix
            raise TrainingError(f"{self.tensors_path} does not fit this model ({type(err).__name__}: {err}); "
                                f"delete {self.directory} to start this training over") from err
        _restore_rng(tensors, self._rank())
        return {"step": meta["step"], "world_size": meta["world_size"], "extra": meta["extra"]}

    def clear(self) -> None:
        for name in self.FILES:
            (self.directory / name).unlink(missing_ok=True)
