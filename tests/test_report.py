"""The report of the tiny run: targets missed when measured are flagged, plots and Markdown tables."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from puzzlenas.eval.report import accuracy_interval, retention_interval, target_checks


def _with_measured_speedups(run, speedups: dict[str, float]) -> None:
    """Set the measured decode speedup of gkd-<name> (first scenario) in eval/results.json: timings
    of a 3-layer toy on a shared CPU are noise, a test needs a known miss and a known hit."""
    path = run / "eval" / "results.json"
    results = json.loads(path.read_text())
    for name, value in speedups.items():
        for scenario in results[f"gkd-{name}"]["speedup"].values():
            scenario["decode_step_s"] = value
    path.write_text(json.dumps(results))


def test_report_flags_the_missed_target_with_plots_and_tables(finished_run, tmp_path, capsys):
    from puzzlenas.config import load_run_config
    from puzzlenas.pipeline import stage_table
    from puzzlenas.stages import report

    run = shutil.copytree(finished_run, tmp_path / "run")
    _with_measured_speedups(run, {"fast": 1.05, "small": 2.0})  # fast asks 1.3x; small has no speedup target
    cfg = load_run_config(run / "config.yaml", [])
    report.run(cfg, run)
    printed = capsys.readouterr().out
    assert "[report] WARNING: target fast missed when measured: gkd-fast runs decode 1.05x" in printed
    assert "asks 1.30x" in printed and "small" not in printed.split("WARNING")[1].split("\n")[0]
    assert stage_table(report.STAGE, run).startswith("[report] WARNING: target fast missed")  # `puzzlenas report RUN`

    text = (run / "report" / "README.md").read_text()
    assert "- **target fast missed when measured" in text
    assert "| gkd-fast | fast | tiny | decode | 1.30x |" in text and "| 1.05x | **no** |" in text
    for plot in ("frontier.png", "speedups.png", "losses.png", "layers.png"):
        assert (run / "report" / plot).stat().st_size > 10_000 and f"]({plot})" in text
    # Markdown tables, not code blocks; full headers
    assert "| model | parameters | KV bytes / token | perplexity | KL to parent | top-1 agreement |" in text
    code_blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    assert not any(line.startswith("|") for block in code_blocks for line in block.splitlines())
    assert "No downstream task was evaluated" in text  # the tiny run has none: said, not hidden
    # how to serve each child, per runtime, pointing at its export folder
    assert "### fast" in text and "AutoModelForCausalLM.from_pretrained('./export-fast', trust_remote_code=True)" in text
    from puzzlenas.model.info import runtime_support
    from puzzlenas.model.modeling import DeciLMConfig

    fast = text.split("### fast")[1].split("###")[0]
    for runtime, problems in runtime_support(DeciLMConfig.from_pretrained(run / "gkd-fast")).items():
        # a runtime that cannot run the child says why; one that can gets its export command
        assert (f"- {runtime}: cannot run this child: {'; '.join(problems)}" if problems
                else f"--runtime {runtime} --force`):") in fast
    # BLD loss curves were recorded per job
    bld = [json.loads(line) for line in (run / "bld" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in bld if m["trained"]]
    assert trained and all(len(m["loss_curve"]) >= 2 for m in trained)

    # met when measured: no warning
    _with_measured_speedups(run, {"fast": 1.4})
    report.run(cfg, run)
    assert "every speedup target met when measured" in capsys.readouterr().out
    assert "Every speedup target is met when measured." in (run / "report" / "README.md").read_text()


def test_target_checks_follow_the_targets_scenarios():
    results = {"gkd-a": {"speedup": {"b1": {"decode_step_s": 1.9, "generate_s": 2.1, "prefill_s": 1.0},
                                     "b64": {"decode_step_s": 2.2, "generate_s": 1.5, "prefill_s": 1.0}}}}
    records = [{"name": "a", "target": "t", "predicted_speedup": {"decode_s/b64": 2.1}},
               {"name": "p", "target": "t", "peer": "shortgpt"}]
    one = target_checks(results, records, [{"name": "t", "speedup": 2.0, "metric": "decode", "scenario": None}])
    # the first scenario; not promised there by the search (no prediction): shown, not flagged
    assert [(c["scenario"], c["measured"], c["missed"]) for c in one] == [("b1", 1.9, False)]
    both = target_checks(results, records, [{"name": "t", "speedup": 2.0, "metric": "decode",
                                             "scenario": ["b1", "b64"]}])
    assert [(c["scenario"], c["missed"], c["predicted"]) for c in both] == [("b1", False, None), ("b64", False, 2.1)]
    records[0]["predicted_speedup"] = {"decode_s/b1": 2.05, "generate_s/b64": 2.3}
    both = target_checks(results, records, [{"name": "t", "speedup": 2.0, "metric": "decode",
                                             "scenario": ["b1", "b64"]}])
    assert [(c["scenario"], c["missed"]) for c in both] == [("b1", True), ("b64", False)]  # promised 2.05x, ran 1.9x
    gen = target_checks(results, records, [{"name": "t", "speedup": 2.0, "metric": "generate", "scenario": "b64"}])
    assert gen[0]["measured"] == 1.5 and gen[0]["missed"]
    assert target_checks(results, records, [{"name": "t", "params": 1e6}]) == []  # no speedup target


def test_task_intervals_say_when_examples_are_too_few():
    # 5 examples at 0.6: the interval spans +-0.43, so a retention of 0.75 says nothing
    assert accuracy_interval(0.6, 5) == pytest.approx(1.96 * (0.24 / 5) ** 0.5)
    assert retention_interval(0.45, 0.6, 5) > 0.25
    assert retention_interval(0.45, 0.6, 2000) < 0.05
