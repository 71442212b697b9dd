"""``DataConfig``: what the data stage reads and how it packs it (torch-free, numpy-free, so that
reading a run's YAML imports no method code)."""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .specs import parse_source

DEFAULT_CACHE_DIR = "~/.cache/puzzlenas/data"
_MAX_SEQ_LEN = 1 << 20


@dataclass
class DataConfig:
    """What to read and how to pack it.  Invalid values raise ``ValueError`` on creation.

    Attributes:
        sources: source specs; see :mod:`puzzlenas.data.specs` (``["default"]``).
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
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo
    ok = ok and (hi is None or v <= hi)
    if not ok:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"DataConfig.{name}={v!r} is invalid: must be an int {rng}{extra}")

