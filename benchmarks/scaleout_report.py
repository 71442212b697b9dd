"""Helpers of benchmarks/scaleout.sh (issue 13):

  config EXAMPLE PARENT NPROC          the example's config on PARENT, budgets scaled down (env
                                       knobs: see scaleout.sh), as YAML on stdout
  default LOG_1GPU LOG_NGPU NPROC      per-stage seconds of the default job, one vs NPROC GPUs
  8b LOG RUN_DIR NPROC MEMORY_CSV      stage times, peak memory per GPU, and the example's full
                                       budgets extrapolated to 8 GPUs from the measured rates
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
from pathlib import Path

import yaml

# "[stage] N s"; runs made before only rank 0 printed it may hold two ranks' lines run together
STAGE_LINE = re.compile(r"^([0-9.]+) \[([a-z]+)\] ([0-9.]+) s(?:\[[a-z]+\] [0-9.]+ s)?$")
BLD_ROUND = re.compile(r"\[bld\] rank (\d+): round of \d+ jobs in ([0-9.]+) s")
GKD_RATE = re.compile(r"gkd step (\d+)/(\d+): .* ([0-9,]+) tokens/s")
GPUS_EXTRAPOLATED = 8


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def scaled_config(example: str, parent: str, nproc: int) -> dict:
    """The example's search space and scenarios on `parent`, with few tokens per stage."""
    cfg = yaml.safe_load(Path(example).read_text())
    seq = env_int("SEQ_LEN", 4096)
    cfg.update(name="scaleout-8b", parent=parent)
    cfg["data"]["seq_len"] = seq
    cfg["library"]["calibration_tokens"] = env_int("CAL_TOKENS", 65536)
    bld = cfg["bld"]
    bld.update(tokens=env_int("BLD_STEPS", 4) * bld["batch_size"] * seq, validation_tokens=bld["batch_size"] * seq,
               jobs_per_round=env_int("JOBS_PER_ROUND", 16), checkpoint_every=10**6)
    cfg["scoring"]["tokens"] = env_int("SCORE_TOKENS", 65536)
    gkd = cfg["gkd"]
    gkd.update(tokens=env_int("GKD_STEPS", 16) * gkd["batch_size"] * seq * nproc, validation_tokens=seq,
               checkpoint_every=10**6)
    cfg["peers"] = {"methods": []}  # Puzzle's children only; the full job's peers multiply GKD (see the report)
    cfg["eval"]["max_examples"] = 10
    if os.environ.get("CPU_CHECK") == "1":  # same scenario names, toy sizes; no bf16 parent without autocast
        cfg["parent_dtype"] = "float32"
        cfg["costs"]["scenarios"] = [{**s, "batch_size": 2, "prompt_tokens": 16, "generate_tokens": 8}
                                     for s in cfg["costs"]["scenarios"]]
        cfg["costs"]["iters"] = 2
        cfg["costs"]["check_children"] = 1
    return cfg


def stage_times(log: Path) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, end time) from the stamped log (each rank prints it: the longest kept)."""
    times: dict[str, tuple[float, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = STAGE_LINE.match(line)
        if m:
            end, stage, seconds = float(m[1]), m[2], float(m[3])
            if stage not in times or seconds > times[stage][0]:
                times[stage] = (seconds, end)
    return times


def default_table(one: Path, many: Path, nproc: int) -> str:
    a, b = stage_times(one), stage_times(many)
    lines = [f"{'stage':<10} {'1 GPU s':>9} {f'{nproc} GPUs s':>10} {'speedup':>8}"]
    for stage in a:
        if stage in b:
            ta, tb = a[stage][0], b[stage][0]
            lines.append(f"{stage:<10} {ta:>9.1f} {tb:>10.1f} {ta / tb if tb else float('nan'):>7.2f}x")
    ta, tb = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    lines.append(f"{'total':<10} {ta:>9.1f} {tb:>10.1f} {ta / tb if tb else float('nan'):>7.2f}x")
    lines.append("acceptance (issue 13): bld >= 1.8x, gkd >= 1.7x, total >= 1.5x")
    return "\n".join(lines)


def memory_samples(path: Path) -> list[tuple[float, int, int]]:
    """(epoch seconds, GPU index, MiB used) from nvidia-smi's csv."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, int(parts[1]), int(parts[2])))
        except ValueError:
            continue
    return rows


def report_8b(log: Path, run_dir: Path, nproc: int, memory_csv: Path) -> str:
    times = stage_times(log)
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    full = yaml.safe_load(Path("examples/llama-3.1-8b-gpu.yaml").read_text())
    samples = memory_samples(memory_csv)
    gpus = sorted({g for _, g, _ in samples})
    lines = [f"8B-shaped random parent, {nproc} ranks; peak MiB per GPU from nvidia-smi (0.5 s samples)",
             f"{'stage':<10} {'seconds':>8} " + " ".join(f"{f'GPU{g} MiB':>10}" for g in gpus)
             + f" {f'full budget on {GPUS_EXTRAPOLATED} GPUs':>24}"]
    bld_done = json.loads((run_dir / "bld" / "DONE").read_text()) if (run_dir / "bld" / "DONE").is_file() else {}
    per_gpu = nproc / GPUS_EXTRAPOLATED
    ratios = {  # stage -> factor from the measured seconds to the full budget on 8 GPUs
        "library": full["library"]["calibration_tokens"] / used["library"]["calibration_tokens"],
        "bld": full["bld"]["tokens"] / used["bld"]["tokens"] * per_gpu,
        "scores": full["scoring"]["tokens"] / used["scoring"]["tokens"] * per_gpu,
    }
    total_full = 0.0
    rounds: dict[str, float] = {}  # rank -> seconds its BLD rounds took (the training itself)
    for m in BLD_ROUND.finditer(log.read_text(errors="replace")):
        rounds[m[1]] = rounds.get(m[1], 0.0) + float(m[2])
    bld_training = max(rounds.values(), default=0.0)  # the busiest rank
    for stage, (seconds, end) in times.items():
        peaks = [max((m for t, g, m in samples if g == gpu and end - seconds - 1 <= t <= end + 1), default=0)
                 for gpu in gpus]
        if stage == "gkd":
            extrapolated = None
        elif stage == "bld" and bld_training:  # loading and calibration do not grow with the tokens
            extrapolated = seconds - bld_training + bld_training * ratios["bld"]
            total_full += extrapolated
        else:
            extrapolated = seconds * ratios.get(stage, 1.0)
            total_full += extrapolated
        lines.append(f"{stage:<10} {seconds:>8.1f} " + " ".join(f"{p:>10,}" for p in peaks)
                     + f" {(f'{extrapolated / 3600:.2f} h' if extrapolated is not None else 'below'):>24}")
    rates = [float(m[3].replace(",", "")) for m in GKD_RATE.finditer(log.read_text(errors="replace"))
             if m[1] == m[2]]  # the last step's running rate of each child (all ranks' tokens)
    children = len(list(run_dir.glob("gkd-*/DONE")))
    lines.append(f"bld: {bld_done.get('jobs', '?')} jobs x {used['bld']['tokens']:,} tokens "
                 f"(full: {full['bld']['tokens']:,}); jobs split over ranks, no gradient traffic: x{per_gpu:.2f} for "
                 f"{GPUS_EXTRAPOLATED} GPUs; the busiest rank trained {bld_training:.1f} s (scaled), the rest of the stage "
                 f"(loading, activations' setup) is kept as measured")
    if rates:
        rate = min(rates) * GPUS_EXTRAPOLATED / nproc  # linear in ranks: the optimistic side
        per_child = full["gkd"]["tokens"] / rate
        total_full += per_child * children
        lines.append(f"gkd: {children} children, {', '.join(f'{r:,.0f}' for r in sorted(set(rates)))} tokens/s on {nproc} ranks "
                     f"(eager: gkd.compile=auto compiles runs >= 16M tokens, data parallel only); "
                     f"{full['gkd']['tokens']:,} tokens per child on {GPUS_EXTRAPOLATED} GPUs: {per_child / 3600:.2f} h "
                     f"each, {per_child * children / 3600:.2f} h for these children (the example's peers, "
                     f"{full.get('peers', {}).get('methods')}, add one GKD per target each)")
    lines.append(f"total, full budgets on {GPUS_EXTRAPOLATED} GPUs (Puzzle's children, no eval): "
                 f"{total_full / 3600:.2f} h")
    return "\n".join(lines)


def main() -> None:
    what, *args = sys.argv[1:]
    if what == "config":
        print(yaml.safe_dump(scaled_config(args[0], args[1], int(args[2])), sort_keys=False), end="")
    elif what == "default":
        print(default_table(Path(args[0]), Path(args[1]), int(args[2])))
    elif what == "8b":
        print(report_8b(Path(args[0]), Path(args[1]), int(args[2]), Path(args[3])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
