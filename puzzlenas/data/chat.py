"""Chat transcripts written by the parent, for distilling an instruction-tuned parent.

GKD on plain text teaches a child the parent's next-token distribution on plain text only; an
instruct parent is used through its chat template, where a child distilled on plain text may
answer with an end-of-turn at once or drift (seen on SmolLM2-135M-Instruct). So a share of the
GKD rows can be the parent's own chat transcripts: user requests built from the *training*
documents of the run's corpus (never validation / test: eval must not see them), answered by
the parent (sampled), wrapped in its chat template, packed into rows like the corpus.

Requests per source: Wikipedia ("What is <title>?", "Summarize this text ..."), news
("Summarize this news report ..."), Bible ("Explain this passage from <chapter> ..."),
Python docs ("Explain <topic> in Python ..."); other sources get "Summarize this text ...".
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .corpus import assign_split
from .sources import iter_source
from .specs import expand_sources, split_namespace


def _excerpt(text: str, words: int = 60) -> str:
    return " ".join(text.split()[:words])


def _title_and_body(text: str) -> tuple[str, str]:
    first, _, rest = text.strip().partition("\n")
    return first.strip(), rest.strip() or first


def requests_for(source: str, text: str) -> list[str]:
    """User requests about one document (a few, chosen from by the caller)."""
    title, body = _title_and_body(text)
    if source == "wikipedia":
        return [f"What is {title}?", f"Tell me about {title}.",
                f"Summarize this text in a few sentences:\n\n{_excerpt(body)}"]
    if source == "news":
        return [f"Summarize this news report:\n\n{_excerpt(text)}", f"What is this news story about?\n\n{_excerpt(text)}"]
    if source == "bible":
        verses = " ".join(body.splitlines()[:2])
        return [f"Explain this passage from {title}:\n\n{verses}", f"What happens in {title} of the Bible?"]
    if source == "python-docs":
        return [f"Explain {title.strip('*')} in Python, with an example.",
                f"Explain this in simple words:\n\n{_excerpt(body)}"]
    return [f"Summarize this text in a few sentences:\n\n{_excerpt(text)}"]


def chat_requests(data_cfg: DataConfig, count: int, seed: int) -> list[str]:
    """`count` user requests from the training documents of the run's sources, shuffled."""
    rng = random.Random(seed)
    pool: list[str] = []
    for spec in expand_sources(data_cfg.sources):
        ns = split_namespace(spec)
        for doc in iter_source(spec, data_cfg):
            if assign_split(ns, doc.doc_id, data_cfg.fractions) == "train" and doc.text.strip():
                pool.append(rng.choice(requests_for(spec.kind, doc.text)))
    if not pool:
        raise ValueError("gkd.chat_fraction > 0 needs training documents to write requests from; none found")
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(count)]


@torch.no_grad()
def parent_transcripts(parent, tokenizer, requests: list[str], max_new_tokens: int, temperature: float,
                       batch_size: int, seed: int, log=print) -> list[list[int]]:
    """Token ids of each request in the chat template followed by the parent's sampled answer
    (ending with the end-of-turn token when the parent stopped)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("gkd.chat_fraction > 0 needs a parent tokenizer with a chat template; set it to 0")
    device = parent.model.embed_tokens.weight.device
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                             add_generation_prompt=True) for r in requests]
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:  # some tokenizers (or transformers versions) have none: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    tokenizer.padding_side = "left"  # generation continues every row at the same position
    stops = parent.generation_config.eos_token_id if parent.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(seed + start)  # sampling: reproducible per batch
            ids = parent.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                  top_p=0.95, top_k=None, pad_token_id=pad)  # (b, P + new)
            for row, mask in zip(ids.tolist(), enc["attention_mask"].tolist()):
                prompt_len = len(mask)
                text_ids = [t for t, m in zip(row[:prompt_len], mask) if m] + until_stop(row[prompt_len:], stops)
                out.append(text_ids)
            log(f"  chat transcripts: {len(out)}/{len(prompts)}")
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return out


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The generated tokens up to and including the first stop token (padding after it dropped)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens


def pack_transcripts(transcripts: list[list[int]], seq_len: int, eos: int) -> np.ndarray:
    """(N, seq_len) int32 rows: transcripts joined with EOS, cut like the corpus."""
    stream = np.concatenate([np.asarray(t + [eos], dtype=np.int64) for t in transcripts])
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the chat transcripts hold {len(stream)} tokens, fewer than one row of {seq_len}; "
                         f"raise gkd.chat_requests")
    return stream[:rows * seq_len].reshape(rows, seq_len).astype(np.int32)


class MixedBatches:
    """Corpus batches with the first round(fraction x B) rows of each replaced by chat rows
    (cycled in a seeded order). Iterates like the corpus batches it wraps."""

    def __init__(self, batches, chat_rows: np.ndarray, fraction: float, seed: int):
        self.batches, self.fraction = batches, fraction
        self.chat = torch.from_numpy(chat_rows.astype(np.int64))
        self.order = torch.randperm(len(self.chat), generator=torch.Generator().manual_seed(seed))
        self.next = 0

    def __iter__(self):
        self.next = 0
        for batch in self.batches:
            k = round(self.fraction * batch.shape[0])
            if k:
                take = self.order[(torch.arange(k) + self.next) % len(self.chat)]
                self.next += k
                batch = torch.cat([self.chat[take], batch[k:]])
            yield batch


def load_or_build_chat_rows(path: Path, fingerprint: str, build) -> np.ndarray:
    """The cached rows at `path` when their fingerprint matches, else build() and cache them."""
    from safetensors.torch import load_file

    from ..checkpoint import atomic_save_tensors

    if path.is_file():
        try:
            cached = load_file(str(path))
            if bytes(cached["fingerprint"].tolist()).decode() == fingerprint:
                return cached["rows"].numpy()
        except Exception:  # torn or foreign file: rebuild  # noqa: BLE001
            pass
    rows = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors({"rows": torch.from_numpy(rows),
                         "fingerprint": torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)}, path)
    return rows
