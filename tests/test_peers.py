"""Peers (ShortGPT, Minitron-style width, uniform KV) built at Puzzle's budgets on a tiny parent."""

import json
import os

import pytest
import torch
import yaml

from puzzlenas.config import ConfigError, load_run_config
from puzzlenas.costs import predicted_costs
from puzzlenas.model.modeling import DeciLMConfig
from puzzlenas.pipeline import run_pipeline

ALL = ["shortgpt", "minitron_width", "uniform_kv"]


def _hard_link_copy(src, dst):
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


@pytest.fixture(scope="module")
def peers_run(finished_run, tmp_path_factory):
    """The finished tiny run, copied (hard links), then rerun with every peer asked for."""
    run = tmp_path_factory.mktemp("peers") / "run"
    _hard_link_copy(finished_run, run)
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("*/DONE")}
    stamps.update({f"eval/{p.stem}": p.stat().st_mtime_ns for p in run.glob("eval/models/*.json")})
    run_pipeline(run / "config.yaml", run_dir=run, overrides=[f"peers.methods={ALL}"])
    return run, stamps


def _records(run):
    return [json.loads(line) for line in (run / "peers" / "solutions.jsonl").read_text().splitlines()]


def test_block_influence_is_one_minus_cosine_of_layer_input_and_output():
    from puzzlenas.peers import block_influence
    from tests.test_child import make_child

    model = make_child(seed=0).eval()
    batches = [torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (3, 7))]
    got = block_influence(model, batches)
    with torch.no_grad():
        cos = [[] for _ in range(model.config.num_hidden_layers)]
        for b in batches:
            hs = model.model(b, output_hidden_states=True).hidden_states  # L + 1 states, pre final norm
            for i in range(model.config.num_hidden_layers):
                cos[i].append(torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).flatten())
    want = [1 - torch.cat(c).mean().item() for c in cos]
    assert got == pytest.approx(want, abs=1e-6)


def test_shortgpt_drops_the_fewest_lowest_influence_layers_that_meet_the_target(peers_run):
    run, _ = peers_run
    table = json.loads((run / "costs" / "costs.json").read_text())
    parent_blocks = DeciLMConfig.from_pretrained(run / "parent").blocks
    influence = json.loads((run / "peers" / "block_influence.json").read_text())["block_influence"]
    record = next(r for r in _records(run) if r["name"] == "shortgpt-fast")
    dropped = [i for i, n in enumerate(record["names"]) if n == "attn_noop+ffn_noop"]
    kept = [i for i, n in enumerate(record["names"]) if n == "attn_kv2+ffn_96"]
    assert len(dropped) + len(kept) == 3 and dropped
    assert max(influence[i] for i in dropped) <= min((influence[i] for i in kept), default=1e9)
    key = "decode_s/tiny"
    assert record["predicted_speedup"][key] >= 1.3 * 1.03 - 1e-9
    # one layer fewer dropped (the highest-influence one of the dropped kept) misses the target
    fewer = [b for b in parent_blocks]
    order = sorted(range(3), key=lambda i: influence[i])
    from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig

    for i in order[:len(dropped) - 1]:
        fewer[i] = BlockConfig(AttentionConfig("no_op"), FFNConfig("no_op"))
    parent_time = predicted_costs(table, parent_blocks)[key]
    assert parent_time / predicted_costs(table, fewer)[key] < 1.3 * 1.03


def test_uniform_peers_take_the_best_fitting_uniform_choice(peers_run):
    run, _ = peers_run
    records = _records(run)
    scores = [json.loads(line) for line in (run / "scores" / "scores.jsonl").read_text().splitlines()]
    kl = {(r["layer"], r["name"]): r["kl"] for r in scores}
    unreachable = json.loads((run / "peers" / "unreachable.json").read_text())
    done = {(r["peer"], r["target"]) for r in records}
    assert done | {(u["method"], u["target"]) for u in unreachable} == {(m, t) for m in ALL for t in ("fast", "small")}
    for r in records:
        if r["peer"] == "shortgpt":
            continue
        attention = {n.split("+")[0] for n in r["names"]}
        ffn = {n.split("+")[1] for n in r["names"]}
        assert len(attention) == 1 and len(ffn) == 1  # uniform over layers
        if r["peer"] == "uniform_kv":
            assert ffn == {"ffn_96"} and attention == {"attn_kv1"}  # the only smaller KV count of the tiny parent
        else:
            assert attention == {"attn_kv2"} and ffn <= {"ffn_48", "ffn_32"}
        # the objective is the sum of the replace-1-block KL of its subblocks
        want = sum(max(kl[(i, a)] + kl[(i, f)], 0.0) for i, n in enumerate(r["names"]) for a, f in [n.split("+")])
        assert r["objective"] == pytest.approx(want)
    for u in unreachable:
        assert "misses" in u["why"] and ("speedup" in u["why"]) == (u["target"] == "fast")


def test_peer_children_go_through_gkd_and_eval_without_redoing_puzzles(peers_run):
    run, stamps = peers_run
    names = [r["name"] for r in _records(run)]
    assert {"shortgpt-fast", "shortgpt-small"} <= set(names)
    for name in names:
        assert (run / f"child-{name}" / "DONE").is_file() and (run / f"gkd-{name}" / "config.json").is_file()
    for name in ("child-fast", "gkd-fast", "child-small", "gkd-small-1", "search", "scores"):
        assert (run / name / "DONE").stat().st_mtime_ns == stamps[name], name  # Puzzle's children kept
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {f"gkd-{n}" for n in names} <= set(results) and "gkd-fast" in results
    # eval kept Puzzle's children's results; their speedups stay those against the parent of their session
    assert (run / "eval/models/gkd-fast.json").stat().st_mtime_ns == stamps["eval/gkd-fast"]
    assert (run / "eval/models/parent.json").stat().st_mtime_ns != stamps["eval/parent"]
    kept = json.loads((run / "eval/models/gkd-fast.json").read_text())
    assert results["gkd-fast"]["speedup"]["tiny"]["decode_step_s"] == pytest.approx(
        kept["parent_throughput"]["tiny"]["decode_step_s"] / kept["result"]["throughput"]["tiny"]["decode_step_s"])
    # equal training tokens: ShortGPT (no BLD-trained block) distils on GKD + BLD tokens, Puzzle on GKD's
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    tokens = {n: json.loads((run / f"gkd-{n}" / "history.json").read_text())["tokens"]
              for n in ("fast", "shortgpt-fast")}
    assert tokens == {"fast": cfg["gkd"]["tokens"], "shortgpt-fast": cfg["gkd"]["tokens"] + cfg["bld"]["tokens"]}
    report = (run / "report" / "README.md").read_text()
    assert "## Puzzle vs peers at the same budgets" in report
    assert f"| {tokens['shortgpt-fast']:,} |" in report
    assert "| fast | shortgpt |" in report and "| fast | puzzle (fast) |" in report
    # asking for no peers again: Puzzle's children only, as before
    run_pipeline(run / "config.yaml", run_dir=run, overrides=["peers.methods=[]"])
    assert "Puzzle vs peers" not in (run / "report" / "README.md").read_text()


def test_unknown_peer_method_is_refused_with_the_allowed_ones(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"peers": {"methods": ["sheared"]}}))
    with pytest.raises(ConfigError, match="peers.*unknown.*sheared.*shortgpt, minitron_width, uniform_kv"):
        load_run_config(path)


def synthetic_instance():
    """4 layers; per-layer decode costs: attention kv4 4 / kv2 2 / kv1 1.5 / no-op 0, FFN 64 4 / 32 2.5 /
    16 1.5 / no-op 0, fixed 1 (parent 33); KL: kv2 0.1, kv1 0.3, no-op 1.0, ffn_32 0.05, ffn_16 0.2, no-op 0.8."""
    from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
    from puzzlenas.costs import subblock_key
    from puzzlenas.library import attention_variant, ffn_variant

    pa, pf = AttentionConfig("gqa", 4), FFNConfig("gated", 64)
    att = [attention_variant(c, pa) for c in (pa, AttentionConfig("gqa", 2), AttentionConfig("gqa", 1),
                                              AttentionConfig("no_op"))]
    ffn = [ffn_variant(c, pf) for c in (pf, FFNConfig("gated", 32), FFNConfig("gated", 16), FFNConfig("no_op"))]
    time = dict(zip([v.name for v in att + ffn], [4, 2, 1.5, 0, 4, 2.5, 1.5, 0]))
    kl = dict(zip([v.name for v in att + ffn], [0, 0.1, 0.3, 1.0, 0, 0.05, 0.2, 0.8]))
    scenario = {"name": "s", "batch_size": 1, "prompt_tokens": 1, "generate_tokens": 1}

    def entry(t):
        return {"params_bytes": t * 100, "kv_bytes_per_token": 0, "decode_s/s": t, "prefill_s/s": t,
                "generate_s/s": t}

    table = {"device": {"scenarios": [scenario]}, "fixed": entry(1.0),
             "attention": {subblock_key(v.config): entry(time[v.name]) for v in att},
             "ffn": {subblock_key(v.config): entry(time[v.name]) for v in ffn}}
    scores = [{"layer": i, "kind": v.subblock, "name": v.name, "variants": [v.to_json()], "kl": kl[v.name]}
              for i in range(4) for v in att + ffn]
    return scores, table, [BlockConfig(pa, pf)] * 4, [(att, ffn)] * 4


def test_peers_on_a_synthetic_instance_match_the_hand_solution():
    from puzzlenas.peers import build_peers
    from puzzlenas.search import SearchConfig, Target

    scores, table, parent_blocks, space = synthetic_instance()
    search = SearchConfig(targets=[Target("t1.2", speedup=1.2), Target("t2", speedup=2.0)], time_margin=0.0)
    records, unreachable = build_peers(scores, table, parent_blocks, space, search, ALL, [0.3, 0.1, 0.2, 0.4],
                                       "kl", "bfloat16", 8, 48)
    by = {r["name"]: r for r in records}
    # 1.2x: time <= 27.5. Uniform kv2 (25, KL 0.4) beats kv1 (23, 1.2); ffn_32 (27, 0.2) beats ffn_16 (23, 0.8);
    # ShortGPT drops one layer (25), the one of lowest influence (layer 1).
    assert by["uniform_kv-t1.2"]["names"] == ["attn_kv2+ffn_64"] * 4
    assert by["uniform_kv-t1.2"]["objective"] == pytest.approx(0.4)
    assert by["minitron_width-t1.2"]["names"] == ["attn_kv4+ffn_32"] * 4
    assert by["shortgpt-t1.2"]["names"][1] == "attn_noop+ffn_noop"
    assert sum(n == "attn_noop+ffn_noop" for n in by["shortgpt-t1.2"]["names"]) == 1
    assert by["shortgpt-t1.2"]["predicted_speedup"]["decode_s/s"] == pytest.approx(33 / 25)
    # 2x: time <= 16.5. ShortGPT must drop 3 layers (9); no uniform choice reaches it (best 23: 1.43x).
    assert [i for i, n in enumerate(by["shortgpt-t2"]["names"]) if n == "attn_noop+ffn_noop"] == [0, 1, 2]
    assert {(u["method"], u["target"]) for u in unreachable} == {("uniform_kv", "t2"), ("minitron_width", "t2")}
    for u in unreachable:
        assert u["best_speedup"] == pytest.approx(33 / 23) and "1.43x" in u["why"]
    assert set(by) == {"uniform_kv-t1.2", "minitron_width-t1.2", "shortgpt-t1.2", "shortgpt-t2"}
    assert all(r["peer"] == r["method"] and len(r["block_configs"]) == 4 for r in records)
    # peers.targets: the same peers at the named target only, and nothing said about the others
    only, unreachable_only = build_peers(scores, table, parent_blocks, space, search, ALL, [0.3, 0.1, 0.2, 0.4],
                                         "kl", "bfloat16", 8, 48, only_targets=["t2"])
    assert [r["name"] for r in only] == ["shortgpt-t2"] and only[0]["names"] == by["shortgpt-t2"]["names"]
    assert {u["target"] for u in unreachable_only} == {"t2"}


def test_peers_targets_must_name_search_targets(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"peers": {"methods": ["shortgpt"], "targets": ["decode-3x"]},
                                    "search": {"targets": [{"name": "decode-2x", "speedup": 2.0}]}}))
    with pytest.raises(ConfigError, match=r"peers.targets names \['decode-3x'\].*\['decode-2x'\]"):
        load_run_config(path)


def test_peers_with_a_parameter_budget_name_the_budget_they_miss():
    from puzzlenas.peers import build_peers
    from puzzlenas.search import SearchConfig, Target

    scores, table, parent_blocks, space = synthetic_instance()
    search = SearchConfig(targets=[Target("tiny", params=300)], time_margin=0.0)  # bf16: 2 bytes a parameter
    _, unreachable = build_peers(scores, table, parent_blocks, space, search, ["uniform_kv"], None,
                                 "kl", "bfloat16", 8, 48)
    (u,) = unreachable
    assert "parameters" in u["why"] and "every layer attn_kv1" in u["why"] and "speedup" not in u["why"]


def test_the_peers_depend_on_the_budgets_not_on_how_puzzle_picks(tmp_path):
    from puzzlenas.stages.peers import STAGE as peers_stage

    def fp(peer_targets=None, **target):
        path = tmp_path / "cfg.yaml"
        peers = {"methods": ["shortgpt"], **({"targets": peer_targets} if peer_targets is not None else {})}
        path.write_text(yaml.safe_dump({"peers": peers,
                                        "search": {"targets": [{"name": "t", "speedup": 2.0, **target}]}}))
        return peers_stage.fingerprint(load_run_config(path))

    assert fp() == fp(candidates=4) == fp(solutions=2)
    assert fp() != fp(memory_gib=10.0)
    # peers.targets: empty is every target, as before the setting existed; naming targets is a new peers stage
    assert fp() == fp(peer_targets=[]) != fp(peer_targets=["t"])


def two_scenario_instance():
    """The synthetic instance with two scenarios: in s attention costs as before and every FFN
    but the no-op 1; in b the FFN costs as before and every attention but the no-op 1."""
    scores, table, parent_blocks, space = synthetic_instance()
    table["device"]["scenarios"].append({"name": "b", "batch_size": 1, "prompt_tokens": 1, "generate_tokens": 1})
    for kind in ("attention", "ffn"):
        for key, e in table[kind].items():
            e["decode_s/b"] = e["decode_s/s"] if kind == "ffn" or key == "no-op" else 1.0
            if kind == "ffn" and key != "no-op":
                e["decode_s/s"] = 1.0
            e["prefill_s/b"] = e["generate_s/b"] = e["decode_s/b"]
    table["fixed"].update({"decode_s/b": 1.0, "prefill_s/b": 1.0, "generate_s/b": 1.0})
    return scores, table, parent_blocks, space


def test_a_target_with_several_scenarios_meets_its_budget_in_each():
    """Scenario a: attention is the cost (kv4 4, kv2 2, kv1 1.5, FFN 1 each); scenario b: the FFN is
    (FFN 64 4 / 32 2.5 / 16 1.5, attention 1 each). 1.2x in both needs cuts in both subblocks."""
    from puzzlenas.peers import build_peers
    from puzzlenas.mip import InfeasibleBudgetError
    from puzzlenas.search import SearchConfig, Target, run_search

    scores, table, parent_blocks, space = two_scenario_instance()

    def best(scenario):
        cfg = SearchConfig(targets=[Target("t", scenario=scenario, speedup=1.2)], time_margin=0.0, frontier=[])
        (record,), _ = run_search(scores, table, parent_blocks, cfg, "kl", "bfloat16", 8, 48)
        return record

    both, only_a, only_b = best(["s", "b"]), best("s"), best("b")
    assert both["predicted_speedup"]["decode_s/s"] >= 1.2 - 1e-9 and both["predicted_speedup"]["decode_s/b"] >= 1.2 - 1e-9
    assert only_a["predicted_speedup"]["decode_s/b"] < 1.2 and only_b["predicted_speedup"]["decode_s/s"] < 1.2
    assert both["objective"] > max(only_a["objective"], only_b["objective"])
    cfg = SearchConfig(targets=[Target("t", scenario=["s", "b"], speedup=30.0)], time_margin=0.0, frontier=[])
    with pytest.raises(InfeasibleBudgetError, match="best achievable decode speedup in this library on"):
        run_search(scores, table, parent_blocks, cfg, "kl", "bfloat16", 8, 48)
    # a uniform peer must also meet both: one KV head everywhere leaves scenario b's FFN cost untouched
    _, unreachable = build_peers(scores, table, parent_blocks, space,
                                 SearchConfig(targets=[Target("t", scenario=["s", "b"], speedup=1.2)], time_margin=0.0),
                                 ["uniform_kv"], None, "kl", "bfloat16", 8, 48)
    (u,) = unreachable
    assert u["best_speedup"] == pytest.approx(1.0) and "on b" in u["why"]


def test_scenario_mode_best_solves_each_scenario_alone_and_keeps_the_lowest_score():
    from puzzlenas.peers import build_peers
    from puzzlenas.mip import InfeasibleBudgetError
    from puzzlenas.search import SearchConfig, Target, run_search

    scores, table, parent_blocks, space = two_scenario_instance()

    def solve(scenario, mode="all", speedup=1.2):
        cfg = SearchConfig(targets=[Target("t", scenario=scenario, scenario_mode=mode, speedup=speedup)],
                           time_margin=0.0, frontier=[])
        (record,), _ = run_search(scores, table, parent_blocks, cfg, "kl", "bfloat16", 8, 48)
        return record

    alone = {"s": solve("s"), "b": solve("b")}
    best = solve(["s", "b"], "best")
    winner = min(alone, key=lambda k: alone[k]["objective"])
    assert best["scenario"] == winner and best["names"] == alone[winner]["names"]
    assert [t["objective"] for t in best["scenarios_tried"]] == [alone["s"]["objective"], alone["b"]["objective"]]
    assert best["objective"] < solve(["s", "b"])["objective"]  # "all" must satisfy both: dearer
    with pytest.raises(InfeasibleBudgetError, match="(?s)on s: .*on b: "):
        solve(["s", "b"], "best", speedup=30.0)
    # peers in mode best: one KV head everywhere fits scenario s (4 x (2 + 1) + 1 = 13 vs 21)
    records, _ = build_peers(scores, table, parent_blocks, space,
                             SearchConfig(targets=[Target("t", scenario=["s", "b"], scenario_mode="best", speedup=1.2)],
                                          time_margin=0.0), ["uniform_kv"], None, "kl", "bfloat16", 8, 48)
    (r,) = records
    assert r["scenario"] == "s" and r["names"] == ["attn_kv2+ffn_64"] * 4


def test_a_corrupted_peers_file_names_the_stage_to_rerun(peers_run):
    run, _ = peers_run
    from puzzlenas.config import load_run_config as load
    from puzzlenas.stages.common import solutions

    cfg = load(run / "config.yaml", [f"peers.methods={ALL}"])
    path = run / "peers" / "solutions.jsonl"
    good = path.read_text()
    path.unlink()  # a hard link: replace, never edit in place
    path.write_text(good[: len(good) // 2])
    try:
        with pytest.raises(ValueError, match="peers/solutions.jsonl line 1 is not JSON.*--force peers"):
            solutions(run, cfg)
    finally:
        path.unlink()
        path.write_text(good)
