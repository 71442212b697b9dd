#!/usr/bin/env bash
# GKD levers against out-of-genre quality (issue 11): the default job (presets/gpu.yaml, peers off)
# up to the search once, then GKD + eval of the same two children under each variant, each in a hard-
# linked copy of that run directory. A variant is one argument: "NAME key=value [key=value ...]"
# (`--set` overrides, no spaces inside a value). Prints each variant's stage times and eval table
# (test split, out-of-genre genres, chat quality); tars the eval folders into $OUT.
# Usage there, after `bash benchmarks/gpu_setup.sh install`:
#   OUT=folder bash benchmarks/gkd_levers.sh base "t9M gkd.tokens=9437184" "t19M gkd.tokens=18874368"
#   OUT=folder bash benchmarks/gkd_levers.sh "b128 gkd.batch_size=128"   # more, on the same base
# PARALLEL=1: the variants run at once, one process each (the bundled pair leaves most of an H200
# idle: quality comparisons in less device time; their stage times are then not the preset's)
set -uo pipefail
source benchmarks/device_common.sh
BASE=${BASE:-~/runs/base}  # BASE=~/runs/preset: variants of the preset run (peers off in the copies)
NO_PEERS=(--set "peers.methods=[]")
if [ "$1" = base ]; then
  shift
  timed_run base --run-dir "$BASE" --until search "${NO_PEERS[@]}"
  cat "$BASE/search/table.txt"
fi
run_variant() {
  local spec=$1 name settings dir overrides
  read -r name settings <<< "$spec"
  overrides=()
  for kv in $settings; do overrides+=(--set "$kv"); done
  dir=~/runs/v-$name
  copy_run "$BASE" "$dir"
  timed_run "v-$name" --run-dir "$dir" "${NO_PEERS[@]}" "${overrides[@]}"
  echo "== $name ($settings): eval/table.txt"
  cat "$dir/eval/table.txt"
  grep -E "^\[gkd\] .*validation loss" "$OUT/v-$name.log"
  (cd ~/runs && tar czf "$OUT/v-$name.tgz" "v-$name/eval" v-"$name"/gkd-*/history.json v-"$name"/child-*/architecture.txt)
}
if [ "${PARALLEL:-0}" = 1 ]; then
  for spec in "$@"; do read -r name _ <<< "$spec"; run_variant "$spec" > "$OUT/v-$name.summary" 2>&1 & done
  wait
  for spec in "$@"; do read -r name _ <<< "$spec"; cat "$OUT/v-$name.summary"; done
else
  for spec in "$@"; do run_variant "$spec"; done
fi
