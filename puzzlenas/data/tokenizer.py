"""Tokenizer plumbing shared by the corpus and the task scorer: ids from any encode result, the
EOS id, and a fingerprint that changes when the tokenizer's behaviour changes.

A tokenizer is a ``transformers.PreTrainedTokenizerBase`` or any object with ``encode(text)``
(or ``__call__``) and an ``eos_token_id``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

_PROBE_TEXT = "Puzzle NAS probe: Hello, World! 12345 ünïcödé\n\tend."


def is_hf_tokenizer(tok: Any) -> bool:
    """Whether ``tok`` is a transformers tokenizer (found by class name: transformers not imported)."""
    return any(c.__name__ == "PreTrainedTokenizerBase" and c.__module__.startswith("transformers")
               for c in type(tok).__mro__)


def token_ids(out: Any) -> list[int]:
    """Token ids from an encode result: list, array, dict/BatchEncoding, tokenizers.Encoding."""
    if isinstance(out, dict) or hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    elif hasattr(out, "ids") and not isinstance(out, (list, np.ndarray)):
        out = out.ids
    if hasattr(out, "tolist") and not isinstance(out, np.ndarray):  # a torch tensor
        out = out.tolist()
    return [int(t) for t in np.asarray(out).reshape(-1)]


def _encode_one(tok: Any, text: str) -> list[int]:
    encode = getattr(tok, "encode", None)
    if encode is not None:
        try:
            return token_ids(encode(text, add_special_tokens=False))
        except TypeError:  # encode() without that keyword
            return token_ids(encode(text))
    if callable(tok):
        return token_ids(tok(text))
    raise TypeError(f"tokenizer {type(tok).__name__} has neither encode() nor __call__()")


def tokenize_documents(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched for HF tokenizers)."""
    if not texts:
        return []
    if is_hf_tokenizer(tokenizer):
        out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]
    return [_encode_one(tokenizer, t) for t in texts]


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id (the first of a list); a clear error when it has none."""
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
        "eos_token_id": eos_token_id(tokenizer),
        "vocab_sha1": h.hexdigest(),
    }

