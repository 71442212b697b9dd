"""Tasks built from held-out documents of the embedded corpus, under the SAME document split as
training (:func:`puzzlenas.data.corpus.assign_split`):

* ``wiki-lastword``: predict the last word of a sentence of a held-out Wikipedia article from up
  to 60 preceding words;
* ``news-continuation``: 4-way choice of the next sentence of a held-out ABC news article;
  distractors are sentences of other held-out articles;
* ``bible-continuation``: 4-way choice of the next verse of a held-out King James chapter.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence

from ...data.config import DataConfig
from ...data.corpus import SPLITS, assign_split
from ...data.sources import Document, iter_bible, iter_news, iter_wikipedia
from ...data.specs import parse_source, split_namespace
from .task import LAST_WORD, MULTIPLE_CHOICE, Example, Task, sample_in_order, seeded_rng

_SOURCE_ITERS: dict[str, Callable[[], Iterable[Document]]] = {
    "wikipedia": iter_wikipedia, "news": iter_news, "bible": iter_bible}


@functools.lru_cache(maxsize=None)
def _source_documents(source: str) -> tuple[Document, ...]:
    """All documents of an embedded source (cached: Wikipedia takes ~3 s to extract)."""
    return tuple(_SOURCE_ITERS[source]())


def held_out_documents(source: str, splits: Sequence[str] = ("test",),
                       fractions: dict[str, float] | None = None) -> list[Document]:
    """Documents of embedded ``source`` whose split is in ``splits``, exactly as the training
    data pipeline assigns them.

    The split is :func:`puzzlenas.data.corpus.assign_split` with the source's namespace
    (``puzzlenas.data.specs.split_namespace``: the source kind, e.g. "wikipedia") and the
    document id; ``fractions`` default to ``DataConfig()``'s (0.9 / 0.05 / 0.05) and must
    match the run's ``data`` fractions.  Like ``build_dataset``, a document whose text
    duplicates an earlier document is dropped (the earlier one may be in training).
    """
    if source not in _SOURCE_ITERS:
        raise ValueError(f"source={source!r} is invalid: allowed {list(_SOURCE_ITERS)}")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"splits={list(splits)!r} is invalid: allowed {list(SPLITS)}")
    fractions = dict(fractions) if fractions is not None else DataConfig().fractions
    namespace = split_namespace(parse_source(source))
    seen: set[bytes] = set()
    out = []
    for doc in _source_documents(source):
        digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        if assign_split(namespace, doc.doc_id, fractions) in splits:
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
    rng = seeded_rng("wiki-lastword", seed)
    chosen = sample_in_order(candidates, max_examples, rng)
    return Task("wiki-lastword", LAST_WORD, [ex for ex, _ in chosen], source="wikipedia",
                split="test",
                metadata={"documents": [d.doc_id for d in docs], "candidates": len(candidates),
                          "seed": seed, "max_examples": max_examples,
                          "context_words": context_words, "min_context_words": min_context_words,
                          "docs_used": sorted({d for _, d in chosen}, key=str)})


def _news_units(doc: Document) -> tuple[str, list[str]]:
    return "", split_sentences(doc.text)


def _bible_units(doc: Document) -> tuple[str, list[str]]:
    header, _, body = doc.text.partition("\n\n")
    return header, [line for line in body.splitlines() if line.strip()]


def _continuation_examples(name: str, docs: list[Document],
                           units_of: Callable[[Document], tuple[str, list[str]]],
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
        rng = seeded_rng(name, seed, doc.doc_id)
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
    examples = sample_in_order(examples, max_examples, seeded_rng(name, seed, "cap"))
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
