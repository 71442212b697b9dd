"""A task: examples ``(context, choices, gold)`` of one kind, and the seeded sampling builders share.

* ``multiple_choice``: the gold is the choice with the highest log-likelihood;
* ``last_word`` (LAMBADA style, one choice): the gold word must be the model's greedy output.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MULTIPLE_CHOICE = "multiple_choice"
LAST_WORD = "last_word"
KINDS = (MULTIPLE_CHOICE, LAST_WORD)


class Example(NamedTuple):
    """One example: the context, the candidate continuations and the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass
class Task:
    """A built task.

    ``kind``: "multiple_choice" or "last_word"; ``source``: where the text comes from;
    ``split``: which document split(s) the examples were taken from; ``metadata``: builder
    parameters, counts and notes (e.g. why a validation split was added).
    """

    name: str
    kind: str
    examples: list[Example]
    source: str
    split: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task.kind={self.kind!r} is invalid: allowed {list(KINDS)}")
        self.examples = [Example(e[0], tuple(e[1]), int(e[2])) for e in self.examples]
        for i, ex in enumerate(self.examples):
            if not isinstance(ex.context, str) or not ex.choices or not all(
                    isinstance(c, str) and c for c in ex.choices):
                raise ValueError(f"task {self.name!r} example {i}: context must be a string and "
                                 f"choices a non-empty list of non-empty strings")
            if not 0 <= ex.gold < len(ex.choices):
                raise ValueError(f"task {self.name!r} example {i}: gold={ex.gold} is not an index "
                                 f"of its {len(ex.choices)} choices")
            if self.kind == LAST_WORD and len(ex.choices) != 1:
                raise ValueError(f"task {self.name!r} example {i}: a last_word example has exactly "
                                 f"one choice (the target), got {len(ex.choices)}")

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """sha1 of the examples (identifies the exact task content in reports)."""
        h = hashlib.sha1()
        for ex in self.examples:
            h.update(json.dumps([ex.context, list(ex.choices), ex.gold]).encode("utf-8"))
        return h.hexdigest()[:16]


def seeded_rng(*parts: Any) -> random.Random:
    """A deterministic RNG (string seeding is stable across runs and PYTHONHASHSEED)."""
    return random.Random("puzzlenas.tasks/" + "/".join(map(str, parts)))


def sample_in_order(items: list, max_examples: int | None, rng: random.Random) -> list:
    """At most ``max_examples`` items, a seeded sample kept in the original order."""
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            raise ValueError(f"max_examples={max_examples!r} is invalid: must be an int >= 1 "
                             f"or None")
        if len(items) > max_examples:
            keep = sorted(rng.sample(range(len(items)), max_examples))
            return [items[i] for i in keep]
    return list(items)
