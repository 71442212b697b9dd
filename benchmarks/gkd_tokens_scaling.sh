#!/usr/bin/env bash
# How the children's quality on out-of-genre text moves with GKD tokens (issue 11): the default job
# (presets/gpu.yaml, peers off) up to the search once, then GKD + eval of the same two children at
# other gkd.tokens values, each in a copy of that run directory. Prints each run's stage times and
# the out-of-genre / chat tables; tars the eval folders into $OUT.
# Usage there, after `bash benchmarks/gpu_setup.sh install`:
#   OUT=folder bash benchmarks/gkd_tokens_scaling.sh base TOKENS...   # the shared stages, then TOKENS
#   OUT=folder bash benchmarks/gkd_tokens_scaling.sh TOKENS...        # more points on the same base
set -uo pipefail
source benchmarks/device_common.sh
BASE=~/runs/base
NO_PEERS=(--set "peers.methods=[]")
if [ "$1" = base ]; then
  shift
  timed_run base --run-dir "$BASE" --until search "${NO_PEERS[@]}"
  cat "$BASE/search/table.txt" 2>/dev/null | head -40
fi
for tokens in "$@"; do
  dir=~/runs/gkd-$tokens
  copy_run "$BASE" "$dir"
  timed_run "gkd-$tokens" --run-dir "$dir" "${NO_PEERS[@]}" --set "gkd.tokens=$tokens"
  echo "== gkd.tokens=$tokens: eval/table.txt"
  cat "$dir/eval/table.txt"
  grep -E "^\[gkd\] .*validation loss" "$OUT/gkd-$tokens.log"
  (cd ~/runs && tar czf "$OUT/gkd-$tokens.tgz" "gkd-$tokens/eval" gkd-$tokens/gkd-*/history.json \
    gkd-$tokens/child-*/architecture.txt)
done
