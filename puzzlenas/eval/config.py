"""``EvalConfig``: what the eval stage measures (torch-free, so that reading a run's YAML imports
no method code)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
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

    def validate(self) -> None:
        if min(self.tokens, self.batch_size, self.max_examples, self.throughput_iters, self.logits_chunk) < 1:
            raise ValueError("eval.tokens, batch_size, max_examples, throughput_iters, logits_chunk must be >= 1")
        if self.sample_tokens < 1:
            raise ValueError("eval.sample_tokens must be >= 1")
