#!/usr/bin/env bash
# Predicted vs measured speedups of the default job's children in three serving scenarios, on the
# device machine after benchmarks/gpu_preset.sh: the finished preset run is copied (hard links),
# its costs re-measured for b256-p128-g1024 (the preset's), b64-p128-g1024 and b1-p2048-g256, the
# search re-run with the preset's targets (so each child carries a prediction for every scenario),
# then benchmarks/speedup_check.py builds every child and the parent and times their generation in
# each scenario on the fast path.
# Usage there: OUT=folder bash benchmarks/scenarios_check.sh
set -uo pipefail
source benchmarks/device_common.sh
RUN=~/runs/scenarios
copy_run ~/runs/preset "$RUN"
timed_run scenarios --run-dir "$RUN" --until search --set "costs.scenarios=[\
{name: b256-p128-g1024, batch_size: 256, prompt_tokens: 128, generate_tokens: 1024}, \
{name: b64-p128-g1024, batch_size: 64, prompt_tokens: 128, generate_tokens: 1024}, \
{name: b1-p2048-g256, batch_size: 1, prompt_tokens: 2048, generate_tokens: 256}]"
python3 benchmarks/speedup_check.py --run "$RUN" --iters 5 --out "$OUT/scenarios_check.json" 2>&1 | quiet \
  | tee "$OUT/scenarios_check.txt"
cp "$RUN/costs/table.txt" "$OUT/scenarios_costs_table.txt" 2>/dev/null
cp "$RUN/search/table.txt" "$OUT/scenarios_search_table.txt" 2>/dev/null
