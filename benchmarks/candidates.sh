#!/usr/bin/env bash
# The GPU preset's targets searched again with `candidates` (diverse MIP solutions, the best by
# realized KL kept), on the device machine after benchmarks/gpu_preset.sh: the finished preset run
# is copied (hard links) and rerun from the search stage; GKD and eval as in the preset.
# Usage there: OUT=folder [N=4] bash benchmarks/candidates.sh [extra `puzzlenas run` args]
set -uo pipefail
source benchmarks/device_common.sh
N=${N:-4}
RUN=~/runs/candidates
copy_run ~/runs/preset "$RUN"
S=b256-p128-g1024
timed_run candidates --run-dir "$RUN" \
  --set "search.targets=[{name: decode-1.5x, scenario: $S, metric: decode, speedup: 1.5, candidates: $N}, {name: decode-2x, scenario: $S, metric: decode, speedup: 2.0, candidates: $N}]" \
  "$@"
cd ~/runs && tar czf "$OUT/candidates.tgz" candidates/search candidates/eval candidates/report candidates/gkd-*/history.json
