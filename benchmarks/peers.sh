#!/usr/bin/env bash
# Puzzle vs its peers on the device machine, after benchmarks/gpu_preset.sh: the finished
# preset run is copied (hard links) and rerun with every peer asked for. The peers stage builds
# ShortGPT, Minitron-style uniform FFN width and uniform KV-head children at the preset's
# targets on the same measured costs; they are trained on as many tokens (peers.equal_tokens) and
# get the same evaluation.
# Usage there: OUT=folder bash benchmarks/peers.sh [extra `puzzlenas run` args]
set -uo pipefail
source benchmarks/device_common.sh
RUN=~/runs/peers
copy_run ~/runs/preset "$RUN"
timed_run peers --run-dir "$RUN" --set "peers.methods=[shortgpt, minitron_width, uniform_kv]" "$@"
cd ~/runs && tar czf "$OUT/peers.tgz" peers/peers peers/eval peers/report peers/gkd-*/history.json \
  peers/child-*/architecture.txt
