"""Blockwise local distillation (METHOD.md section 3).

Every library variant is trained alone to imitate its parent subblock, from the parent's own
input activations (teacher forcing), on the normalized MSE

    L = MSE(o_parent, o_child) / MSE(o_parent, 0),  o = the layer's residual update (y - x).

All variants of a layer share the denominator, so their losses are comparable: 0 is the
parent, 1 is as bad as skipping the whole layer.

- decoupled (default): an attention variant is trained in front of the parent's (frozen)
  FFN of its layer, an FFN variant behind the parent's attention;
- coupled: (attention, FFN) pairs trained together;
- hybrid: decoupled, then coupled on a reduced set of pairs, starting from the decoupled weights.

Work is a list of jobs, one per (layer, variant). One frozen parent forward per batch feeds
every job a worker owns: the parent runs layer by layer and each layer's jobs train as soon
as its activations exist. Jobs split across `torchrun` ranks with no communication; each
job checkpoints, and a killed run resumes without redoing finished jobs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .activations import LayerActivations, visit_parent_layers
from .checkpoint import atomic_save_tensors, atomic_write_json, atomic_write_text
from .integrity import load_weights
from .library import (AttentionUnit, FFNUnit, LibraryConfig, Variant, build_unit, parent_attention_unit,
                      parent_ffn_unit)
from .model.modeling import DeciLMForCausalLM, ForwardContext
from .progress import progress
from .train import (TrainingCheckpoint, TrainingError, adamw, autocast, autocast_dtype, clip_gradients,
                    lr_scheduler, raise_if_non_finite, settings_fingerprint)
from .sections import BLDConfig  # noqa: F401  (re-exported)


class BLDError(TrainingError):
    """A BLD run that cannot go on (non-finite loss, corrupted checkpoint...)."""


# =============================================================================================
# Jobs
# =============================================================================================
@dataclass(frozen=True)
class Job:
    """One (layer, variant) to train or evaluate. `attention` / `ffn` None = the parent's own,
    frozen (decoupled); both set = coupled."""

    layer: int
    attention: Variant | None
    ffn: Variant | None
    init_from_decoupled: bool = False  # hybrid: start from the decoupled-trained units

    @property
    def kind(self) -> str:
        if self.attention is not None and self.ffn is not None:
            return "coupled"
        return "attention" if self.attention is not None else "ffn"

    @property
    def name(self) -> str:
        if self.kind == "coupled":
            return f"{self.attention.name}+{self.ffn.name}"
        return (self.attention or self.ffn).name

    @property
    def relpath(self) -> str:
        return f"layers/{self.layer:03d}/" + ("coupled/" if self.kind == "coupled" else "") + self.name

    @property
    def variants(self) -> list[Variant]:
        return [v for v in (self.attention, self.ffn) if v is not None]

    @property
    def trainable(self) -> bool:
        return any(v.trainable for v in self.variants)


def decoupled_jobs(space, layers: Iterable[int]) -> list[Job]:
    jobs = []
    for i in layers:
        attention, ffn = space[i]
        jobs += [Job(i, v, None) for v in attention] + [Job(i, None, v) for v in ffn]
    return jobs


def coupled_jobs(space, layers: Iterable[int], pairs: list[list[str]], from_decoupled: bool) -> list[Job]:
    jobs = []
    for i in layers:
        attention = {v.name: v for v in space[i][0]}
        ffn = {v.name: v for v in space[i][1]}
        chosen = pairs or [[a, f] for a in attention for f in ffn]
        for a, f in chosen:
            if a not in attention or f not in ffn:
                raise ValueError(f"bld.coupled_pairs: [{a}, {f}] is not in layer {i}'s space; attention: "
                                 f"{sorted(attention)}, ffn: {sorted(ffn)}")
            jobs.append(Job(i, attention[a], ffn[f], init_from_decoupled=from_decoupled))
    return jobs


def job_cost(job: Job, param_counts: dict[str, int]) -> float:
    """Relative work of a job, for balancing ranks (trainable parameters; evaluation ~ free)."""
    return 1.0 + (sum(param_counts.get(v.name, 0) for v in job.variants if v.trainable) if job.trainable else 0)


def assign_jobs(jobs: list[Job], world_size: int, costs: list[float]) -> list[list[Job]]:
    """Longest-processing-time-first split of jobs over ranks; deterministic."""
    loads, out = [0.0] * world_size, [[] for _ in range(world_size)]
    for idx in sorted(range(len(jobs)), key=lambda k: (-costs[k], jobs[k].layer, jobs[k].name)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        out[rank].append(jobs[idx])
        loads[rank] += costs[idx]
    return [sorted(js, key=lambda j: (j.layer, j.kind, j.name)) for js in out]


# =============================================================================================
# One job's model: what is trained and what is the parent's (frozen)
# =============================================================================================
class JobBlock(nn.Module):
    """The block a job trains: attention unit then FFN unit, either trainable or the parent's."""

    def __init__(self, attention: AttentionUnit, ffn: FFNUnit, use_parent_mid: bool):
        super().__init__()
        self.attention, self.ffn = attention, ffn
        self.use_parent_mid = use_parent_mid  # FFN job: the parent's attention output is given

    def forward(self, acts: LayerActivations, ctx: ForwardContext) -> torch.Tensor:
        """The predicted residual update of the layer (B, T, C)."""
        if self.use_parent_mid:
            return (acts.m - acts.x) + self.ffn(acts.m)
        a = self.attention(acts.x, ctx)
        return a + self.ffn(acts.x + a)


def normalized_mse_terms(pred: torch.Tensor, acts: LayerActivations,
                         stacked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared error, sum of squared target) of the layer's residual update, in fp32.
    stacked: tensors (G, ...) of G jobs (bld_stacked.py), sums per job (G,)."""
    target = (acts.y - acts.x).float()
    dims = tuple(range(1, target.dim())) if stacked else tuple(range(target.dim()))
    return (pred.float() - target).pow(2).sum(dims), target.pow(2).sum(dims)


@dataclass
class JobState:
    job: Job
    block: JobBlock
    trainables: list[nn.Module]  # the units whose weights this job writes
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    start_step: int = 0
    step: int = 0
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


# =============================================================================================
# The trainer
# =============================================================================================
class BLDTrainer:
    """Trains / evaluates a list of jobs against one parent, writing results under `out_dir`."""

    def __init__(self, parent: DeciLMForCausalLM, stats: dict | None, lib_cfg: LibraryConfig, cfg: BLDConfig,
                 out_dir: Path, seq_len: int, seed: int = 0, log=print):
        self.parent, self.stats, self.lib_cfg, self.cfg = parent, stats, lib_cfg, cfg
        self.out_dir, self.seq_len, self.seed, self.log = out_dir, seq_len, seed, log
        self.config = parent.config
        self.device = parent.model.embed_tokens.weight.device
        self.autocast_dtype = autocast_dtype(cfg.autocast, self.device)
        self.steps = math.ceil(cfg.tokens / (cfg.batch_size * seq_len)) if cfg.tokens else 0
        # What a job checkpoint must have been made with to be resumed.
        self.fingerprint = settings_fingerprint(cfg, lib_cfg, seq_len, seed)

    # ---- building -------------------------------------------------------------------------
    def _unit(self, variant: Variant | None, layer: int, subblock: str, from_decoupled: bool) -> nn.Module:
        parent_layer = self.parent.model.layers[layer]
        if variant is None or variant.is_parent:
            return (parent_attention_unit if subblock == "attention" else parent_ffn_unit)(self.config, parent_layer)
        if from_decoupled and variant.trainable:
            return load_trained_unit(self.out_dir, Job(layer, variant, None) if subblock == "attention"
                                     else Job(layer, None, variant), self.config, self.device)
        seed = self.seed * 1_000_003 + layer * 1009 + sum(map(ord, variant.name))
        return build_unit(variant, self.config, self.parent, layer, self.stats, self.lib_cfg,
                          init=self.cfg.init, seed=seed)

    def build(self, job: Job) -> JobState:
        attention = self._unit(job.attention, job.layer, "attention", job.init_from_decoupled)
        ffn = self._unit(job.ffn, job.layer, "ffn", job.init_from_decoupled)
        block = JobBlock(attention, ffn, use_parent_mid=job.kind == "ffn")
        trainables = [u for u, v in ((attention, job.attention), (ffn, job.ffn)) if v is not None and v.trainable]
        params = [p for u in trainables for p in u.parameters()]
        for unit in (attention, ffn):
            if unit not in trainables:
                unit.requires_grad_(False)
        optimizer = scheduler = None
        if params and self.steps:
            optimizer = adamw(params, self.cfg, self.device)
            scheduler = lr_scheduler(optimizer, self.steps, self.cfg)
        return JobState(job, block, trainables, optimizer, scheduler)

    # ---- one step -------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def train_step(self, state: JobState, acts: LayerActivations, ctx: ForwardContext) -> torch.Tensor:
        """One optimizer step of one job; returns the (detached) loss without syncing the GPU."""
        with torch.enable_grad(), self._autocast():
            err, ref = normalized_mse_terms(state.block(acts, ctx), acts)
            loss = err / ref.clamp(min=1e-12)
        loss.backward()
        clip_gradients((p for u in state.trainables for p in u.parameters()), self.cfg.grad_clip)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def check_finite(self, states: list[JobState]) -> None:
        """One GPU sync for all jobs: stop on a non-finite loss before it reaches a checkpoint."""
        pending = [s for s in states if isinstance(s.metrics.get("last_loss"), torch.Tensor)]
        losses = {f"layer {s.job.layer} {s.job.name}": s.metrics["last_loss"] for s in pending}
        raise_if_non_finite(losses, max((s.step for s in pending), default=0), "bld", self.cfg.lr, BLDError)
        for s in pending:
            s.metrics["last_loss"] = s.metrics["last_loss"].item()

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, states: list[JobState], batches: list[torch.Tensor]) -> list[float]:
        """Validation normalized MSE of each job (summed errors over summed targets)."""
        by_layer = _group_by_layer(states)
        err = {id(s): 0.0 for s in states}  # running sums stay on the device: no sync per batch
        ref = {id(s): 0.0 for s in states}

        def visit(i: int, acts: LayerActivations, ctx: ForwardContext) -> None:
            for s in by_layer.get(i, []):
                with self._autocast():
                    e, r = normalized_mse_terms(s.block(acts, ctx), acts)
                err[id(s)] = err[id(s)] + e.double()
                ref[id(s)] = ref[id(s)] + r.double()

        for batch in batches:
            visit_parent_layers(self.parent, batch.to(self.device), max(by_layer), visit)
        return [float(err[id(s)]) / max(float(ref[id(s)]), 1e-30) for s in states]

    # ---- a round of jobs ------------------------------------------------------------------
    def run_round(self, jobs: list[Job], train_batches, val_batches: list[torch.Tensor]) -> None:
        states = [self.build(j) for j in jobs]
        for s in states:
            self._maybe_resume(s)
        fresh = [s for s in states if "nmse_init" not in s.metrics]
        if fresh:
            for s, value in zip(fresh, self.evaluate(fresh, val_batches)):
                s.metrics["nmse_init"] = value
        training = [s for s in states if s.optimizer is not None and s.start_step < self.steps]
        if training:
            self._train(training, train_batches)
        for s, value in zip(states, self.evaluate(states, val_batches)):
            s.metrics["nmse_final"] = value
            self._finish(s)

    def _train(self, states: list[JobState], train_batches) -> None:
        from .bld_stacked import max_group_size, stack_groups

        limit = max_group_size(self.cfg.stack_jobs, self.config, self.cfg.batch_size * self.seq_len, self.device)
        groups, alone = stack_groups(states, self.config.blocks, limit, self.config, self.cfg)
        by_layer = _group_by_layer(alone)
        first = min(s.start_step for s in states)
        bar = progress(total=self.steps, initial=first, desc=f"[bld] {len(states)} jobs", unit="step")
        for step, batch in enumerate(train_batches):
            if step < first:
                continue  # resumed: these batches were seen before the checkpoint
            if step >= self.steps:
                break
            bar.update(1)
            active = {i: [s for s in ss if s.step <= step] for i, ss in by_layer.items()}
            active = {i: ss for i, ss in active.items() if ss}
            active_groups = [g for g in groups if g.step <= step]
            kept_layers = {i for g in active_groups for i in g.layers}
            if not active and not active_groups:
                continue
            kept: dict[int, LayerActivations] = {}
            contexts: list[ForwardContext] = []

            def visit(i: int, acts: LayerActivations, ctx: ForwardContext) -> None:
                for s in active.get(i, []):
                    started = time.perf_counter()
                    s.metrics["last_loss"] = self.train_step(s, acts, ctx)
                    s.step = step + 1
                    s.seconds += time.perf_counter() - started
                if i in kept_layers:
                    kept[i] = acts
                contexts[:] = [ctx]

            visit_parent_layers(self.parent, batch.to(self.device), max(list(active) + list(kept_layers)), visit)
            for g in active_groups:  # every stacked group once the parent's activations exist
                started = time.perf_counter()
                losses = g.train_step(kept, contexts[0], self._autocast())
                for s, loss in zip(g.states, losses):
                    s.metrics["last_loss"], s.step = loss, step + 1
                    s.seconds += (time.perf_counter() - started) / len(g.states)
            kept.clear()
            checkpoint = (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.steps
            report = (step + 1) % max(1, self.steps // 10) == 0
            if checkpoint or report or step + 1 == self.steps:
                self.check_finite(states)
            if checkpoint:
                for g in groups:
                    g.write_back(optimizer_state=True)
                for s in states:
                    self._checkpoint(s)
            if report:
                for s in states:  # the loss curve the report plots (check_finite made them floats)
                    if isinstance(s.metrics.get("last_loss"), float):
                        s.metrics.setdefault("loss_curve", []).append([step + 1, s.metrics["last_loss"]])
                losses = [s.metrics["last_loss"] for s in states if "last_loss" in s.metrics]
                self.log(f"  step {step + 1}/{self.steps}: {len(states)} jobs, mean train loss "
                         f"{sum(losses) / max(1, len(losses)):.4f}")
        bar.close()
        for g in groups:
            g.write_back(optimizer_state=False)

    # ---- files ----------------------------------------------------------------------------
    def job_dir(self, job: Job) -> Path:
        return self.out_dir / job.relpath

    def job_checkpoint(self, job: Job) -> TrainingCheckpoint:
        """A job's checkpoint: written by the rank that owns the job alone (no collective)."""
        return TrainingCheckpoint(self.job_dir(job), self.fingerprint, world_size=1,
                                  label=f"{job.relpath}: checkpoint", log=self.log)

    def _checkpoint(self, s: JobState) -> None:
        self.job_checkpoint(s.job).save(nn.ModuleList(s.trainables), s.optimizer, s.scheduler, s.step,
                                        extra={"metrics": s.metrics, "seconds": s.seconds})

    def _maybe_resume(self, s: JobState) -> None:
        if s.optimizer is None:
            return
        saved = self.job_checkpoint(s.job).load(nn.ModuleList(s.trainables), s.optimizer, s.scheduler)
        if saved is None:
            return
        s.start_step = s.step = saved["step"]
        s.metrics, s.seconds = saved["extra"]["metrics"], saved["extra"]["seconds"]
        self.log(f"  {s.job.relpath}: resumed at step {s.step}")

    def _finish(self, s: JobState) -> None:
        d = self.job_dir(s.job)
        d.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, self.cfg.save_dtype)
        if s.trainables:
            tensors = {f"{prefix}.{n}": p.detach().to("cpu", dtype).contiguous()
                       for prefix, u in _unit_prefixes(s) for n, p in u.state_dict().items()}
            atomic_save_tensors(tensors, d / "weights.safetensors")
        tokens = s.step * self.cfg.batch_size * self.seq_len
        metrics = {"layer": s.job.layer, "name": s.job.name, "kind": s.job.kind,
                   "variants": [v.to_json() for v in s.job.variants], "trained": bool(s.trainables),
                   "init": self.cfg.init if s.trainables else None,
                   "nmse_init": s.metrics.get("nmse_init"), "nmse_final": s.metrics.get("nmse_final"),
                   "last_train_loss": s.metrics.get("last_loss"), "tokens": tokens, "steps": s.step,
                   "seconds": round(s.seconds, 3),
                   "params": sum(p.numel() for u in s.trainables for p in u.parameters()),
                   "loss_curve": s.metrics.get("loss_curve", [])}  # [step, train loss] ~10 times per job
        atomic_write_json(d / "metrics.json", metrics)
        atomic_write_text(d / "DONE", "")
        self.job_checkpoint(s.job).clear()


def _unit_prefixes(s: JobState):
    for unit in s.trainables:
        yield ("attention" if isinstance(unit, AttentionUnit) else "ffn"), unit


def _group_by_layer(states: list[JobState]) -> dict[int, list[JobState]]:
    out: dict[int, list[JobState]] = {}
    for s in states:
        out.setdefault(s.job.layer, []).append(s)
    return out


def job_is_done(out_dir: Path, job: Job) -> bool:
    return (out_dir / job.relpath / "DONE").is_file()


def job_fix(out_dir: Path, job: Job) -> str:
    """What to do about a damaged job: retrain that job alone (the bld stage resumes the others)."""
    return f"delete {out_dir / job.relpath} and rerun the bld stage (only that job is retrained)"


def load_trained_unit(out_dir: Path, job: Job, config, device) -> nn.Module:
    """The trained unit of a finished decoupled job (attention or FFN)."""
    variant = job.attention or job.ffn
    path = out_dir / job.relpath / "weights.safetensors"
    if not path.is_file():
        raise BLDError(f"{path} is missing: the decoupled job {job.relpath} has not finished; rerun bld")
    unit = (AttentionUnit if variant.subblock == "attention" else FFNUnit)(config, variant.config)
    prefix = "attention." if variant.subblock == "attention" else "ffn."
    state = {k[len(prefix):]: v for k, v in load_weights(path, job_fix(out_dir, job)).items() if k.startswith(prefix)}
    unit.load_state_dict(state)
    return unit.to(device=device, dtype=torch.float32)


# =============================================================================================
# Driver: split jobs over ranks, run them in rounds
# =============================================================================================
def run_jobs(trainer: BLDTrainer, jobs: list[Job], train_batches, val_batches, rank: int, world_size: int,
             param_counts: dict[str, int]) -> list[Job]:
    """Run this rank's share of `jobs` (skipping finished ones); return that share."""
    mine = assign_jobs(jobs, world_size, [job_cost(j, param_counts) for j in jobs])[rank]
    todo = [j for j in mine if not job_is_done(trainer.out_dir, j)]
    skipped = len(mine) - len(todo)
    trainer.log(f"[bld] rank {rank}/{world_size}: {len(mine)} jobs ({skipped} finished before), "
                f"{trainer.steps} steps of {trainer.cfg.batch_size}x{trainer.seq_len} tokens each")
    per_round = trainer.cfg.jobs_per_round or max(1, len(todo))
    for start in range(0, len(todo), per_round):
        round_jobs = todo[start:start + per_round]
        started = time.time()
        trainer.run_round(round_jobs, train_batches, val_batches)
        trainer.log(f"[bld] rank {rank}: round of {len(round_jobs)} jobs in {time.time() - started:.1f} s")
    return mine


def collect_metrics(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(out_dir.glob("layers/*/**/metrics.json")):
        rows.append(json.loads(path.read_text()))
    return sorted(rows, key=lambda r: (r["layer"], r["kind"] == "coupled", r["kind"], r["name"]))


def library_table(rows: list[dict], per_layer: bool = False) -> str:
    """Mean validation normalized MSE per variant over layers (or every row with per_layer)."""
    if not rows:
        return "no BLD results yet"
    lines = []
    if per_layer:
        lines.append(f"{'layer':>5} {'variant':<24} {'nmse init':>10} {'nmse final':>10} {'tokens':>10} {'s':>7}")
        for r in rows:
            lines.append(f"{r['layer']:>5} {r['name']:<24} {_fmt(r['nmse_init']):>10} {_fmt(r['nmse_final']):>10} "
                         f"{r['tokens']:>10,} {r['seconds']:>7.1f}")
        return "\n".join(lines)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    lines.append(f"{'variant':<24} {'layers':>6} {'nmse init':>10} {'nmse final':>10} {'improved':>9} "
                 f"{'tokens/job':>11} {'s/job':>7}")
    for name, rs in groups.items():
        init = [r["nmse_init"] for r in rs]
        final = [r["nmse_final"] for r in rs]
        better = sum(f < i for f, i in zip(final, init)) if rs[0]["trained"] else None
        lines.append(f"{name:<24} {len(rs):>6} {_fmt(sum(init) / len(init)):>10} {_fmt(sum(final) / len(final)):>10} "
                     f"{(f'{better}/{len(rs)}' if better is not None else '-'):>9} "
                     f"{rs[0]['tokens']:>11,} {sum(r['seconds'] for r in rs) / len(rs):>7.1f}")
    lines.append("normalized MSE of the layer's residual update on validation tokens (0 = parent, "
                 "1 = as bad as skipping the layer), mean over layers")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def load_job_block(out_dir: Path, job: Job, parent: DeciLMForCausalLM, dtype: torch.dtype) -> JobBlock:
    """The block of a finished job with its trained weights (parent / no-op parts as they are)."""
    config, device = parent.config, parent.model.embed_tokens.weight.device
    path = out_dir / job.relpath / "weights.safetensors"
    weights = load_weights(path, job_fix(out_dir, job)) if job.trainable and path.is_file() else {}
    if job.trainable and not weights:
        raise BLDError(f"{path} is missing or empty: job {job.relpath} has not finished; rerun bld")

    def unit(variant: Variant | None, subblock: str) -> nn.Module:
        parent_layer = parent.model.layers[job.layer]
        if variant is None or variant.is_parent:
            return (parent_attention_unit if subblock == "attention" else parent_ffn_unit)(config, parent_layer)
        made = (AttentionUnit if subblock == "attention" else FFNUnit)(config, variant.config)
        if variant.trainable:
            prefix = f"{subblock}."
            made.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        return made.to(device=device, dtype=dtype).eval()

    return JobBlock(unit(job.attention, "attention"), unit(job.ffn, "ffn"), use_parent_mid=job.kind == "ffn")


def finished_jobs(out_dir: Path, space, layers: Iterable[int] | None = None) -> list[Job]:
    """Every job with a DONE marker in a bld folder, rebuilt from its metrics."""
    jobs = []
    layers = set(layers) if layers is not None else None
    for path in sorted(out_dir.glob("layers/*/**/metrics.json")):
        if not (path.parent / "DONE").is_file():
            continue
        m = json.loads(path.read_text())
        if layers is not None and m["layer"] not in layers:
            continue
        variants = [Variant.from_json(v) for v in m["variants"]]
        attention = next((v for v in variants if v.subblock == "attention"), None)
        ffn = next((v for v in variants if v.subblock == "ffn"), None)
        jobs.append(Job(m["layer"], attention, ffn))
    return jobs
