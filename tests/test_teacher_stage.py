"""The teacher stage (the parent's own corpus in the pipeline), out-of-genre and chat-quality eval,
passes over each source, and the GPU preset's options end to end on a tiny parent."""

import json
import shutil

import numpy as np
import pytest
import yaml

from puzzlenas.pipeline import run_pipeline
from tests.conftest import pipeline_config

CHAT_TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
                 "{% if add_generation_prompt %}w5{% endif %}")


def teacher_config(inputs, cache, **extra) -> dict:
    cfg = pipeline_config(inputs)
    cfg["data"]["sources"] = cfg["data"]["sources"] + ["teacher:3k"]
    cfg["data"]["cache_dir"] = str(cache)
    cfg["teacher"] = {"max_new_tokens": 24, "batch_size": 16, "shard_samples": 32, "validation_fraction": 0.2}
    cfg.update(extra)
    return cfg


def write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_teacher_stage_caches_by_fingerprint_and_resumes_a_killed_generation(tmp_path, tiny_run_inputs, capsys):
    cache = tmp_path / "cache"
    path = write(tmp_path, teacher_config(tiny_run_inputs, cache))
    run_pipeline(path, run_dir=tmp_path / "a", until="teacher")
    meta = json.loads((tmp_path / "a" / "teacher" / "meta.json").read_text())
    assert meta["shards"] >= 2 and meta["shards_reused"] == 0 and meta["validation_rows"] >= 1
    shards = sorted((cache.glob("teacher-*/shard-*.safetensors")))
    assert len(shards) == meta["shards"]
    rows = (tmp_path / "a" / "teacher" / "rows.safetensors").read_bytes()

    # a second run (another run directory) reads every shard from the cache folder
    run_pipeline(path, run_dir=tmp_path / "b", until="teacher")
    again = json.loads((tmp_path / "b" / "teacher" / "meta.json").read_text())
    assert again["shards_reused"] == again["shards"] == meta["shards"]
    assert (tmp_path / "b" / "teacher" / "rows.safetensors").read_bytes() == rows

    # a generation killed after its first shard: the next run generates only the missing ones
    for shard in shards[1:]:
        shard.unlink()
    capsys.readouterr()
    run_pipeline(path, run_dir=tmp_path / "c", until="teacher")
    resumed = json.loads((tmp_path / "c" / "teacher" / "meta.json").read_text())
    assert resumed["shards_reused"] == 1 and resumed["shards"] == meta["shards"]
    assert "teacher shard 0:" not in capsys.readouterr().out  # shard 0 was not generated again
    assert resumed["tokens"] == meta["tokens"]  # the same seeds per shard: the same corpus size

    # the run directory's stage is done: a rerun skips it
    run_pipeline(path, run_dir=tmp_path / "c", until="teacher")
    assert "[teacher] done already" in capsys.readouterr().out


def test_teacher_rows_join_train_and_validation_never_test(tmp_path, tiny_run_inputs):
    from puzzlenas.config import load_run_config
    from puzzlenas.stages.common import load_data, prefix_source_tokens

    path = write(tmp_path, teacher_config(tiny_run_inputs, tmp_path / "cache"))
    run_dir = run_pipeline(path, run_dir=tmp_path / "run", until="teacher")
    cfg = load_run_config(path)
    corpus = load_data(cfg, run_dir, teacher=False)
    joined = load_data(cfg, run_dir)
    meta = json.loads((run_dir / "teacher" / "meta.json").read_text())
    assert (joined.test == corpus.test).all()  # the test split is the corpus' alone
    assert len(joined.train) == len(corpus.train) + meta["train_rows"]
    assert len(joined.validation) == len(corpus.validation) + meta["validation_rows"]
    teacher_rows = {r.tobytes() for r in joined.train[len(corpus.train):]}
    teacher_rows |= {r.tobytes() for r in joined.validation[joined.meta["teacher"]["validation_rows_at"]]}
    assert not teacher_rows & {r.tobytes() for r in joined.test}
    assert not teacher_rows & {r.tobytes() for r in corpus.validation}
    # held-out teacher rows are spread over the validation split: the first rows hold some
    at = joined.meta["teacher"]["validation_rows_at"]
    assert at[0] < len(joined.validation) // 2
    spec = joined.meta["teacher"]["spec"]
    first = prefix_source_tokens(joined, "validation", (at[0] + 1) * joined.seq_len)
    assert first[spec] == joined.seq_len and sum(first.values()) == (at[0] + 1) * joined.seq_len
    # train_share: every training batch holds that share of teacher rows
    from puzzlenas.stages.common import train_batches

    cfg.teacher.train_share = 0.5
    for batch in train_batches(cfg, joined, 4, 4 * 32 * 3, seed=0):
        assert sum(r.numpy().astype(np.int32).tobytes() in teacher_rows for r in batch) == 2
    # gkd.teacher_share: GKD's own share (the stage passes it), the passes counted at that share
    from puzzlenas.stages.common import passes

    for batch in train_batches(cfg, joined, 4, 4 * 32 * 3, seed=0, teacher_share=1.0):
        assert sum(r.numpy().astype(np.int32).tobytes() in teacher_rows for r in batch) == 4
    read = passes(cfg, joined, "gkd", 1000, teacher_share=0.75)["sources"]
    assert read[spec][0] == 750 and sum(v[0] for k, v in read.items() if k != spec) == 250


def gpu_preset_at_tiny_scale(inputs, cache) -> dict:
    """presets/gpu.yaml with the tiny parent and token budgets: every option it turns on (the
    teacher source and section, ShortGPT peers at equal tokens, GKD at batch 64 on the fused
    path, out-of-genre genres, chat quality) kept as the preset sets it."""
    from importlib.resources import files

    preset = yaml.safe_load(files("puzzlenas.presets").joinpath("gpu.yaml").read_text())
    tiny = pipeline_config(inputs)
    cfg = {**preset, "parent": inputs["parent"], "device": "cpu", "parent_dtype": "float32"}
    assert [s for s in preset["data"]["sources"] if s.startswith("teacher:")], "the GPU preset has a teacher source"
    cfg["data"] = {**tiny["data"], "cache_dir": str(cache),
                   "sources": tiny["data"]["sources"] + ["teacher:3k"]}
    cfg["teacher"] = {**preset["teacher"], "max_new_tokens": 24, "batch_size": 16, "shard_samples": 32,
                      "validation_fraction": 0.2}
    for section in ("library", "scoring", "costs", "search", "serving"):
        cfg[section] = tiny[section]
    cfg["bld"] = {**preset["bld"], **tiny["bld"]}
    # The preset names its own targets for the peers; here the tiny run's speedup target stands in.
    cfg["peers"] = {**preset["peers"], "tokens": 256, "targets": ["fast"] if preset["peers"].get("targets") else []}
    cfg["gkd"] = {**preset["gkd"], "tokens": 2048, "checkpoint_every": 4, "validation_tokens": 512,
                  "batch_size": 16}
    cfg["eval"] = {**preset["eval"], **tiny["eval"], "genres": preset["eval"]["genres"], "genre_tokens": 128,
                   "chat_quality_prompts": 3, "chat_quality_max_new_tokens": 8}
    return cfg


def test_gpu_preset_options_end_to_end(tmp_path, tiny_run_inputs):
    """The GPU preset's options on a tiny instruct parent, end to end: results.json holds genre
    metrics and chat quality for the parent, every child and every ShortGPT peer."""
    from transformers import AutoTokenizer

    parent = tmp_path / "instruct"
    shutil.copytree(tiny_run_inputs["parent"], parent)
    tok = AutoTokenizer.from_pretrained(parent)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(parent)
    cfg = gpu_preset_at_tiny_scale({**tiny_run_inputs, "parent": str(parent)}, tmp_path / "cache")
    assert cfg["peers"]["methods"] == ["shortgpt"] and cfg["eval"]["chat_quality"] in ("auto", "on")
    run_dir = run_pipeline(write(tmp_path, cfg), run_dir=tmp_path / "run")

    teacher = json.loads((run_dir / "teacher" / "meta.json").read_text())
    assert teacher["kinds"]["chat"] > 0 and teacher["chat_template"]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert any(n.startswith("gkd-shortgpt") for n in results)
    if cfg["peers"]["targets"]:  # peers at the named target only
        expected = {"child-shortgpt-fast", "gkd-shortgpt-fast"} if cfg["eval"].get("before_gkd", True) \
            else {"gkd-shortgpt-fast"}  # the preset evaluates the distilled children only
        assert {n for n in results if "shortgpt" in n} == expected
    for name, r in results.items():
        assert set(r["genres"]) == {"dialogue", "legal", "readme"}, name
        for m in r["genres"].values():
            assert m["perplexity"] > 0 and m["tokens"] > 0
        assert 0 <= r["chat_quality"]["empty_rate"] <= 1 and r["chat_quality"]["answers"]
    assert results["parent"]["genres"]["legal"]["kl_to_parent"] == pytest.approx(0, abs=1e-5)
    assert results["parent"]["chat_quality"]["kl_to_parent"] == pytest.approx(0, abs=1e-5)
    # passes over each source: the teacher's rows are read by BLD, scores and GKD
    spec = teacher["spec"]
    bld = json.loads((run_dir / "bld" / "passes.json").read_text())
    assert bld[0]["sources"][spec][0] == pytest.approx(0.5 * cfg["bld"]["tokens"], rel=0.01)
    scores = json.loads((run_dir / "scores" / "passes.json").read_text())
    assert sum(v[0] for v in scores[0]["sources"].values()) >= cfg["scoring"]["tokens"]
    report = (run_dir / "report" / "README.md").read_text()
    for heading in ("## Out-of-genre text", "## Chat quality", "## Passes over each source"):
        assert heading in report
    assert "out-of-genre text" in (run_dir / "eval" / "table.txt").read_text()


def test_gkd_teacher_share_is_checked_and_inert_while_unset():
    from puzzlenas.sections import GKDConfig

    with pytest.raises(ValueError, match=r"gkd.teacher_share = 1.5: must be in \[0, 1\]"):
        GKDConfig(teacher_share=1.5).validate()
    GKDConfig(teacher_share=1.0).validate()
    assert "teacher_share" not in repr(GKDConfig())  # runs made before the field keep their fingerprints
    assert "teacher_share=0.75" in repr(GKDConfig(teacher_share=0.75))
