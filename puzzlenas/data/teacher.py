"""A teacher-written corpus: text the parent samples itself, used as training data.

The embedded corpus holds four genres; a child distilled on it alone fits those genres and little
else (issue 11). The parent can write text of any genre it knows, so this module has it write a
corpus from diverse seeds, which a stage mixes into its training rows:

* ``document``: the opening words of a *training* document of the run's corpus (never a
  validation / test one: evaluation must not see them), continued by the parent;
* ``topic``: a header "Here is <a text kind> about <topic>." over a built-in list of topics x
  text kinds (:data:`TOPICS`, :data:`TEXT_KINDS`), with a short cue the kind starts with;
* ``unconditional``: the BOS token alone (EOS when the tokenizer has no BOS: the corpus separates
  documents with EOS, so after it the parent starts a new document);
* ``chat`` (instruction-tuned parents, i.e. the tokenizer has a chat template): a request built
  from the same seeds, rendered with the chat template and answered by the parent.

Sampling: temperature 1.0 with nucleus sampling (top_p 0.95). Degenerate samples are dropped
(:func:`degenerate_reason`: too short, few distinct n-grams, a long repeated span), then exact and
near duplicates (:class:`NearDuplicateIndex`: MinHash over token 5-gram shingles, candidates
verified by their Jaccard similarity).

Cache: ``<cache_dir>/teacher-<key>/shard-NNNNN.safetensors``. Each shard is made from prompts and
seeds that depend only on (seed, shard index), deduplicated within itself, and written atomically
with its samples' MinHash signatures; the corpus joins shards in index order, dropping samples that
duplicate an earlier shard's. A killed generation resumes at the first missing shard, and torchrun
ranks write different shards of a round at once. The key covers what determines the
shards (parent weights, tokenizer, prompt pool, sampling and filter settings, seed) but not the
token count: asking for more tokens extends the cache, asking for fewer reads a prefix of it.

Spec in ``data.sources``: ``teacher:TOKENS`` (``teacher:30M``, ``teacher:500k``,
``teacher:2000000``) or ``teacher:Fx`` (``teacher:0.5x``: half as many tokens as the other
sources' training split). The teacher rows join the training split only and are drawn like every
other row, so a source's weight in the mix is its share of the training tokens.

Generation goes through :func:`generate_batch`, the one function a faster engine replaces.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .specs import parse_teacher_spec

__all__ = [
    "TEACHER_FORMAT_VERSION", "TEXT_KINDS", "TOPICS", "CHAT_REQUESTS", "TeacherConfig", "TeacherCorpus",
    "Prompt", "NearDuplicateIndex", "degenerate_reason", "distinct_ngram_ratio", "generate_batch",
    "generate_teacher_corpus", "has_repeated_span", "longest_repeated_span", "pack_samples", "parse_teacher_spec",
    "prompt_pool", "resolve_teacher_tokens", "weights_fingerprint", "add_teacher_rows", "teacher_source", "stop_ids",
    "fast_generate_batch",
]

# Bump when prompts, sampling, filtering or the shard layout change: old caches are then not reused.
TEACHER_FORMAT_VERSION = 3  # 2: MinHash on uint64 multiply-xorshift; 3: shards deduplicated alone, joined in order

# --------------------------------------------------------------------------------------------
# Seeds: topics x text kinds
# --------------------------------------------------------------------------------------------
TOPICS: tuple[str, ...] = (
    # science and nature
    "black holes", "photosynthesis", "plate tectonics", "the immune system", "climate change",
    "honeybees", "volcanoes", "quantum computing", "the water cycle", "DNA sequencing",
    "the Moon landing", "coral reefs",
    # cooking and food
    "sourdough bread", "Thai green curry", "fermenting vegetables", "a vegetarian lasagna",
    "brewing coffee", "chocolate chip cookies", "knife skills", "a weeknight soup",
    # law and civics
    "a tenancy agreement", "copyright law", "small claims court", "jury duty", "data privacy rules",
    "an employment contract", "traffic fines",
    # sport and games
    "marathon training", "a football match", "chess openings", "rock climbing", "the Tour de France",
    "a tennis final", "swimming technique",
    # medicine and health
    "type 2 diabetes", "seasonal flu", "sleep hygiene", "physiotherapy after a knee injury",
    "vaccines", "first aid for burns", "managing stress",
    # programming and technology
    "binary search", "a REST API", "unit testing", "SQL joins", "git branches", "memory leaks",
    "a shell script that renames files", "recursion", "password hashing",
    # travel and places
    "a weekend in Lisbon", "backpacking in Patagonia", "a night train across Europe",
    "visiting Kyoto in spring", "a road trip through Arizona", "packing light",
    # finance and business
    "index funds", "a household budget", "inflation", "starting a small bakery", "credit card interest",
    "quarterly earnings", "negotiating a salary",
    # history and culture
    "the printing press", "the fall of the Berlin Wall", "ancient Egyptian pyramids",
    "the Silk Road", "the Industrial Revolution", "jazz in the 1920s",
    # everyday life
    "moving to a new flat", "a noisy neighbour", "training a puppy", "growing tomatoes on a balcony",
    "a broken washing machine", "planning a birthday party", "learning to drive",
    "a first day at a new job", "a lost umbrella",
)

# (text kind, the words it starts with): the cue nudges a base model into the kind's format.
TEXT_KINDS: tuple[tuple[str, str], ...] = (
    ("a news report", ""),
    ("a recipe", "Ingredients:\n-"),
    ("a forum post", "Posted by"),
    ("a dialogue between two friends", "A:"),
    ("an email to a colleague", "Subject:"),
    ("a product review", "Rating:"),
    ("a how-to guide", "Step 1:"),
    ("a short story", "Once"),
    ("a lecture note", "Lecture notes:"),
    ("Python code with comments", "```python\n#"),
    ("a poem", ""),
    ("a FAQ", "Q:"),
    ("a letter", "Dear"),
    ("an encyclopedia entry", ""),
    ("a speech", "Ladies and gentlemen,"),
    ("a diary entry", "Dear diary,"),
    ("an interview", "Interviewer:"),
    ("a scientific abstract", "Abstract:"),
    ("a customer support chat", "Customer:"),
    ("a product description", ""),
)

# Chat requests over a topic and a kind ({topic}, {kind}); document seeds use chat.requests_for.
CHAT_REQUESTS: tuple[str, ...] = (
    "Write {kind} about {topic}.",
    "Explain {topic} to a beginner.",
    "What are common mistakes people make with {topic}?",
    "Give me three practical tips about {topic}.",
    "Summarize the most important facts about {topic} in a short paragraph.",
    "What is the history of {topic}?",
    "Compare two different approaches to {topic}.",
    "I have a question about {topic}. Where should I start?",
)

SEED_KINDS: tuple[str, ...] = ("document", "topic", "unconditional", "chat")
_KIND_CODE = {k: i for i, k in enumerate(SEED_KINDS)}


# --------------------------------------------------------------------------------------------
# Config and spec
# --------------------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    """How the parent writes its corpus. Invalid values raise ``ValueError`` naming the field."""

    tokens: int = 1_000_000          # kept tokens to produce (prompt + text, EOS separators excluded)
    max_new_tokens: int = 256        # per sample
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 32
    shard_samples: int = 256         # prompts per shard (the unit of resume)
    # Share of each seed kind; "chat" counts only for parents with a chat template (else its
    # share goes to the others in proportion).
    document_share: float = 0.35
    topic_share: float = 0.35
    unconditional_share: float = 0.1
    chat_share: float = 0.2
    opening_words: int = 24          # words of a training document used as its seed
    # Filters on the generated tokens (the prompt excluded).
    min_new_tokens: int = 16
    min_distinct_ratio: float = 0.6  # distinct 4-grams / 4-grams
    max_repeated_span: int = 32      # tokens: longest span that occurs twice
    near_duplicate_jaccard: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("tokens", "max_new_tokens", "batch_size", "shard_samples", "opening_words",
                     "min_new_tokens", "max_repeated_span"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"teacher.{name}={v!r} is invalid: must be an int >= 1")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"teacher.temperature={self.temperature!r} is invalid: must be in [0, 10] "
                             f"(0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"teacher.top_p={self.top_p!r} is invalid: must be in (0, 1]")
        shares = [self.document_share, self.topic_share, self.unconditional_share, self.chat_share]
        if any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(f"teacher shares {dict(zip(SEED_KINDS, shares))} are invalid: each must be "
                             f">= 0 and at least one > 0")
        for name in ("min_distinct_ratio", "near_duplicate_jaccard"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"teacher.{name}={getattr(self, name)!r} is invalid: must be in [0, 1]")

    def shares(self, chat: bool) -> dict[str, float]:
        """Normalized share of each seed kind (chat dropped when the parent has no chat template)."""
        raw = {"document": self.document_share, "topic": self.topic_share,
               "unconditional": self.unconditional_share, "chat": self.chat_share if chat else 0.0}
        total = sum(raw.values())
        if total <= 0:
            raise ValueError("teacher: only chat_share > 0, but the parent's tokenizer has no chat template; "
                             "give document_share, topic_share or unconditional_share a share")
        return {k: v / total for k, v in raw.items()}


def resolve_teacher_tokens(spec: str, corpus_train_tokens: int) -> int:
    """Tokens a teacher spec asks for, given the other sources' training tokens."""
    kind, value = parse_teacher_spec(spec)
    tokens = int(round(value * corpus_train_tokens if kind == "relative" else value))
    if tokens < 1:
        raise ValueError(f"data source {spec!r} resolves to {tokens} tokens (the other sources have "
                         f"{corpus_train_tokens} training tokens); give an absolute count, e.g. 'teacher:1M'")
    return tokens


# --------------------------------------------------------------------------------------------
# Generation (today's static-KV-cache path; the function a faster engine replaces)
# --------------------------------------------------------------------------------------------
def _padded_forward(model, input_ids: torch.Tensor, cache, pad: torch.Tensor) -> torch.Tensor:
    """Prefill or decode (B, T) tokens at the cache's write slot for left-padded rows; returns the
    last position's logits (B, V). Row b's first ``pad[b]`` slots are padding: masked out as keys,
    and its rotary positions count from its first real token (as if it had no padding)."""
    from ..model.modeling import ForwardContext

    B, T = input_ids.shape
    x = model.model.embed_tokens(input_ids)  # (B, T, C)
    slots = cache.pos + torch.arange(T, device=x.device)  # (T,) cache slots written now
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
    cos, sin = model.model.rotary_emb(positions, x.dtype)
    k_slot = torch.arange(cache.max_len, device=x.device)  # (K,)
    mask = (k_slot[None, None, :] <= slots[None, :, None]) & (k_slot[None, None, :] >= pad[:, None, None])
    mask = mask | (k_slot[None, :] == slots[:, None])[None]  # a padding query sees itself: no empty rows
    ctx = ForwardContext(cos, sin, mask[:, None], False, cache)  # mask (B, 1, T, K)
    for layer in model.model.layers:
        x = layer(x, ctx)
    cache.pos.add_(T)
    return model.lm_head(model.model.norm(x[:, -1]))  # (B, V)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: greedy when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_batch(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 0.95, eos_id: int | Sequence[int] | None = None, seed: int = 0
                   ) -> list[list[int]]:
    """The new tokens of each prompt: sampled (temperature > 0, nucleus ``top_p``) or greedy
    (temperature 0); a row stops after its first token in ``eos_id`` (included in its output).

    The same prompts, settings and seed give the same tokens. Prompts of different lengths are
    left-padded into one batch on the static KV cache (one prefill, then one decode step per token
    until every row stopped)."""
    from ..model.inference import StaticKVCache

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_batch: every prompt needs at least one token (use the BOS token for "
                         "an unconditional sample)")
    device = model.model.embed_tokens.weight.device
    stops = torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id or ())),
                         dtype=torch.long, device=device)
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    pad = torch.tensor([P - len(p) for p in prompt_ids], device=device)  # (B,)
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompt_ids):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    cache = StaticKVCache(model, B, P + max_new_tokens)
    gen = torch.Generator(device=device).manual_seed(int(seed) % (2 ** 63))
    logits = _padded_forward(model, ids, cache, pad)  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = _sample(logits, temperature, top_p, gen)  # (B,)
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(int(token[b]))
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = _padded_forward(model, token[:, None], cache, pad)
    return out


def fast_generate_batch(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                        top_p: float = 0.95, eos_id: int | Sequence[int] | None = None, seed: int = 0
                        ) -> list[list[int]]:
    """:func:`generate_batch` on the fast path (``puzzlenas.model.fast.generate``: fused layers, CUDA
    graphs on a GPU); same outputs when greedy, its own random draws when sampling. Pass it as
    ``generate=`` to :func:`generate_teacher_corpus`. The cache key names the distribution (parent,
    prompts, sampling settings), not the engine, so shards written by either engine are reused."""
    from ..model.fast import generate

    eos = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    return generate(model, prompt_ids, max_new_tokens, temperature, top_p, eos_token_id=eos,
                    batch_size=max(len(prompt_ids), 1), seed=seed).tokens


# --------------------------------------------------------------------------------------------
# Filters: degenerate samples and duplicates
# --------------------------------------------------------------------------------------------
def distinct_ngram_ratio(tokens: Sequence, n: int) -> float:
    """Distinct n-grams / n-grams (1.0 for a sequence shorter than n: nothing repeats)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def has_repeated_span(tokens: Sequence, length: int) -> bool:
    """Whether some span of `length` tokens occurs at least twice (occurrences may overlap)."""
    keys = list(tokens)
    seen = set()
    for i in range(len(keys) - length + 1):
        gram = tuple(keys[i:i + length])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def longest_repeated_span(tokens: Sequence) -> int:
    """Length of the longest span that occurs at least twice (occurrences may overlap: 'a a a a'
    -> 3). Binary search over the length: if a span of length L repeats, so does one of L - 1."""
    keys = list(tokens)
    lo, hi = 0, max(len(keys) - 1, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if has_repeated_span(keys, mid) else (lo, mid - 1)
    return lo


def degenerate_reason(tokens: Sequence[int], cfg: TeacherConfig) -> str | None:
    """Why a generated text (its tokens, stop token excluded) is dropped, or None to keep it."""
    if len(tokens) < cfg.min_new_tokens:
        return "too_short"
    if distinct_ngram_ratio(tokens, 4) < cfg.min_distinct_ratio:
        return "repetitive"
    # longest_repeated_span(tokens) > max_repeated_span, without the search for the longest: one
    # pass at max + 1 (the search cost ~1 ms of the ~1.05 ms a sample the filters took, RESULTS.md)
    if has_repeated_span(tokens, cfg.max_repeated_span + 1):
        return "repeated_span"
    return None


_SHINGLE = 5
_MINHASH_BANDS, _MINHASH_ROWS = 8, 4  # 32 hashes; pairs at Jaccard 0.7 share a band with p ~ 0.9
_MASK61 = (1 << 61) - 1


def _shingles(tokens: Sequence[int]) -> set[int]:
    """Hashes of the token 5-grams (the whole sequence when shorter)."""
    n = min(_SHINGLE, max(len(tokens), 1))
    return {hash(tuple(tokens[i:i + n])) & _MASK61 for i in range(max(len(tokens) - n + 1, 1))}


class NearDuplicateIndex:
    """Exact and near-duplicate detection over token sequences.

    Exact: sha1 of the tokens. Near: MinHash signatures of the 5-gram shingle sets, banded for
    locality-sensitive lookup; a candidate is a duplicate when the Jaccard similarity of the
    shingle sets is >= ``jaccard``."""

    def __init__(self, jaccard: float, seed: int = 0):
        rng = np.random.default_rng([seed, 61])
        k = _MINHASH_BANDS * _MINHASH_ROWS
        self._xa = rng.integers(0, _MASK61, k, dtype=np.uint64)[:, None]  # (k, 1)
        self._mb = (rng.integers(0, _MASK61, k, dtype=np.uint64) | np.uint64(1))[:, None]  # odd multipliers
        self.jaccard = jaccard
        self.exact: set[bytes] = set()
        self.bands: dict[tuple, list[int]] = {}
        self._tokens: list[Sequence[int]] = []  # every recorded sample, in order
        self._sets: list[set[int] | None] = []  # their shingle sets, computed when first needed

    def _signature(self, sh: set[int]) -> list[int]:
        # k hash functions at once, multiply-xorshift on uint64 (wrapping): (k, S) -> min over S.
        # (The exact (a x + b) mod p on Python ints cost ~5 ms per 256-token sample: the filter,
        # not the GPU, bounded the teacher corpus' tokens/s.)
        vals = np.fromiter(sh, dtype=np.uint64, count=len(sh))[None, :]  # (1, S)
        with np.errstate(over="ignore"):
            h = (vals ^ self._xa) * self._mb  # (k, S)
            h ^= h >> np.uint64(29)
        return h.min(axis=1).tolist()

    def signature(self, tokens: Sequence[int]) -> list[int]:
        """The MinHash signature of ``tokens`` (shards store it: joining shards then costs lookups,
        not hashing; the same for every index of the same seed)."""
        return self._signature(_shingles(tokens))

    def _shingle_set(self, i: int) -> set[int]:
        if self._sets[i] is None:
            self._sets[i] = _shingles(self._tokens[i])
        return self._sets[i]

    def add_if_new(self, tokens: Sequence[int], signature: Sequence[int] | None = None) -> str | None:
        """Record ``tokens`` and return None, or return "duplicate" / "near_duplicate".
        signature: ``self.signature(tokens)`` when the caller has it already."""
        digest = hashlib.sha1(np.asarray(tokens, dtype=np.int64).tobytes()).digest()
        if digest in self.exact:
            return "duplicate"
        sh = None
        sig = list(signature) if signature is not None else self._signature(sh := _shingles(tokens))
        keys = [(i, tuple(sig[i * _MINHASH_ROWS:(i + 1) * _MINHASH_ROWS])) for i in range(_MINHASH_BANDS)]
        for cand in sorted({c for key in keys for c in self.bands.get(key, ())}):
            sh = sh if sh is not None else _shingles(tokens)  # shingle sets only where a band collides
            other = self._shingle_set(cand)
            if len(sh & other) / len(sh | other) >= self.jaccard:
                return "near_duplicate"
        self.exact.add(digest)
        for key in keys:
            self.bands.setdefault(key, []).append(len(self._tokens))
        self._tokens.append(tokens)  # kept by reference (callers pass samples they no longer change)
        self._sets.append(sh)
        return None


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One seed: its kind, the token ids the parent continues, and for chat prompts nothing else
    (the rendered template is in the ids)."""

    kind: str
    ids: tuple[int, ...]


def _chat_ids(tokenizer, request: str) -> tuple[int, ...]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def training_openings(data_cfg, words: int) -> list[tuple[str, str, str]]:
    """(source kind, opening words, full text) of every training document of the run's sources
    (teacher sources skipped): the document split is the corpus' own, so validation / test
    documents never seed the teacher."""
    from .corpus import assign_split
    from .sources import iter_source
    from .specs import expand_sources, split_namespace

    out = []
    for spec in expand_sources(data_cfg.sources):
        if spec.kind == "teacher":
            continue
        ns = split_namespace(spec)
        for doc in iter_source(spec, data_cfg):
            if doc.text.strip() and assign_split(ns, doc.doc_id, data_cfg.fractions) == "train":
                out.append((spec.kind, " ".join(doc.text.split()[:words]), doc.text))
    return out


def prompt_pool(tokenizer, data_cfg, cfg: TeacherConfig) -> dict[str, list[Prompt]]:
    """Every seed of each kind, in a fixed order (shards draw from these lists)."""
    from .chat import requests_for

    chat = bool(getattr(tokenizer, "chat_template", None))
    openings = training_openings(data_cfg, cfg.opening_words) if data_cfg is not None else []
    bos = getattr(tokenizer, "bos_token_id", None)
    start = bos if bos is not None else tokenizer.eos_token_id
    pool: dict[str, list[Prompt]] = {
        "document": [Prompt("document", _encode(tokenizer, opening)) for _, opening, _ in openings],
        "topic": [Prompt("topic", _encode(tokenizer, f"Here is {kind} about {topic}.\n\n{cue}".rstrip(" ")))
                  for topic in TOPICS for kind, cue in TEXT_KINDS],
        "unconditional": [Prompt("unconditional", (int(start),))],
        "chat": [],
    }
    pool["document"] = [p for p in pool["document"] if p.ids]
    if chat:
        requests = [r.format(kind=kind, topic=topic) for topic in TOPICS for kind, _ in TEXT_KINDS[:6]
                    for r in CHAT_REQUESTS[:1]]
        requests += [r.format(topic=topic, kind="") for topic in TOPICS for r in CHAT_REQUESTS[1:]]
        rng = random.Random(cfg.seed)
        requests += [rng.choice(requests_for(src, text)) for src, _, text in openings]
        pool["chat"] = [Prompt("chat", _chat_ids(tokenizer, r)) for r in requests]
    return pool


def _shard_prompts(pool: dict[str, list[Prompt]], shares: dict[str, float], cfg: TeacherConfig,
                   shard: int) -> list[Prompt]:
    """The prompts of one shard: kinds drawn by share, seeds drawn uniformly (seeded by shard)."""
    rng = random.Random(f"teacher/{cfg.seed}/{shard}")
    kinds = [k for k in SEED_KINDS if shares[k] > 0 and pool[k]]
    if not kinds:
        raise ValueError("teacher: no seeds to write from (no training documents, topics or chat requests)")
    weights = [shares[k] for k in kinds]
    return [rng.choice(pool[k]) for k in rng.choices(kinds, weights, k=cfg.shard_samples)]


# --------------------------------------------------------------------------------------------
# Shards, cache, the corpus
# --------------------------------------------------------------------------------------------
@dataclass
class TeacherCorpus:
    """Kept samples (prompt + generated tokens; chat samples end with the end-of-turn token), their
    seed kinds, and statistics (per-shard counts, drop reasons, tokens/s)."""

    samples: list[list[int]]
    kinds: list[str]
    meta: dict[str, Any]
    path: Path

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def weights_fingerprint(model) -> str:
    """sha1 over the model's parameter names, shapes, dtypes and bytes."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end a sample: the tokenizer's EOS and the generation config's EOS ids."""
    ids = {int(tokenizer.eos_token_id)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    return sorted(ids)


def _cache_key(parent_fp: str, tokenizer, pool: dict[str, list[Prompt]], cfg: TeacherConfig,
               stops: list[int]) -> dict[str, Any]:
    from .tokenizer import tokenizer_fingerprint

    h = hashlib.sha1()
    for kind in SEED_KINDS:
        for p in pool[kind]:
            h.update(kind.encode() + np.asarray(p.ids, dtype=np.int64).tobytes() + b"\0")
    settings = {k: v for k, v in asdict(cfg).items() if k != "tokens"}  # tokens extend, not change, shards
    tok = tokenizer_fingerprint(tokenizer)
    return {"format_version": TEACHER_FORMAT_VERSION, "parent": parent_fp, "prompts_sha1": h.hexdigest(),
            "settings": settings, "stop_ids": stops,
            "tokenizer": {k: tok[k] for k in ("vocab_size", "eos_token_id", "vocab_sha1")}}


@dataclass
class Shard:
    """One cached shard: its samples (prompt + generated tokens), their seed kinds, the (start, end)
    of the generated text in each (what the filters and dedup saw), the MinHash signature of that
    text, and the shard's statistics."""

    samples: list[list[int]]
    kinds: list[str]
    spans: list[tuple[int, int]]
    signatures: list[list[int]]
    stats: dict


def _read_shard(path: Path, key: str) -> Shard | None:
    """A shard; None when missing, torn or of another key."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        meta = json.loads(bytes(t["meta_json"].tolist()).decode())
        if meta.get("key") != key:
            return None
        flat, lengths = t["tokens"].tolist(), t["lengths"].tolist()
        kinds = [SEED_KINDS[c] for c in t["kinds"].tolist()]
        spans = [tuple(s) for s in t["spans"].tolist()]
        signatures = t["signatures"].numpy().view(np.uint64).tolist()  # (n, 32) stored as int64
    except Exception:  # torn or foreign file: regenerate it  # noqa: BLE001
        return None
    offsets = np.cumsum([0] + lengths)
    samples = [flat[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
    return Shard(samples, kinds, spans, signatures, meta)


def _write_shard(path: Path, shard: Shard) -> None:
    from ..checkpoint import atomic_save_tensors

    flat = [t for s in shard.samples for t in s]
    k = _MINHASH_BANDS * _MINHASH_ROWS
    signatures = np.asarray(shard.signatures, dtype=np.uint64).reshape(len(shard.samples), k).view(np.int64)
    atomic_save_tensors({
        "tokens": torch.tensor(flat, dtype=torch.int32),
        "lengths": torch.tensor([len(s) for s in shard.samples], dtype=torch.int32),
        "kinds": torch.tensor([_KIND_CODE[k] for k in shard.kinds], dtype=torch.int8),
        "spans": torch.tensor(shard.spans, dtype=torch.int32).reshape(len(shard.samples), 2),
        "signatures": torch.from_numpy(signatures.copy()),
        "meta_json": torch.tensor(list(json.dumps(shard.stats).encode()), dtype=torch.uint8),
    }, path)


def _generate_shard(model, prompts: list[Prompt], cfg: TeacherConfig, stops: list[int], shard: int,
                    generate: Callable) -> Shard:
    """Generate one shard's prompts in batches, filter, deduplicate within the shard (against other
    shards when the shards are joined: :func:`generate_teacher_corpus`), so that a shard depends on
    its index alone and torchrun ranks can write different shards at once."""
    index = NearDuplicateIndex(cfg.near_duplicate_jaccard, cfg.seed)
    samples, kinds, spans, signatures = [], [], [], []
    drops: dict[str, int] = {}
    generated = 0
    started = time.perf_counter()
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        outs = generate(model, [list(p.ids) for p in batch], cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                        stops, cfg.seed * 1_000_003 + shard * 1009 + start)
        for prompt, new in zip(batch, outs):
            generated += len(new)
            stopped = bool(new) and new[-1] in stops
            text = new[:-1] if stopped else new
            reason = degenerate_reason(text, cfg)
            signature = index.signature(text) if reason is None else None
            reason = reason or index.add_if_new(text, signature)
            if reason:
                drops[reason] = drops.get(reason, 0) + 1
                continue
            if prompt.kind == "chat":
                sample = list(prompt.ids) + list(new)  # the answer keeps its end-of-turn token
            elif prompt.kind == "unconditional":
                sample = list(text)  # the BOS / EOS seed is a separator, not text
            else:
                sample = list(prompt.ids) + list(text)
            start = 0 if prompt.kind == "unconditional" else len(prompt.ids)
            samples.append(sample)
            kinds.append(prompt.kind)
            spans.append((start, start + len(text)))
            signatures.append(signature)
    seconds = time.perf_counter() - started
    stats = {"shard": shard, "prompts": len(prompts), "kept": len(samples), "drops": drops,
             "generated_tokens": generated, "kept_tokens": sum(len(s) for s in samples),
             "seconds": round(seconds, 3), "generated_tokens_per_s": round(generated / max(seconds, 1e-9), 1)}
    return Shard(samples, kinds, spans, signatures, stats)


def generate_teacher_corpus(model, tokenizer, cfg: TeacherConfig, cache_dir: str | Path, *, data_cfg=None,
                            parent_fingerprint: str | None = None, log: Callable[[str], None] = print,
                            progress: bool = True, generate: Callable | None = None,
                            rank: int = 0, world: int = 1) -> TeacherCorpus:
    """At least ``cfg.tokens`` tokens of parent-written text (whole samples), from the cache when
    it holds them, generating (and caching) the missing shards otherwise.

    data_cfg: the run's :class:`~puzzlenas.data.config.DataConfig`, whose training documents seed
    ``document`` prompts (None: no document seeds). parent_fingerprint: an identity of the parent
    weights when the caller has one (else they are hashed). generate: a function with
    :func:`generate_batch`'s signature (a faster engine).

    rank, world: under torchrun every rank calls this with its own copy of the parent; shards go
    in rounds of ``world``, rank r writing shard ``round + r`` (on a folder every rank sees), then
    every rank joins them in index order, dropping samples that duplicate an earlier shard's,
    until the corpus holds the tokens asked for. The corpus is the same for any number of ranks;
    a round's surplus shards stay in the cache for a run that asks for more."""
    from tqdm.auto import tqdm

    from ..dist import barrier

    cfg.validate()
    generate = generate or generate_batch
    chat = bool(getattr(tokenizer, "chat_template", None))
    pool = prompt_pool(tokenizer, data_cfg, cfg)
    shares = cfg.shares(chat)
    stops = stop_ids(model, tokenizer)
    key_inputs = _cache_key(parent_fingerprint or weights_fingerprint(model), tokenizer, pool, cfg, stops)
    key = hashlib.sha1(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / f"teacher-{key}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "key.json").write_text(json.dumps(key_inputs, indent=1, sort_keys=True))
    barrier(world)

    index = NearDuplicateIndex(cfg.near_duplicate_jaccard, cfg.seed)  # across shards, in index order
    samples: list[list[int]] = []
    kinds: list[str] = []
    shard_stats: list[dict] = []
    joined_drops: dict[str, int] = {}
    bar = tqdm(total=cfg.tokens, unit="tok", desc="teacher corpus", disable=not progress or rank != 0)
    first, reused, tokens = 0, 0, 0
    try:
        while tokens < cfg.tokens:
            paths = [folder / f"shard-{s:05d}.safetensors" for s in range(first, first + world)]
            cached = [_read_shard(p, key) for p in paths]  # None: missing, torn or of another key
            barrier(world)  # every rank has seen which shards were cached before any is written
            made = None
            if cached[rank] is None:
                made = _generate_shard(model, _shard_prompts(pool, shares, cfg, first + rank), cfg, stops,
                                       first + rank, generate)
                made.stats["key"] = key
                _write_shard(paths[rank], made)
                st = made.stats
                log(f"teacher shard {first + rank}: kept {st['kept']}/{st['prompts']} samples "
                    f"({st['kept_tokens']:,} tokens; dropped {st['drops'] or 'none'}), "
                    f"{st['generated_tokens_per_s']:,.0f} generated tokens/s")
            barrier(world)  # the round's shards are written
            for i, path in enumerate(paths):
                if tokens >= cfg.tokens:
                    break
                # read from disk only what another rank wrote in this round
                shard = cached[i] or (made if i == rank else _read_shard(path, key))
                if shard is None:
                    raise RuntimeError(f"teacher: {path} is missing or unreadable after its rank wrote it; the "
                                       f"cache folder must be one that every rank sees (data.cache_dir)")
                for sample, (a, b), kind, sig in zip(shard.samples, shard.spans, shard.kinds, shard.signatures):
                    reason = index.add_if_new(sample[a:b], sig)  # a duplicate of an earlier shard's sample
                    if reason:
                        joined_drops[reason] = joined_drops.get(reason, 0) + 1
                        continue
                    samples.append(sample)
                    kinds.append(kind)
                    tokens += len(sample)
                shard_stats.append(shard.stats)
                reused += cached[i] is not None
                bar.update(min(sum(len(s) for s in shard.samples), max(cfg.tokens - bar.n, 0)))
            first += world
            if first > 20 and not samples:
                raise RuntimeError(f"teacher: {first} shards kept no sample; the filters drop everything "
                                   f"(see {folder}); loosen min_distinct_ratio / max_repeated_span")
    finally:
        bar.close()
    gen_s = sum(s["seconds"] for s in shard_stats)
    meta = {"key": key, "key_inputs": key_inputs, "tokens_requested": cfg.tokens, "tokens": tokens,
            "samples": len(samples), "shards": len(shard_stats), "shards_reused": reused,
            "kinds": {k: kinds.count(k) for k in SEED_KINDS},
            "drops": _sum_drops(shard_stats + [{"drops": joined_drops}]), "generate_seconds": round(gen_s, 3),
            "generated_tokens_per_s": round(sum(s["generated_tokens"] for s in shard_stats) / max(gen_s, 1e-9), 1),
            "ranks": world}
    log(f"teacher corpus: {tokens:,} tokens in {len(samples):,} samples from {len(shard_stats)} shards "
        f"({reused} reused from {folder})")
    return TeacherCorpus(samples, kinds, meta, folder)


def _sum_drops(stats: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in stats:
        for k, v in s["drops"].items():
            out[k] = out.get(k, 0) + v
    return out


def pack_samples(samples: list[list[int]], seq_len: int, eos: int) -> np.ndarray:
    """(N, seq_len) int32 rows: samples joined with EOS (as the corpus joins documents), the last
    partial row dropped."""
    if not samples:
        raise ValueError("the teacher corpus is empty: nothing to pack")
    stream = np.concatenate([np.asarray(list(s) + [eos], dtype=np.int64) for s in samples])
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the teacher corpus holds {len(stream)} tokens, fewer than one row of {seq_len}; "
                         f"ask for more tokens")
    return stream[:rows * seq_len].reshape(rows, seq_len).astype(np.int32)


# --------------------------------------------------------------------------------------------
# The data source: teacher rows in the training split
# --------------------------------------------------------------------------------------------
def teacher_source(data_cfg) -> str | None:
    """The ``teacher:...`` spec of a DataConfig's sources, or None; more than one is an error."""
    specs = [s for s in data_cfg.sources if isinstance(s, str) and s.strip().startswith("teacher:")]
    if len(specs) > 1:
        raise ValueError(f"DataConfig.sources has {len(specs)} teacher sources {specs}; give one, e.g. 'teacher:30M'")
    return specs[0].replace(" ", "") if specs else None


def add_teacher_rows(dataset, data_cfg, model, tokenizer, cache_dir: str | Path | None = None, *,
                     teacher_cfg: TeacherConfig | None = None, parent_fingerprint: str | None = None,
                     log: Callable[[str], None] = print, progress: bool = True, generate: Callable | None = None):
    """``dataset`` (a PackedDataset built from the same ``data_cfg``) with the teacher's rows
    appended to its train split when ``data_cfg.sources`` holds a ``teacher:...`` spec; returned
    unchanged otherwise. Validation and test rows never include teacher text.

    The token count comes from the spec (``teacher:0.5x`` counts the other sources' training
    tokens); the other settings from ``teacher_cfg`` (defaults: :class:`TeacherConfig`). The
    teacher cache lives next to the corpus cache (``cache_dir`` or ``data_cfg.cache_dir``)."""
    from .corpus import PackedDataset

    spec = teacher_source(data_cfg)
    if spec is None:
        return dataset
    tokens = resolve_teacher_tokens(spec, dataset.num_tokens("train"))
    cfg = TeacherConfig(**{**asdict(teacher_cfg or TeacherConfig()), "tokens": tokens})
    corpus = generate_teacher_corpus(model, tokenizer, cfg, cache_dir if cache_dir is not None else data_cfg.cache_dir,
                                     data_cfg=data_cfg, parent_fingerprint=parent_fingerprint, log=log,
                                     progress=progress, generate=generate)
    rows = pack_samples(corpus.samples, dataset.seq_len, int(tokenizer.eos_token_id))  # (N, seq_len)
    train = np.concatenate([dataset.train, rows])
    meta = json.loads(json.dumps(dataset.meta))
    stream_tokens = corpus.tokens + len(corpus.samples)  # EOS after each sample, as the corpus counts
    meta["source_stats"][spec] = {"train": {"docs": len(corpus.samples), "tokens": stream_tokens},
                                  "validation": {"docs": 0, "tokens": 0}, "test": {"docs": 0, "tokens": 0}}
    meta["sources"] = list(meta.get("sources", [])) + [spec]
    split = meta["splits"]["train"]
    split.update(rows=int(train.shape[0]), tokens=int(train.size), docs=split["docs"] + len(corpus.samples),
                 stream_tokens=split["stream_tokens"] + stream_tokens)
    meta["teacher"] = {**corpus.meta, "spec": spec, "rows": int(rows.shape[0]), "cache": str(corpus.path),
                       "train_share": rows.shape[0] / train.shape[0]}
    meta.setdefault("licenses", {})[spec] = ("text written by the parent model: the parent's license and terms of "
                                            "use apply")
    log(f"teacher rows: {rows.shape[0]:,} of {train.shape[0]:,} training rows "
        f"({100 * rows.shape[0] / train.shape[0]:.1f}%)")
    return PackedDataset(train, dataset.validation, dataset.test, meta, dataset.path)


def interleave_rows(corpus: np.ndarray, teacher: np.ndarray, density: float = 0.0) -> tuple[np.ndarray, list[int]]:
    """(corpus rows and teacher rows spread evenly among them, the teacher rows' positions): a
    stage reading the first N validation tokens sees both, the teacher's rows at least at their
    share of the whole and at least at `density` (teacher.train_share: validation measures the mix
    training draws) until they run out; the first row is the teacher's."""
    n, m = len(corpus), len(teacher)
    if m == 0:
        return corpus, []
    step = (n + m) / m if density <= 0 else min(1.0 / density, (n + m) / m)  # >= 1: increasing positions
    at = [int(k * step) for k in range(m)]
    is_teacher = np.zeros(n + m, dtype=bool)
    is_teacher[at] = True
    out = np.empty((n + m, corpus.shape[1] if n else teacher.shape[1]), dtype=np.int32)
    out[is_teacher] = teacher
    out[~is_teacher] = corpus
    return out, at


def join_teacher_rows(dataset, train_rows: np.ndarray, validation_rows: np.ndarray, info: dict,
                      density: float = 0.0):
    """``dataset`` (the corpus' PackedDataset) with the teacher stage's rows: ``train_rows`` appended
    to the train split, ``validation_rows`` interleaved with the validation split; the test split
    unchanged (never teacher text). ``info``: the teacher stage's meta (spec, samples, ...)."""
    from .corpus import PackedDataset

    if train_rows.ndim != 2 or train_rows.shape[1] != dataset.seq_len:
        raise ValueError(f"teacher rows of shape {train_rows.shape} do not match data.seq_len {dataset.seq_len}; "
                         f"rerun the teacher stage (--force teacher)")
    spec = info["spec"]
    train = np.concatenate([dataset.train, train_rows.astype(np.int32)])
    validation, at = interleave_rows(dataset.validation, validation_rows.astype(np.int32), density)
    meta = json.loads(json.dumps(dataset.meta))
    meta["source_stats"][spec] = {"train": {"docs": info.get("train_samples", 0), "tokens": int(train_rows.size)},
                                  "validation": {"docs": info.get("validation_samples", 0),
                                                 "tokens": int(validation_rows.size)},
                                  "test": {"docs": 0, "tokens": 0}}
    meta["sources"] = list(meta.get("sources", [])) + [spec]
    for split, rows, added in (("train", train, train_rows), ("validation", validation, validation_rows)):
        s = meta["splits"][split]
        s.update(rows=int(rows.shape[0]), tokens=int(rows.size), stream_tokens=s["stream_tokens"] + int(added.size))
    meta["teacher"] = {"spec": spec, "train_rows": int(train_rows.shape[0]), "validation_rows_at": at,
                       "train_share": train_rows.shape[0] / max(train.shape[0], 1), "cache": info.get("cache")}
    meta.setdefault("licenses", {})[spec] = ("text written by the parent model: the parent's license and terms of "
                                            "use apply")
    return PackedDataset(train, validation, dataset.test, meta, dataset.path)
