#!/usr/bin/env bash
# Does distilling on the parent's own chat transcripts (gkd.chat_fraction) help the children of
# an instruct parent? The GPU preset through the search once, then the 2x child distilled twice
# on the same library: corpus only, and with a quarter of every batch from the parent's chat
# transcripts (same token budget). Each variant hard-links the shared stages.
# Usage on the device machine: OUT=folder bash benchmarks/chat_gkd.sh
set -uo pipefail
source benchmarks/device_common.sh
BASE=~/runs/chat-base
TWO_X='search.targets=[{name: decode-2x, scenario: b256-p128-g1024, metric: decode, speedup: 2.0}]'
timed_run base --run-dir "$BASE" --until search --set "$TWO_X"
variant() {  # name, then --set overrides
  local name=$1; shift
  copy_run "$BASE" ~/runs/$name
  timed_run "$name" --run-dir ~/runs/$name --set "$TWO_X" "$@"
}
variant corpus-only
variant chat-0.25 --set gkd.chat_fraction=0.25
cd ~/runs && tar czf "$OUT/chat_gkd.tgz" */eval/results.json */eval/table.txt */search/table.txt \
  */gkd-decode-2x/history.json */report/README.md 2>/dev/null
