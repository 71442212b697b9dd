"""Replace-1-block scoring (METHOD.md section 4).

Each library item (a trained attention or FFN variant of one layer, or a coupled pair) is put
into the otherwise unchanged parent, and the damage is measured on held-out tokens:
KL(parent || child) of the next-token distributions (the paper's best ranking), and the
child's LM loss. An architecture's quality estimate is the sum of its blocks' scores.

The parent runs once per batch and keeps, for every layer, its input x_i and mid-stream m_i;
an item of layer i starts from them and runs only the parent's layers i+1.. and the head.
Several items of one layer are stacked along the batch and run together. Items split over
ranks; the running sums are checkpointed after each batch, so a killed run resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .activations import LayerActivations, causal_context
from .bld import Job, JobBlock, assign_jobs, load_job_block
from .checkpoint import atomic_write_json
from .model.modeling import DeciLMForCausalLM, ForwardContext
from .progress import progress
from .sections import ScoringConfig  # noqa: F401  (re-exported)



@torch.no_grad()
def parent_pass(parent: DeciLMForCausalLM, input_ids: torch.Tensor) -> tuple[list[LayerActivations], torch.Tensor,
                                                                                ForwardContext]:
    """x and m of every layer (y is the next layer's x) and the final hidden state (B, T, C)."""
    model = parent.model
    x = model.embed_tokens(input_ids)
    ctx = causal_context(parent, input_ids, x.dtype)
    acts = []
    for layer in model.layers:
        m = x + layer.self_attn(layer.input_layernorm(x), ctx) if layer.self_attn is not None else x
        y = m + layer.mlp(layer.post_attention_layernorm(m)) if layer.mlp is not None else m
        acts.append(LayerActivations(x, m, None))
        x = y
    return acts, x, ctx


@torch.no_grad()
def run_suffix(parent: DeciLMForCausalLM, h: torch.Tensor, first_layer: int, ctx: ForwardContext) -> torch.Tensor:
    """The parent's layers first_layer.. on h (B', T, C), with RoPE tables broadcast to B'."""
    reps = h.shape[0] // ctx.cos.shape[0]
    wide = ForwardContext(ctx.cos.repeat(reps, 1, 1), ctx.sin.repeat(reps, 1, 1), ctx.mask, ctx.is_causal, None)
    for layer in parent.model.layers[first_layer:]:
        h = layer(h, wide)
    return h


@torch.no_grad()
def kl_and_nll(parent: DeciLMForCausalLM, parent_h: torch.Tensor, child_h: torch.Tensor, targets: torch.Tensor,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item sums of KL(parent || child) and child NLL over all positions but the last.

    parent_h: (B, T, C) final hidden of the parent; child_h: (k*B, T, C) of k items;
    targets: (B, T) next tokens. Logits are made `chunk` rows at a time, never (k*B, T, V)."""
    B, T, C = parent_h.shape
    k = child_h.shape[0] // B
    head, norm = parent.lm_head, parent.model.norm
    p_rows = parent_h[:, :-1].reshape(-1, C)  # (N, C), N = B*(T-1)
    c_rows = child_h[:, :-1].reshape(k, -1, C)  # (k, N, C)
    t_rows = targets[:, 1:].reshape(-1)  # (N,)
    kl = torch.zeros(k, dtype=torch.float64, device=parent_h.device)
    nll = torch.zeros(k, dtype=torch.float64, device=parent_h.device)
    for start in range(0, p_rows.shape[0], chunk):
        sl = slice(start, start + chunk)
        logp = F.log_softmax(head(norm(p_rows[sl])).float(), dim=-1)  # (n, V)
        for j in range(k):
            logq = F.log_softmax(head(norm(c_rows[j, sl])).float(), dim=-1)  # (n, V)
            kl[j] += (logp.exp() * (logp - logq)).sum().double()
            nll[j] += F.nll_loss(logq, t_rows[sl], reduction="sum").double()
    return kl, nll


class ScoreAccumulator:
    """Running sums per item, checkpointed to JSON after each batch."""

    def __init__(self, path: Path, items: list[Job]):
        self.path = path
        self.sums = {j.relpath: {"kl": 0.0, "nll": 0.0} for j in items}
        self.tokens, self.batches_done, self.parent_nll = 0, 0, 0.0
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                if set(saved["sums"]) == set(self.sums):
                    self.sums, self.tokens = saved["sums"], saved["tokens"]
                    self.batches_done, self.parent_nll = saved["batches_done"], saved["parent_nll"]
            except (json.JSONDecodeError, KeyError):
                pass  # torn by a kill: start over

    def save(self) -> None:
        atomic_write_json(self.path, {"sums": self.sums, "tokens": self.tokens, "batches_done": self.batches_done,
                                      "parent_nll": self.parent_nll}, indent=None)


def score_items(parent: DeciLMForCausalLM, bld_dir: Path, items: list[Job], batches: list[torch.Tensor],
                cfg: ScoringConfig, progress_path: Path, log=print) -> dict[str, dict]:
    """KL and LM loss of every item, summed over `batches` (resuming from `progress_path`)."""
    device = parent.model.embed_tokens.weight.device
    dtype = parent.model.embed_tokens.weight.dtype
    # The parent's own blocks need no pass: their KL is 0 and their loss the parent's.
    exact = [j for j in items if all(v.is_parent for v in j.variants)]
    items = [j for j in items if j not in exact]
    acc = ScoreAccumulator(progress_path, items)
    blocks: dict[str, JobBlock] = {j.relpath: load_job_block(bld_dir, j, parent, dtype) for j in items}
    by_layer: dict[int, list[Job]] = {}
    for j in items:
        by_layer.setdefault(j.layer, []).append(j)
    started = time.time()
    bar = progress(total=len(batches), initial=acc.batches_done, desc=f"[scores] {len(items)} items", unit="batch")
    for b, batch in enumerate(batches):
        if b < acc.batches_done:
            continue
        batch = batch.to(device)
        acts, parent_h, ctx = parent_pass(parent, batch)
        for layer, jobs in sorted(by_layer.items()):
            for start in range(0, len(jobs), cfg.items_per_pass):
                group = jobs[start:start + cfg.items_per_pass]
                with torch.no_grad():
                    outs = [acts[layer].x + blocks[j.relpath](acts[layer], ctx) for j in group]  # (B, T, C) each
                    h = run_suffix(parent, torch.cat(outs), layer + 1, ctx)
                    kl, nll = kl_and_nll(parent, parent_h, h, batch, cfg.logits_chunk)
                for j, k_sum, n_sum in zip(group, kl.tolist(), nll.tolist()):
                    acc.sums[j.relpath]["kl"] += k_sum
                    acc.sums[j.relpath]["nll"] += n_sum
        _, parent_nll = kl_and_nll(parent, parent_h, parent_h, batch, cfg.logits_chunk)
        acc.parent_nll += parent_nll.item()
        acc.tokens += batch.shape[0] * (batch.shape[1] - 1)
        acc.batches_done = b + 1
        acc.save()
        bar.update(1)
        log(f"  scored batch {b + 1}/{len(batches)} for {len(items)} items ({time.time() - started:.0f} s)")
    bar.close()
    n = max(acc.tokens, 1)
    parent_loss = acc.parent_nll / n
    for j in exact:
        acc.sums[j.relpath] = {"kl": 0.0, "nll": acc.parent_nll}
    return {j.relpath: {"layer": j.layer, "name": j.name, "kind": j.kind,
                        "variants": [v.to_json() for v in j.variants],
                        "kl": acc.sums[j.relpath]["kl"] / n, "lm_loss": acc.sums[j.relpath]["nll"] / n,
                        "lm_loss_delta": acc.sums[j.relpath]["nll"] / n - parent_loss, "tokens": acc.tokens}
            for j in items + exact}


def split_items(items: list[Job], num_layers: int, rank: int, world: int) -> list[Job]:
    """This rank's share: balanced by suffix length (an item of layer i runs L - i layers)."""
    return assign_jobs(items, world, [float(num_layers - j.layer) for j in items])[rank]


def scores_table(rows: list[dict], metric: str = "kl", per_layer: bool = False) -> str:
    """Mean (min..max) of `metric` over layers per variant, or a layer x variant grid."""
    if not rows:
        return "no scores yet"
    names = list(dict.fromkeys(r["name"] for r in sorted(rows, key=lambda r: (r["kind"], r["name"]))))
    if per_layer:
        layers = sorted({r["layer"] for r in rows})
        grid = {(r["layer"], r["name"]): r[metric] for r in rows}
        width = max(9, *(len(n) for n in names))
        lines = [f"{metric} by layer\n{'layer':>5} " + " ".join(f"{n:>{width}}" for n in names)]
        for i in layers:
            cells = [f"{grid[(i, n)]:>{width}.4f}" if (i, n) in grid else f"{'-':>{width}}" for n in names]
            lines.append(f"{i:>5} " + " ".join(cells))
        return "\n".join(lines)
    lines = [f"{'variant':<24} {'layers':>6} {'mean ' + metric:>12} {'min':>9} {'max':>9}"]
    for n in names:
        vals = [r[metric] for r in rows if r["name"] == n]
        lines.append(f"{n:<24} {len(vals):>6} {sum(vals) / len(vals):>12.5f} {min(vals):>9.5f} {max(vals):>9.5f}")
    lines.append(f"replace-1-block {metric} on {rows[0]['tokens']:,} held-out tokens "
                 f"({'nats per token' if metric != 'lm_loss_delta' else 'loss increase'})")
    return "\n".join(lines)
