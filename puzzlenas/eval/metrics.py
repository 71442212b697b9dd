"""Evaluation of the parent and the children on held-out data (the test split).

- language modelling: perplexity, KL(parent || model) of the next-token distributions, and
  top-1 next-token agreement with the parent;
- downstream tasks built from real text that installed packages ship, scored by
  log-likelihood like lm-evaluation-harness (`eval/tasks/`);
- throughput: the end-to-end generation benchmark on the fast path (`model/fast.py`: fused,
  fill-aware decode, as a serving engine runs it), the same for parent and child
  (`inference.measure_generation`), per serving scenario;
- samples: greedy completions of a few fixed prompts (chat-templated and plain), generated on
  the same fast path, so a reader sees whether a child still writes coherent text.
Retention = child / parent (for perplexity: parent / child).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..model.modeling import DeciLMForCausalLM
    from .config import EvalConfig


@torch.no_grad()
def complete(model: DeciLMForCausalLM, tokenizer, prompt: str, chat: bool, max_new_tokens: int,
             temperature: float = 0.0) -> str:
    """One completion of `prompt` (greedy unless temperature > 0), decoded without the prompt."""
    return complete_many(model, tokenizer, [(prompt, chat)], max_new_tokens, temperature)[0]


def complete_many(model: DeciLMForCausalLM, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int,
                  temperature: float = 0.0) -> list[str]:
    """Completions of (prompt, through the chat template?) pairs, all in one batch on the fast path
    (fused weights, attention over the filled cache, compiled + graphed on CUDA, eager on CPU), as
    an engine runs the model: one decode step serves every prompt, where one at a time a CPU
    re-read the weights for each (5 report samples: ~5x the steps). Greedy unless temperature > 0;
    each row stops at the model's EOS as transformers' generate does."""
    from ..model.fast import generate

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat and getattr(tokenizer, "chat_template", None) else p for p, chat in prompts]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    eos = eos if eos is not None else (model.config.eos_token_id if model.config.eos_token_id is not None
                                       else tokenizer.eos_token_id)
    result = generate(model, ids, max_new_tokens, temperature=temperature, eos_token_id=eos, batch_size=len(ids))
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.tokens]


def sample_completions(model: DeciLMForCausalLM, tokenizer, cfg: EvalConfig) -> list[dict]:
    """The eval config's chat and plain prompts, each completed greedily (in one batch)."""
    prompts = [(p, True) for p in cfg.chat_prompts] + [(p, False) for p in cfg.plain_prompts]
    if not prompts:
        return []
    texts = complete_many(model, tokenizer, prompts, cfg.sample_tokens)
    return [{"prompt": p, "chat": chat, "completion": text} for (p, chat), text in zip(prompts, texts)]


@torch.no_grad()
def final_hidden(model: DeciLMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, C) normed final hidden state."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def lm_metrics(models: dict[str, DeciLMForCausalLM], parent: DeciLMForCausalLM, batches: list[torch.Tensor],
               chunk: int, parent_hidden: list[torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Perplexity, KL to the parent and top-1 agreement for each model on the same batches.

    parent_hidden: the parent's `final_hidden` of each batch, when the caller evaluates models
    one at a time and keeps them (so the parent runs once, not once per model)."""
    device = parent.model.embed_tokens.weight.device
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in models}
    n_total = 0
    for b, batch in enumerate(batches):
        batch = batch.to(device)
        hp = (parent_hidden[b] if parent_hidden is not None else final_hidden(parent, batch))[:, :-1].flatten(0, 1)
        labels = batch[:, 1:].flatten()
        hidden = {name: final_hidden(m, batch)[:, :-1].flatten(0, 1) for name, m in models.items()}
        for start in range(0, hp.shape[0], chunk):
            sl = slice(start, start + chunk)
            logp = F.log_softmax(parent.lm_head(hp[sl]).float(), dim=-1)
            for name, model in models.items():
                logq = F.log_softmax(model.lm_head(hidden[name][sl].to(model.lm_head.weight.dtype)).float(), dim=-1)
                s = sums[name]
                s["nll"] += F.nll_loss(logq, labels[sl], reduction="sum").item()
                s["kl"] += (logp.exp() * (logp - logq)).sum().item()
                s["agree"] += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
        n_total += hp.shape[0]
    return {name: {"loss": s["nll"] / n_total, "perplexity": math.exp(s["nll"] / n_total),
                   "kl_to_parent": s["kl"] / n_total, "top1_agreement": s["agree"] / n_total, "tokens": n_total}
            for name, s in sums.items()}


def retention(child: dict, parent: dict) -> dict[str, float]:
    """What a child keeps of its parent, higher is better: ``perplexity`` = parent / child,
    ``<task>.acc`` = child / parent accuracy, ``tasks_mean`` = their mean.  Results are the eval
    stage's (``{"perplexity": .., "tasks": {task: {"acc": ..}}}``); a task the parent lacks or
    scores 0 on is left out."""
    out = {}
    if "perplexity" in child and "perplexity" in parent:
        out["perplexity"] = parent["perplexity"] / child["perplexity"]
    for task, scores in child.get("tasks", {}).items():
        base = parent.get("tasks", {}).get(task, {}).get("acc")
        if base and scores.get("acc") is not None:
            out[f"{task}.acc"] = scores["acc"] / base
    task_values = [v for k, v in out.items() if k.endswith(".acc")]
    if task_values:
        out["tasks_mean"] = sum(task_values) / len(task_values)
    return out
