"""GKD's on-policy phase (generalized knowledge distillation, Agarwal et al. 2024; on-policy
distillation): the child samples continuations of prompts, the parent scores every generated
token, and the child is trained on the divergence between the two next-token distributions at
the generated positions only (the prompt and the padding carry no loss).

Off-policy GKD trains the child on text it would not write itself; at generation time its own
mistakes (a repeated phrase) put it in states it never saw in training, and it repeats. On its
own samples the parent's distribution tells it, at exactly those states, what to write instead.

Divergences (per generated position, full vocabulary, child q, parent p; `gkd.on_policy_divergence`):
  forward  KL(p || q)                                  (the off-policy phase's)
  reverse  KL(q || p)                                  (mode-seeking; the default)
  jsd      0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2
Each is reduced chunk by chunk on the LM head (gkd._FusedHeadKL) with its analytic gradient
w.r.t. the child's logits: for a divergence D(q) with g_v = dD/dq_v, dD/dz_v = q_v (g_v - sum_u q_u g_u);
reverse: g = log q - log p + 1; jsd: g = 0.5 log(q / m).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

JSD_BETA = 0.5


# ---- the divergences, one chunk of logits at a time ------------------------------------------
def _forward_kl(logp, logq, p, q):
    return (p * (logp - logq)).sum(), q - p


def _reverse_kl(logp, logq, p, q):
    ratio = logq - logp  # (n, V)
    per_row = (q * ratio).sum(-1, keepdim=True)  # (n, 1)
    return per_row.sum(), q * (ratio - per_row)


def _jsd(logp, logq, p, q):
    m = JSD_BETA * p + (1 - JSD_BETA) * q
    logm = torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))
    div = JSD_BETA * (p * (logp - logm)).sum() + (1 - JSD_BETA) * (q * (logq - logm)).sum()
    g = (1 - JSD_BETA) * (logq - logm)  # dD/dq
    return div, q * (g - (q * g).sum(-1, keepdim=True))


_DIVERGENCES = {"forward": _forward_kl, "reverse": _reverse_kl, "jsd": _jsd}


def divergence_reducer(kind: str) -> Callable:
    """A `reduce_chunk` for gkd._FusedHeadKL: (zc, zp (n, V), labels, scale, lm_scale) -> (sum
    over rows of the divergence, 0, scale * d divergence / d zc) in fp32 (labels and lm_scale unused)."""
    if kind not in _DIVERGENCES:
        raise ValueError(f"gkd.on_policy_divergence = {kind!r}; allowed: {', '.join(_DIVERGENCES)}")
    divergence = _DIVERGENCES[kind]

    def reduce_chunk(zc, zp, labels, scale, lm_scale):
        logq = torch.log_softmax(zc.float(), dim=-1)
        logp = torch.log_softmax(zp.float(), dim=-1)
        div, grad = divergence(logp, logq, logp.exp(), logq.exp())
        return div, torch.zeros_like(div), scale * grad

    reduce_chunk.__name__ = f"reduce_{kind}"
    return reduce_chunk


# ---- sequences: prompt + the child's continuation, padded ------------------------------------
def pack_generated(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], length: int,
                   pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, length): each prompt followed by its continuation, right-padded with pad_id and
    cut at `length`; predicts (B, length - 1): True where position t's next token ids[:, t + 1]
    is a generated one, i.e. where the loss is taken). Padding after the real tokens changes
    nothing before it in a causal model."""
    B = len(prompts)
    ids = torch.full((B, length), pad_id, dtype=torch.long)
    generated = torch.zeros(B, length, dtype=torch.bool)
    for b, (prompt, new) in enumerate(zip(prompts, continuations)):
        row = (list(prompt) + list(new))[:length]
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        generated[b, len(prompt):len(row)] = True
    return ids, generated[:, 1:]


def sample_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                         top_p: float, stop_ids: Sequence[int], seed: int, log=print) -> list[list[int]]:
    """The child's sampled continuation of every prompt (up to and including its first stop token)
    on the fast path (model/fast.py: fused weights, CUDA graphs on a GPU, eager on the CPU); the
    static-KV-cache path of data/teacher.py if the fast path refuses the model. The global RNG is
    seeded with `seed` inside and restored after, so a resumed run samples the same tokens."""
    from .model.fast import generate

    device = model.model.embed_tokens.weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        was_training = model.training
        model.eval()
        try:
            return generate(model, prompts, max_new_tokens, temperature, top_p, eos_token_id=list(stop_ids),
                            batch_size=max(len(prompts), 1), seed=seed).tokens
        except (NotImplementedError, RuntimeError) as err:  # an engine limit: the plain path always works
            from .data.teacher import generate_batch

            log(f"  gkd on-policy: fast generation failed ({type(err).__name__}: {str(err)[:200]}); "
                f"using the static-cache path")
            return generate_batch(model, [list(p) for p in prompts], max_new_tokens, temperature, top_p,
                                  list(stop_ids), seed)
        finally:
            model.train(was_training)


# ---- prompts ----------------------------------------------------------------------------------
def row_openings(batch: torch.Tensor, tokens: int) -> list[list[int]]:
    """The first `tokens` tokens of every row of a (B, T) batch (the prompts when nothing else is given)."""
    return batch[:, :tokens].tolist()


class OnPolicyPrompts:
    """Where the child's on-policy prompts come from, a deterministic function of (seed, rank,
    step): a share `chat_share` of chat requests in the parent's chat template (when given), the
    rest half seeds (the teacher corpus' topic x text-kind headers) and half the openings of the
    step's training rows (`prompt_tokens` tokens). Every rank draws its own prompts."""

    def __init__(self, seeds: Sequence[Sequence[int]] = (), chat: Sequence[Sequence[int]] = (),
                 chat_share: float = 0.0, prompt_tokens: int = 32, stop_ids: Sequence[int] = (), seed: int = 0,
                 rank: int = 0):
        self.seeds, self.chat = [list(s) for s in seeds if s], [list(c) for c in chat if c]
        self.chat_share = chat_share if self.chat else 0.0
        self.prompt_tokens, self.stop_ids, self.seed, self.rank = prompt_tokens, list(stop_ids), seed, rank

    def sample_seed(self, step: int) -> int:
        return (self.seed * 1_000_003 + self.rank * 10_007 + step) % (2 ** 63)

    def for_step(self, step: int, batch: torch.Tensor) -> list[list[int]]:
        """One prompt per row of this step's (B, T) batch."""
        rng = random.Random(f"onpolicy/{self.seed}/{self.rank}/{step}")
        openings = row_openings(batch, self.prompt_tokens)
        out = []
        for opening in openings:
            if rng.random() < self.chat_share:
                out.append(rng.choice(self.chat))
            elif self.seeds and rng.random() < 0.5:
                out.append(rng.choice(self.seeds))
            else:
                out.append(opening)
        return out

    def kinds(self) -> str:
        parts = [f"{self.chat_share:.0%} chat requests ({len(self.chat)})"] if self.chat_share else []
        rest = 1 - self.chat_share
        if self.seeds:
            parts.append(f"{rest / 2:.0%} topic seeds ({len(self.seeds)})")
            rest /= 2
        parts.append(f"{rest:.0%} openings of training rows ({self.prompt_tokens} tokens)")
        return ", ".join(parts)
