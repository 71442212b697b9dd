"""The packed corpus: documents -> split by document -> tokens -> packed rows -> disk cache.

Every later stage (library calibration, BLD, scoring, GKD, eval) reads its tokens through
:func:`build_dataset`, so all of them share one train / validation / test split, made **by
document**:

1. *Sources* (:mod:`puzzlenas.data.sources`) yield documents ``(doc_id, text)``.
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

Token budgets over the packed rows are :mod:`puzzlenas.data.batches`.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .sources import SOURCE_LICENSES, Document, iter_source, source_fingerprint
from .specs import SourceSpec, expand_sources, split_namespace
from .tokenizer import eos_token_id, tokenize_documents, tokenizer_fingerprint

# Bump whenever text extraction, splitting, packing or the cache layout changes: the version
# is part of the cache key, so old caches are rebuilt instead of being reused silently.
DATA_FORMAT_VERSION = 1

SPLITS: tuple[str, ...] = ("train", "validation", "test")

_ENCODE_BATCH_CHARS = 200_000  # tokenize this many characters at a time (bounds waste at a cap)
_ENCODE_BATCH_DOCS = 256


class DataCacheWarning(UserWarning):
    """A cache file was corrupted, partial or stale and is being rebuilt."""


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
    eos = eos_token_id(tokenizer)
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


def _write_cache(arrays: dict[str, np.ndarray], meta: dict[str, Any], st_path: Path,
                 meta_path: Path) -> dict[str, Any]:
    """Write the data file, then the meta file that marks the cache done, each atomically
    (temp name, then rename); returns the final meta (with the data file's size and sha256)."""
    import torch

    from ..checkpoint import atomic_save_tensors, atomic_write_json

    st_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                        st_path, metadata={"format_version": str(DATA_FORMAT_VERSION), "key": meta["key"]})
    meta = dict(meta, data_file={"name": st_path.name, "bytes": st_path.stat().st_size,
                                 "sha256": _sha256_file(st_path)})
    atomic_write_json(meta_path, meta)  # the meta file appears last: it marks the cache done
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
