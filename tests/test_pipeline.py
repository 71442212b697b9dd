"""The pipeline: resume after a kill, hard-linked copies, the run log, fingerprints and invalidation."""

import json

import pytest
import yaml

from puzzlenas.pipeline import run_pipeline
from tests.conftest import pipeline_config


def test_killed_run_resumes_without_redoing_finished_stages(tmp_path, tiny_run_inputs, monkeypatch, capsys):
    from puzzlenas import gkd as gkd_module

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(tiny_run_inputs)))
    real = gkd_module.GKDTrainer.loss_and_backward
    calls = {"n": 0}

    def killed(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the first child's GKD, after its checkpoint at step 3
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(gkd_module.GKDTrainer, "loss_and_backward", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, run_dir=tmp_path / "run")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/DONE")}
    assert {p.parent.name for p in stamps} >= {"parent", "data", "library", "bld", "scores", "costs", "search"}
    capsys.readouterr()
    monkeypatch.setattr(gkd_module.GKDTrainer, "loss_and_backward", real)
    run_pipeline(path, run_dir=tmp_path / "run")
    out = capsys.readouterr().out
    for stage in ("parent", "data", "library", "bld", "scores", "costs", "search", "assemble"):
        assert f"[{stage}] done already" in out
    assert "resumed GKD at step 3" in out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert (tmp_path / "run" / "report" / "DONE").is_file()


def test_rerunning_a_hard_linked_copy_never_edits_the_original(finished_run, tmp_path):
    """Every artifact is replaced (temp name, then rename), never written in place: a run
    directory copied with hard links (`cp -al`) can be rerun with other settings."""
    import os

    snapshot = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    copy = tmp_path / "copy"
    for path in snapshot:
        target = copy / path.relative_to(finished_run)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    config_path = tmp_path / "other.yaml"
    other = yaml.safe_load((finished_run / "config.yaml").read_text())
    other["search"]["targets"] = [{"name": "fast", "metric": "decode", "speedup": 1.2}]
    other["scoring"]["objective"] = "lm_loss"
    config_path.write_text(yaml.safe_dump(other))
    run_pipeline(config_path, run_dir=copy, until="search")
    assert (copy / "search" / "solutions.jsonl").read_bytes() != snapshot[finished_run / "search" / "solutions.jsonl"]
    for path, data in snapshot.items():
        assert path.read_bytes() == data, path


def test_every_run_appends_what_it_printed_to_run_log(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "run.log").unlink()
    run_pipeline(run / "config.yaml", run_dir=run, until="search")
    printed = capsys.readouterr().out
    log = (run / "run.log").read_text()
    assert "puzzlenas run:" in log and "until search" in log and "[search] done already" in log
    assert printed.strip() and printed.strip() in log  # the stage output, as printed
    with pytest.raises(ValueError):
        run_pipeline(run / "config.yaml", run_dir=run, overrides=["search.targets=[{name: x, speedup: 1000000.0}]"])
    log = (run / "run.log").read_text()
    assert log.count("puzzlenas run:") == 2 and "==== stopped: InfeasibleBudgetError" in log


# ---- fingerprints: derived from each stage's declaration, equal to the hand-chained ones before ----
LEGACY_CONFIG = """
name: legacy
parent: /fixture/parent
device: cpu
data: {sources: ["txt:/fixture/corpus"], seq_len: 32}
library: {ffn_ratios: [1.0, 0.5], ffn_multiple: 16, calibration_tokens: 2048}
bld: {tokens: 4096, batch_size: 4, lr: 1.0e-3}
costs: {dtype: float32, scenarios: [{name: tiny, batch_size: 2, prompt_tokens: 16, generate_tokens: 8}]}
search: {targets: [{name: fast, speedup: 1.3}, {name: small, params: 60000, solutions: 2}]}
gkd: {tokens: 2048, batch_size: 4}
eval: {tasks: []}
"""
# Computed by the code before stages declared their inputs (commit 4e27826, pipeline.py's
# *_fingerprint functions) on LEGACY_CONFIG; per-child ones for a Puzzle child and a peer's.
# Except eval and report, changed on purpose by the distill branch: eval measures out-of-genre
# text and chat quality now (eval.genres, eval.chat_quality), so an old run's eval is redone; the
# teacher stage is new (its fingerprint is not part of the others' while data.sources has none).
LEGACY_FINGERPRINTS = {
    "parent": "2f1381d02b202e3e", "data": "e1cd0425622b453a", "library": "9d5aa20af93eb923",
    "bld": "c43d806d2a7d87ed", "scores": "56458f49752b0661", "costs": "2cfbffee225547d1",
    "search": "fd7b35da8674a3bb", "peers": "9e2a74a91cfcb54f", "eval": "702d6a660c15dfd4",
    "report": "43fb5e2514d403ef", "teacher": "ccd3da4450c66065", "assemble/fast": "95dd3b2d32d0d3b3",
    "gkd/fast": "043c3e1b6f776605", "assemble/shortgpt-fast": "666c3f289c343321",
    "gkd/shortgpt-fast": "c98c5f4935faa22c"}
LEGACY_WITH_PEERS = {"peers": "3cd1edbc86a87b71", "eval": "f14c7002f2fc848c",
                     "report": "d90fad6649fabdde", "assemble/shortgpt-fast": "a1089b0c8715e4e2",
                     "gkd/shortgpt-fast": "eaa606fe1be9101f"}


@pytest.mark.parametrize("peers", [[], ["shortgpt"]])
def test_derived_fingerprints_equal_the_old_hand_chained_ones(tmp_path, peers):
    from puzzlenas.config import load_run_config
    from puzzlenas.pipeline import STAGE_NAMES, stage_module

    path = tmp_path / "cfg.yaml"
    path.write_text(LEGACY_CONFIG)
    # Before serving.runtime existed every block was in the library: what runtime hf keeps.
    cfg = load_run_config(path, [f"peers.methods={peers}", "serving.runtime=hf"])
    got = {}
    for name in STAGE_NAMES:
        if name == "export":  # a stage added since
            continue
        stage = stage_module(name).STAGE
        if stage.per_child:
            for record in ({"name": "fast"}, {"name": "shortgpt-fast", "peer": "shortgpt"}):
                got[f"{name}/{record['name']}"] = stage.fingerprint(cfg, record)
        else:
            got[name] = stage.fingerprint(cfg)
    assert got == {**LEGACY_FINGERPRINTS, **(LEGACY_WITH_PEERS if peers else {})}


def test_the_search_fingerprint_holds_the_gkd_settings_only_with_a_short_gkd(tmp_path):
    """The candidates' short GKD (search.select_gkd_tokens) trains with the gkd section's settings:
    a new gkd.lr must redo the selection; without a short GKD gkd settings do not touch the search."""
    from puzzlenas.config import load_run_config
    from puzzlenas.stages import search

    path = tmp_path / "cfg.yaml"
    path.write_text(LEGACY_CONFIG)

    def fingerprint(*overrides):
        return search.STAGE.fingerprint(load_run_config(path, ["serving.runtime=hf", *overrides]))

    assert fingerprint() == fingerprint("gkd.lr=0.01") == LEGACY_FINGERPRINTS["search"]
    short = fingerprint("search.select_gkd_tokens=256")
    assert short != fingerprint()
    assert fingerprint("search.select_gkd_tokens=256", "gkd.lr=0.01") != short
    assert fingerprint("search.select_gkd_tokens=256", "gkd.train_embeddings=false") != short
    # settings the short GKD replaces or does not use leave it alone
    assert fingerprint("search.select_gkd_tokens=256", "gkd.tokens=4096", "gkd.checkpoint_every=3",
                       "gkd.on_policy_fraction=0.5") == short


def _copy(run, to):
    import shutil

    shutil.copytree(run, to)
    return to


def _done_stamps(run) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/DONE")}


def test_a_run_directory_made_before_the_change_resumes_without_redoing_anything(finished_run, tmp_path, capsys):
    """The markers the code before wrote: {config_hash, finished, stage info}, no files, inputs
    or content ids; such a run resumes on its fingerprints alone."""
    run = _copy(finished_run, tmp_path / "old")
    for marker in run.glob("*/DONE"):
        done = json.loads(marker.read_text())
        for key in ("content", "inputs", "files", "checksums"):
            del done[key]
        marker.write_text(json.dumps(done, indent=1))
    stamps = _done_stamps(run)
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*")
             if p.is_file() and p.name not in ("run.log", "config.yaml", "LOCK")}
    capsys.readouterr()
    run_pipeline(run / "config.yaml", run_dir=run)
    out = capsys.readouterr().out
    for stage in ("parent", "data", "library", "bld", "scores", "costs", "search", "assemble", "gkd", "eval"):
        assert f"[{stage}] done already" in out, stage
    assert "redone" not in out and _done_stamps(run) == stamps
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_a_forced_costs_stage_redoes_the_search_and_everything_after_it(finished_run, tmp_path, capsys):
    """The same costs again (the run reads a recorded table), but a redone stage: what read it is redone."""
    from puzzlenas.config import load_run_config
    from puzzlenas.stages import gkd

    run = _copy(finished_run, tmp_path / "run")
    before = _done_stamps(run)
    capsys.readouterr()
    run_pipeline(run / "config.yaml", run_dir=run, until="assemble", force=["costs"])
    out = capsys.readouterr().out
    after = _done_stamps(run)
    assert {n for n in before if after.get(n) != before[n]} == {"costs", "search", "child-fast", "child-small",
                                                               "child-small-1"}
    assert "[search] redone: costs changed since it ran" in out
    # the children after them know they are stale without running
    cfg = load_run_config(run / "config.yaml")
    assert gkd.STAGE.why_not_done(cfg, run, {"name": "fast"}) == "search changed since it ran"


def test_an_edited_scores_file_redoes_scores_and_search(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    scores = run / "scores" / "scores.jsonl"
    rows = scores.read_text().splitlines()
    scores.write_text("\n".join(rows[:-1]) + "\n")  # a row lost
    capsys.readouterr()
    run_pipeline(run / "config.yaml", run_dir=run, until="search")
    out = capsys.readouterr().out
    assert f"[scores] redone: {scores} has " in out and "when it was written (truncated or changed)" in out
    assert "[search] redone: scores changed since it ran" in out
    assert scores.read_text().splitlines() == rows


def test_a_forced_gkd_redoes_its_children_then_eval_and_report_only_for_them(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    before = _done_stamps(run)
    models = {p.name: p.stat().st_mtime_ns for p in (run / "eval" / "models").glob("*.json")}
    run_pipeline(run / "config.yaml", run_dir=run, force=["gkd"])
    after = _done_stamps(run)
    assert {n for n in before if after[n] != before[n]} == {"gkd-fast", "gkd-small", "gkd-small-1", "eval",
                                                           "report", "export"}
    changed = {n for n, t in models.items() if (run / "eval" / "models" / n).stat().st_mtime_ns != t}
    assert changed == {"parent.json", "gkd-fast.json", "gkd-small.json", "gkd-small-1.json"}  # children kept
    results = json.loads((run / "eval" / "results.json").read_text())
    kept = json.loads((run / "eval" / "models" / "gkd-fast.json").read_text())["result"]
    assert results["gkd-fast"]["perplexity"] == kept["perplexity"]


def test_forcing_assemble_rebuilds_every_child(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    before = _done_stamps(run)
    (run / "child-fast.tmp").mkdir()  # a leftover of a killed assemble goes too
    run_pipeline(run / "config.yaml", run_dir=run, until="assemble", force=["assemble"])
    after = _done_stamps(run)
    assert {n for n in before if after[n] != before[n]} == {"child-fast", "child-small", "child-small-1"}
    assert not (run / "child-fast.tmp").exists()
