"""A real child of the bundled parent, exported for `lm_eval` (issue 12's acceptance check).

Builds a SmolLM2-135M child without training: five of its 30 layers replaced by library variants
initialized from the parent (no calibration: linear attention = W_o W_v, linear FFN =
W_down W_up, GQA KV heads mean-pooled, FFN channels by weight norm), so it holds every block
kind a search can pick: GQA with 1 of 3 KV heads, linear attention, linear FFN, no-op attention,
a narrower FFN. Saves it as a run saves a child (fp32, tokenizer), then

    puzzlenas export OUT/child OUT/export --runtime hf
    puzzlenas tasks OUT/tasks --task news-continuation --task mmlu-dev

prints the lm_eval command, and scores the same tasks with puzzlenas' own scorer for comparison
(the child's weights are rounded to bf16 first, so the bf16 export holds exactly them).

    PYTHONPATH=$PWD python benchmarks/lm_eval_export.py OUT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from puzzlenas.assemble import child_config
from puzzlenas.library import Variant, build_unit
from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzlenas.model.modeling import DeciLMForCausalLM
from puzzlenas.model.parent import copy_tokenizer_files, load_parent, resolve_parent_dir
from puzzlenas.sections import LibraryConfig

TASKS = ("news-continuation", "mmlu-dev")
# layer -> (attention, FFN); other layers keep the parent's block.
REPLACED = {
    4: (AttentionConfig("gqa", 1), None),
    12: (AttentionConfig("linear"), None),
    18: (None, FFNConfig("linear")),
    24: (AttentionConfig("no_op"), None),
    27: (None, FFNConfig("gated", 768)),
}


def build_child(parent: DeciLMForCausalLM) -> DeciLMForCausalLM:
    cfg = parent.config
    lib = LibraryConfig()
    blocks, state = [], {k: v for k, v in parent.state_dict().items()}
    for i, layer in enumerate(parent.model.layers):
        attention, ffn = REPLACED.get(i, (None, None))
        blocks.append(BlockConfig(attention or layer.block.attention, ffn or layer.block.ffn))
        for sub, config, names in (("attention", attention, ("input_layernorm.", "self_attn.")),
                                   ("ffn", ffn, ("post_attention_layernorm.", "mlp."))):
            if config is None:
                continue
            prefix = f"model.layers.{i}."
            state = {k: v for k, v in state.items() if not (k.startswith(prefix) and k[len(prefix):].startswith(names))}
            unit = build_unit(Variant(f"{sub}-{i}", sub, config), cfg, parent, i, None, lib)
            state.update({prefix + k: v for k, v in unit.state_dict().items()})
    child = DeciLMForCausalLM(child_config(cfg, blocks))
    # bf16-representable weights: the bf16 export read back in fp32 is this child exactly, so
    # `lm_eval ... dtype=float32` and our scorer run the same numbers.
    child.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state.items()}, strict=True)
    return child.eval()


def main(out: Path) -> None:
    from puzzlenas.cli import main as cli
    from puzzlenas.eval.tasks import evaluate_tasks
    from transformers import AutoTokenizer

    parent_dir = resolve_parent_dir("smollm2-135m")
    child = build_child(load_parent("smollm2-135m"))
    child.save_pretrained(out / "child")
    copy_tokenizer_files(parent_dir, out / "child")
    assert cli(["export", str(out / "child"), str(out / "export"), "--runtime", "hf"]) == 0
    assert cli(["tasks", str(out / "tasks"), *[a for t in TASKS for a in ("--task", t)]]) == 0
    start = time.time()
    tok = AutoTokenizer.from_pretrained(out / "child")
    with torch.no_grad():
        scores = evaluate_tasks(child, tok, list(TASKS), batch_size=8)
    keep = ("acc", "acc_norm", "acc_stderr", "n")
    summary = {t: {k: r[k] for k in keep if k in r} for t, r in scores.items()}
    summary["seconds"] = round(time.time() - start, 1)
    (out / "puzzlenas_scores.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
