"""``EvalConfig``: what the eval stage measures (torch-free, so that reading a run's YAML imports
no method code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sections import InertFieldsRepr
from .chat_prompts import CHAT_PROMPTS

# The out-of-genre evaluation texts of eval/genres.py. "reviews" (movie reviews shipped in gensim's
# test data: research use only, no licence stated) is left out of the default: docs/tasks.md.
GENRE_NAMES = ("dialogue", "legal", "reviews", "readme")
DEFAULT_GENRES = ("dialogue", "legal", "readme")


@dataclass(repr=False)
class EvalConfig(InertFieldsRepr):
    """What the eval stage measures."""

    tokens: int = 65536  # test-split tokens for perplexity / KL / agreement
    batch_size: int = 8
    tasks: list[str] = field(default_factory=lambda: ["wiki-lastword", "news-continuation",
                                                      "bible-continuation", "mmlu-dev"])
    max_examples: int = 200  # per task
    throughput: bool = True  # end-to-end generation benchmark per costs scenario
    throughput_iters: int = 10
    logits_chunk: int = 2048
    # Greedy completions shown in the report: chat prompts go through the tokenizer's chat
    # template (when it has one), plain prompts are continued as they are.
    chat_prompts: list[str] = field(default_factory=lambda: ["What is the capital of France?",
                                                             "Write one sentence about the ocean.",
                                                             "Give me three tips for staying healthy."])
    plain_prompts: list[str] = field(default_factory=lambda: ["The history of the Roman Empire",
                                                              "Water boils at"])
    sample_tokens: int = 48  # new tokens per completion
    # Out-of-genre text (eval/genres.py: genres no training source holds): perplexity, KL to the
    # parent and top-1 agreement per genre, on the first genre_tokens of each (whole rows).
    genres: list[str] = field(default_factory=lambda: list(DEFAULT_GENRES))
    genre_tokens: int = 16384
    # Chat quality (eval/chat_quality.py) of instruct parents and their children: greedy answers
    # to the first chat_quality_prompts of its 100 fixed prompts (eval/chat_prompts.py); empty-answer
    # rate, repetition (with standard errors over the prompts), KL on the parent's own answers.
    # auto = when the parent's tokenizer has a chat template; on / off. Over 20 prompts distinct-2
    # has a standard error of ~0.05; the GPU preset asks all 100 (one batch there, as fast as 20).
    chat_quality: str = "auto"
    chat_quality_prompts: int = 20
    chat_quality_max_new_tokens: int = 128
    # The assembled children before GKD too (what GKD changed); off saves about 40% of the stage
    # (the GPU preset's 10-minute bound) and the report shows "-" for them.
    before_gkd: bool = True

    def inert_fields(self) -> tuple[str, ...]:
        return ("before_gkd",) if self.before_gkd else ()  # added later: runs made before keep their fingerprints

    def validate(self) -> None:
        if min(self.tokens, self.batch_size, self.max_examples, self.throughput_iters, self.logits_chunk) < 1:
            raise ValueError("eval.tokens, batch_size, max_examples, throughput_iters, logits_chunk must be >= 1")
        if self.sample_tokens < 1:
            raise ValueError("eval.sample_tokens must be >= 1")
        bad = [g for g in self.genres if g not in GENRE_NAMES]
        if bad or len(set(self.genres)) != len(self.genres):
            raise ValueError(f"eval.genres = {self.genres}: each once, from {', '.join(GENRE_NAMES)}")
        if self.chat_quality not in ("auto", "on", "off"):
            raise ValueError(f"eval.chat_quality = {self.chat_quality!r}; allowed: auto, on, off")
        if min(self.genre_tokens, self.chat_quality_prompts, self.chat_quality_max_new_tokens) < 1:
            raise ValueError("eval.genre_tokens, chat_quality_prompts, chat_quality_max_new_tokens must be >= 1")
        if self.chat_quality_prompts > len(CHAT_PROMPTS):
            raise ValueError(f"eval.chat_quality_prompts = {self.chat_quality_prompts}, but there are "
                             f"{len(CHAT_PROMPTS)} fixed chat prompts; ask for at most {len(CHAT_PROMPTS)}")
