"""``mmlu-dev``: MMLU dev questions (57 subjects, 281 usable) as the ``lm-eval`` wheel ships them
inside its Flan chain-of-thought few-shot prompts, asked zero-shot in lm-eval's MMLU format."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...data.sources import MissingDependencyError
from ...versions import package_version
from .task import MULTIPLE_CHOICE, Example, Task, sample_in_order, seeded_rng

MMLU_DEV_FILE = ("tasks", "mmlu", "flan_cot_fewshot", "_cot_prompts.json")
_MMLU_Q = re.compile(r"^Q: (?P<body>.*?)\nA: (?P<answer>.*?)(?=\n\nQ: |\Z)", re.S | re.M)
_MMLU_OPTION = re.compile(r"(?:^|(?<=\s))\(([A-J])\)(?:\s+|$)")
_MMLU_ANSWER = re.compile(r"answer is \(?([ABCD])\)?")


def mmlu_dev_path() -> Path:
    """The MMLU dev questions inside the installed ``lm-eval`` package.

    lm-eval's own MMLU tasks read ``cais/mmlu`` from the Hugging Face hub at run time; the
    wheel itself only carries the 5 dev questions per subject as the few-shot examples of its
    Flan chain-of-thought variant.  Raises ``MissingDependencyError`` (naming
    ``pip install lm-eval``) when lm-eval is not installed.
    """
    spec = importlib.util.find_spec("lm_eval")  # located, not imported (lm_eval is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "task 'mmlu-dev' reads the MMLU dev questions shipped in the lm-eval package, which "
            "is not installed: pip install lm-eval")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MMLU_DEV_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"task 'mmlu-dev': {path} is missing from the installed lm-eval "
            f"({package_version('lm-eval')}); it ships with lm-eval 0.4.x: "
            f"pip install --force-reinstall lm-eval")
    return path


def _parse_mmlu_subject(subject: str, prompt: str) -> tuple[list[dict[str, Any]], list[str]]:
    """``(questions, skipped)`` of one subject's Flan CoT prompt; a question without exactly
    the options (A)-(D) is skipped (college_chemistry's 4th has an (E))."""
    rows, skipped = [], []
    for m in _MMLU_Q.finditer(prompt):
        body = m.group("body")
        a = _MMLU_ANSWER.findall(m.group("answer"))
        cut = body.rfind("\n(A)")  # the options start on the question's last "(A)" line
        marks = list(_MMLU_OPTION.finditer(body, cut + 1)) if cut >= 0 else []
        if [x.group(1) for x in marks] != list("ABCD") or not a:
            skipped.append(f"{subject}: {body.strip()[:60]!r}")
            continue
        ends = [x.start() for x in marks[1:]] + [len(body)]
        choices = [body[x.end():e].strip() for x, e in zip(marks, ends, strict=True)]
        rows.append({"subject": subject, "question": body[:cut].strip(), "choices": choices,
                     "answer": "ABCD".index(a[-1])})
    return rows, skipped


def mmlu_dev_questions() -> tuple[list[dict[str, Any]], list[str]]:
    """``(questions, skipped)``: ``[{"subject", "question", "choices", "answer"}]`` in subject
    order (281 with lm-eval 0.4.13: the Flan prompts hold 5 questions for 54 subjects and 4
    for college_chemistry, formal_logic and human_aging; 1 five-option question is skipped)."""
    prompts = json.loads(mmlu_dev_path().read_text(encoding="utf-8"))
    out, skipped = [], []
    for subject in sorted(prompts):
        rows, skip = _parse_mmlu_subject(subject, prompts[subject])
        if not rows:
            raise ValueError(f"mmlu-dev: no questions found for subject {subject!r} in "
                             f"{mmlu_dev_path()}")
        out.extend(rows)
        skipped.extend(skip)
    return out, skipped


def build_mmlu_dev(seed: int = 0, max_examples: int | None = None, *,
                   subjects: Sequence[str] | None = None) -> Task:
    """MMLU dev questions (from the lm-eval wheel, see :func:`mmlu_dev_path`), zero-shot in
    lm-eval's ``mmlu`` format::

        The following are multiple choice questions (with answers) about <subject>.

        <question>
        A. <choice>
        B. <choice>
        C. <choice>
        D. <choice>
        Answer:

    with choices ``" A"`` .. ``" D"``.  Needs lm-eval installed (no download at run time).
    Caveats: these questions are MMLU's few-shot pool (public, likely in pre-training data) as
    rewritten for the Flan CoT prompts, not the ``cais/mmlu`` dev split byte for byte: three
    subjects have 4 questions, one question has 5 options (skipped, listed in
    ``metadata["skipped"]``) and a few carry the prompts' typos (abstract_algebra's 2nd
    question starts with a stray sentence).
    """
    rows, skipped = mmlu_dev_questions()
    if subjects is not None:
        known = sorted({r["subject"] for r in rows})
        bad = [s for s in subjects if s not in known]
        if bad:
            raise ValueError(f"subjects {bad} unknown; allowed: {known}")
        rows = [r for r in rows if r["subject"] in set(subjects)]
    examples = []
    for r in rows:
        desc = (f"The following are multiple choice questions (with answers) about "
                f"{r['subject'].replace('_', ' ')}.\n\n")
        body = r["question"] + "".join(f"\n{x}. {c}" for x, c in zip("ABCD", r["choices"],
                                                                       strict=True))
        examples.append(Example(desc + body + "\nAnswer:", (" A", " B", " C", " D"),
                                r["answer"]))
    examples = sample_in_order(examples, max_examples, seeded_rng("mmlu-dev", seed))
    return Task("mmlu-dev", MULTIPLE_CHOICE, examples, source="lm-eval:" + "/".join(MMLU_DEV_FILE),
                split="dev", metadata={"lm_eval": package_version("lm-eval"),
                                       "subjects": len({r["subject"] for r in rows}),
                                       "skipped": skipped,
                                       "seed": seed, "max_examples": max_examples})
