"""BLD's small jobs batched: equal-shape decoupled jobs of different layers trained as one.

A group holds G jobs of one kind and shape (e.g. `ffn_768` of layers 0..29): each weight is
stacked into one (G, ...) parameter, the layers' activations into (G, B, T, C) inputs, and every
matrix product of the G jobs is one batched matmul (`bmm`; attention folds G into SDPA's batch).
The loss is the sum of the jobs' normalized MSEs, so each slice of a stacked weight gets exactly
its own job's gradient; clipping is per job (per slice); AdamW is elementwise, so one optimizer
over the stacked weights moves every slice as the job's own optimizer would. Per-job weights,
optimizer states and schedules are written back into the jobs (`write_back`) for checkpoints,
evaluation and the job files, in the one-job-at-a-time format: a run resumes either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .activations import LayerActivations
from .model.modeling import ForwardContext, rotate_half


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of (G, N, C) with per-job weights (G, C), as modeling.RMSNorm computes it."""
    dtype = x.dtype
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight[:, None, :] * y.to(dtype)


def _linear(x: torch.Tensor, params: dict, name: str) -> torch.Tensor:
    """x (G, N, in) @ weight (G, out, in)^T (+ bias (G, out)) -> (G, N, out)."""
    out = torch.bmm(x, params[f"{name}.weight"].transpose(1, 2))
    bias = params.get(f"{name}.bias")
    return out if bias is None else out + bias[:, None, :]


def stacked_ffn(params: dict, m: torch.Tensor, eps: float) -> torch.Tensor:
    """FFNUnit.forward for G jobs: m (G, N, C) -> (G, N, C)."""
    h = _norm(m, params["post_attention_layernorm.weight"], eps)
    if "mlp.linear_mlp.weight" in params:
        return _linear(h, params, "mlp.linear_mlp")
    return _linear(F.silu(_linear(h, params, "mlp.gate_proj")) * _linear(h, params, "mlp.up_proj"),
                   params, "mlp.down_proj")


def stacked_attention(params: dict, x: torch.Tensor, ctx: ForwardContext, shape: tuple[int, int],
                      heads: int, kv_heads: int | None, head_dim: int, eps: float) -> torch.Tensor:
    """AttentionUnit.forward for G jobs: x (G, N, C) with N = B * T tokens -> (G, N, C)."""
    h = _norm(x, params["input_layernorm.weight"], eps)
    if "self_attn.linear_attn.weight" in params:
        return _linear(h, params, "self_attn.linear_attn")
    G, (B, T) = x.shape[0], shape

    def heads_of(name: str, n: int) -> torch.Tensor:  # (G, N, n * D) -> (G, B, n, T, D)
        return _linear(h, params, name).view(G, B, T, n, head_dim).transpose(2, 3)

    cos, sin = ctx.cos[None, :, None], ctx.sin[None, :, None]  # (1, B, 1, T, D)
    q, k, v = heads_of("self_attn.q_proj", heads), heads_of("self_attn.k_proj", kv_heads), \
        heads_of("self_attn.v_proj", kv_heads)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    y = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn_mask=ctx.mask,
                                       is_causal=ctx.is_causal, enable_gqa=kv_heads != heads)  # (G*B, Hq, T, D)
    y = y.view(G, B, heads, T, head_dim).transpose(2, 3).reshape(G, B * T, heads * head_dim)
    return _linear(y, params, "self_attn.o_proj")


def group_key(state, parent_blocks) -> tuple | None:
    """What jobs must share to be stacked (None: this job trains alone): decoupled, trainable,
    the same variant shape, at the same step, and for attention jobs the same parent FFN."""
    job = state.job
    if job.kind == "coupled" or state.optimizer is None or job.init_from_decoupled:
        return None
    variant = job.attention or job.ffn
    if not variant.trainable:
        return None
    frozen = parent_blocks[job.layer].ffn if job.kind == "attention" else None
    return job.kind, variant.config, frozen, state.start_step


def max_group_size(setting: int, config, batch_tokens: int, device: torch.device) -> int:
    """How many jobs one stacked group may hold. setting 0 (auto): on a GPU, models narrower
    than 2048 (whose matrices are too small to fill it alone, RESULTS.md), as many as fit in a
    quarter of the device's memory by a rough count of the saved activations; on the CPU, all."""
    if setting:
        return setting
    if device.type != "cuda":
        return 1 << 30
    if config.hidden_size >= 2048:
        return 1
    widest = max([b.ffn.intermediate_size or 0 for b in config.blocks] + [config.hidden_size])
    per_job = batch_tokens * (8 * config.hidden_size + 6 * widest) * 2  # bytes kept for backward
    return max(1, int(0.25 * torch.cuda.get_device_properties(device).total_memory // per_job))


@dataclass
class StackedGroup:
    """G jobs (JobStates) trained as one; see the module docstring."""

    states: list
    config: object  # the parent's DeciLMConfig
    lr_cfg: object  # BLDConfig (lr, betas, weight_decay, grad_clip...)
    names: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)  # name -> (G, ...) leaf tensor
    frozen: dict = field(default_factory=dict)  # attention jobs: the parent FFNs, stacked
    step: int = 0

    def __post_init__(self):
        from .train import _adamw_kernel

        units = [s.trainables[0] for s in self.states]
        self.names = [n for n, _ in units[0].named_parameters()]
        self.params = {n: torch.stack([dict(u.named_parameters())[n].detach() for u in units]).requires_grad_(True)
                       for n in self.names}
        if self.kind == "attention":
            ffns = [s.block.ffn for s in self.states]
            self.frozen = {n: torch.stack([dict(f.named_parameters())[n].detach() for f in ffns])
                           for n, _ in ffns[0].named_parameters()}
        per_job_dim = {n: p.dim() - 1 for n, p in self.params.items()}
        cfg, device = self.lr_cfg, units[0].parameters().__next__().device
        self.optimizer = torch.optim.AdamW(
            [{"params": [self.params[n] for n in self.names if per_job_dim[n] >= 2], "weight_decay": cfg.weight_decay},
             {"params": [self.params[n] for n in self.names if per_job_dim[n] < 2], "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), **_adamw_kernel(device, False))
        first = self.states[0]
        self.scheduler = type(first.scheduler)(self.optimizer, first.scheduler.lr_lambdas[0])
        self.scheduler.load_state_dict(first.scheduler.state_dict())
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.step = first.start_step
        self._load_optimizer_states()

    @property
    def kind(self) -> str:
        return self.states[0].job.kind

    @property
    def layers(self) -> list[int]:
        return [s.job.layer for s in self.states]

    def _job_param(self, g: int, name: str) -> torch.Tensor:
        return dict(self.states[g].trainables[0].named_parameters())[name]

    def _load_optimizer_states(self) -> None:
        """A resumed job's AdamW moments into the stacked optimizer (all jobs of a group are at
        the same step, so all or none have them)."""
        for name in self.names:
            per_job = [self.states[g].optimizer.state.get(self._job_param(g, name)) for g in range(len(self.states))]
            if per_job[0]:
                self.optimizer.state[self.params[name]] = {
                    "step": per_job[0]["step"].clone(),
                    **{k: torch.stack([s[k] for s in per_job]) for k in ("exp_avg", "exp_avg_sq")}}

    # ---- one step ---------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, m: torch.Tensor, ctx: ForwardContext, shape) -> torch.Tensor:
        """The G jobs' residual updates (G, N, C) from the stacked parent activations."""
        cfg, eps = self.config, self.config.rms_norm_eps
        if self.kind == "ffn":
            return (m - x) + stacked_ffn(self.params, m, eps)
        kv = self.states[0].job.attention.config.num_kv_heads
        a = stacked_attention(self.params, x, ctx, shape, cfg.num_attention_heads, kv, cfg.head_dim, eps)
        return a + stacked_ffn(self.frozen, x + a, eps) if self.frozen else a

    def train_step(self, acts: dict[int, LayerActivations], ctx: ForwardContext, autocast_ctx) -> torch.Tensor:
        """One optimizer step of every job of the group; returns the (G,) detached losses."""
        B, T, C = acts[self.layers[0]].x.shape
        x = torch.stack([acts[i].x for i in self.layers]).view(-1, B * T, C)  # (G, N, C)
        y = torch.stack([acts[i].y for i in self.layers]).view(-1, B * T, C)
        m = torch.stack([acts[i].m for i in self.layers]).view(-1, B * T, C) if self.kind == "ffn" else None
        from . import bld

        with torch.enable_grad(), autocast_ctx:
            err, ref = bld.normalized_mse_terms(self.predict(x, m, ctx, (B, T)), LayerActivations(x, m, y),
                                                stacked=True)  # (G,) each
            losses = err / ref.clamp(min=1e-12)
        losses.sum().backward()
        self._clip_per_job()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return losses.detach()

    def _clip_per_job(self) -> None:
        """clip_grad_norm_ of each job's own gradients (a slice of every stacked gradient)."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        sq = sum(g.float().pow(2).flatten(1).sum(1) for g in grads)  # (G,)
        coef = (self.lr_cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))

    # ---- back into the jobs -----------------------------------------------------------------
    @torch.no_grad()
    def write_back(self, optimizer_state: bool) -> None:
        """Copy each job's slice of the weights (and the AdamW moments and the schedule, for a
        checkpoint) into the job's own unit, optimizer and scheduler."""
        for g, s in enumerate(self.states):
            for name in self.names:
                param = self._job_param(g, name)
                param.copy_(self.params[name][g])
                state = self.optimizer.state.get(self.params[name])
                if optimizer_state and state:
                    s.optimizer.state[param] = {"step": state["step"].clone(),
                                                **{k: state[k][g].clone() for k in ("exp_avg", "exp_avg_sq")}}
            if optimizer_state:
                s.scheduler.load_state_dict(self.scheduler.state_dict())
                for group, lr in zip(s.optimizer.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = lr


def stack_groups(states: list, parent_blocks, max_size: int, config, lr_cfg) -> tuple[list[StackedGroup], list]:
    """Split states into stacked groups (of 2 to max_size jobs) and jobs left to train alone."""
    if max_size < 2:
        return [], list(states)
    by_key: dict[tuple, list] = {}
    alone = []
    for s in states:
        key = group_key(s, parent_blocks)
        (alone.append(s) if key is None else by_key.setdefault(key, []).append(s))
    groups = []
    for members in by_key.values():
        for start in range(0, len(members), max_size):
            part = members[start:start + max_size]
            if len(part) < 2:
                alone += part
            else:
                groups.append(StackedGroup(part, config, lr_cfg))
    return groups, alone
