# Sourced by the device-machine benchmark scripts (`source benchmarks/device_common.sh`): the
# packages carried by gpu_setup.sh on the path, and timed `puzzlenas run`s whose logs and stage
# times land in $OUT.
export PYTHONPATH=/tmp/site:.
quiet() { grep --line-buffered -v -e "it/s]" -e "s/it]"; }  # progress bars out of the logs

# timed_run NAME ARGS...: `puzzlenas run ARGS` into $OUT/NAME.log; its total and per-stage seconds
# appended to $OUT/times.txt
timed_run() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  python3 -m puzzlenas.cli run "$@" 2>&1 | quiet > "$OUT/$name.log"
  echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
  grep -E "^\[[a-z]+\] [0-9.]+ s$" "$OUT/$name.log" | sed "s/^/  /" | tee -a "$OUT/times.txt"
}

# copy_run FROM TO: a run directory copied with hard links (stages replace files, never edit them);
# the LOCK file is not linked: a shared inode would be one flock, and runs in the two copies would
# refuse each other
copy_run() { rm -rf "$2" && cp -al "$1" "$2" && rm -f "$2/LOCK"; }
