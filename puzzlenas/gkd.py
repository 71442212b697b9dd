"""Global knowledge distillation (METHOD.md section 7): the assembled child trained against the
frozen parent on

    L = sum over layers l of mean_tokens (1 - cos(h_child_l, h_parent_l)) + KL(p_parent || p_child)

with no LM loss by default (the paper: adding it dropped MT-Bench from 8.74 to 7.71; switchable).
The KL runs in chunks of tokens and backpropagates chunk by chunk into the final hidden state,
so (batch, seq, vocab) logits never exist whole. bf16 autocast and optional activation
checkpointing on GPU; checkpoints every N steps and resume; with several ranks the child and
the parent are sharded with FSDP2 (`fully_shard`) and the data is split by rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .model.modeling import DeciLMForCausalLM
from .train import (TrainingCheckpoint, TrainingError, adamw, autocast, autocast_dtype, clip_gradients,
                    lr_scheduler, raise_if_non_finite, settings_fingerprint)


class GKDError(TrainingError):
    """GKD cannot go on (non-finite loss, unreadable checkpoint...)."""


@dataclass
class GKDConfig:
    """How each assembled child is distilled from the parent."""

    tokens: int = 1_000_000  # training tokens (all ranks together)
    batch_size: int = 8  # sequences per step (per rank)
    lr: float = 5e-5  # the child starts close to the parent: Adam's first steps move every weight by ~lr
    min_lr_fraction: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    cosine_weight: float = 1.0  # per-layer hidden-state cosine term
    kl_weight: float = 1.0  # KL(parent || child) on the logits
    lm_loss_weight: float = 0.0  # next-token cross-entropy; off by default (METHOD.md section 7)
    logits_chunk: int = 1024  # token rows of logits materialized at once
    activation_checkpointing: bool = False
    checkpoint_every: int = 100
    autocast: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    validation_tokens: int = 16384  # held-out tokens on which the GKD loss is reported before / after
    # Share of every batch's rows taken from the parent's own chat transcripts (`chat_data.py`):
    # user requests built from the corpus' training documents, answered by the parent (sampled).
    chat_fraction: float = 0.0
    chat_requests: int = 1024  # transcripts written (once per run, cached in gkd-chat/)
    chat_max_new_tokens: int = 192
    chat_temperature: float = 0.7
    chat_batch_size: int = 128  # requests answered at once

    def validate(self) -> None:
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"gkd.autocast = {self.autocast!r}; allowed: auto, bf16, off")
        if self.tokens < 0 or self.batch_size < 1 or self.logits_chunk < 1 or self.checkpoint_every < 1:
            raise ValueError("gkd.tokens >= 0, batch_size, logits_chunk, checkpoint_every >= 1")
        if min(self.cosine_weight, self.kl_weight, self.lm_loss_weight) < 0 or \
                self.cosine_weight + self.kl_weight + self.lm_loss_weight == 0:
            raise ValueError("gkd loss weights must be >= 0 and not all 0")
        if not (self.lr > 0 and 0 <= self.warmup_fraction < 1 and len(self.betas) == 2):
            raise ValueError("gkd.lr > 0, warmup_fraction in [0, 1), two betas")
        if not 0 <= self.chat_fraction <= 1 or min(self.chat_requests, self.chat_max_new_tokens,
                                                   self.chat_batch_size) < 1 or self.chat_temperature <= 0:
            raise ValueError("gkd.chat_fraction in [0, 1]; chat_requests, chat_max_new_tokens, chat_batch_size "
                             ">= 1; chat_temperature > 0")


def hidden_cosine_loss(child_hidden: tuple[torch.Tensor, ...], parent_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """sum over layers of mean over tokens of 1 - cos; the embedding output (index 0) is skipped."""
    terms = [(1 - F.cosine_similarity(c.float(), p.float(), dim=-1)).mean()
             for c, p in zip(child_hidden[1:], parent_hidden[1:])]
    return torch.stack(terms).sum()


def chunked_kl_backward(child: DeciLMForCausalLM, parent: DeciLMForCausalLM, h_child: torch.Tensor,
                        h_parent: torch.Tensor, targets: torch.Tensor, cfg: GKDConfig,
                        scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(parent || child) (and LM loss) on the final hidden states, chunk by chunk.

    h_child: (B, T, C) pre-norm final hidden of the child (in the graph); h_parent: same, parent.
    Backpropagates each chunk into a leaf copy of h_child and the head; returns (kl, lm, grad of
    h_child) so the caller finishes the backward through the trunk with one call."""
    B, T, C = h_child.shape
    leaf = h_child.detach().requires_grad_(True)
    rows_c, rows_p = leaf[:, :-1].reshape(-1, C), h_parent[:, :-1].reshape(-1, C)  # (N, C)
    labels = targets[:, 1:].reshape(-1)
    n = rows_c.shape[0]
    kl_total = torch.zeros((), device=h_child.device)
    lm_total = torch.zeros((), device=h_child.device)
    for start in range(0, n, cfg.logits_chunk):
        sl = slice(start, start + cfg.logits_chunk)
        with torch.no_grad():
            logp = F.log_softmax(parent.lm_head(parent.model.norm(rows_p[sl])).float(), dim=-1)  # (n, V)
        logq = F.log_softmax(child.lm_head(child.model.norm(rows_c[sl])).float(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum() / n
        loss = cfg.kl_weight * kl
        if cfg.lm_loss_weight:
            lm = F.nll_loss(logq, labels[sl], reduction="sum") / n
            loss = loss + cfg.lm_loss_weight * lm
            lm_total += lm.detach()
        (loss * scale).backward()
        kl_total += kl.detach()
    return kl_total, lm_total, leaf.grad


class GKDTrainer:
    """Distills one child from the parent; writes checkpoints and the final model to out_dir."""

    def __init__(self, child: DeciLMForCausalLM, parent: DeciLMForCausalLM, cfg: GKDConfig, out_dir: Path,
                 seq_len: int, world_size: int = 1, log=print, fingerprint: str = ""):
        """world_size > 1: child and parent sharded with `parallelize` over the ranks.
        fingerprint: what else the checkpoint must have been made with to be resumed (the
        child's identity, the data...); the GKD settings and seq_len are always covered."""
        self.child, self.parent, self.cfg, self.out_dir, self.log = child, parent, cfg, out_dir, log
        self.device = next(child.parameters()).device
        self.world = world_size
        self.steps = math.ceil(cfg.tokens / (cfg.batch_size * seq_len * world_size)) if cfg.tokens else 0
        self.autocast_dtype = autocast_dtype(cfg.autocast, self.device)
        params = [p for p in child.parameters() if p.requires_grad]
        self.optimizer = adamw(params, cfg, self.device, sharded=world_size > 1)
        self.scheduler = lr_scheduler(self.optimizer, self.steps, cfg)
        # Not the world size: a checkpoint written by W ranks resumes on any number of ranks.
        self.checkpoint = TrainingCheckpoint(out_dir, settings_fingerprint(cfg, seq_len, fingerprint),
                                             world_size=world_size, label="GKD checkpoint", log=log)
        self.step = 0
        self.history: list[dict] = []
        if cfg.activation_checkpointing:
            child.model.gradient_checkpointing = True

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def loss_and_backward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward/backward of the GKD loss (gradients accumulate in the child)."""
        with torch.no_grad(), self._autocast():
            p_out = self.parent.model(input_ids=batch, output_hidden_states=True, use_cache=False)
        with self._autocast():
            c_out = self.child.model(input_ids=batch, output_hidden_states=True, use_cache=False)
            cos = hidden_cosine_loss(c_out.hidden_states, p_out.hidden_states)
        # last_hidden_state is normed; the chunked head needs the pre-norm final stream.
        h_child, h_parent = c_out.hidden_states[-1], p_out.hidden_states[-1]
        with self._autocast():
            kl, lm, grad = chunked_kl_backward(self.child, self.parent, h_child, h_parent, batch, self.cfg)
        trunk = self.cfg.cosine_weight * cos + (h_child * grad).sum()  # the KL's gradient through the trunk
        trunk.backward()
        return {"loss": (self.cfg.cosine_weight * cos + self.cfg.kl_weight * kl + self.cfg.lm_loss_weight * lm).detach(),
                "cosine": cos.detach(), "kl": kl, "lm": lm}

    @torch.no_grad()
    def validation_loss(self, batches: list[torch.Tensor]) -> dict[str, float]:
        """The GKD loss terms on fixed held-out batches (no update)."""
        self.child.eval()
        sums = {"cosine": 0.0, "kl": 0.0}
        for batch in batches:
            batch = batch.to(self.device)
            with self._autocast():
                p_out = self.parent.model(input_ids=batch, output_hidden_states=True, use_cache=False)
                c_out = self.child.model(input_ids=batch, output_hidden_states=True, use_cache=False)
                sums["cosine"] += hidden_cosine_loss(c_out.hidden_states, p_out.hidden_states).item()
                lq = F.log_softmax(self.child.lm_head(c_out.last_hidden_state[:, :-1]).float(), -1)
                lp = F.log_softmax(self.parent.lm_head(p_out.last_hidden_state[:, :-1]).float(), -1)
                sums["kl"] += (lp.exp() * (lp - lq)).sum(-1).mean().item()
        out = {k: v / max(1, len(batches)) for k, v in sums.items()}
        out["loss"] = self.cfg.cosine_weight * out["cosine"] + self.cfg.kl_weight * out["kl"]
        return out

    def train(self, batches) -> list[dict]:
        self._maybe_resume()
        started = time.time()
        for step, batch in enumerate(batches):
            if step < self.step:
                continue
            if step >= self.steps:
                break
            self.child.train()
            parts = self.loss_and_backward(batch.to(self.device))
            if self.world > 1:
                sync_replicated_grads(self.child)
            clip_gradients(self.child.parameters(), self.cfg.grad_clip, sharded=self.world > 1)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1
            every = max(1, self.steps // 10)
            if self.step % every == 0 or self.step == self.steps or self.step % self.cfg.checkpoint_every == 0:
                values = {k: v.item() for k, v in parts.items()}
                raise_if_non_finite({"the GKD loss": values["loss"]}, self.step, "gkd", self.cfg.lr, GKDError)
                self.history.append({"step": self.step, **values, "lr": self.scheduler.get_last_lr()[0]})
                if self.step % every == 0:
                    self.log(f"  gkd step {self.step}/{self.steps}: loss {values['loss']:.4f} (cos {values['cosine']:.4f}, "
                             f"kl {values['kl']:.4f}) {time.time() - started:.0f} s")
            if self.step % self.cfg.checkpoint_every == 0 and self.step < self.steps:
                self._checkpoint()
        self.child.eval()
        self.child.model.gradient_checkpointing = False
        return self.history

    # ---- checkpoints (train.TrainingCheckpoint: any number of ranks, settings fingerprinted) ----
    def _checkpoint(self) -> None:
        self.checkpoint.save(self.child, self.optimizer, self.scheduler, self.step, extra={"history": self.history})

    def _maybe_resume(self) -> None:
        saved = self.checkpoint.load(self.child, self.optimizer, self.scheduler)
        if saved is None:
            return
        self.step, self.history = saved["step"], saved["extra"]["history"]
        written_by = saved["world_size"]
        self.log(f"  resumed GKD at step {self.step}" + (f" (checkpoint written by {written_by} ranks, resumed "
                                                          f"on {self.world})" if written_by != self.world else ""))

    def clear_checkpoint(self) -> None:
        self.checkpoint.clear()


def parallelize(child: DeciLMForCausalLM, parent: DeciLMForCausalLM) -> None:
    """FSDP2 for whole-model training: every decoder layer of the child and of the frozen parent
    is sharded with `fully_shard` (its gradients are reduce-scattered by FSDP). The embedding,
    final norm and LM head stay replicated, because the chunked KL calls the head outside the
    model's forward; their gradients are averaged by `sync_replicated_grads`."""
    from torch.distributed.fsdp import fully_shard

    for model in (child, parent):
        for layer in model.model.layers:
            fully_shard(layer)


def sync_replicated_grads(model: torch.nn.Module) -> None:
    """Average the gradients of the parameters FSDP does not own (plain tensors) over ranks."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    for p in {id(p): p for p in model.parameters()}.values():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
