"""The eval stage: greedy samples, a killed eval resumes, kept results follow their settings."""

import json

import pytest

from puzzlenas.pipeline import run_pipeline


def test_eval_samples_are_the_models_greedy_completions(finished_run):
    from transformers import AutoTokenizer

    from puzzlenas.eval.metrics import complete
    from puzzlenas.model.modeling import DeciLMForCausalLM

    results = json.loads((finished_run / "eval" / "results.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "parent")
    child = DeciLMForCausalLM.from_pretrained(finished_run / "gkd-fast").eval()
    samples = results["gkd-fast"]["samples"]
    assert [(s["prompt"], s["chat"]) for s in samples] == [("w5 w6", True), ("w7 w8 w9", False)]
    assert samples[1]["completion"] == complete(child, tokenizer, "w7 w8 w9", False, 6)
    assert 1 <= len(samples[1]["completion"].split()) <= 6  # a word per generated token (EOS ends early)
    # complete() runs the fast path: the same text as transformers' greedy generate
    import torch

    ids = tokenizer("w7 w8 w9", return_tensors="pt")["input_ids"]
    want = child.generate(ids, max_new_tokens=6, do_sample=False, top_p=None, top_k=None,
                          pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        assert samples[1]["completion"] == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    report = (finished_run / "report" / "README.md").read_text()
    assert "## Greedy completions" in report
    for name in results:
        assert f"| {name} | {' '.join(results[name]['samples'][1]['completion'].split())} |" in report


def test_killed_eval_resumes_with_the_models_it_finished(finished_run, tmp_path, monkeypatch):
    import shutil

    from puzzlenas.eval import metrics as evaluate

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "eval")
    real, seen = evaluate.sample_completions, []

    def dies_on_the_third(model, tokenizer, cfg):
        seen.append(model.config.block_configs)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(model, tokenizer, cfg)

    monkeypatch.setattr(evaluate, "sample_completions", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(run / "config.yaml", run_dir=run)
    assert sorted(p.stem for p in (run / "eval" / "models").glob("*.json")) == ["child-fast", "parent"]
    seen.clear()
    monkeypatch.setattr(evaluate, "sample_completions", lambda m, t, c: seen.append(1) or real(m, t, c))
    run_pipeline(run / "config.yaml", run_dir=run)
    assert len(seen) == 1 + 5  # the parent again (speedups are measured against it), then the 5 left
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results) == ["parent", "child-fast", "gkd-fast", "child-small", "gkd-small", "child-small-1",
                             "gkd-small-1"]


def test_kept_eval_results_are_redone_when_eval_settings_change_and_kept_otherwise(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "eval" / "models").glob("*.json")}
    run_pipeline(run / "config.yaml", run_dir=run, overrides=["eval.sample_tokens=5"])
    after = {p.name: p.stat().st_mtime_ns for p in (run / "eval" / "models").glob("*.json")}
    assert all(after[n] != before[n] for n in before)  # eval settings changed: every model again
    run_pipeline(run / "config.yaml", run_dir=run, overrides=["eval.sample_tokens=5"])
    assert {p.name: p.stat().st_mtime_ns for p in (run / "eval" / "models").glob("*.json")} == after


def test_a_child_that_misses_its_target_when_measured_is_flagged(tmp_path, capsys):
    """results.json gives each child with a speedup target `missed_targets` (empty when met) and
    the run summary names the misses."""
    from puzzlenas.config import load_run_config
    from puzzlenas.pipeline import print_missed_targets
    from puzzlenas.stages.eval import flag_missed_targets, missed_lines

    cfg = load_run_config(None, ["search.targets=[{name: x15, speedup: 1.5}, {name: x2, speedup: 2.0}, "
                                 "{name: small, params: 1000}]"])
    scenario = cfg.costs.scenarios[0].name
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "solutions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"name": "x15", "target": "x15", "predicted_speedup": {f"decode_s/{scenario}": 1.6}},
        {"name": "x2", "target": "x2", "predicted_speedup": {f"decode_s/{scenario}": 2.1}},
        {"name": "small", "target": "small", "predicted_speedup": {f"decode_s/{scenario}": 1.2}}]))

    def measured(x):
        return {"speedup": {scenario: {"decode_step_s": x, "prefill_s": 1.0, "generate_s": x}}}

    results = {"parent": {}, "gkd-x15": measured(1.55), "gkd-x2": measured(1.89), "child-x2": measured(2.01),
               "gkd-small": measured(1.1)}
    assert flag_missed_targets(cfg, tmp_path, results) == 1
    assert results["gkd-x15"]["missed_targets"] == [] and results["child-x2"]["missed_targets"] == []
    (miss,) = results["gkd-x2"]["missed_targets"]
    assert miss == {"target": "x2", "scenario": scenario, "metric": "decode", "speedup": 2.0, "measured": 1.89,
                    "predicted": 2.1}
    assert "missed_targets" not in results["gkd-small"]  # no speedup target
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    print_missed_targets(tmp_path)
    out = capsys.readouterr().out
    assert "1 target(s) missed" in out and "gkd-x2 measured 1.89x decode" in out and missed_lines(results)


def test_eval_before_gkd_off_evaluates_the_distilled_children_only(finished_run):
    from puzzlenas.config import load_run_config
    from puzzlenas.stages import eval as eval_stage

    cfg = load_run_config(finished_run / "config.yaml")
    every = eval_stage.model_names(cfg, finished_run)
    assert any(n.startswith("child-") for n in every) and any(n.startswith("gkd-") for n in every)
    cfg = load_run_config(finished_run / "config.yaml", ["eval.before_gkd=false"])
    assert eval_stage.model_names(cfg, finished_run) == [n for n in every if not n.startswith("child-")]
    assert eval_stage.STAGE.fingerprint(cfg) != eval_stage.STAGE.fingerprint(
        load_run_config(finished_run / "config.yaml"))
