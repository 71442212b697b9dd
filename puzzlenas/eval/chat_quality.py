"""Chat quality of an instruction-tuned parent and its children.

A child distilled on plain text can keep its perplexity and still fail as a chat model: issue 11
saw the 2x child answer "Explain why the sky is blue" with "The sky is blue. The sky is blue. ..."
and layer-removal children answer with empty strings. So, on a fixed set of prompts
(:data:`CHAT_PROMPTS`), each model answers greedily through the chat template and this module
reports

* ``empty_rate``: answers with no visible text (the model ended its turn at once);
* repetition: ``distinct_1`` / ``distinct_2`` / ``distinct_3`` (distinct n-grams / n-grams of the
  answer's tokens, averaged over answers) and ``longest_repeated_span`` (tokens of the longest span
  that occurs twice in one answer, mean and max over answers);
* ``kl_to_parent`` / ``top1_agreement`` on the *parent's* greedy answers: each model reads the
  parent's transcript (prompt + answer) and is scored on the answer positions, so a child that
  drifts from the parent's way of answering shows here even when its own answers look fine.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.teacher import distinct_ngram_ratio, generate_batch, longest_repeated_span, stop_ids
from .chat_prompts import CHAT_PROMPTS

__all__ = ["CHAT_PROMPTS", "chat_answers", "chat_quality", "kl_on_transcripts", "repetition_stats"]



def _chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat quality needs an instruction-tuned parent: its tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_answers(model, tokenizer, prompts: Sequence[str] = CHAT_PROMPTS, max_new_tokens: int = 128,
                 batch_size: int = 32, generate=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) per prompt; the answer keeps its end-of-turn token when the
    model ended its turn within ``max_new_tokens``. generate: a function with generate_batch's
    signature (e.g. data/teacher.fast_generate_batch: the same greedy tokens, faster)."""
    generate = generate or generate_batch
    stops = stop_ids(model, tokenizer)
    prompt_ids = [_chat_prompt_ids(tokenizer, p) for p in prompts]
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        answers = generate(model, chunk, max_new_tokens, 0.0, 1.0, stops, 0)  # greedy
        out += list(zip(chunk, answers))
    return out


def repetition_stats(answers: Sequence[Sequence], empty: Sequence[bool] | None = None) -> dict[str, float]:
    """Empty-answer rate and repetition measures over answers given as token (or word) sequences.

    empty: which answers count as empty (default: those with no tokens); the caller passes it when
    an answer of only whitespace / special tokens should count too."""
    if not answers:
        raise ValueError("repetition_stats: no answers")
    empty = [len(a) == 0 for a in answers] if empty is None else list(empty)
    spans = [longest_repeated_span(a) for a in answers]
    stats = {"answers": len(answers), "empty_rate": sum(empty) / len(answers),
             "mean_tokens": sum(len(a) for a in answers) / len(answers),
             "longest_repeated_span": sum(spans) / len(spans), "longest_repeated_span_max": max(spans),
             "longest_repeated_span_se": standard_error(spans)}
    for n in (1, 2, 3):
        ratios = [distinct_ngram_ratio(a, n) for a in answers]
        stats[f"distinct_{n}"] = sum(ratios) / len(ratios)
        stats[f"distinct_{n}_se"] = standard_error(ratios)
    return stats


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean over prompts (sample standard deviation / sqrt(n); 0 for one value):
    how far two models' means must be apart before the prompts tell them apart."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def kl_on_transcripts(models: dict, parent, transcripts: Sequence[tuple[list[int], list[int]]],
                      batch_size: int = 16) -> dict[str, dict[str, float]]:
    """KL(parent || model) and top-1 agreement on the answer positions of each transcript (the
    positions that predict answer tokens), averaged over those tokens. Transcripts are read
    `batch_size` at a time, right-padded: a causal model's logits at a real position do not see
    the padding after it (one forward per batch, not per transcript: 100 prompts cost ~7 forwards)."""
    device = parent.model.embed_tokens.weight.device
    rows = [(list(p), list(a)) for p, a in transcripts if a]
    if not rows:
        raise ValueError("kl_on_transcripts: every answer is empty; nothing to score")
    sums = {name: {"kl": 0.0, "agree": 0.0} for name in models}
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        ids = torch.zeros(len(chunk), max(len(p) + len(a) for p, a in chunk), dtype=torch.long)  # (B, T)
        predicts = torch.zeros(ids.shape, dtype=torch.bool)  # positions predicting an answer token
        for b, (prompt, answer) in enumerate(chunk):
            ids[b, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            predicts[b, len(prompt) - 1:len(prompt) + len(answer) - 1] = True
        ids, predicts = ids.to(device), predicts.to(device)
        logp = F.log_softmax(parent(input_ids=ids).logits[predicts].float(), dim=-1)  # (N, V)
        for name, model in models.items():
            logq = F.log_softmax(model(input_ids=ids).logits[predicts].float(), dim=-1)
            sums[name]["kl"] += (logp.exp() * (logp - logq)).sum().item()
            sums[name]["agree"] += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
    n = sum(len(a) for _, a in rows)
    return {name: {"kl_to_parent": s["kl"] / n, "top1_agreement": s["agree"] / n, "answer_tokens": n}
            for name, s in sums.items()}


def chat_quality(models: dict, parent, tokenizer, prompts: Sequence[str] = CHAT_PROMPTS,
                 max_new_tokens: int = 128, batch_size: int = 32) -> dict[str, dict]:
    """{model name: repetition_stats + kl_to_parent / top1_agreement on the parent's answers,
    "answers": decoded answers} for every model; ``models`` may include the parent itself."""
    stops = set(stop_ids(parent, tokenizer))
    parent_transcripts = chat_answers(parent, tokenizer, prompts, max_new_tokens, batch_size)
    kl = kl_on_transcripts(models, parent, parent_transcripts)
    out = {}
    for name, model in models.items():
        pairs = parent_transcripts if model is parent else chat_answers(model, tokenizer, prompts, max_new_tokens,
                                                                        batch_size)
        answers = [[t for t in a if t not in stops] for _, a in pairs]
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        out[name] = {**repetition_stats(answers, empty=[not t.strip() for t in texts]), **kl[name],
                     "answers": dict(zip(prompts, texts))}
    return out
