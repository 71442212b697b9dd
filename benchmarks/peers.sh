#!/usr/bin/env bash
# Puzzle vs its peers on the device machine, after benchmarks/gpu_preset.sh: the finished
# preset run is copied (hard links) and rerun with every peer asked for. The peers stage builds
# ShortGPT, Minitron-style uniform FFN width and uniform KV-head children at the preset's
# targets on the same measured costs; they get the same GKD tokens and the same evaluation.
# Usage there: OUT=folder bash benchmarks/peers.sh [extra `puzzlenas run` args]
set -uo pipefail
export PYTHONPATH=/tmp/site:.
RUN=~/runs/peers
rm -rf "$RUN" && cp -al ~/runs/preset "$RUN"
start=$(date +%s)
python3 -m puzzlenas.cli run --run-dir "$RUN" --set "peers.methods=[shortgpt, minitron_width, uniform_kv]" "$@" \
  2>&1 | grep -v -e "it/s]" -e "s/it]" > "$OUT/peers.log"
echo "peers run: $(( $(date +%s) - start )) s" | tee "$OUT/peers_times.txt"
grep -E "^\[[a-z]+\] [0-9.]+ s$" "$OUT/peers.log" | tee -a "$OUT/peers_times.txt"
cd ~/runs && tar czf "$OUT/peers.tgz" peers/peers peers/eval peers/report peers/gkd-*/history.json \
  peers/child-*/architecture.txt
