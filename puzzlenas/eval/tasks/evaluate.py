"""Score built tasks on a model: accuracy (and lm-eval's ``acc_norm``), stderr, gold
log-likelihood, for each task (:func:`evaluate_tasks`, the eval stage's entry)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .loglik import loglikelihoods
from .registry import DEFAULT_TASKS, build_task
from .task import LAST_WORD, MULTIPLE_CHOICE, Task


def _norm_length(choice: str) -> int:
    """Characters of a continuation for ``acc_norm``: lm-eval divides by ``len(choice)`` where
    the separator (its ``target_delimiter``, e.g. the leading space) is not part of the choice;
    our choices carry it, so leading whitespace is not counted."""
    return max(1, len(choice.lstrip()))


def _stderr(values: Sequence[float]) -> float | None:
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else None


def evaluate_task(model: Any, tokenizer: Any, task: Task, *, batch_size: int = 8,
                  device: str | torch.device | None = None, max_length: int | None = None,
                  add_special_tokens: bool | None = None,
                  return_details: bool = False) -> dict[str, Any]:
    """Score one built task; see :func:`evaluate_tasks` for the returned fields.

    ``return_details`` adds ``"details"``: per example the choices' log-likelihoods (and for a
    last-word task whether the target is greedy).
    """
    t0 = time.perf_counter()
    pairs = [(ex.context, c) for ex in task.examples for c in ex.choices]
    res = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, device=device,
                         max_length=max_length, add_special_tokens=add_special_tokens,
                         desc=f"[tasks] {task.name}")
    acc, acc_norm, gold_ll, details = [], [], [], []
    pos = 0
    for ex in task.examples:
        part = res[pos:pos + len(ex.choices)]
        pos += len(ex.choices)
        lls = np.array([ll for ll, _ in part])
        gold_ll.append(float(lls[ex.gold]))
        if task.kind == LAST_WORD:
            acc.append(float(part[0][1]))
            details.append({"loglik": part[0][0], "greedy": part[0][1]})
        else:
            lengths = np.array([float(_norm_length(c)) for c in ex.choices])
            acc.append(float(np.argmax(lls) == ex.gold))
            acc_norm.append(float(np.argmax(lls / lengths) == ex.gold))
            details.append({"logliks": lls.tolist(), "gold": ex.gold})
    n = len(task.examples)
    out: dict[str, Any] = {
        "acc": float(np.mean(acc)) if n else None,
        "acc_norm": float(np.mean(acc_norm)) if acc_norm else None,
        "acc_stderr": _stderr(acc),
        "n": n,
        "loglik": float(np.mean(gold_ll)) if n else None,
        "source": task.source,
        "split": task.split,
        "kind": task.kind,
        "chance": (float(np.mean([1.0 / len(ex.choices) for ex in task.examples]))
                   if task.kind == MULTIPLE_CHOICE and n else None),
        "fingerprint": task.fingerprint(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if task.kind == LAST_WORD and n:
        # per-token perplexity of the gold word is not comparable across tokenizers; report
        # the word-level perplexity exp(-mean loglik)
        out["word_ppl"] = float(math.exp(-np.mean(gold_ll)))
    if task.metadata.get("notes"):
        out["notes"] = list(task.metadata["notes"])
    if return_details:
        out["details"] = details
    return out


def evaluate_tasks(model: Any, tokenizer: Any,
                   task_names: Sequence[str | Task] = DEFAULT_TASKS, *,
                   max_examples: int | None = None, batch_size: int = 8,
                   device: str | torch.device | None = None, seed: int = 0,
                   max_length: int | None = None, add_special_tokens: bool | None = None,
                   fractions: dict[str, float] | None = None,
                   verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on tasks (names from ``TASK_NAMES`` or built :class:`Task` objects).

    Returns ``{task: {"acc", "acc_norm", "acc_stderr", "n", "loglik", "source", "split",
    "kind", "chance", "fingerprint", "seconds", ...}}``: ``acc`` / ``acc_norm`` are fractions
    in [0, 1] (``acc_norm`` is None for last-word tasks), ``loglik`` the mean log-likelihood
    of the gold continuation (nats, summed over its tokens), ``chance`` the expected accuracy
    of a random guess (None for last-word tasks).

    ``device``: if given, the model is moved there (and stays); by default it is evaluated
    where it is.  ``fractions``: the run's document split fractions (default 0.9/0.05/0.05),
    so held-out documents are the ones the run did not train on.  ``max_examples`` caps every
    task (None: each builder's default).
    """
    if device is not None and hasattr(model, "to"):
        model.to(device)
    out = {}
    for t in task_names:
        if isinstance(t, Task):
            task = t
        else:
            kw: dict[str, Any] = {}
            if fractions is not None and t != "mmlu-dev":
                kw["fractions"] = fractions
            task = build_task(t, seed=seed, max_examples=max_examples, **kw)
        out[task.name] = evaluate_task(model, tokenizer, task, batch_size=batch_size,
                                       device=device, max_length=max_length,
                                       add_special_tokens=add_special_tokens)
        if verbose:
            r = out[task.name]
            print(f"puzzlenas tasks: {task.name}: acc {r['acc']:.4f} (n={r['n']}) in "
                  f"{r['seconds']:.1f}s", flush=True)
    return out
