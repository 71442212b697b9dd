"""Which signal, measured before GKD, ranks a target's candidates as they rank after GKD out of genre?

For every candidate of a finished search (`search/candidates.jsonl` of a run directory): its realized
KL to the parent as assembled (what the search compares by default), after a short GKD
(`search.select_gkd_tokens`), then after the run's full GKD, with the out-of-genre metrics (eval.genres)
and chat quality of the distilled candidate. The out-of-genre text is only measured here, never used
to choose: this asks whether a signal the search may use predicts it. Prints a table and the Spearman
rank correlation of each signal with the mean out-of-genre log-perplexity ratio after GKD; writes JSON.

    python benchmarks/candidate_signals.py RUN_DIR --short-tokens 65536 [--gkd-tokens N] [--target NAME]
    python benchmarks/candidate_signals.py RUN_DIR --short-tokens 4096 --no-full   # the short GKD's KL alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties broken by order; enough for a handful of candidates)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0] * len(x)
        for rank, i in enumerate(order):
            r[i] = rank
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--short-tokens", type=int, default=65536, help="the short GKD (search.select_gkd_tokens)")
    ap.add_argument("--gkd-tokens", type=int, default=None, help="the full GKD (default: the run's gkd.tokens)")
    ap.add_argument("--target", default=None, help="one target's candidates (default: every target)")
    ap.add_argument("--no-full", action="store_true", help="the short GKD's KL only (no full GKD, no eval)")
    ap.add_argument("--max-candidates", type=int, default=None, help="the first N only (a smoke test)")
    ap.add_argument("--out", default="candidate_signals.json")
    args = ap.parse_args()

    import torch

    from puzzlenas.assemble import assemble_child, pairs_from_record
    from puzzlenas.config import load_run_config
    from puzzlenas.eval.metrics import final_hidden, lm_metrics
    from puzzlenas.gkd import GKDTrainer
    from puzzlenas.library import read_space
    from puzzlenas.stages.base import RunDir
    from puzzlenas.stages.common import load_data, load_parent_for, train_batches, validation_batches
    from puzzlenas.stages.eval import ChatQualityEval, GenreEval
    from puzzlenas.stages.search import short_gkd
    from transformers import AutoTokenizer

    run = Path(args.run_dir)
    cfg = load_run_config(run / "config.yaml")
    if args.gkd_tokens:
        cfg.gkd = dataclasses.replace(cfg.gkd, tokens=args.gkd_tokens)
    cfg.search = dataclasses.replace(cfg.search, select_gkd_tokens=args.short_tokens)
    candidates = [json.loads(line) for line in (run / "search" / "candidates.jsonl").read_text().splitlines()]
    if args.target:
        candidates = [c for c in candidates if c["target"] == args.target]
    candidates = candidates[:args.max_candidates]
    parent = load_parent_for(cfg, run, frozen=True).eval()
    device = parent.model.embed_tokens.weight.device
    tokenizer = AutoTokenizer.from_pretrained(RunDir(run).parent)
    dataset = load_data(cfg, run)
    space = read_space(RunDir(run).space)
    val = validation_batches(dataset, cfg.search.select_tokens, cfg.search.select_batch_size)
    with torch.no_grad():
        val_hidden = [final_hidden(parent, b.to(device)) for b in val]
    genres = GenreEval(cfg, tokenizer, parent, dataset.seq_len)
    chat = ChatQualityEval(cfg, tokenizer, parent, device)
    parent_genres = genres.measure(parent)
    repair, _ = short_gkd(cfg, dataset, parent)

    def kl(child) -> float:
        with torch.no_grad():
            return lm_metrics({"c": child.eval()}, parent, val, cfg.eval.logits_chunk, val_hidden)["c"]["kl_to_parent"]

    rows = []
    for c in candidates:
        t0 = time.time()
        pairs = pairs_from_record(c, space)
        child = assemble_child(parent, RunDir(run).bld, pairs).to(device)
        row = {"name": c["name"], "target": c["target"], "objective": c["objective"], "assembled_kl": kl(child)}
        repair(child)
        row["short_gkd_kl"] = kl(child)
        if args.no_full:
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        child = assemble_child(parent, RunDir(run).bld, pairs).to(device).float()  # the full GKD from assembled
        with tempfile.TemporaryDirectory() as work:
            gkd_cfg = dataclasses.replace(cfg.gkd, chat_fraction=0.0, on_policy_fraction=0.0, checkpoint_every=10**9)
            trainer = GKDTrainer(child, parent, gkd_cfg, Path(work), dataset.seq_len, log=lambda *_: None)
            trainer.train(train_batches(cfg, dataset, gkd_cfg.batch_size, gkd_cfg.tokens, seed=cfg.seed + 1,
                                        teacher_share=gkd_cfg.teacher_share))
        child = child.to(getattr(torch, cfg.parent_dtype)).eval()
        row["gkd_kl"] = kl(child)
        g = genres.measure(child)
        row["genres"] = {k: {"ratio": v["perplexity"] / parent_genres[k]["perplexity"], "kl": v["kl_to_parent"]}
                         for k, v in g.items()}
        row["ood_log_ratio"] = sum(math.log(v["ratio"]) for v in row["genres"].values()) / max(len(g), 1)
        if chat.enabled:
            q = chat.measure(child)
            row["chat"] = {k: q[k] for k in q if k != "answers"}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "chat"}), flush=True)

    if args.no_full:
        Path(args.out).write_text(json.dumps({"rows": rows, "short_tokens": args.short_tokens}, indent=1))
        return
    print(f"\n{'candidate':<20} {'sum score':>9} {'assembled KL':>12} {'short GKD KL':>12} {'GKD KL':>8}  "
          f"out-of-genre ratios after GKD")
    for r in rows:
        ratios = " / ".join(f"{v['ratio']:.2f}x" for v in r["genres"].values())
        print(f"{r['name']:<20} {r['objective']:>9.4f} {r['assembled_kl']:>12.4f} {r['short_gkd_kl']:>12.4f} "
              f"{r['gkd_kl']:>8.4f}  {ratios}")
    summary = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        group = [r for r in rows if r["target"] == target]
        ood = [r["ood_log_ratio"] for r in group]
        summary[target] = {s: spearman([r[s] for r in group], ood)
                           for s in ("objective", "assembled_kl", "short_gkd_kl", "gkd_kl")}
        print(f"{target}: Spearman with the mean out-of-genre log-ratio after GKD: "
              + ", ".join(f"{k} {v:+.2f}" for k, v in summary[target].items()))
    Path(args.out).write_text(json.dumps({"rows": rows, "spearman": summary, "short_tokens": args.short_tokens,
                                          "gkd_tokens": cfg.gkd.tokens, "run_dir": str(run),
                                          "device": str(device), "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
