"""Where does a child lose the parent out of genre? (issue 11)

For each evaluation genre and the run's test split (same-genre text, for comparison), every predicted token of every row is put in one of
two classes:
  * "copy": the bigram (previous token, this token) already occurred earlier in the row, the
    pattern induction heads complete by attending back (names, defined terms, repeated clauses);
  * "other": everything else.
and in a position bucket (0-63, 64-255, 256+). Per class and bucket: the share of the tokens, the
child's mean excess loss over the parent (its NLL minus the parent's, nats) and KL(parent || child),
and the share of the child's total excess loss that the class carries. If the children's extra loss
out of genre lies mostly in "copy" positions, the attention the search removes (not the training
text) is what the out-of-genre gap is made of.

  python benchmarks/oog_positions.py RUN_DIR [--models gkd-decode-1.5x ...] [--tokens 16384] [--out f.json]
Rows are data.seq_len tokens long (the run's), as eval reads them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BUCKETS = ((0, 64), (64, 256), (256, 1 << 30))


def copy_mask(rows: torch.Tensor) -> torch.Tensor:
    """(N, T - 1) bool: target t + 1 of row n completes a bigram seen earlier in the row."""
    out = torch.zeros(rows.shape[0], rows.shape[1] - 1, dtype=torch.bool)
    for n, row in enumerate(rows.tolist()):
        seen: set[tuple[int, int]] = set()
        for t in range(1, len(row)):
            bigram = (row[t - 1], row[t])
            out[n, t - 1] = bigram in seen
            seen.add(bigram)
    return out


@torch.no_grad()
def token_losses(model, parent_logp_fn, rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(child NLL (N, T - 1), KL(parent || child) (N, T - 1)) of every predicted token."""
    nll, kl = [], []
    for b in rows.split(batch):
        logq = F.log_softmax(model(b).logits[:, :-1].float(), -1)  # (B, T - 1, V)
        logp = parent_logp_fn(b)
        nll.append(-logq.gather(-1, b[:, 1:, None])[..., 0])
        kl.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(nll), torch.cat(kl)


def summarize(excess: torch.Tensor, kl: torch.Tensor, copy: torch.Tensor) -> dict:
    positions = torch.arange(copy.shape[1]).expand_as(copy)
    total = excess.sum().item()
    out = {"tokens": copy.numel(), "excess_nll": excess.mean().item(), "kl": kl.mean().item()}
    for cls, mask in (("copy", copy), ("other", ~copy)):
        for lo, hi in ((0, 1 << 30), *BUCKETS):
            m = mask & (positions >= lo) & (positions < hi)
            key = cls if (lo, hi) == (0, 1 << 30) else f"{cls}@{lo}-{min(hi, 99999) if hi < 1 << 30 else 'end'}"
            n = int(m.sum())
            out[key] = {"share_of_tokens": n / copy.numel(), "excess_nll": excess[m].mean().item() if n else None,
                        "kl": kl[m].mean().item() if n else None,
                        "share_of_excess": excess[m].sum().item() / total if n and total else None}
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--models", nargs="*", default=None, help="model folders in the run (default: gkd-*)")
    ap.add_argument("--genres", nargs="*", default=["test", "dialogue", "legal", "readme"],
                    help="evaluation genres; test: the run's test split")
    ap.add_argument("--tokens", type=int, default=16384, help="per genre")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from puzzlenas.config import load_run_config
    from puzzlenas.eval.genres import genre_rows
    from puzzlenas.integrity import load_model_checked
    from puzzlenas.stages.base import RunDir
    from puzzlenas.stages.common import load_data

    cfg = load_run_config(args.run_dir / "config.yaml")
    seq_len = cfg.data.seq_len

    def rows_of(genre: str) -> torch.Tensor:
        if genre == "test":
            rows = load_data(cfg, args.run_dir, teacher=False).split("test")[: max(1, args.tokens // seq_len)]
        else:
            rows = genre_rows(genre, tokenizer, seq_len, args.tokens)
        return torch.from_numpy(np.asarray(rows).astype(np.int64))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(RunDir(args.run_dir).parent)
    parent = load_model_checked(RunDir(args.run_dir).parent, dtype).to(device).eval()
    names = args.models or sorted(p.name for p in args.run_dir.glob("gkd-*") if (p / "config.json").exists())
    texts = {g: rows_of(g) for g in args.genres}
    results: dict = {}
    for genre, rows in texts.items():
        rows = rows.to(device)
        copy = copy_mask(rows.cpu())
        p_logp = [F.log_softmax(parent(b).logits[:, :-1].float(), -1).cpu() for b in rows.split(args.batch)]
        p_nll = torch.cat([-lp.gather(-1, b[:, 1:, None].cpu())[..., 0] for lp, b in zip(p_logp, rows.split(args.batch))])
        results[genre] = {"parent_nll": p_nll.mean().item(), "copy_share": copy.float().mean().item(),
                          "parent_nll_copy": p_nll[copy].mean().item(), "parent_nll_other": p_nll[~copy].mean().item()}
        for name in names:
            model = load_model_checked(args.run_dir / name, dtype).to(device).eval()
            it = iter(p_logp)
            nll, kl = token_losses(model, lambda b: next(it).to(device), rows, args.batch)
            results[genre][name] = summarize((nll.cpu() - p_nll), kl.cpu(), copy)
            r = results[genre][name]
            print(f"{genre:9s} {name:24s} excess {r['excess_nll']:.3f} nats, KL {r['kl']:.3f}; copy tokens "
                  f"{r['copy']['share_of_tokens']:.2f} carry {r['copy']['share_of_excess']:.2f} of the excess "
                  f"(excess {r['copy']['excess_nll']:.3f} vs {r['other']['excess_nll']:.3f} elsewhere)", flush=True)
            del model
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
