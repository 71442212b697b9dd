"""lm-evaluation-harness adapter: our tasks exported as offline lm-eval tasks, and a model
evaluated with ``lm_eval.simple_evaluate`` (needs ``pip install lm-eval``)."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...data.sources import MissingDependencyError
from .registry import TASK_BUILDERS, build_task
from .task import MULTIPLE_CHOICE, Task


# What lm-eval's `hf` model and `simple_evaluate` import beyond the wheel itself: a `--no-deps`
# install (CI's, for the MMLU dev questions) has the wheel without them.
HARNESS_MODULES = ("lm_eval", "accelerate", "datasets", "dill", "evaluate", "sqlitedict")


def missing_harness_modules() -> list[str]:
    """The modules lm-eval needs to score a Hugging Face model that are not installed."""
    import importlib.util

    return [m for m in HARNESS_MODULES if importlib.util.find_spec(m) is None]


def _require_lm_eval() -> Any:
    missing = missing_harness_modules()
    if missing:
        raise MissingDependencyError(
            f"run_lm_eval_harness needs lm-evaluation-harness with its `hf` extra; missing: "
            f"{', '.join(missing)}: pip install 'lm-eval[hf]' (or pip install -e '.[lm-eval]')")
    import lm_eval

    return lm_eval


def _common_delimiter(choices: list[str]) -> str:
    """The leading whitespace every choice starts with (lm-eval's ``target_delimiter``)."""
    lead = [c[:len(c) - len(c.lstrip())] for c in choices]
    delim = lead[0] if lead else ""
    for x in lead[1:]:
        while not x.startswith(delim):
            delim = delim[:-1]
    return delim if all(len(c) > len(delim) for c in choices) else ""


def _metric(name: str, aggregation: str, higher_is_better: bool) -> list[str]:
    """One `metric_list` entry, spelled out (lm-eval warns at every run where it guesses these)."""
    return [f"  - metric: {name}", f"    aggregation: {aggregation}",
            f"    higher_is_better: {str(higher_is_better).lower()}"]


def export_lm_eval_task(task: Task, out_dir: str | Path) -> str:
    """Write ``task`` as an offline lm-eval task (``<out_dir>/<name>.jsonl`` + ``.yaml``,
    ``dataset_path: json``) and return its lm-eval task name (``puzzlenas_<name>``).

    Multiple-choice tasks become ``output_type: multiple_choice`` (lm-eval reports ``acc`` and
    ``acc_norm``); last-word tasks ``output_type: loglikelihood`` (``acc`` = greedy match).
    For multiple choice, the leading whitespace all continuations share (" " or "\\n")
    becomes lm-eval's ``target_delimiter`` and is cut from the choices, so lm-eval's
    ``acc_norm`` divides by the same lengths as ours; a last-word target keeps its leading
    space (lm-eval scores a ``loglikelihood`` target verbatim, without the delimiter).  Pass ``out_dir`` to ``lm_eval.tasks.TaskManager(include_path=...)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "puzzlenas_" + re.sub(r"\W", "_", task.name)
    data_file = out / f"{name}.jsonl"
    # lm-eval puts target_delimiter between context and choice for multiple_choice requests
    # only; a loglikelihood request scores doc_to_target verbatim, so it keeps its space
    delim = (_common_delimiter([c for ex in task.examples for c in ex.choices])
             if task.kind == MULTIPLE_CHOICE else "")
    with open(data_file, "w", encoding="utf-8") as f:
        for ex in task.examples:
            choices = [c[len(delim):] for c in ex.choices]
            f.write(json.dumps({"context": ex.context, "choices": choices, "gold": ex.gold,
                                "target": choices[ex.gold]}) + "\n")
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data_file.resolve()))}", "test_split: test",
             "doc_to_text: context", f"target_delimiter: {json.dumps(delim)}"]
    if task.kind == MULTIPLE_CHOICE:
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", "doc_to_target: gold",
                  "metric_list:", *_metric("acc", "mean", True), *_metric("acc_norm", "mean", True)]
    else:
        lines += ["output_type: loglikelihood", "doc_to_target: target", "metric_list:",
                  *_metric("acc", "mean", True), *_metric("perplexity", "perplexity", False)]
    lines += ["metadata:", "  version: 1.0"]
    (out / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def run_lm_eval_harness(model: Any, tokenizer: Any, tasks: Sequence[str | Task], *,
                        batch_size: int = 8, limit: int | float | None = None,
                        num_fewshot: int | None = None, max_length: int | None = None,
                        seed: int = 0, max_examples: int | None = None,
                        **simple_evaluate_kwargs: Any) -> dict[str, Any]:
    """Evaluate ``model`` with lm-evaluation-harness: ``HFLM(pretrained=model,
    tokenizer=tokenizer, backend="causal")`` and ``lm_eval.simple_evaluate``.

    ``tasks``: lm-eval task names (their data come from the Hugging Face hub, so they need
    network access or a filled ``HF_DATASETS`` cache) and/or this module's tasks (names from
    ``TASK_NAMES`` or :class:`Task` objects), which are exported as offline lm-eval tasks
    (:func:`export_lm_eval_task`) named ``puzzlenas_<name>``.  Returns simple_evaluate's
    result dict (``results[task]["acc,none"]`` etc.).  Needs ``pip install lm-eval``.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="puzzlenas-lm-eval-") as tmp:
        names = []
        for t in tasks:
            if isinstance(t, Task) or t in TASK_BUILDERS:
                task = t if isinstance(t, Task) else build_task(t, seed=seed,
                                                                max_examples=max_examples)
                names.append(export_lm_eval_task(task, tmp))
            else:
                names.append(t)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal",
                  batch_size=batch_size, max_length=max_length)
        manager = TaskManager(include_path=tmp)
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                               num_fewshot=num_fewshot, **simple_evaluate_kwargs)
