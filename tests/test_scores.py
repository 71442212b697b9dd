"""The scores stage: replace-1-block KL / LM loss of the library items, resumable."""

import json

import pytest


def test_scores_rank_no_op_below_the_parent(finished_run):
    rows = [json.loads(line) for line in (finished_run / "scores" / "scores.jsonl").read_text().splitlines()]
    by = {(r["layer"], r["name"]): r for r in rows}
    for layer in range(3):
        assert by[(layer, "attn_kv2")]["kl"] == 0.0 and by[(layer, "ffn_96")]["kl"] == 0.0
        assert by[(layer, "attn_noop")]["kl"] > 0 and by[(layer, "ffn_noop")]["kl"] > 0
        assert by[(layer, "attn_noop")]["kl"] > by[(layer, "attn_kv1")]["kl"]


def test_scoring_resumes_after_a_kill(finished_run, tmp_path):
    import torch

    from puzzlenas.bld import finished_jobs
    from puzzlenas.library import read_space
    from puzzlenas.model.parent import load_parent
    from puzzlenas.scoring import ScoringConfig, score_items

    parent = load_parent(finished_run / "parent")
    items = [j for j in finished_jobs(finished_run / "bld", read_space(finished_run / "library" / "space.json"))
             if j.layer == 1]
    batches = [torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(k)) for k in range(3)]
    cfg = ScoringConfig(items_per_pass=3)
    fresh = score_items(parent, finished_run / "bld", items, batches, cfg, tmp_path / "a.json", log=lambda *a: None)

    def die_after_first(message: str) -> None:
        if "batch 2/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_items(parent, finished_run / "bld", items, batches, cfg, tmp_path / "b.json", log=die_after_first)
    assert json.loads((tmp_path / "b.json").read_text())["batches_done"] == 2
    resumed = score_items(parent, finished_run / "bld", items, batches, cfg, tmp_path / "b.json",
                          log=lambda *a: None)
    for key, row in fresh.items():
        assert resumed[key]["kl"] == pytest.approx(row["kl"], rel=1e-9)
        assert resumed[key]["lm_loss"] == pytest.approx(row["lm_loss"], rel=1e-9)
