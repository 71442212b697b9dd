"""Global knowledge distillation (METHOD.md section 7): the assembled child trained against the
frozen parent on

    L = sum over layers l of mean_tokens (1 - cos(h_child_l, h_parent_l)) + KL(p_parent || p_child)

with no LM loss by default (the paper: adding it dropped MT-Bench from 8.74 to 7.71; switchable).
The teacher runs once per batch under no_grad (in its own dtype, bf16 on GPU). The KL runs in
chunks of tokens on the final hidden states, each chunk's logits reduced and turned into
gradients at once (`_FusedHeadKL`), so (batch, seq, vocab) logits never exist whole. On one GPU
the decoder layers (one graph per block kind; a student layer's graph also makes its cosine term)
and the per-chunk reduction are torch.compile'd (`gkd.compile`). bf16 autocast and optional
activation checkpointing on GPU; checkpoints every N steps and resume. With several ranks the data is split by rank and the child is either
replicated on every rank with its gradients averaged (data parallel) or, when it does not fit
one device, sharded with the parent over the ranks with FSDP2 (`fully_shard`); `choose_parallel`
picks by size (`gkd.parallel`).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .activations import causal_context
from .model.modeling import DeciLMForCausalLM
from .progress import progress
from .train import (TrainingCheckpoint, TrainingError, adamw, autocast, autocast_dtype, clip_gradients,
                    lr_scheduler, raise_if_non_finite, settings_fingerprint)
from .sections import GKDConfig  # noqa: F401  (re-exported)

COMPILE_MIN_TOKENS = 4_000_000  # gkd.compile=auto compiles runs of at least this many tokens


class GKDError(TrainingError):
    """GKD cannot go on (non-finite loss, unreadable checkpoint...)."""




def layer_cosine_term(child_hidden: torch.Tensor, parent_hidden: torch.Tensor) -> torch.Tensor:
    """mean over tokens of 1 - cos(child, parent) for one depth, in fp32; (B, T, C) each -> scalar."""
    return (1 - F.cosine_similarity(child_hidden.float(), parent_hidden.float(), dim=-1)).mean()


def hidden_cosine_loss(child_hidden, parent_hidden) -> torch.Tensor:
    """sum over layers of mean over tokens of 1 - cos; the embedding output (index 0) is skipped.
    Either argument: a sequence of (B, T, C) tensors or one stacked (L + 1, B, T, C) tensor."""
    terms = [layer_cosine_term(c, p) for c, p in zip(child_hidden[1:], parent_hidden[1:])]
    return torch.stack(terms).sum()


def call_layer(layer, x: torch.Tensor, ctx) -> torch.Tensor:
    """One decoder layer on (B, T, C). Compiled once (`compiled_layer_call`), it serves every
    layer: torch.compile keeps one graph per distinct block kind and reuses it for every layer
    of that kind, since parameters are graph inputs (regional compilation)."""
    return layer(x, ctx)


def call_layer_distilled(layer, x: torch.Tensor, ctx, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A student layer and its cosine term against the teacher's residual stream at the same depth
    (target (B, T, C)): (the layer's output (B, T, C), scalar). Compiled, the term's fp32 casts and
    reductions fuse into the layer's graph instead of ~10 eager passes over (B, T, C) per layer."""
    out = layer(x, ctx)
    return out, layer_cosine_term(out, target)


def compiled_layer_call(fn=call_layer):
    """`fn` (call_layer or call_layer_distilled) under torch.compile, with room for one graph per
    block kind and grad mode (the default limit, 8, would send the ninth kind to eager frame by frame)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 128))
    return torch.compile(fn, dynamic=False)


def is_identity(layer) -> bool:
    """A layer with neither subblock: traced alone it would be an empty graph, which torch.compile
    answers by never compiling that function again, so the loops below skip it."""
    return layer.self_attn is None and layer.mlp is None


def run_layer(model: DeciLMForCausalLM, layer_call, layer, x: torch.Tensor, ctx, *extra):
    """layer_call(layer, x, ctx, *extra), recomputed in backward when the model trains with
    activation checkpointing (`gkd.activation_checkpointing`)."""
    inner = model.model
    if inner.gradient_checkpointing and inner.training:
        return torch.utils.checkpoint.checkpoint(layer_call, layer, x, ctx, *extra, use_reentrant=False)
    return layer_call(layer, x, ctx, *extra)


def trunk_hidden_states(model: DeciLMForCausalLM, input_ids: torch.Tensor, layer_call=call_layer) -> list[torch.Tensor]:
    """The residual stream of a full causal batch: [embedding output, after layer 1, ..., after
    the last layer] (pre final norm), each (B, T, C). The decoder without the HF output objects
    and KV-cache plumbing; each layer runs through `layer_call` (eager, or compiled per block
    kind); identity layers are skipped."""
    x = model.model.embed_tokens(input_ids)  # (B, T, C)
    ctx = causal_context(model, input_ids, x.dtype)
    hidden = [x]
    for layer in model.model.layers:
        if not is_identity(layer):
            x = run_layer(model, layer_call, layer, x, ctx)
        hidden.append(x)
    return hidden


class _FusedHeadKL(torch.autograd.Function):
    """kl_w * KL(parent || child) + lm_w * (the child's next-token cross-entropy) on the LM head,
    chunk by chunk.

    forward(child rows (N, C) normed, child head (V, C), parent rows (N, C) normed, parent head,
    labels (N,), kl_w, lm_w, chunk, matmul dtype, reduce_chunk) -> (loss, kl, lm), means over the
    N rows; only `loss` is differentiable. Each chunk's logits (n, V) are made, reduced, and their
    gradient  d loss / d z_child = (kl_w * (q - p) + lm_w * (q - onehot)) / N  (q, p the two
    softmaxes) turned into the gradients of the rows and of the head at once, so no (N, V) tensor
    ever exists and backward is a multiplication by the incoming gradient (as in fused
    linear-cross-entropy kernels)."""

    @staticmethod
    def forward(ctx, rows_c, weight_c, rows_p, weight_p, labels, kl_w, lm_w, chunk, mm_dtype, reduce_chunk):
        n = rows_c.shape[0]
        grad_rows = torch.empty_like(rows_c)
        # a frozen head (gkd.train_embeddings false) needs no weight gradient: one matmul fewer a chunk
        want_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight_c.shape if want_weight else (0,), dtype=torch.float32,
                                  device=weight_c.device)
        kl = torch.zeros((), dtype=torch.float32, device=rows_c.device)
        lm = torch.zeros((), dtype=torch.float32, device=rows_c.device)
        wc, wp = weight_c.to(mm_dtype), weight_p.to(mm_dtype)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            hc = rows_c[sl].to(mm_dtype)  # (n, C)
            zc, zp = hc @ wc.t(), rows_p[sl].to(mm_dtype) @ wp.t()  # (n, V) each
            kl_sum, lm_sum, grad_z = reduce_chunk(zc, zp, labels[sl], kl_w / n, lm_w / n)
            kl += kl_sum
            lm += lm_sum
            grad_z = grad_z.to(mm_dtype)
            grad_rows[sl] = (grad_z @ wc).to(rows_c.dtype)
            if want_weight:
                grad_weight += (grad_z.t() @ hc).float()  # product in mm_dtype, fp32 sum (as autocast does)
        kl, lm = kl / n, lm / n
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.weight_dtype, ctx.want_weight = weight_c.dtype, want_weight
        ctx.mark_non_differentiable(kl, lm)
        return kl_w * kl + lm_w * lm, kl, lm

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_lm):
        grad_rows, grad_weight = ctx.saved_tensors
        grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.want_weight else None
        return (grad_rows * grad_loss, grad_w,
                None, None, None, None, None, None, None, None)


def reduce_logit_chunk(zc: torch.Tensor, zp: torch.Tensor, labels: torch.Tensor, kl_scale: float,
                       lm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one chunk of child / parent logits (n, V): (sum over rows of KL(p || q), sum of the
    child's cross-entropy on `labels`, the gradient of kl_scale * KL + lm_scale * CE w.r.t. zc)
    in fp32. A pure function of tensors: torch.compile fuses it into a few passes over the logits."""
    logq = torch.log_softmax(zc.float(), dim=-1)
    logp = torch.log_softmax(zp.float(), dim=-1)
    p, q = logp.exp(), logq.exp()
    kl = (p * (logp - logq)).sum()
    grad = kl_scale * (q - p)
    if not lm_scale:
        return kl, torch.zeros_like(kl), grad
    lm = -logq.gather(1, labels[:, None]).sum()
    grad = (grad + lm_scale * q).scatter_add(1, labels[:, None], torch.full_like(grad[:, :1], -lm_scale))
    return kl, lm, grad


def teacher_hidden_states(parent: DeciLMForCausalLM, input_ids: torch.Tensor, layer_call=call_layer) -> torch.Tensor:
    """The parent's residual streams stacked: (L + 1, B, T, C) (call under no_grad)."""
    return torch.stack(trunk_hidden_states(parent, input_ids, layer_call))


def student_forward(child: DeciLMForCausalLM, input_ids: torch.Tensor, parent_hidden: torch.Tensor,
                    layer_call=call_layer_distilled) -> tuple[torch.Tensor, torch.Tensor]:
    """(the child's pre-norm final hidden state (B, T, C), the per-layer cosine term), the same as
    `hidden_cosine_loss(trunk_hidden_states(child, ...), parent_hidden)`, with each layer's term made
    by `layer_call` (call_layer_distilled, eager or compiled) beside the layer. parent_hidden:
    (L + 1, B, T, C) or a sequence of L + 1 (B, T, C) tensors."""
    x = child.model.embed_tokens(input_ids)  # (B, T, C)
    ctx = causal_context(child, input_ids, x.dtype)
    terms = []
    for depth, layer in enumerate(child.model.layers, start=1):
        target = parent_hidden[depth]  # (B, T, C): the teacher after its layer `depth`
        if is_identity(layer):
            terms.append(layer_cosine_term(x, target))
        else:
            x, term = run_layer(child, layer_call, layer, x, ctx, target)
            terms.append(term)
    return x, torch.stack(terms).sum()


def fused_head_kl(child: DeciLMForCausalLM, parent: DeciLMForCausalLM, h_child: torch.Tensor,
                  h_parent: torch.Tensor, targets: torch.Tensor, cfg: "GKDConfig", mm_dtype: torch.dtype | None,
                  reduce_chunk=reduce_logit_chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(parent || child), LM loss) on the final hidden states, means over the B * (T - 1)
    predicted tokens; differentiable w.r.t. h_child (through the child's final norm) and the
    child's head. h_child, h_parent: (B, T, C) pre-norm final residual streams; targets (B, T).
    mm_dtype: the head matmuls' dtype (the autocast dtype, or None for the weights' own).
    Returns (kl_weight * KL + lm_loss_weight * LM (differentiable), KL, LM (detached))."""
    C = h_child.shape[-1]
    rows_c = child.model.norm(h_child[:, :-1].reshape(-1, C))  # (N, C), in the graph
    with torch.no_grad():
        rows_p = parent.model.norm(h_parent[:, :-1].reshape(-1, C))
    labels = targets[:, 1:].reshape(-1)
    dtype = mm_dtype or child.lm_head.weight.dtype
    return _FusedHeadKL.apply(rows_c, child.lm_head.weight, rows_p, parent.lm_head.weight, labels,
                                 cfg.kl_weight, cfg.lm_loss_weight, cfg.logits_chunk, dtype, reduce_chunk)


def fused_head_divergence(child: DeciLMForCausalLM, parent: DeciLMForCausalLM, h_child: torch.Tensor,
                          h_parent: torch.Tensor, predicts: torch.Tensor, cfg: "GKDConfig",
                          mm_dtype: torch.dtype | None, reduce_chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The on-policy divergence (`reduce_chunk`: onpolicy.divergence_reducer) on the final hidden
    states, mean over the positions where `predicts` (B, T - 1) holds, i.e. whose next token the
    child generated; prompt and padding positions never reach the head. h_child, h_parent:
    (B, T, C) pre-norm. Returns (divergence (differentiable), divergence, 0 (detached))."""
    rows_c = child.model.norm(h_child[:, :-1][predicts])  # (N, C): generated positions only
    with torch.no_grad():
        rows_p = parent.model.norm(h_parent[:, :-1][predicts])
    labels = torch.zeros(rows_c.shape[0], dtype=torch.long, device=rows_c.device)  # unused: no LM term
    dtype = mm_dtype or child.lm_head.weight.dtype
    return _FusedHeadKL.apply(rows_c, child.lm_head.weight, rows_p, parent.lm_head.weight, labels,
                              1.0, 0.0, cfg.logits_chunk, dtype, reduce_chunk)


def freeze_embeddings(child: DeciLMForCausalLM) -> None:
    """gkd.train_embeddings false: the token embedding and the LM head (one tensor when tied) keep
    the parent's values; GKD trains the decoder layers and the norms."""
    child.model.embed_tokens.weight.requires_grad_(False)
    child.lm_head.weight.requires_grad_(False)


class GKDTrainer:
    """Distills one child from the parent; writes checkpoints and the final model to out_dir."""

    def __init__(self, child: DeciLMForCausalLM, parent: DeciLMForCausalLM, cfg: GKDConfig, out_dir: Path,
                 seq_len: int, world_size: int = 1, log=print, fingerprint: str = "", data_parallel: bool = False,
                 compile_tokens: int | None = None):
        """world_size > 1: child and parent sharded with `parallelize` over the ranks, or with
        `data_parallel` both whole on every rank (gradients averaged after each backward).
        fingerprint: what else the checkpoint must have been made with to be resumed (the
        child's identity, the data...); the GKD settings and seq_len are always covered.
        compile_tokens: the tokens that gkd.compile=auto weighs a compile against (default
        cfg.tokens); the search's short GKDs pass the run's GKD tokens, since torch.compile keeps
        the graphs per block kind in the process and the run's GKD reuses them."""
        self.child, self.parent, self.cfg, self.out_dir, self.log = child, parent, cfg, out_dir, log
        self.compile_tokens = cfg.tokens if compile_tokens is None else compile_tokens
        self.device = next(child.parameters()).device
        self.world = world_size
        self.sharded = world_size > 1 and not data_parallel
        self.steps = math.ceil(cfg.tokens / (cfg.batch_size * seq_len * world_size)) if cfg.tokens else 0
        self.autocast_dtype = autocast_dtype(cfg.autocast, self.device)
        if not cfg.train_embeddings:
            freeze_embeddings(child)
        params = [p for p in child.parameters() if p.requires_grad]
        self.optimizer = adamw(params, cfg, self.device, sharded=self.sharded)
        self.scheduler = lr_scheduler(self.optimizer, self.steps, cfg)
        # Not the world size: a checkpoint written by W ranks resumes on any number of ranks.
        self.checkpoint = TrainingCheckpoint(out_dir, settings_fingerprint(cfg, seq_len, fingerprint),
                                             world_size=world_size, label="GKD checkpoint", log=log,
                                             sharded=self.sharded)
        self.step = 0
        self.history: list[dict] = []
        # The on-policy phase: the last on_policy_fraction of the steps (onpolicy.py).
        self.on_policy_steps = round(cfg.on_policy_fraction * self.steps)
        self.on_policy_start = self.steps - self.on_policy_steps
        if self.on_policy_steps and self.sharded:
            raise GKDError("gkd.on_policy_fraction > 0 needs the whole child on every rank to sample from it; "
                           "use gkd.parallel=ddp (or on_policy_fraction=0)")
        if cfg.activation_checkpointing:
            child.model.gradient_checkpointing = True
        # The step functions that ran compiled once (off-policy and on-policy steps compile apart:
        # the on-policy phase's first step can fail to compile long after the first step did).
        self._compile_proven: set[str] = set()
        self._set_step_functions(self._use_compile())

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    # ---- the step's functions, compiled or not ---------------------------------------------
    def _use_compile(self) -> bool:
        if self.cfg.compile == "off" or not hasattr(torch, "compile"):
            if self.cfg.compile == "on":
                raise GKDError(f"gkd.compile = on but torch {torch.__version__} has no torch.compile; "
                               f"use gkd.compile=auto or off")
            return False
        # auto: a GPU, the whole child on it (one GPU or data parallel; not FSDP2-sharded models;
        # on the CPU compiling costs more than it saves), and a run long enough to repay the
        # compile of each new block kind (benchmarks/RESULTS.md, "GKD compiled per block kind").
        long_enough = self.compile_tokens >= COMPILE_MIN_TOKENS
        return self.cfg.compile == "on" or (self.device.type == "cuda" and not self.sharded and long_enough)

    def _set_step_functions(self, compiled: bool) -> None:
        """The teacher's stacked hidden states, the student's last hidden state and cosine term,
        and the per-chunk logit reduction of the KL: plain functions, or with the decoder layers
        and the reduction torch.compile'd. Layers compile per block kind, not per model: the
        bundled pair's whole-model graphs took ~2 minutes per child shape (RESULTS.md), one graph
        per kind takes seconds and serves every child holding that kind."""
        from .onpolicy import divergence_reducer

        layer_call = compiled_layer_call() if compiled else call_layer
        distilled_call = compiled_layer_call(call_layer_distilled) if compiled else call_layer_distilled
        teacher = functools.partial(teacher_hidden_states, self.parent, layer_call=layer_call)
        student = functools.partial(student_forward, self.child, layer_call=distilled_call)
        reduce = reduce_logit_chunk
        reduce_on_policy = divergence_reducer(self.cfg.on_policy_divergence)
        if compiled:
            reduce = torch.compile(reduce, dynamic=False)
            # the number of generated positions changes every step: one graph for every chunk length
            reduce_on_policy = torch.compile(reduce_on_policy, dynamic=True)
        self.compiled = compiled
        self._teacher, self._student, self._reduce = teacher, student, reduce
        self._reduce_on_policy = reduce_on_policy

    def loss_and_backward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward/backward of the GKD loss (gradients accumulate in the child). The first
        compiled step is where compiling happens: with gkd.compile=auto a failure there (no
        compiler, an unsupported op) switches to the eager functions and redoes the step."""
        return self._guarded(self._loss_and_backward, batch)

    def on_policy_loss_and_backward(self, ids: torch.Tensor, predicts: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward/backward of the on-policy loss on the child's own samples: ids (B, T)
        prompt + continuation + padding, predicts (B, T - 1) True where the next token is a
        generated one (`onpolicy.pack_generated`)."""
        return self._guarded(self._on_policy_loss_and_backward, ids, predicts)

    def _guarded(self, step_fn, *args) -> dict[str, torch.Tensor]:
        if not self.compiled or step_fn.__name__ in self._compile_proven:
            return step_fn(*args)
        try:
            parts = step_fn(*args)
        except Exception as err:  # noqa: BLE001: any compiler failure; eager is always possible
            why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
            if self.cfg.compile == "on":
                raise GKDError(f"torch.compile failed for GKD ({why}); use gkd.compile=auto or off") from err
            self.log(f"  gkd: torch.compile failed ({why}); running eagerly")
            self.child.zero_grad(set_to_none=True)
            self._set_step_functions(False)
            return step_fn(*args)
        self._compile_proven.add(step_fn.__name__)
        return parts

    def _loss_and_backward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with torch.no_grad(), self._autocast():
            parent_hidden = self._teacher(batch)  # (L + 1, B, T, C), the teacher once per batch
        with self._autocast():
            h_child, cos = self._student(batch, parent_hidden)  # (B, T, C) pre-norm, scalar
            head, kl, lm = fused_head_kl(self.child, self.parent, h_child, parent_hidden[-1], batch, cfg,
                                         self.autocast_dtype, self._reduce)
        (cfg.cosine_weight * cos + head).backward()
        return {"loss": (cfg.cosine_weight * cos + head).detach(), "cosine": cos.detach(), "kl": kl, "lm": lm}

    def _on_policy_loss_and_backward(self, ids: torch.Tensor, predicts: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self._autocast():
            parent_hidden = self._teacher(ids)  # (L + 1, B, T, C): the parent scores every token
        with self._autocast():
            h_child, _ = self._student(ids, parent_hidden)  # (B, T, C) pre-norm
            loss, divergence, _ = fused_head_divergence(self.child, self.parent, h_child, parent_hidden[-1], predicts,
                                                        self.cfg, self.autocast_dtype, self._reduce_on_policy)
        loss.backward()
        return {"loss": loss.detach(), "divergence": divergence,
                "generated_tokens": predicts.sum().to(divergence.device, torch.float32)}

    def on_policy_batch(self, batch: torch.Tensor, step: int, prompts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The child's samples for this step: (ids (B, T), predicts (B, T - 1)) on the device, T
        the batch's length. prompts: an onpolicy.OnPolicyPrompts (None: the openings of the
        batch's rows, EOS from the child's config)."""
        from .onpolicy import OnPolicyPrompts, pack_generated, sample_continuations

        cfg, T = self.cfg, batch.shape[1]
        if prompts is None:
            eos = self.child.config.eos_token_id
            prompts = OnPolicyPrompts(prompt_tokens=cfg.on_policy_prompt_tokens,
                                      stop_ids=[] if eos is None else [eos] if isinstance(eos, int) else eos)
        chosen = [p[-(T - 1):] for p in prompts.for_step(step, batch)]  # at least one token left to generate
        max_new = max(1, min(cfg.on_policy_max_new_tokens, T - max(len(p) for p in chosen)))
        new = sample_continuations(self.child, chosen, max_new, cfg.on_policy_temperature, cfg.on_policy_top_p,
                                   prompts.stop_ids, prompts.sample_seed(step), log=self.log)
        ids, predicts = pack_generated(chosen, new, T)
        return ids.to(self.device), predicts.to(self.device)

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

    def train(self, batches, prompts=None) -> list[dict]:
        """All steps from the last checkpoint on; the last `on_policy_steps` on the child's own
        samples (prompts: an onpolicy.OnPolicyPrompts, None = openings of the batches' rows).
        The batches are drawn in every step, so the data position stays the step."""
        self._maybe_resume()
        started, first = time.time(), self.step
        bar = progress(total=self.steps, initial=first, desc="[gkd]", unit="step")
        for step, batch in enumerate(batches):
            if step < self.step:
                continue
            if step >= self.steps:
                break
            bar.update(1)
            on_policy = step >= self.on_policy_start
            if on_policy:
                if step == self.on_policy_start:
                    self.log(f"  gkd: on-policy phase, steps {step + 1}-{self.steps} "
                             f"({self.cfg.on_policy_divergence} divergence on the child's samples)")
                ids, predicts = self.on_policy_batch(batch, step, prompts)
                self.child.train()
                parts = self.on_policy_loss_and_backward(ids, predicts)
            else:
                self.child.train()
                parts = self.loss_and_backward(batch.to(self.device))
            if self.sharded:
                sync_replicated_grads(self.child)
            elif self.world > 1:
                average_gradients(self.child, self.world)
            clip_gradients(self.child.parameters(), self.cfg.grad_clip, sharded=self.sharded)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1
            every = max(1, self.steps // 10)
            if on_policy:  # every step of the on-policy phase is recorded
                values = {k: v.item() for k, v in parts.items()}
                raise_if_non_finite({"the on-policy GKD loss": values["loss"]}, self.step, "gkd", self.cfg.lr, GKDError)
                self.history.append({"step": self.step, "phase": "on_policy", **values,
                                     "lr": self.scheduler.get_last_lr()[0]})
                self.log(f"  gkd step {self.step}/{self.steps} (on-policy): {self.cfg.on_policy_divergence} "
                         f"divergence {values['divergence']:.4f} on {values['generated_tokens']:.0f} generated tokens, "
                         f"{time.time() - started:.0f} s")
            elif self.step % every == 0 or self.step == self.steps or self.step % self.cfg.checkpoint_every == 0:
                values = {k: v.item() for k, v in parts.items()}
                raise_if_non_finite({"the GKD loss": values["loss"]}, self.step, "gkd", self.cfg.lr, GKDError)
                self.history.append({"step": self.step, **values, "lr": self.scheduler.get_last_lr()[0]})
                if self.step % every == 0:
                    elapsed = time.time() - started
                    self.log(f"  gkd step {self.step}/{self.steps}: loss {values['loss']:.4f} (cos {values['cosine']:.4f}, "
                             f"kl {values['kl']:.4f}) {elapsed:.0f} s, "
                             f"{(self.step - first) * batch.numel() * self.world / max(elapsed, 1e-9):,.0f} tokens/s")
            if self.step % self.cfg.checkpoint_every == 0 and self.step < self.steps:
                self._checkpoint()
        bar.close()
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


# ---- several ranks ------------------------------------------------------------------------------
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two Adam moments of each trained parameter
DDP_MEMORY_SHARE = 0.6  # of one GPU for the replicated child's state and the parent; the rest: activations


def choose_parallel(setting: str, world_size: int, child_params: int, parent_bytes: int, device: torch.device) -> str:
    """How GKD runs over the ranks: "single" (one rank), "ddp" (the child replicated, gradients
    averaged) or "fsdp" (decoder layers sharded). `setting` auto: ddp when the largest child's
    training state plus the parent fit in DDP_MEMORY_SHARE of this GPU (always on the CPU)."""
    if world_size == 1:
        return "single"
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "ddp"
    need = child_params * TRAIN_BYTES_PER_PARAM + parent_bytes
    return "ddp" if need <= DDP_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory else "fsdp"


def shard_layers(model: DeciLMForCausalLM) -> None:
    """FSDP2: every decoder layer sharded with `fully_shard` (once per model: a second call on the
    same model fails). The embedding, final norm and LM head stay whole on every rank, because
    the chunked KL calls the head outside the model's forward; `sync_replicated_grads` averages
    their gradients. Works on a model still on the CPU: the shards land on this rank's device."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)


def parallelize(child: DeciLMForCausalLM, parent: DeciLMForCausalLM | None = None) -> None:
    """FSDP2 for whole-model training: the child's decoder layers sharded (their gradients are
    reduce-scattered by FSDP), and the frozen parent's when given. A parent serving several
    children is sharded once (`shard_layers`), then each child alone: `parallelize(child)`."""
    for model in (child, parent):
        if model is not None:
            shard_layers(model)


def average_gradients(model: torch.nn.Module, world_size: int, bucket_bytes: int = 256 << 20) -> None:
    """Data parallel: average every gradient over the ranks, in flat buckets of at most
    `bucket_bytes` per dtype (one all-reduce per bucket, not one per parameter)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in {id(p): p for p in model.parameters()}.values() if p.grad is not None]
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    filled: dict[torch.dtype, int] = {}  # bytes in the last bucket of each dtype
    for g in grads:
        per_dtype = buckets.setdefault(g.dtype, [[]])
        size = g.numel() * g.element_size()
        if per_dtype[-1] and filled[g.dtype] + size > bucket_bytes:
            per_dtype.append([])
            filled[g.dtype] = 0
        per_dtype[-1].append(g)
        filled[g.dtype] = filled.get(g.dtype, 0) + size
    for bucket in (b for per_dtype in buckets.values() for b in per_dtype):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)  # SUM then divide: gloo has no AVG
        flat.div_(world_size)
        for g, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(averaged)


def sync_replicated_grads(model: torch.nn.Module) -> None:
    """Average the gradients of the parameters FSDP does not own (plain tensors) over ranks."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    for p in {id(p): p for p in model.parameters()}.values():
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
