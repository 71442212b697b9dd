"""Library quality on a real parent: BLD from the parent-derived initialization vs from a
random initialization of the same shapes, with the same data and token budget.

Reads two finished runs (`bld/metrics.jsonl`) and prints / writes a Markdown table: per
variant, mean validation normalized MSE over layers at initialization and after BLD, and in
how many layers BLD lowered it.

    puzzlenas run examples/smollm2-bld-gpu.yaml --until bld
    puzzlenas run examples/smollm2-bld-gpu.yaml --until bld --set name=smollm2-bld-random --set bld.init=random
    python benchmarks/library_quality.py runs/smollm2-bld runs/smollm2-bld-random --out quality.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(run_dir: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in (run_dir / "bld" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["name"], []).append(r)
    return rows


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table(parent_run: Path, random_run: Path) -> str:
    ours, rand = load_rows(parent_run), load_rows(random_run)
    lines = ["| variant | layers | parent init: NMSE init | after BLD | improved | random init: NMSE init | "
             "after BLD | parent-derived better after BLD |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in ours.items():
        init, final = [r["nmse_init"] for r in rs], [r["nmse_final"] for r in rs]
        if not rs[0]["trained"]:
            lines.append(f"| {name} | {len(rs)} | {mean(init):.4f} | (not trained) | - | - | - | - |")
            continue
        improved = sum(f < i for f, i in zip(final, init))
        rr = {r["layer"]: r for r in rand.get(name, [])}
        r_init = [rr[r["layer"]]["nmse_init"] for r in rs if r["layer"] in rr]
        r_final = [rr[r["layer"]]["nmse_final"] for r in rs if r["layer"] in rr]
        wins = sum(r["nmse_final"] < rr[r["layer"]]["nmse_final"] for r in rs if r["layer"] in rr)
        lines.append(f"| {name} | {len(rs)} | {mean(init):.4f} | {mean(final):.4f} | {improved}/{len(rs)} | "
                     f"{mean(r_init):.4f} | {mean(r_final):.4f} | {wins}/{len(r_final)} |")
    tokens = next(r["tokens"] for rs in ours.values() for r in rs if r["trained"])
    lines.append(f"\nNMSE: normalized MSE of the layer's residual update on validation tokens (0 = parent, "
                 f"1 = skipping the layer), mean over layers; {tokens:,} training tokens per variant.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parent_init_run", type=Path)
    parser.add_argument("random_init_run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = table(args.parent_init_run, args.random_init_run)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
