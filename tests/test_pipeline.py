"""The chained stages after BLD on a tiny parent: scores, costs, search."""

import json

import pytest
import yaml

from puzzlenas.cli import main
from puzzlenas.pipeline import run_pipeline
from puzzlenas.search import InfeasibleBudgetError
from tests.conftest import tiny_run_config

SCENARIO = {"name": "tiny", "batch_size": 2, "prompt_tokens": 16, "generate_tokens": 8}


def config(inputs, **search) -> dict:
    cfg = tiny_run_config(inputs, tokens=2048)
    cfg["scoring"] = {"tokens": 256, "batch_size": 4}
    cfg["costs"] = {"dtype": "float32", "iters": 3, "check_children": 1, "scenarios": [SCENARIO]}
    cfg["search"] = {"targets": [{"name": "fast", "metric": "decode", "speedup": 1.3},
                                 {"name": "small", "params": 60000, "solutions": 2}],
                     "frontier": [1.1, 1.3, 1.0e6], **search}
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_run_inputs):
    root = tmp_path_factory.mktemp("search")
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(tiny_run_inputs)))
    return run_pipeline(path, run_dir=root / "run")


def test_scores_rank_no_op_below_the_parent(finished_run):
    rows = [json.loads(line) for line in (finished_run / "scores" / "scores.jsonl").read_text().splitlines()]
    by = {(r["layer"], r["name"]): r for r in rows}
    for layer in range(3):
        assert by[(layer, "attn_kv2")]["kl"] == 0.0 and by[(layer, "ffn_96")]["kl"] == 0.0
        assert by[(layer, "attn_noop")]["kl"] > 0 and by[(layer, "ffn_noop")]["kl"] > 0
        assert by[(layer, "attn_noop")]["kl"] > by[(layer, "attn_kv1")]["kl"]


def test_costs_and_the_whole_model_check(finished_run):
    table = json.loads((finished_run / "costs" / "costs.json").read_text())
    assert table["device"]["scenarios"][0]["name"] == "tiny"
    assert table["attention"]["no-op"]["decode_s/tiny"] == 0.0
    check = json.loads((finished_run / "costs" / "check.json").read_text())
    assert {r["model"] for r in check} == {"parent", "random-0"}


def test_solutions_meet_their_budgets(finished_run):
    records = [json.loads(line) for line in (finished_run / "search" / "solutions.jsonl").read_text().splitlines()]
    fast = next(r for r in records if r["target"] == "fast")
    assert fast["predicted_speedup"]["decode_s/tiny"] >= 1.3 - 1e-9
    assert len(fast["block_configs"]) == 3 and "n_heads_in_group" in fast["block_configs"][0]["attention"]
    small = [r for r in records if r["target"] == "small"]
    assert len(small) == 2  # two diverse solutions
    assert all(r["constraint_values"]["parameters"] <= 60000 for r in small)
    assert sum(a != b for a, b in zip(small[0]["names"], small[1]["names"])) >= 1  # >= 20% of 3 layers
    front = json.loads((finished_run / "search" / "frontier.json").read_text())
    assert front[0]["objective"] <= front[1]["objective"] and front[2]["objective"] is None  # beyond the fixed part


def test_impossible_budget_says_the_best_achievable(tmp_path, tiny_run_inputs, finished_run, capsys):
    cfg = config(tiny_run_inputs, targets=[{"name": "impossible", "speedup": 1.0e6}])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    import shutil

    shutil.copytree(finished_run, tmp_path / "run")
    with pytest.raises(InfeasibleBudgetError) as err:
        run_pipeline(path, run_dir=tmp_path / "run")
    assert "impossible" in str(err.value) and err.value.best_alone
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err
    assert "best achievable decode speedup in this library" in message and "asked 1e+06x" in message
