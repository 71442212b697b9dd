"""The tiny end-to-end pipeline on a CUDA device with every search option this session added:
candidates by realized KL, a target solved per scenario (scenario_mode best), and the peers.
A smoke run (seconds), not a benchmark: it checks the GPU code paths finish and stay consistent.
Usage: python benchmarks/gpu_smoke.py OUT_DIR [cpu]"""

import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from puzzlenas.pipeline import run_pipeline  # noqa: E402
from tests.conftest import save_tiny_hf_parent, save_word_tokenizer, tiny_run_config, write_word_corpus  # noqa: E402


def main(out: Path) -> None:
    root = Path(tempfile.mkdtemp())
    parent = save_tiny_hf_parent("llama", root / "parent")
    save_word_tokenizer(parent)
    inputs = {"parent": str(parent), "corpus": str(write_word_corpus(root / "corpus"))}
    cfg = tiny_run_config(inputs, tokens=2048)
    scenarios = [{"name": "tiny", "batch_size": 2, "prompt_tokens": 16, "generate_tokens": 8},
                 {"name": "wide", "batch_size": 8, "prompt_tokens": 16, "generate_tokens": 8}]
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"  # "cpu" to try the script here
    cfg.update(device=device, parent_dtype="bfloat16" if device == "cuda" else "float32",
               scoring={"tokens": 256, "batch_size": 4},
               costs={"dtype": "bfloat16" if device == "cuda" else "float32", "iters": 3, "check_children": 1, "scenarios": scenarios},
               search={"targets": [{"name": "fast", "speedup": 1.3, "candidates": 3},
                                   {"name": "best", "speedup": 1.3, "scenario": ["tiny", "wide"],
                                    "scenario_mode": "best"}],
                       "select_tokens": 256, "frontier": [1.2]},
               peers={"methods": ["shortgpt", "minitron_width", "uniform_kv"], "tokens": 256},
               gkd={"tokens": 2048, "batch_size": 4, "lr": 5e-5, "checkpoint_every": 3, "validation_tokens": 512},
               eval={"tokens": 256, "batch_size": 4, "tasks": [], "throughput_iters": 2, "sample_tokens": 4,
                     "chat_prompts": ["w5 w6"], "plain_prompts": ["w7 w8"]})
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = run_pipeline(path, run_dir=root / "run")
    results = json.loads((run / "eval" / "results.json").read_text())
    summary = {n: {"kl": r["kl_to_parent"], "speedup": {s: v["decode_step_s"] for s, v in r.get("speedup", {}).items()},
                   "peak_gib": {s: (v["peak_memory_bytes"] or 0) / 2**30 for s, v in r["throughput"].items()}}
               for n, r in results.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(summary, indent=1))
    for name in ("search/table.txt", "peers/table.txt", "eval/table.txt"):
        print((run / name).read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
