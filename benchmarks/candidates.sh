#!/usr/bin/env bash
# The GPU preset's targets searched again with `candidates` (diverse MIP solutions, the best by
# realized KL kept), on the device machine after benchmarks/gpu_preset.sh: the finished preset run
# is copied (hard links) and rerun from the search stage; GKD and eval as in the preset.
# Usage there: OUT=folder [N=4] bash benchmarks/candidates.sh [extra `puzzlenas run` args]
set -uo pipefail
export PYTHONPATH=/tmp/site:.
N=${N:-4}
RUN=~/runs/candidates
rm -rf "$RUN" && cp -al ~/runs/preset "$RUN"
S=b256-p128-g1024
start=$(date +%s)
python3 -m puzzlenas.cli run --run-dir "$RUN" \
  --set "search.targets=[{name: decode-1.5x, scenario: $S, metric: decode, speedup: 1.5, candidates: $N}, {name: decode-2x, scenario: $S, metric: decode, speedup: 2.0, candidates: $N}]" \
  "$@" 2>&1 | grep -v -e "it/s]" -e "s/it]" > "$OUT/candidates.log"
echo "candidates run: $(( $(date +%s) - start )) s" | tee "$OUT/candidates_times.txt"
grep -E "^\[[a-z]+\] [0-9.]+ s$" "$OUT/candidates.log" | tee -a "$OUT/candidates_times.txt"
cd ~/runs && tar czf "$OUT/candidates.tgz" candidates/search candidates/eval candidates/report candidates/gkd-*/history.json
