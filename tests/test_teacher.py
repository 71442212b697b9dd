"""The teacher-written corpus (`data/teacher.py`): generation, filters, dedup, cache and resume."""

import numpy as np
import pytest
import torch

from puzzlenas.data import teacher as T
from puzzlenas.data.config import DataConfig
from puzzlenas.data.corpus import assign_split
from puzzlenas.data.sources import iter_source
from puzzlenas.data.specs import parse_source, split_namespace

TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
            "{% if add_generation_prompt %}w5{% endif %}")


@pytest.fixture(scope="module")
def tiny(tiny_run_inputs):
    from transformers import AutoTokenizer

    from puzzlenas.model.parent import load_parent

    model = load_parent(tiny_run_inputs["parent"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_run_inputs["parent"])
    return model, tokenizer


def test_greedy_batch_matches_one_prompt_at_a_time_and_hf_generate(tiny):
    model, _ = tiny
    prompts = [[5, 9, 17, 33, 4], [7], [11, 12, 13]]
    batch = T.generate_batch(model, prompts, 12, temperature=0.0, eos_id=None, seed=0)
    for p, got in zip(prompts, batch):
        alone = T.generate_batch(model, [p], 12, temperature=0.0, eos_id=None, seed=0)[0]
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, top_p=None, top_k=None,
                             pad_token_id=0)[0, len(p):].tolist()
        assert got == alone == ref  # left padding changes nothing


def test_fast_path_adapter_matches_greedy_and_stops_at_eos(tiny):
    model, _ = tiny
    prompts = [[5, 9, 17, 33, 4], [7], [11, 12, 13]]
    ours = T.generate_batch(model, prompts, 12, temperature=0.0, eos_id=None, seed=0)
    assert T.fast_generate_batch(model, prompts, 12, temperature=0.0, eos_id=None, seed=0) == ours
    stop = ours[1][3]
    fast = T.fast_generate_batch(model, prompts, 12, temperature=0.0, eos_id=stop, seed=0)
    assert fast == T.generate_batch(model, prompts, 12, temperature=0.0, eos_id=stop, seed=0)
    assert fast[1] == ours[1][:ours[1].index(stop) + 1]


def test_sampling_is_seeded_and_stops_at_eos(tiny):
    model, _ = tiny
    prompts = [[5, 9, 17], [7, 8]] * 4
    a = T.generate_batch(model, prompts, 40, temperature=1.0, top_p=0.95, eos_id=None, seed=3)
    b = T.generate_batch(model, prompts, 40, temperature=1.0, top_p=0.95, eos_id=None, seed=3)
    c = T.generate_batch(model, prompts, 40, temperature=1.0, top_p=0.95, eos_id=None, seed=4)
    assert a == b and a != c
    assert all(len(row) == 40 for row in a)
    # stop at a token that the unstopped run produced: each row ends at its first occurrence
    stop = a[0][5]
    stopped = T.generate_batch(model, prompts, 40, temperature=1.0, top_p=0.95, eos_id=stop, seed=3)
    for full, row in zip(a, stopped):
        if stop in full:
            assert row == full[:full.index(stop) + 1]
        else:
            assert row == full


def test_top_p_keeps_only_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]])).repeat(2000, 1)
    draws = T._sample(logits, 1.0, 0.8, gen)
    assert set(draws.tolist()) == {0, 1}  # 0.6 + 0.3 reaches 0.8: tokens 2, 3 are cut
    assert abs((draws == 0).float().mean().item() - 2 / 3) < 0.05  # renormalized 0.6 / 0.9


def test_repetition_measures_and_filters():
    cfg = T.TeacherConfig(min_new_tokens=8, max_repeated_span=6)
    assert T.longest_repeated_span([1, 2, 3, 1, 2, 3, 9]) == 3
    assert T.longest_repeated_span([7, 7, 7, 7]) == 3  # overlapping occurrences count
    assert T.longest_repeated_span([1, 2, 3, 4]) == 0
    assert T.distinct_ngram_ratio([1, 2, 1, 2, 1, 2], 2) == 2 / 5
    varied = list(range(10, 40))
    assert T.degenerate_reason(varied, cfg) is None
    assert T.degenerate_reason([1, 2, 3], cfg) == "too_short"
    assert T.degenerate_reason([5, 6, 7] * 10, cfg) == "repetitive"
    assert T.degenerate_reason(varied[:10] + [1, 2, 3, 4, 5, 6, 7] + varied[10:20] + [1, 2, 3, 4, 5, 6, 7], cfg) \
        == "repeated_span"
    # the filter's one-pass check at max + 1 equals comparing the longest repeated span with max
    assert T.degenerate_reason(varied[:10] + [1, 2, 3, 4, 5, 6] + varied[10:20] + [1, 2, 3, 4, 5, 6], cfg) is None
    rng = np.random.default_rng(1)
    for _ in range(200):
        tokens = rng.integers(0, int(rng.integers(3, 60)), int(rng.integers(8, 80))).tolist()
        span = T.longest_repeated_span(tokens)
        assert T.has_repeated_span(tokens, span) and not T.has_repeated_span(tokens, span + 1)
        loose = T.TeacherConfig(min_new_tokens=1, min_distinct_ratio=0.0, max_repeated_span=int(rng.integers(1, 12)))
        assert (T.degenerate_reason(tokens, loose) == "repeated_span") == (span > loose.max_repeated_span)


def test_dedup_drops_exact_and_near_duplicates():
    rng = np.random.default_rng(0)
    index = T.NearDuplicateIndex(jaccard=0.7)
    a = rng.integers(0, 5000, 200).tolist()
    b = rng.integers(0, 5000, 200).tolist()
    assert index.add_if_new(a) is None and index.add_if_new(b, index.signature(b)) is None
    assert index.add_if_new(list(a)) == "duplicate"
    near = list(a)
    near[100] = 77777  # one token changed: 5 of ~196 shingles differ
    assert index.add_if_new(near) == "near_duplicate"
    assert index.add_if_new(near, T.NearDuplicateIndex(jaccard=0.7).signature(near)) == "near_duplicate"
    assert index.add_if_new(rng.integers(0, 5000, 200).tolist()) is None


def test_spec_parsing():
    assert T.parse_teacher_spec("teacher:30M") == ("tokens", 30e6)
    assert T.resolve_teacher_tokens("teacher:500k", 10) == 500_000
    assert T.resolve_teacher_tokens("teacher:2000000", 10) == 2_000_000
    assert T.resolve_teacher_tokens("teacher:0.5x", 1000) == 500
    for bad in ("teacher:", "teacher:abc", "teacher:0x", "teacher:-3M"):
        with pytest.raises(ValueError, match="teacher"):
            T.resolve_teacher_tokens(bad, 1000)


def test_document_seeds_come_from_training_documents_only(tiny, tiny_run_inputs):
    _, tokenizer = tiny
    data_cfg = DataConfig(sources=[f"txt:{tiny_run_inputs['corpus']}"], seq_len=32)
    spec = parse_source(data_cfg.sources[0])
    openings = {}
    for doc in iter_source(spec, data_cfg):
        split = assign_split(split_namespace(spec), doc.doc_id, data_cfg.fractions)
        opening = " ".join(doc.text.split()[:24])
        openings.setdefault(split, set()).add(tuple(tokenizer(opening, add_special_tokens=False)["input_ids"]))
    pool = T.prompt_pool(tokenizer, data_cfg, T.TeacherConfig())
    seeds = {p.ids for p in pool["document"]}
    assert seeds == openings["train"]
    assert not seeds & (openings.get("validation", set()) | openings.get("test", set()))
    assert len(pool["topic"]) == len(T.TOPICS) * len(T.TEXT_KINDS) >= 60 * 10
    assert pool["chat"] == []  # no chat template: no chat seeds


def _small_cfg(**kw):
    return T.TeacherConfig(**{"tokens": 600, "max_new_tokens": 24, "batch_size": 4, "shard_samples": 8,
                              "min_new_tokens": 4, "min_distinct_ratio": 0.0, "max_repeated_span": 1000, **kw})


def test_corpus_cache_reuse_and_resume_after_a_kill(tiny, tiny_run_inputs, tmp_path):
    model, tokenizer = tiny
    data_cfg = DataConfig(sources=[f"txt:{tiny_run_inputs['corpus']}"], seq_len=32)
    cfg = _small_cfg()
    calls = []

    def counting(*args):
        calls.append(args[-1])
        return T.generate_batch(*args)

    whole = T.generate_teacher_corpus(model, tokenizer, cfg, tmp_path / "a", data_cfg=data_cfg, progress=False,
                                      generate=counting, log=lambda s: None)
    assert whole.tokens >= cfg.tokens and whole.meta["shards"] >= 3
    assert set(whole.kinds) <= {"document", "topic", "unconditional"}
    n_calls = len(calls)

    # a second run reads every shard from the cache and generates nothing
    calls.clear()
    again = T.generate_teacher_corpus(model, tokenizer, cfg, tmp_path / "a", data_cfg=data_cfg, progress=False,
                                      generate=counting, log=lambda s: None)
    assert calls == [] and again.samples == whole.samples and again.meta["shards_reused"] == whole.meta["shards"]

    # killed during the third shard: the first two survive, the rerun starts at shard 2
    class Killed(Exception):
        pass

    def killed_at_shard_2(*args):
        if len(calls) == 2 * (cfg.shard_samples // cfg.batch_size):
            raise Killed
        return counting(*args)

    calls.clear()
    with pytest.raises(Killed):
        T.generate_teacher_corpus(model, tokenizer, cfg, tmp_path / "b", data_cfg=data_cfg, progress=False,
                                  generate=killed_at_shard_2, log=lambda s: None)
    assert sorted(p.name for p in whole.path.parent.parent.joinpath("b").glob("teacher-*/shard-*")) == \
        ["shard-00000.safetensors", "shard-00001.safetensors"]
    calls.clear()
    resumed = T.generate_teacher_corpus(model, tokenizer, cfg, tmp_path / "b", data_cfg=data_cfg, progress=False,
                                        generate=counting, log=lambda s: None)
    assert len(calls) == n_calls - 2 * (cfg.shard_samples // cfg.batch_size)
    assert resumed.samples == whole.samples and resumed.meta["drops"] == whole.meta["drops"]

    # more tokens extend the same cache; other sampling settings use another folder
    calls.clear()
    more = T.generate_teacher_corpus(model, tokenizer, _small_cfg(tokens=1200), tmp_path / "a", data_cfg=data_cfg,
                                     progress=False, generate=counting, log=lambda s: None)
    assert more.path == whole.path and more.samples[:len(whole.samples)] == whole.samples and calls
    hotter = T.generate_teacher_corpus(model, tokenizer, _small_cfg(temperature=0.7), tmp_path / "a",
                                       data_cfg=data_cfg, progress=False, log=lambda s: None)
    assert hotter.path != whole.path

    rows = T.pack_samples(whole.samples, 32, tokenizer.eos_token_id)
    assert rows.shape == ((whole.tokens + len(whole.samples)) // 32, 32) and rows.dtype == np.int32


def test_degenerate_and_duplicate_samples_are_dropped(tiny, tmp_path):
    model, tokenizer = tiny
    cfg = _small_cfg(tokens=10 ** 9, min_distinct_ratio=0.6, shard_samples=8)

    batches = []

    def fake(model, prompts, max_new, temperature, top_p, stops, seed):
        # a varied sample, the same again, a looping one and one that stops at once; the second
        # batch's varied sample differs from the first's in one token: it and its copy are near duplicates
        varied = [(13 * i) % 100 + 10 for i in range(40)]
        varied[20] += len(batches)
        batches.append(seed)
        return [varied, list(varied), [5, 6, 7] * 7, [stops[0]]]

    prompts = [T.Prompt("topic", (3, 4))] * 8
    shard = T._generate_shard(model, prompts, cfg, [2], 0, fake)
    assert shard.stats["drops"] == {"duplicate": 1, "near_duplicate": 2, "repetitive": 2, "too_short": 2}
    assert len(shard.samples) == 1 and shard.samples[0][:2] == [3, 4] and shard.spans == [(2, 42)]
    assert len(batches) == 2
    index = T.NearDuplicateIndex(cfg.near_duplicate_jaccard, cfg.seed)  # the stored signature is the text's own
    assert shard.signatures == [index.signature(shard.samples[0][2:42])]


def test_shards_joined_in_order_drop_what_an_earlier_shard_holds(tiny, tmp_path):
    """Each shard is deduplicated alone (torchrun ranks write shards at once); joining them in
    index order drops a sample that repeats an earlier shard's, from its stored signature."""
    model, tokenizer = tiny
    # 4 unconditional samples of 30 tokens per shard: 120 tokens, then 90 new per shard -> 3 shards
    cfg = _small_cfg(tokens=300, shard_samples=4, batch_size=4, unconditional_share=1, document_share=0,
                     topic_share=0)
    repeated = [(7 * i) % 90 + 10 for i in range(30)]

    def fake(model, prompts, max_new, temperature, top_p, stops, seed):
        rng = np.random.default_rng(seed)  # every shard: the same repeated sample and three of its own
        return [list(repeated)] + [rng.integers(10, 99, 30).tolist() for _ in prompts[1:]]

    corpus = T.generate_teacher_corpus(model, tokenizer, cfg, tmp_path, progress=False, generate=fake,
                                       log=lambda s: None)
    shards = corpus.meta["shards"]
    assert shards == 3 and corpus.samples.count(repeated) == 1
    assert corpus.meta["drops"]["duplicate"] == shards - 1 and len(corpus.samples) == 4 * shards - (shards - 1)


def test_chat_seeds_use_the_template_and_keep_the_end_of_turn(tiny, tmp_path):
    from transformers import AutoTokenizer

    model, tok = tiny
    tokenizer = AutoTokenizer.from_pretrained(tok.name_or_path)
    tokenizer.chat_template = TEMPLATE
    cfg = _small_cfg(document_share=0, topic_share=0, unconditional_share=0, chat_share=1, tokens=100)
    corpus = T.generate_teacher_corpus(model, tokenizer, cfg, tmp_path, progress=False, log=lambda s: None)
    assert set(corpus.kinds) == {"chat"}
    w5 = tokenizer.convert_tokens_to_ids("w5")
    for s in corpus.samples:
        assert s[0] == tokenizer.convert_tokens_to_ids("w3") and w5 in s
    with pytest.raises(ValueError, match="chat template"):
        T.generate_teacher_corpus(model, tok, cfg, tmp_path, progress=False, log=lambda s: None)


def test_teacher_source_joins_the_train_split_only(tiny, tiny_run_inputs, tmp_path):
    from puzzlenas.data.corpus import build_dataset

    model, tokenizer = tiny
    corpus = f"txt:{tiny_run_inputs['corpus']}"
    plain_cfg = DataConfig(sources=[corpus], seq_len=32, cache_dir=str(tmp_path))
    cfg = DataConfig(sources=[corpus, "teacher:0.1x"], seq_len=32, cache_dir=str(tmp_path))
    assert parse_source("teacher: 2k").spec == "teacher:2k"
    with pytest.raises(ValueError, match="teacher:TOKENS"):
        DataConfig(sources=[corpus, "teacher:lots"])
    with pytest.raises(ValueError, match="at least one other source"):
        build_dataset(DataConfig(sources=["teacher:1k"], cache_dir=str(tmp_path)), tokenizer, verbose=False)
    plain = build_dataset(plain_cfg, tokenizer, verbose=False)
    base = build_dataset(cfg, tokenizer, verbose=False)
    assert (base.train == plain.train).all()  # the corpus itself is unchanged by the teacher spec
    settings = _small_cfg()
    mixed = T.add_teacher_rows(base, cfg, model, tokenizer, teacher_cfg=settings, progress=False, log=lambda s: None)
    extra = mixed.train.shape[0] - base.train.shape[0]
    assert extra >= (0.1 * base.num_tokens("train")) // 32 - 1 and (mixed.train[:len(base.train)] == base.train).all()
    assert (mixed.validation == base.validation).all() and (mixed.test == base.test).all()
    assert mixed.meta["teacher"]["tokens"] >= round(0.1 * base.num_tokens("train"))
    assert "teacher:0.1x" in mixed.summary()
    assert T.add_teacher_rows(plain, plain_cfg, model, tokenizer) is plain
