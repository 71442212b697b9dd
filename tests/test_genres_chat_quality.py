"""Out-of-genre evaluation texts (`eval/genres.py`) and chat-quality measures (`eval/chat_quality.py`)."""

import functools
import random

import numpy as np
import pytest
import torch

from puzzlenas.eval import chat_quality as C
from puzzlenas.eval import genres as G

TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
            "{% if add_generation_prompt %}w5{% endif %}")


@functools.lru_cache(maxsize=1)
def _training_text() -> str:
    from puzzlenas.data.sources import iter_source
    from puzzlenas.data.specs import EMBEDDED_SOURCES

    return "\n".join(" ".join(doc.text.split()) for s in EMBEDDED_SOURCES for doc in iter_source(s))


@pytest.mark.parametrize("genre", G.GENRES)
def test_genre_text_is_absent_from_the_training_sources(genre):
    docs = G.genre_documents(genre)
    assert docs == G.genre_documents(genre)  # fixed order
    text = "\n".join(" ".join(d.split()) for d in docs)
    assert len(text) > 20_000, f"{genre} has only {len(text)} characters"
    training = _training_text()
    rng = random.Random(0)
    starts = [rng.randrange(len(text) - 50) for _ in range(150)]
    spans = [text[s:s + 50] for s in starts]
    spans = [s for s in spans if len(set(s.split())) >= 5]  # skip runs of punctuation / spaces
    assert len(spans) > 100
    shared = [s for s in spans if s in training]
    assert not shared, f"{genre}: {len(shared)} sampled 50-character spans occur in the training sources: {shared[:3]}"
    assert G.GENRE_LICENSES[genre]


def test_genre_rows_are_packed_and_capped(tiny_run_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run_inputs["parent"])
    rows = G.genre_rows("legal", tokenizer, 32, max_tokens=320)
    assert rows.shape == (10, 32) and rows.dtype == np.int32
    assert (G.genre_rows("legal", tokenizer, 32, max_tokens=320) == rows).all()
    with pytest.raises(ValueError, match="allowed"):
        G.genre_documents("poetry")


def test_genre_metrics_parent_against_itself_and_a_perturbed_child(tiny_run_inputs):
    from transformers import AutoTokenizer

    from puzzlenas.model.parent import load_parent

    parent = load_parent(tiny_run_inputs["parent"]).eval()
    child = load_parent(tiny_run_inputs["parent"]).eval()
    with torch.no_grad():
        child.lm_head.weight.add_(0.5 * torch.randn(child.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_run_inputs["parent"])
    out = G.genre_metrics({"parent": parent, "child": child}, parent, tokenizer, seq_len=32, tokens_per_genre=256,
                          batch_size=4, genres=["dialogue", "reviews"])
    for genre in ("dialogue", "reviews"):
        assert out[genre]["parent"]["kl_to_parent"] == pytest.approx(0.0, abs=1e-6)
        assert out[genre]["parent"]["top1_agreement"] == 1.0
        assert out[genre]["child"]["kl_to_parent"] > 1e-3 and out[genre]["child"]["top1_agreement"] < 1 and out[genre]["child"]["tokens"] == 8 * 31


def test_repetition_stats_on_hand_made_answers():
    looping = "The sky is blue. The sky is blue. The sky is blue. The sky is blue.".split()
    varied = "Sunlight scatters off air molecules, and blue light scatters the most.".split()
    stats = C.repetition_stats([looping, varied, []])
    assert stats["empty_rate"] == pytest.approx(1 / 3)
    assert C.longest_repeated_span(looping) == 12  # three of the four sentences
    assert stats["longest_repeated_span_max"] == 12
    assert stats["longest_repeated_span"] == pytest.approx((12 + 1 + 0) / 3)  # "scatters" twice
    assert stats["distinct_1"] == pytest.approx((4 / 16 + 10 / 11 + 1) / 3)  # an empty answer repeats nothing
    assert C.repetition_stats([varied])["distinct_2"] == 1.0
    assert C.repetition_stats([looping], empty=[True])["empty_rate"] == 1.0
    spans = [12, 1, 0]  # standard errors of the mean over the answers (sample sd / sqrt(n))
    mean = sum(spans) / 3
    sd = (sum((x - mean) ** 2 for x in spans) / 2) ** 0.5
    assert stats["longest_repeated_span_se"] == pytest.approx(sd / 3 ** 0.5)
    ratios = [C.distinct_ngram_ratio(a, 2) for a in (looping, varied, [])]
    assert stats["distinct_2_se"] == pytest.approx(torch.tensor(ratios).std().item() / 3 ** 0.5, rel=1e-6)
    assert C.repetition_stats([varied])["distinct_2_se"] == 0.0  # one answer: no spread to measure


def test_the_fixed_chat_prompts_are_many_distinct_and_off_the_teacher_topics():
    from puzzlenas.data.teacher import TOPICS
    from puzzlenas.eval.config import EvalConfig

    prompts = C.CHAT_PROMPTS
    assert len(prompts) == 100 and EvalConfig().chat_quality_prompts == 20  # runs made before keep 20
    assert len({p.lower() for p in prompts}) == len(prompts)
    later = " ".join(prompts[20:]).lower()  # the first 20 predate the rule
    assert not [t for t in TOPICS if t.lower() in later]
    with pytest.raises(ValueError, match="at most 100"):
        EvalConfig(chat_quality_prompts=101).validate()


def test_chat_quality_of_the_parent_and_a_broken_child(tiny_run_inputs):
    from transformers import AutoTokenizer

    from puzzlenas.model.parent import load_parent

    parent = load_parent(tiny_run_inputs["parent"]).eval()
    child = load_parent(tiny_run_inputs["parent"]).eval()

    class EndOfTurnHead(torch.nn.Module):  # the child always ends its turn at once: every answer empty
        def forward(self, x):
            logits = torch.zeros(*x.shape[:-1], 128, dtype=x.dtype)
            logits[..., 2] = 10.0
            return logits

    child.lm_head = EndOfTurnHead()
    tokenizer = AutoTokenizer.from_pretrained(tiny_run_inputs["parent"])
    tokenizer.chat_template = TEMPLATE
    prompts = ["w10 w11 w12", "w20 w21", "w30"]
    out = C.chat_quality({"parent": parent, "child": child}, parent, tokenizer, prompts, max_new_tokens=8)
    assert out["parent"]["kl_to_parent"] == pytest.approx(0.0, abs=1e-6)
    assert out["parent"]["top1_agreement"] == 1.0
    assert out["child"]["empty_rate"] == 1.0 and out["child"]["kl_to_parent"] > 0.1
    assert set(out["child"]["answers"]) == set(prompts)
    with pytest.raises(ValueError, match="chat template"):
        C.chat_answers(parent, AutoTokenizer.from_pretrained(tiny_run_inputs["parent"]), prompts)


def test_kl_on_transcripts_batched_equals_one_at_a_time(tiny_run_inputs):
    """Right-padded batches of transcripts score exactly the positions one-at-a-time reading does."""
    from puzzlenas.model.parent import load_parent

    parent = load_parent(tiny_run_inputs["parent"]).eval()
    child = load_parent(tiny_run_inputs["parent"]).eval()
    with torch.no_grad():
        child.lm_head.weight.add_(0.3 * torch.randn(child.lm_head.weight.shape,
                                                    generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(0)
    transcripts = [(torch.randint(3, 128, (p,), generator=g).tolist(), torch.randint(3, 128, (a,), generator=g).tolist())
                   for p, a in ((5, 7), (2, 1), (9, 0), (3, 12), (1, 4))]  # lengths differ; one empty answer
    one = C.kl_on_transcripts({"child": child, "parent": parent}, parent, transcripts, batch_size=1)
    batched = C.kl_on_transcripts({"child": child, "parent": parent}, parent, transcripts, batch_size=3)
    assert one["child"]["answer_tokens"] == batched["child"]["answer_tokens"] == 7 + 1 + 12 + 4
    assert batched["child"]["kl_to_parent"] == pytest.approx(one["child"]["kl_to_parent"], rel=1e-4)
    assert batched["child"]["top1_agreement"] == one["child"]["top1_agreement"]
    assert one["child"]["kl_to_parent"] > 1e-3
    assert batched["parent"]["kl_to_parent"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="every answer is empty"):
        C.kl_on_transcripts({"child": child}, parent, [([1, 2], [])])
