#!/usr/bin/env bash
# The default job on the device machine, timed from the GGUF to the report, then the same
# library searched under other serving scenarios (costs + search only) for comparison.
# Usage there: OUT=folder [SCENARIOS=0] bash benchmarks/gpu_preset.sh [extra `puzzlenas run` args]
# (SCENARIOS=0: the default job only)
set -uo pipefail
source benchmarks/device_common.sh
RUN=~/runs/preset
timed_run run --run-dir "$RUN" "$@"
# The exported children load with AutoModelForCausalLM after `import puzzlenas` and generate.
python3 - "$RUN" > "$OUT/automodel_generations.txt" 2>&1 <<'PY'
import sys, torch
import puzzlenas  # noqa: F401  (registers nemotron-nas)
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
[ "${SCENARIOS:-1}" = 1 ] && for spec in "b64-p128-g128 64 128 128" "b64-p128-g1024 64 128 1024" "b128-p512-g512 128 512 512"; do
  set -- $spec
  dir=~/runs/scenario-$1
  copy_run "$RUN" "$dir"
  python3 -m puzzlenas.cli run --run-dir "$dir" --until search \
    --set "costs.scenarios=[{name: $1, batch_size: $2, prompt_tokens: $3, generate_tokens: $4}]" \
    --set "search.targets=[{name: decode-1.5x, scenario: $1, metric: decode, speedup: 1.5}, {name: decode-2x, scenario: $1, metric: decode, speedup: 2.0}]" \
    2>&1 | quiet > "$OUT/scenario-$1.log"
done
cd ~/runs && tar czf "$OUT/preset.tgz" preset/eval preset/report preset/search preset/costs preset/scores/table.txt \
  preset/bld/table.txt preset/gkd-*/history.json preset/child-*/architecture.txt $(ls -d scenario-*/costs scenario-*/search 2>/dev/null)
