"""Launch settings of the split-KV decode kernel per query-group size, on one GPU.

kernels.TRITON_CONFIG was swept for the parent's shape only (3 KV heads, 3 query heads per KV
head). A one-KV-head block (9 query heads per KV head) ran at 45% of copy bandwidth in the
costs stage where the parent's attention ran at 93%, so the search paid for one KV head as a
serving engine would not. This sweeps the fused kernel (RoPE and the cache write inside,
`decode_attention_qkv_triton`) at batch 256 and the preset's buffer (128 + 1024 tokens) over
block_n x num_warps x programs x one split or not, for 3 and 1 KV heads, each at fills 128 /
640 / 1151 (CUDA graphs, interleaved), and prints each head count's best against today's setting
by the mean over the fills.

    PYTHONPATH=$PWD python benchmarks/attention_tune.py --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from puzzlenas.model import kernels
from puzzlenas.model.inference import time_interleaved

B, L, HQ, D = 256, 1152, 9, 64
FILLS = (128, 640, 1151)


def configs() -> list[dict]:
    grid = itertools.product((32, 64, 128), (2, 4, 8), (512, 1024, 2048, 4096), (0, 1))
    return [{"block_n": bn, "num_warps": nw, "programs": pr, "one_split_from": 1 if one else 0}
            for bn, nw, pr, one in grid if not (one and pr != 1024)]  # one split ignores programs


def call_with(cfg: dict, args: tuple):
    def call() -> None:
        saved, by_group = dict(kernels.TRITON_CONFIG), dict(kernels.TRITON_CONFIG_BY_GROUP)
        kernels.TRITON_CONFIG.update(cfg)  # read while the graph is captured: baked into it
        kernels.TRITON_CONFIG_BY_GROUP.clear()  # the swept settings for every group
        try:
            kernels.decode_attention_qkv_triton(*args)
        finally:
            kernels.TRITON_CONFIG.clear()
            kernels.TRITON_CONFIG.update(saved)
            kernels.TRITON_CONFIG_BY_GROUP.update(by_group)
    return call


def sweep(kv: int, fill: int, grid: list[dict]) -> list[float]:
    dev = torch.device("cuda")
    qkv = torch.randn(B, (HQ + 2 * kv) * D, device=dev, dtype=torch.bfloat16)
    cos, sin = torch.randn(B, 1, D, device=dev), torch.randn(B, 1, D, device=dev)
    kc, vc = (torch.randn(B, kv, L, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    pos = torch.full((B,), fill, device=dev)
    args = (qkv, cos, sin, kc, vc, pos, HQ, 0.125)
    return time_interleaved([call_with(c, args) for c in grid], dev, iters=15, calls_per_sample=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="attention_tune.json")
    args = parser.parse_args()
    grid = configs()
    out = {"device": torch.cuda.get_device_name(), "by_kv": {}}
    for kv in (3, 1):
        settings = kernels.launch_settings(HQ // kv)
        current = {k: settings[k] for k in ("block_n", "num_warps", "programs", "one_split_from")}
        out[f"current_kv{kv}"] = current
        times = {fill: sweep(kv, fill, grid) for fill in FILLS}
        rows = [{**c, **{f"us@{f}": times[f][i] * 1e6 for f in FILLS},
                 "mean_us": sum(times[f][i] for f in FILLS) / len(FILLS) * 1e6} for i, c in enumerate(grid)]
        rows.sort(key=lambda r: r["mean_us"])
        now = next(r for r in rows if all(r[k] == (current[k] if k != "one_split_from"
                                                   else int(B * kv >= current[k] > 0)) for k in current))
        out["by_kv"][kv] = {"best": rows[0], "current": now, "top10": rows[:10]}
        at_fills = ", ".join(f"{now['us@' + str(f)]:.1f}" for f in FILLS)
        print(f"kv={kv}: current {now['mean_us']:.1f} us mean ({at_fills}); best {rows[0]['mean_us']:.1f} us: "
              f"{rows[0]}", flush=True)
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
