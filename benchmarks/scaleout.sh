#!/usr/bin/env bash
# Scale-out on one host (issue 13), for the device machine with 2 GPUs:
#  (a) the default GPU job (presets/gpu.yaml) on one GPU and under `torchrun --nproc_per_node 2`:
#      per-stage seconds of both and the ratios -> $OUT/default_1gpu.log, default_2gpu.log,
#      times.txt, scaleout_default.txt
#  (b) an 8B-shaped parent with random weights (benchmarks/random_parent.py; Llama-3.1-8B's shape)
#      with the search space of examples/llama-3.1-8b-gpu.yaml, budgets scaled down (few tokens),
#      through library, bld, scores, costs, search, assemble and a short GKD on NPROC GPUs: stage
#      times, peak memory per GPU (nvidia-smi samples) and the example's full budgets extrapolated
#      to 8 GPUs from the measured per-token rates -> $OUT/8b.log, 8b_memory.csv, scaleout_8b.txt
# Usage there:   OUT=folder bash benchmarks/scaleout.sh            (both parts)
#                OUT=folder PART=8b bash benchmarks/scaleout.sh    (one part: default | default-1gpu |
#                                                                   default-2gpu | 8b)
# Checked on the CPU (gloo) with a scaled-down shape:
#   OUT=/tmp/o PART=8b SHAPE=tiny SEQ_LEN=128 CPU_CHECK=1 bash benchmarks/scaleout.sh
# Knobs (env): NPROC (2), SHAPE (8b | tiny), SEQ_LEN (4096), BLD_STEPS (4), GKD_STEPS (16),
# CAL_TOKENS (65536), SCORE_TOKENS (65536), JOBS_PER_ROUND (16: BLD jobs sharing a parent forward;
# each 8B FFN job holds ~3.5 GB of fp32 weights, gradients and Adam state), RUNS (~/runs).
set -uo pipefail
[ -f benchmarks/device_common.sh ] && source benchmarks/device_common.sh
export PYTHONPATH="${PYTHONPATH:-}:." PYTHONUNBUFFERED=1  # unbuffered: the stamps are when a line was printed
quiet() { grep --line-buffered -v -e "it/s]" -e "s/it]"; }  # line-buffered: stamps are when a line came
PY=${PYTHON:-python3}
NPROC=${NPROC:-2}
RUNS=${RUNS:-~/runs}
PART=${PART:-all}
mkdir -p "$OUT" "$RUNS"

# stamp: every line of the log with the seconds since the epoch (stage boundaries for the memory samples)
stamp() { $PY -u -c 'import sys, time
for line in sys.stdin: sys.stdout.write(f"{time.time():.1f} {line}"); sys.stdout.flush()'; }

# launch NAME NPROC ARGS...: `puzzlenas run ARGS` on NPROC ranks (1: no torchrun) into $OUT/NAME.log
launch() {
  local name=$1 nproc=$2; shift 2
  local t0; t0=$(date +%s)
  if [ "$nproc" = 1 ]; then
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} $PY -m puzzlenas.cli run "$@" 2>&1 | quiet | stamp > "$OUT/$name.log"
  else
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
      -m puzzlenas.cli run "$@" 2>&1 | quiet | stamp > "$OUT/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  echo "$name: $(( $(date +%s) - t0 )) s, exit $rc" | tee -a "$OUT/times.txt"
  grep -E "^[0-9.]+ \[[a-z]+\] [0-9.]+ s$" "$OUT/$name.log" | cut -d' ' -f2- | sort -u -k1,1 -s | sed "s/^/  /" \
    | tee -a "$OUT/times.txt"
  return "$rc"
}

# gpu_memory FILE: nvidia-smi samples every 0.5 s in the background (its pid in $SAMPLER)
gpu_memory() {
  SAMPLER=
  command -v nvidia-smi > /dev/null || return 0
  nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader,nounits -lms 500 > "$1" &
  SAMPLER=$!
}

# Each run has a teacher-text cache of its own (a second run would read the first one's shards).
# PART=default-1gpu and default-2gpu run one side each (one device call each: each is ~5-8 min);
# the second prints the comparison when the first one's log is in $RUNS.
if [ "$PART" = all ] || [ "$PART" = default ] || [ "$PART" = default-1gpu ]; then
  rm -rf "$RUNS/scaleout-1gpu" "$RUNS/cache-1gpu"
  launch default_1gpu 1 --run-dir "$RUNS/scaleout-1gpu" --set "data.cache_dir=$RUNS/cache-1gpu"
  cp "$OUT/default_1gpu.log" "$RUNS/default_1gpu.log"
fi
if [ "$PART" = all ] || [ "$PART" = default ] || [ "$PART" = default-2gpu ]; then
  rm -rf "$RUNS/scaleout-2gpu" "$RUNS/cache-2gpu"
  launch default_2gpu "$NPROC" --run-dir "$RUNS/scaleout-2gpu" --set "data.cache_dir=$RUNS/cache-2gpu"
  cp "$RUNS/default_1gpu.log" "$OUT/default_1gpu.log" 2>/dev/null
  $PY benchmarks/scaleout_report.py default "$OUT/default_1gpu.log" "$OUT/default_2gpu.log" "$NPROC" \
    | tee "$OUT/scaleout_default.txt"
fi

if [ "$PART" = all ] || [ "$PART" = 8b ]; then
  SHAPE=${SHAPE:-8b}
  PARENT="$RUNS/random-llama-$SHAPE"
  [ -f "$PARENT/config.json" ] || $PY benchmarks/random_parent.py "$PARENT" --shape "$SHAPE" | tee -a "$OUT/times.txt"
  CONFIG="$RUNS/scaleout-8b.yaml"
  $PY benchmarks/scaleout_report.py config examples/llama-3.1-8b-gpu.yaml "$PARENT" "$NPROC" > "$CONFIG" || exit 1
  cp "$CONFIG" "$OUT/scaleout-8b.yaml"
  rm -rf "$RUNS/scaleout-8b"
  gpu_memory "$OUT/8b_memory.csv"
  launch 8b "$NPROC" "$CONFIG" --run-dir "$RUNS/scaleout-8b" --until gkd
  rc=$?
  [ -n "$SAMPLER" ] && kill "$SAMPLER"
  $PY benchmarks/scaleout_report.py 8b "$OUT/8b.log" "$RUNS/scaleout-8b" "$NPROC" "$OUT/8b_memory.csv" \
    | tee "$OUT/scaleout_8b.txt"
  exit $rc
fi
