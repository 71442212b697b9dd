"""GKD and BLD-round speed on one GPU, old path vs new, for a SmolLM2-135M-shaped pair.

Random weights (the image has no GGUF): parent hidden 576, 30 layers, 9 / 3 heads, FFN 1536,
vocab 49152, tied embeddings, bf16; child (fp32 master weights, bf16 autocast): 1 KV head in
the even layers, FFN 768 in every third layer, no attention in layers 5, 15 and 25.

Model FLOPs counted as RESULTS.md counts BLD: 6 x trained matmul parameters x tokens (the
child, its LM head included) + 2 x the frozen parent's matmul parameters x tokens (its forward,
head included) + causal attention (3 x forward for the child, 1 x for the parent); the KL's and
the cosine's elementwise work is not counted. MFU = model FLOPs / time / 989 TFLOP/s.

    python benchmarks/gkd_throughput.py --out gkd.json [--deadline 270] [--skip-bld] [--runs blocks|session4|cosine]

warmup_s of a compiled row is its compile time (the first 3 steps); set TORCHINDUCTOR_CACHE_DIR to
an empty folder to measure it cold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from puzzlenas import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig

PEAK = 989e12
T = 512


def pair():
    blocks = [BlockConfig.parent(3, 1536)] * 30
    fields = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, rope_theta=100000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        parent = DeciLMForCausalLM(DeciLMConfig.from_blocks(blocks, **fields)).to(torch.bfloat16).eval()
    parent.requires_grad_(False)
    child_blocks = []
    for i in range(30):
        att = AttentionConfig("no_op") if i in (5, 15, 25) else AttentionConfig("gqa", 1 if i % 2 == 0 else 3)
        ffn = FFNConfig("gated", 768 if i % 3 == 0 else 1536)
        child_blocks.append(BlockConfig(att, ffn))
    with torch.device("cuda"):
        child = DeciLMForCausalLM(DeciLMConfig.from_blocks(child_blocks, **fields)).float()
    return parent, child


def matmul_params(model) -> int:
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    return n + model.lm_head.weight.numel()  # tied: the head's matmul counts once


def attention_flops(model, tokens: int) -> float:
    c = model.config
    gqa = sum(b.attention.kind == "gqa" for b in c.blocks)
    return gqa * 4 * tokens * T / 2 * c.num_attention_heads * c.head_dim


def gkd_flops(parent, child, tokens: int) -> float:
    return (6 * matmul_params(child) * tokens + 3 * attention_flops(child, tokens)
            + 2 * matmul_params(parent) * tokens + attention_flops(parent, tokens))


def time_gkd(label: str, trainer_cls, cfg, parent, child, batch: int, steps: int, warmup: int) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # every row compiles its own graphs (the disk caches stay: see the docstring)
    counters.clear()
    with tempfile.TemporaryDirectory() as d:
        trainer = trainer_cls(child, parent, cfg, Path(d), T, log=print)
        data = [torch.randint(0, 49152, (batch, T), device="cuda") for _ in range(warmup + steps)]
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for i, ids in enumerate(data):
            if i == warmup:
                torch.cuda.synchronize()
                warm_s, t0 = time.perf_counter() - started, time.perf_counter()
            child.train()
            parts = trainer.loss_and_backward(ids)
            torch.nn.utils.clip_grad_norm_(child.parameters(), 1.0, foreach=True)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / steps
    tokens = batch * T
    flops = gkd_flops(parent, child, tokens)
    return {"path": label, "batch": [batch, T], "ms_per_step": round(seconds * 1e3, 2),
            "tokens_per_s": round(tokens / seconds), "tflops": round(flops / seconds / 1e12, 1),
            "mfu": round(flops / seconds / PEAK, 4), "warmup_s": round(warm_s, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "loss": round(parts["loss"].item(), 4), "compiled": getattr(trainer, "compiled", False),
            "graphs": counters["stats"]["unique_graphs"]}


def time_bld_round(parent, stack_jobs: int, steps: int) -> dict:
    """A whole decoupled BLD round (all 30 layers, the default space) as `puzzlenas run` does it:
    build, initial validation, `steps` training steps of 32 x 512, final validation, files."""
    from puzzlenas.bld import BLDConfig, BLDTrainer, decoupled_jobs
    from puzzlenas.library import LibraryConfig, search_space

    lib = LibraryConfig(linear_ffn_init="product", linear_attention_init="product")  # no calibration stats
    cfg = BLDConfig(tokens=steps * 32 * T, batch_size=32, lr=4e-4, validation_tokens=65536, checkpoint_every=10**6,
                    stack_jobs=stack_jobs)
    g = torch.Generator(device="cuda").manual_seed(1)
    train = [torch.randint(0, 49152, (32, T), device="cuda", generator=g) for _ in range(steps)]
    val = [torch.randint(0, 49152, (32, T), device="cuda", generator=g) for _ in range(4)]
    with tempfile.TemporaryDirectory() as d:
        trainer = BLDTrainer(parent, None, lib, cfg, Path(d), T, log=lambda *a: None)
        jobs = decoupled_jobs(search_space(parent.config, lib), range(30))
        torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.run_round(jobs, train, val)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows = [json.loads(p.read_text()) for p in Path(d).glob("layers/*/*/metrics.json")]
    trained = [r for r in rows if r["trained"]]
    return {"stack_jobs": stack_jobs, "steps": steps, "seconds": round(seconds, 2), "jobs": len(rows),
            "trained_jobs": len(trained),
            "mean_nmse_final": round(sum(r["nmse_final"] for r in trained) / len(trained), 5)}


def whole_model_trainer():
    """GKDTrainer as it compiled before: the teacher's and the student's whole forward as one
    graph each (the layer loop unrolled), for comparison with the per-block-kind graphs."""
    import functools

    from puzzlenas.gkd import GKDTrainer, student_forward, teacher_hidden_states

    class WholeModelGKDTrainer(GKDTrainer):
        def _set_step_functions(self, compiled: bool) -> None:
            super()._set_step_functions(compiled)
            if compiled:
                self._teacher = torch.compile(functools.partial(teacher_hidden_states, self.parent), dynamic=False)
                self._student = torch.compile(functools.partial(student_forward, self.child), dynamic=False)

    return WholeModelGKDTrainer


def cosine_outside_trainer():
    """GKDTrainer as it was before session 8: the layers compiled per block kind, the per-layer
    cosine terms made afterwards, eagerly, from the list of hidden states."""
    import functools

    from puzzlenas.gkd import GKDTrainer, call_layer, compiled_layer_call, hidden_cosine_loss, trunk_hidden_states

    def student(child, input_ids, parent_hidden, layer_call):
        hidden = trunk_hidden_states(child, input_ids, layer_call)
        return hidden[-1], hidden_cosine_loss(hidden, parent_hidden)

    class CosineOutsideGKDTrainer(GKDTrainer):
        def _set_step_functions(self, compiled: bool) -> None:
            super()._set_step_functions(compiled)
            layer_call = compiled_layer_call() if compiled else call_layer
            self._student = functools.partial(student, self.child, layer_call=layer_call)

    return CosineOutsideGKDTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gkd.json")
    parser.add_argument("--deadline", type=float, default=270.0)
    parser.add_argument("--skip-bld", action="store_true")
    parser.add_argument("--runs", choices=("session4", "blocks", "cosine"), default="blocks",
                        help="session4: old path vs whole-model compile; blocks: eager vs per-block-kind vs whole; "
                             "cosine: per-block-kind graphs with the cosine terms outside (before) and inside")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    begin = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "gkd": [], "bld_round": []}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=1))

    parent, child = pair()
    result["params"] = {"parent_matmul": matmul_params(parent), "child_matmul": matmul_params(child)}
    if not args.skip_bld:
        for stack, steps in ((1, 4), (0, 4), (0, 20)):
            if time.perf_counter() - begin > args.deadline:
                break
            result["bld_round"].append(time_bld_round(parent, stack, steps))
            print(result["bld_round"][-1], flush=True)
            save()
    from puzzlenas.gkd import GKDConfig, GKDTrainer
    chunk = {"logits_chunk": 8192}
    runs = {"session4": [("old (main)", "old", 16, {}), ("new eager", "new", 16, {"compile": "off"}),
                         ("new compiled", "new", 64, {"compile": "on", **chunk}),
                         ("new compiled", "new", 16, {"compile": "on", **chunk}),
                         ("new compiled", "new", 128, {"compile": "on", **chunk})],
            # layers compiled per block kind (main) vs the whole model as one graph (before)
            "blocks": [("eager", "new", 64, {"compile": "off", **chunk}),
                       ("compiled per block kind", "new", 64, {"compile": "on", **chunk}),
                       ("compiled per block kind", "new", 128, {"compile": "on", **chunk}),
                       ("compiled whole model", "whole", 64, {"compile": "on", **chunk})],
            # session 8: each student layer's cosine term inside its per-kind graph (main) vs after
            "cosine": [("per block kind, cosine eager (before)", "cosine_outside", 64, {"compile": "on", **chunk}),
                       ("per block kind, cosine in the graphs (main)", "new", 64, {"compile": "on", **chunk}),
                       ("per block kind, cosine in the graphs (main)", "new", 128, {"compile": "on", **chunk})]}[args.runs]
    for label, which, batch, changes in runs:
        if time.perf_counter() - begin > args.deadline:
            break
        try:
            if which == "old":
                from puzzlenas.gkd_old import GKDConfig as OldConfig, GKDTrainer as OldTrainer
                cfg, cls = OldConfig(batch_size=batch, tokens=10**9, lr=3e-4), OldTrainer
            else:
                cfg = dataclasses.replace(GKDConfig(batch_size=batch, tokens=10**9, lr=3e-4), **changes)
                cls = {"whole": whole_model_trainer, "cosine_outside": cosine_outside_trainer}.get(which, lambda: GKDTrainer)()
            row = time_gkd(label, cls, cfg, parent, child, batch, steps=8, warmup=3)
        except Exception as err:  # keep what was measured
            row = {"path": label, "batch": [batch, T], "error": f"{type(err).__name__}: {str(err)[:500]}"}
        result["gkd"].append(row)
        print(row, flush=True)
        save()
        torch.cuda.empty_cache()
    result["total_s"] = round(time.perf_counter() - begin, 1)
    save()


if __name__ == "__main__":
    main()
