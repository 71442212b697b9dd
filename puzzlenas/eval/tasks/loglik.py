"""Log-likelihood of continuations, the way lm-evaluation-harness computes it (its
``loglikelihood`` request type), batched for any causal LM.

Tokenization follows lm-eval's causal-LM ``_encode_pair``: trailing whitespace of the
context moves to the continuation, ``context + continuation`` and ``context`` are encoded
and the continuation's tokens are the tokens of the whole past the context's length
(so a merge across the boundary is attributed to the continuation, as lm-eval does).  The
tokenizer's default special tokens are used (lm-eval's default); an empty context is
replaced by the BOS (else EOS) token.  Sequences are truncated on the left to the model's
maximum length.  Requests are run in batches (right padding, one forward per batch, longest
first, identical model inputs computed once); any model called as
``model(input_ids=..., attention_mask=...)`` returning ``.logits`` works.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...data.tokenizer import is_hf_tokenizer, token_ids


def _encode_many(tokenizer: Any, texts: list[str], add_special_tokens: bool | None
                 ) -> list[list[int]]:
    """Token ids of each text (one batched call for HF tokenizers)."""
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if not texts:
        return []
    if is_hf_tokenizer(tokenizer):
        out = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False, **kw)
        return [list(map(int, ids)) for ids in out["input_ids"]]
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode()")
    try:
        return [token_ids(encode(t, **kw)) for t in texts]
    except TypeError:
        if not kw:
            raise
        return [token_ids(encode(t)) for t in texts]


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
                         max_length: int | None = None, pad_token_id: int = 0, desc: str | None = None
                         ) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), all continuation tokens greedy)`` per request.

    ``requests``: ``(context_ids, continuation_ids)``.  The model input of a request is
    ``(context + continuation)[-(max_length + 1):][:-1]`` (lm-eval's left truncation); distinct
    inputs are run longest first in batches of ``batch_size`` rows, right-padded, one forward
    each, and requests with identical inputs share a row.  Log-softmax runs in float32 on the
    continuation positions only.  ``device``: where the inputs go (default: the model's).
    ``desc``: label of the progress bar over the batches (stderr, terminals only).
    """
    from ...progress import progress

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
        for b0 in progress(range(0, len(order), batch_size), desc=desc or "[tasks]", unit="batch"):
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
                   max_length: int | None = None, add_special_tokens: bool | None = None,
                   desc: str | None = None) -> list[tuple[float, bool]]:
    """``(loglik, is_greedy)`` of each ``(context, continuation)`` string pair (lm-eval's
    ``loglikelihood`` request type)."""
    enc = encode_pairs(tokenizer, pairs, add_special_tokens)
    return score_token_requests(model, enc, batch_size=batch_size, device=device,
                                max_length=max_length, pad_token_id=_pad_id(tokenizer), desc=desc)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and v >= 0:
            return v
    return 0
