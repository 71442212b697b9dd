#!/usr/bin/env bash
# Which lever makes the GPU preset's 2x child better, at the preset's budgets? One BLD library
# (the GPU preset up to the search), then the 2x target alone with variants of what follows.
# Each variant's run directory hard-links the shared stages (stages replace files, never edit them).
# Usage on the device machine: OUT=folder bash benchmarks/coherence_levers.sh
set -uo pipefail
source benchmarks/device_common.sh
BASE=~/runs/levers-base
TWO_X='search.targets=[{name: decode-2x, scenario: b64-p128-g128, metric: decode, speedup: 2.0}]'
timed_run base --run-dir "$BASE" --until costs
variant() {  # name, then --set overrides
  local name=$1; shift
  copy_run "$BASE" ~/runs/$name
  timed_run "$name" --run-dir ~/runs/$name --set "$TWO_X" "$@"
  mkdir -p "$OUT/$name"
  cp ~/runs/$name/eval/results.json ~/runs/$name/eval/table.txt ~/runs/$name/search/table.txt \
     ~/runs/$name/gkd-decode-2x/history.json "$OUT/$name/" 2>/dev/null
  cp ~/runs/$name/report/README.md "$OUT/$name/report.md" 2>/dev/null
}
variant lr3e-4 --set gkd.lr=3.0e-4
variant lr3e-4-4M --set gkd.lr=3.0e-4 --set gkd.tokens=4194304 --set gkd.checkpoint_every=256
variant lmloss-lr3e-4 --set gkd.lr=3.0e-4 --set scoring.objective=lm_loss
variant lr1e-4 --set gkd.lr=1.0e-4
