#!/usr/bin/env bash
# Device-machine helper: a benchmark longer than one `run` call (10 minutes at most) runs in its own
# process session, so that it outlives the call that started it; later calls wait for it.
#   bash benchmarks/background.sh start NAME COMMAND...   COMMAND with OUT=~/bg/NAME, log ~/bg/NAME.log, run
#                                                          in a snapshot of this tree (~/bg/NAME.src: the
#                                                          next call's fresh copy of the tree cannot change
#                                                          a script bash is still reading)
#   bash benchmarks/background.sh wait NAME SECONDS        until it ends or SECONDS pass; prints the
#                                                          log's tail; once ended, copies ~/bg/NAME to $OUT
# The machine goes back after ~30 s idle: call `wait` back to back until it says "ended".
set -uo pipefail
mkdir -p ~/bg
case "$1" in
  start)
    name=$2; shift 2
    mkdir -p ~/bg/"$name"; rm -rf ~/bg/"$name".rc ~/bg/"$name".src
    rsync -a --exclude '.carry*' --exclude .git ./ ~/bg/"$name".src/ 2>/dev/null \
      || { mkdir -p ~/bg/"$name".src && tar --exclude='./.carry*' --exclude=./.git -cf - . | tar -xf - -C ~/bg/"$name".src; }
    cd ~/bg/"$name".src || exit 1
    OUT=~/bg/$name setsid bash -c '"$@" > ~/bg/'"$name"'.log 2>&1; echo $? > ~/bg/'"$name"'.rc' _ "$@" \
      < /dev/null > /dev/null 2>&1 &
    echo "started $name (pid $!)" ;;
  wait)
    name=$2; deadline=$(( $(date +%s) + $3 ))
    while [ ! -f ~/bg/"$name".rc ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    tail -n 40 ~/bg/"$name".log
    if [ -f ~/bg/"$name".rc ]; then
      echo "ended $name: exit $(cat ~/bg/"$name".rc)"
      cp -r ~/bg/"$name"/. "$OUT"/ && cp ~/bg/"$name".log "$OUT"/
    else
      echo "still running $name"
    fi ;;
esac
