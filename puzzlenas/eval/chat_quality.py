"""Chat quality of an instruction-tuned parent and its children.

A child distilled on plain text can keep its perplexity and still fail as a chat model: issue 11
saw the 2x child answer "Explain why the sky is blue" with "The sky is blue. The sky is blue. ..."
and layer-removal children answer with empty strings. So, on a fixed set of prompts
(:data:`CHAT_PROMPTS`), each model answers greedily through the chat template and this module
reports

* ``empty_rate``: answers with no visible text (the model ended its turn at once);
* repetition: ``distinct_1`` / ``distinct_2`` / ``distinct_3`` (distinct n-grams / n-grams of the
  answer's tokens, averaged over answers) and ``longest_repeated_span`` (tokens of the longest span
  that occurs twice in one answer, mean and max over answers);
* ``kl_to_parent`` / ``top1_agreement`` on the *parent's* greedy answers: each model reads the
  parent's transcript (prompt + answer) and is scored on the answer positions, so a child that
  drifts from the parent's way of answering shows here even when its own answers look fine.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.teacher import distinct_ngram_ratio, generate_batch, longest_repeated_span, stop_ids

__all__ = ["CHAT_PROMPTS", "chat_answers", "chat_quality", "kl_on_transcripts", "repetition_stats"]

CHAT_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue.",
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Give me three tips for staying focused while studying.",
    "How do I boil an egg so the yolk stays soft?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a virus and a bacterium?",
    "Write a Python function that reverses a string.",
    "My laptop is running slowly. What can I try?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What should I pack for a weekend hiking trip?",
    "Explain what inflation is to a ten-year-old.",
    "Write a polite email asking my landlord to fix the heating.",
    "What are the health benefits of regular exercise?",
    "Tell me a fun fact about octopuses.",
    "How does a bill become a law?",
    "Suggest a name for a small bakery and explain why.",
    "What is 15% of 80? Show your steps.",
    "Describe the water cycle in simple terms.",
    "I feel nervous before job interviews. Any advice?",
    # 21-100: more of the same mix (facts, explanations, how-to, writing, code, arithmetic, advice),
    # away from the teacher corpus' topics (data/teacher.TOPICS), so that the repetition measures
    # average over enough answers to tell children apart (one answer in a loop moves distinct-2 of
    # 20 answers by ~0.03).
    "Why do cats purr?",
    "How many legs does a spider have?",
    "Write a haiku about the ocean.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Explain how a rainbow forms.",
    "Give me a recipe idea for leftover rice.",
    "What is the tallest mountain in the world?",
    "Write a limerick about a forgetful wizard.",
    "How do airplanes stay in the air?",
    "What does a librarian do all day?",
    "Name five fruits that are high in vitamin C.",
    "Explain the rules of tic-tac-toe.",
    "Write a thank-you note to a teacher.",
    "What is the difference between a lake and a pond?",
    "How can I make my houseplants grow better?",
    "What is a prime number? Give two examples.",
    "Write a JavaScript function that checks whether a number is even.",
    "Convert 5 kilometers to miles.",
    "Why is the ocean salty?",
    "Tell me a short story about a robot who learns to paint.",
    "What are the primary colors?",
    "How do I change a flat bicycle tire?",
    "What causes thunder?",
    "Describe a sunset to someone who has never seen one.",
    "What is the capital of Japan?",
    "Explain what a noun is, with examples.",
    "How can I reduce food waste at home?",
    "Write a get-well-soon message for a friend.",
    "Who wrote Pride and Prejudice?",
    "What is the speed of light?",
    "How do magnets work?",
    "Suggest three board games for a family evening.",
    "Explain the difference between 'their', 'there' and 'they're'.",
    "What should I do if my phone falls into water?",
    "Write a short motivational speech for a school choir before a concert.",
    "How does a refrigerator keep food cold?",
    "What is the largest planet in our solar system?",
    "Give me ideas for a rainy afternoon indoors.",
    "Why do we have seasons?",
    "Write a Python function that counts the vowels in a word.",
    "What is the square root of 144?",
    "Explain how the gears on a bicycle work.",
    "Recommend a good morning habit and explain why.",
    "What is the difference between a crocodile and an alligator?",
    "Write a short review of an imaginary restaurant.",
    "How do I politely decline an invitation?",
    "What is the Pythagorean theorem?",
    "Describe the taste of a lemon.",
    "What are some ways to remember people's names better?",
    "Explain what an algorithm is.",
    "Write a dialogue between a cat and a dog.",
    "What language is spoken in Brazil?",
    "How do I make a paper airplane?",
    "What is a synonym for 'happy'?",
    "Why do we yawn?",
    "List the days of the week in French.",
    "Explain what gravity is.",
    "Write a short apology for missing a meeting.",
    "How long does light from the Sun take to reach Earth?",
    "What are the benefits of reading books?",
    "Give me a simple explanation of how the internet works.",
    "Write a four-line poem about a city at night.",
    "What is 7 times 8?",
    "How do birds know where to migrate?",
    "Suggest a weekend project for someone who likes woodworking.",
    "What is the difference between an ocean and a sea?",
    "Explain how to tie a simple knot.",
    "Write a short social media post announcing a new bookstore.",
    "What are the three states of matter?",
    "How can I be a better listener?",
    "Describe the life cycle of a butterfly.",
    "What is the currency of the United Kingdom?",
    "Write a short riddle and give its answer.",
    "How do I write a good cover letter?",
    "Why is the sky dark at night?",
    "What is a haiku?",
    "Explain why we should drink water every day.",
    "Give me a fun science experiment for kids.",
    "What is the opposite of 'generous'?",
    "Tell me about the planet Mars.",
)


def _chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat quality needs an instruction-tuned parent: its tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_answers(model, tokenizer, prompts: Sequence[str] = CHAT_PROMPTS, max_new_tokens: int = 128,
                 batch_size: int = 32, generate=None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) per prompt; the answer keeps its end-of-turn token when the
    model ended its turn within ``max_new_tokens``. generate: a function with generate_batch's
    signature (e.g. data/teacher.fast_generate_batch: the same greedy tokens, faster)."""
    generate = generate or generate_batch
    stops = stop_ids(model, tokenizer)
    prompt_ids = [_chat_prompt_ids(tokenizer, p) for p in prompts]
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        answers = generate(model, chunk, max_new_tokens, 0.0, 1.0, stops, 0)  # greedy
        out += list(zip(chunk, answers))
    return out


def repetition_stats(answers: Sequence[Sequence], empty: Sequence[bool] | None = None) -> dict[str, float]:
    """Empty-answer rate and repetition measures over answers given as token (or word) sequences.

    empty: which answers count as empty (default: those with no tokens); the caller passes it when
    an answer of only whitespace / special tokens should count too."""
    if not answers:
        raise ValueError("repetition_stats: no answers")
    empty = [len(a) == 0 for a in answers] if empty is None else list(empty)
    spans = [longest_repeated_span(a) for a in answers]
    stats = {"answers": len(answers), "empty_rate": sum(empty) / len(answers),
             "mean_tokens": sum(len(a) for a in answers) / len(answers),
             "longest_repeated_span": sum(spans) / len(spans), "longest_repeated_span_max": max(spans),
             "longest_repeated_span_se": standard_error(spans)}
    for n in (1, 2, 3):
        ratios = [distinct_ngram_ratio(a, n) for a in answers]
        stats[f"distinct_{n}"] = sum(ratios) / len(ratios)
        stats[f"distinct_{n}_se"] = standard_error(ratios)
    return stats


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean over prompts (sample standard deviation / sqrt(n); 0 for one value):
    how far two models' means must be apart before the prompts tell them apart."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def kl_on_transcripts(models: dict, parent, transcripts: Sequence[tuple[list[int], list[int]]],
                      batch_size: int = 16) -> dict[str, dict[str, float]]:
    """KL(parent || model) and top-1 agreement on the answer positions of each transcript (the
    positions that predict answer tokens), averaged over those tokens. Transcripts are read
    `batch_size` at a time, right-padded: a causal model's logits at a real position do not see
    the padding after it (one forward per batch, not per transcript: 100 prompts cost ~7 forwards)."""
    device = parent.model.embed_tokens.weight.device
    rows = [(list(p), list(a)) for p, a in transcripts if a]
    if not rows:
        raise ValueError("kl_on_transcripts: every answer is empty; nothing to score")
    sums = {name: {"kl": 0.0, "agree": 0.0} for name in models}
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        ids = torch.zeros(len(chunk), max(len(p) + len(a) for p, a in chunk), dtype=torch.long)  # (B, T)
        predicts = torch.zeros(ids.shape, dtype=torch.bool)  # positions predicting an answer token
        for b, (prompt, answer) in enumerate(chunk):
            ids[b, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            predicts[b, len(prompt) - 1:len(prompt) + len(answer) - 1] = True
        ids, predicts = ids.to(device), predicts.to(device)
        logp = F.log_softmax(parent(input_ids=ids).logits[predicts].float(), dim=-1)  # (N, V)
        for name, model in models.items():
            logq = F.log_softmax(model(input_ids=ids).logits[predicts].float(), dim=-1)
            sums[name]["kl"] += (logp.exp() * (logp - logq)).sum().item()
            sums[name]["agree"] += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
    n = sum(len(a) for _, a in rows)
    return {name: {"kl_to_parent": s["kl"] / n, "top1_agreement": s["agree"] / n, "answer_tokens": n}
            for name, s in sums.items()}


def chat_quality(models: dict, parent, tokenizer, prompts: Sequence[str] = CHAT_PROMPTS,
                 max_new_tokens: int = 128, batch_size: int = 32) -> dict[str, dict]:
    """{model name: repetition_stats + kl_to_parent / top1_agreement on the parent's answers,
    "answers": decoded answers} for every model; ``models`` may include the parent itself."""
    stops = set(stop_ids(parent, tokenizer))
    parent_transcripts = chat_answers(parent, tokenizer, prompts, max_new_tokens, batch_size)
    kl = kl_on_transcripts(models, parent, parent_transcripts)
    out = {}
    for name, model in models.items():
        pairs = parent_transcripts if model is parent else chat_answers(model, tokenizer, prompts, max_new_tokens,
                                                                        batch_size)
        answers = [[t for t in a if t not in stops] for _, a in pairs]
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        out[name] = {**repetition_stats(answers, empty=[not t.strip() for t in texts]), **kl[name],
                     "answers": dict(zip(prompts, texts))}
    return out
