#!/usr/bin/env bash
# The default job (puzzlenas/presets/gpu.yaml) on the device machine, timed from the GGUF to the
# report: teacher corpus, BLD, scores, costs, search, ShortGPT peers, GKD, eval with out-of-genre
# text and chat quality. Prints the per-stage times, the teacher corpus, the passes over each
# source and the out-of-genre / chat tables (parent, children, ShortGPT); then checks that a second
# run directory reuses the cached teacher text; tars the results into $OUT.
# Usage there, after `bash benchmarks/gpu_setup.sh install`:
#   OUT=folder [SCENARIOS=1] [REUSE=0] bash benchmarks/gpu_preset.sh [extra `puzzlenas run` args]
# SCENARIOS=1: the same library also searched under other serving scenarios (costs + search only).
set -uo pipefail
source benchmarks/device_common.sh
RUN=~/runs/preset
timed_run run --run-dir "$RUN" "$@"
echo "== teacher corpus"; cat "$RUN/teacher/table.txt"
echo "== passes over each source"; grep -h "passes over each source" "$OUT/run.log" | sed 's/^/  /'
echo "== out-of-genre text and chat quality (eval/table.txt)"
sed -n '/^out-of-genre text/,$p' "$RUN/eval/table.txt"
grep -E "^\[gkd\] .*validation loss" "$OUT/run.log"
if [ "${REUSE:-1}" = 1 ]; then  # a fresh run directory: the teacher stage reads every shard from the cache
  timed_run reuse --run-dir ~/runs/reuse --until teacher "$@"
  grep -h "reused from" "$OUT/reuse.log" | tee -a "$OUT/times.txt"
fi
# The exported children load with AutoModelForCausalLM after `import puzzlenas` and generate.
python3 - "$RUN" > "$OUT/automodel_generations.txt" 2>&1 <<'PY'
import sys, torch
import puzzlenas.model.modeling  # noqa: F401  (registers nemotron-nas with transformers)
from transformers import AutoModelForCausalLM, AutoTokenizer
from puzzlenas.eval.metrics import complete
run = sys.argv[1]
for name in ("parent", "gkd-decode-1.5x", "gkd-decode-2x"):
    model = AutoModelForCausalLM.from_pretrained(f"{run}/{name}", dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(f"{run}/{name}")
    print(f"== {name}: {type(model).__name__}")
    for prompt in ("What is the capital of France?", "Tell me about the ocean."):
        print(f"  {prompt} -> {complete(model, tok, prompt, True, 40)!r}")
PY
[ "${SCENARIOS:-0}" = 1 ] && for spec in "b64-p128-g128 64 128 128" "b64-p128-g1024 64 128 1024" "b128-p512-g512 128 512 512"; do
  set -- $spec
  dir=~/runs/scenario-$1
  copy_run "$RUN" "$dir"
  python3 -m puzzlenas.cli run --run-dir "$dir" --until search \
    --set "costs.scenarios=[{name: $1, batch_size: $2, prompt_tokens: $3, generate_tokens: $4}]" \
    --set "search.targets=[{name: decode-1.5x, scenario: $1, metric: decode, speedup: 1.5}, {name: decode-2x, scenario: $1, metric: decode, speedup: 2.0}]" \
    2>&1 | quiet > "$OUT/scenario-$1.log"
done
cd ~/runs && tar czf "$OUT/preset.tgz" preset/eval preset/report preset/search preset/costs preset/scores/table.txt \
  preset/scores/passes.json preset/bld/table.txt preset/bld/passes.json preset/teacher/table.txt preset/teacher/meta.json \
  preset/peers preset/run.log preset/gkd-*/history.json preset/child-*/architecture.txt \
  $(ls -d scenario-*/costs scenario-*/search 2>/dev/null)
