"""The parent's chat transcripts as GKD data (`puzzlenas/data/chat.py`)."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from puzzlenas.data.chat import (MixedBatches, chat_requests, pack_transcripts, parent_transcripts, requests_for,
                                 until_stop)
from puzzlenas.data.config import DataConfig
from puzzlenas.data.corpus import assign_split
from puzzlenas.data.sources import iter_source
from puzzlenas.data.specs import parse_source, split_namespace

TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
            "{% if add_generation_prompt %}w5{% endif %}")


def test_requests_name_the_document():
    assert requests_for("wikipedia", "Anarchism\n\nAnarchism is a political philosophy.")[0] == "What is Anarchism?"
    bible = requests_for("bible", "Genesis 1\n\nIn the beginning God created the heaven.\nAnd the earth was void.")
    assert bible[0].startswith("Explain this passage from Genesis 1:") and "the earth was void" in bible[0]
    assert "Summarize this news report" in requests_for("news", "Hundreds of people left.")[0]


def test_requests_come_from_training_documents_only(tiny_run_inputs):
    cfg = DataConfig(sources=[f"txt:{tiny_run_inputs['corpus']}"], seq_len=32)
    spec = parse_source(cfg.sources[0])
    by_split = {}
    for doc in iter_source(spec, cfg):
        by_split.setdefault(assign_split(split_namespace(spec), doc.doc_id, cfg.fractions), []).append(doc.text)
    requests = chat_requests(cfg, 40, seed=0)
    assert len(requests) == 40 and len(set(requests)) > 1
    excerpts = {" ".join(t.split()[:60]) for t in by_split["train"]}
    held_out = {" ".join(t.split()[:60]) for s in ("validation", "test") for t in by_split.get(s, [])}
    assert held_out  # the corpus has held-out documents, and none of them is asked about
    for r in requests:
        excerpt = r.split("\n\n", 1)[1]
        assert excerpt in excerpts and excerpt not in held_out
    assert requests == chat_requests(cfg, 40, seed=0)  # deterministic


def test_until_stop_keeps_the_stop_token():
    assert until_stop([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert until_stop([5, 6, 7], {2}) == [5, 6, 7]  # ran out of new tokens


def test_parent_transcripts_are_the_prompt_then_the_parents_answer(tiny_run_inputs):
    from transformers import AutoTokenizer

    from puzzlenas.model.parent import load_parent

    parent = load_parent(tiny_run_inputs["parent"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_run_inputs["parent"])
    tokenizer.chat_template = TEMPLATE
    requests = ["w7 w8", "w9 w10 w11 w12", "w13"]
    out = parent_transcripts(parent, tokenizer, requests, max_new_tokens=6, temperature=1.0, batch_size=2, seed=3,
                             log=lambda *a: None)
    assert out == parent_transcripts(parent, tokenizer, requests, 6, 1.0, 2, seed=3, log=lambda *a: None)
    for request, ids in zip(requests, out):
        prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)
        n = len(prompt["input_ids"])
        assert ids[:n] == prompt["input_ids"]  # no padding inside a transcript
        answer = ids[n:]
        assert 1 <= len(answer) <= 6 and tokenizer.eos_token_id not in answer[:-1]
    assert tokenizer.padding_side == "right"  # restored
    rows = pack_transcripts(out * 4, 8, eos=2)
    assert rows.shape[1] == 8 and rows.dtype == np.int32 and rows.reshape(-1)[len(out[0])] == 2


def test_mixed_batches_replace_a_share_of_rows():
    corpus = [torch.full((4, 3), 100 + i) for i in range(3)]
    chat = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
    mixed = list(MixedBatches(corpus, chat, fraction=0.5, seed=0))
    seen = []
    for batch, original in zip(mixed, corpus):
        assert torch.equal(batch[2:], original[2:])  # the corpus rows that stay
        seen += [int(r[0]) // 3 for r in batch[:2]]
        assert all(torch.equal(r, torch.from_numpy(chat[int(r[0]) // 3]).long()) for r in batch[:2])
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4]  # cycles through every chat row before repeating


def test_gkd_with_chat_transcripts_runs_and_caches_them(finished_run, tmp_path):
    from transformers import AutoTokenizer

    from puzzlenas.pipeline import run_pipeline

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    tokenizer = AutoTokenizer.from_pretrained(run / "parent")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(run / "parent")
    # as if the parent had come with the template: its marker lists the files as they are now
    # (an artifact edited behind its marker's back is redone, and the template would be lost)
    from puzzlenas.integrity import checksum
    from puzzlenas.stages.base import artifact_files

    done = json.loads((run / "parent" / "DONE").read_text())
    files = artifact_files(run / "parent")
    sums = {rel: checksum(run / "parent" / rel) for rel in files}
    (run / "parent" / "DONE").write_text(json.dumps({**done, "files": files, "checksums": sums}))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["gkd"].update(chat_fraction=0.5, chat_requests=16, chat_max_new_tokens=12, chat_batch_size=8)
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_pipeline(path, run_dir=run, until="gkd")
    cache = run / "gkd-chat" / "rows.safetensors"
    assert cache.is_file()
    history = json.loads((run / "gkd-fast" / "history.json").read_text())
    assert history["validation_after"]["loss"] < history["validation_before"]["loss"]
    stamp = cache.stat().st_mtime_ns
    run_pipeline(path, run_dir=run, until="gkd", force=["gkd"])
    assert cache.stat().st_mtime_ns == stamp  # written once, reused


def test_chat_settings_are_validated():
    from puzzlenas.gkd import GKDConfig

    with pytest.raises(ValueError, match="chat_fraction"):
        GKDConfig(chat_fraction=1.5).validate()
