"""`puzzlenas` command line: convert, info, export, generate, run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def cmd_convert(args: argparse.Namespace) -> int:
    from .model.info import architecture_table
    from .model.parent import convert_parent
    from .model.modeling import DeciLMConfig

    out = convert_parent(args.parent, args.out, _torch_dtype(args.dtype))
    print(architecture_table(DeciLMConfig.from_pretrained(out)))
    print(f"wrote {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model.info import architecture_table
    from .model.parent import nas_config_from_hf, read_hf_config, resolve_parent_dir

    config = nas_config_from_hf(read_hf_config(resolve_parent_dir(args.model)))
    print(architecture_table(config, args.kv_dtype))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from .eval.metrics import complete
    from .model.parent import load_parent, resolve_parent_dir

    model_dir = resolve_parent_dir(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_parent(model_dir, _torch_dtype(args.dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(complete(model, tokenizer, args.prompt, args.chat, args.max_new_tokens, args.temperature))
    return 0


def cmd_library(args: argparse.Namespace) -> int:
    from .bld import collect_metrics, library_table

    run_dir = Path(args.run)
    if not (run_dir / "library" / "space.txt").is_file():
        raise FileNotFoundError(f"{run_dir} has no library yet: run `puzzlenas run CONFIG --until library` first")
    print((run_dir / "library" / "space.txt").read_text(), end="")
    rows = collect_metrics(run_dir / "bld") if (run_dir / "bld").is_dir() else []
    if rows:
        print(library_table(rows, per_layer=args.per_layer))
    else:
        print("no BLD results yet: run `puzzlenas run CONFIG --until bld`")
    return 0


def _stage_command(stage: str, table_file: str):
    """`puzzlenas STAGE RUN`: run the stage (and any unfinished one before it) with the run's own
    config.yaml, then print its table."""

    def command(args: argparse.Namespace) -> int:
        from .pipeline import run_pipeline

        run_dir = Path(args.run)
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: {run_dir} is not a run directory (start one with "
                                    f"`puzzlenas run [CONFIG] --run-dir {run_dir}`)")
        run_pipeline(config, run_dir=run_dir, until=stage, overrides=args.set)
        if getattr(args, "per_layer", False) and stage == "scores":
            import json

            from .scoring import scores_table

            rows = [json.loads(line) for line in (run_dir / "scores" / "scores.jsonl").read_text().splitlines()]
            print(scores_table(rows, args.metric, per_layer=True))
        return 0

    return command


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    run_pipeline(args.config, run_dir=args.run_dir, until=args.until, force=args.force, overrides=args.set)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puzzlenas", description=(
        "Puzzle NAS: turn a parent LLM into a faster heterogeneous child (Nemotron-NAS format). "
        "PARENT / MODEL may be a local checkpoint directory, a hub id, or 'smollm2-135m' (bundled)."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a parent into a Nemotron-NAS checkpoint with all-parent blocks",
                       description="Convert a Llama / Mistral / Qwen2 parent into the Nemotron-NAS layout.")
    p.add_argument("parent", help="local directory, hub id, or smollm2-135m")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype written (default float32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="per-layer table: blocks, parameters, KV-cache bytes per token",
                       description="Print a model's per-layer architecture table and totals.")
    p.add_argument("model", help="puzzlenas child, parent directory, hub id, or smollm2-135m")
    p.add_argument("--kv-dtype", choices=("bfloat16", "float16", "float32", "fp8"), default="bfloat16",
                   help="dtype of the KV cache and weights for the byte counts (default bfloat16)")
    p.set_defaults(func=cmd_info)

    from .export import add_export_parser

    add_export_parser(sub)

    p = sub.add_parser("generate", help="generate text from a model with its KV cache",
                       description="Generate a continuation of PROMPT (greedy unless --temperature > 0).")
    p.add_argument("model", help="puzzlenas child, parent directory, hub id, or smollm2-135m")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("library", help="table of a run's replacement library and its BLD results",
                       description="Print the search space of RUN and the validation normalized MSE of every "
                                   "variant at initialization and after blockwise local distillation.")
    p.add_argument("run", help="run directory, e.g. runs/default")
    p.add_argument("--per-layer", action="store_true", help="one row per (layer, variant) instead of means")
    p.set_defaults(func=cmd_library)

    for name, stage, text in (("score", "scores", "replace-1-block KL / LM loss of every library item"),
                              ("costs", "costs", "measured prefill / decode cost of every block shape on this device"),
                              ("search", "search", "MIP search: one architecture per target, and the frontier"),
                              ("peers", "peers", "ShortGPT / Minitron-width / uniform-KV architectures at the "
                                                 "same targets (with --set peers.methods=[...])")):
        p = sub.add_parser(name, help=text, description=f"{text[0].upper() + text[1:]}: runs the '{stage}' stage "
                           f"of RUN (and unfinished stages before it) with RUN/config.yaml, then prints its table.")
        p.add_argument("run", help="run directory, e.g. runs/default")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        if stage == "scores":
            p.add_argument("--per-layer", action="store_true", help="also print the layer x variant grid")
            p.add_argument("--metric", default="kl", choices=("kl", "lm_loss", "lm_loss_delta"))
        p.set_defaults(func=_stage_command(stage, ""))

    p = sub.add_parser("run", help="run the pipeline (default: the bundled parent)",
                       description="Run the pipeline stages of CONFIG into a run directory, resuming "
                                   "finished stages. Without CONFIG: the default job on the bundled parent.")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: built-in default job)")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<name>)")
    from .pipeline import STAGES

    stages = ", ".join(name for name, _ in STAGES)
    p.add_argument("--until", default=None, help=f"stop after this stage ({stages})")
    p.add_argument("--force", action="append", default=[], help="rerun this stage even if done (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set parent=/path/to/llama (repeatable)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        from .dist import shutdown_distributed

        shutdown_distributed()  # under torchrun; nothing otherwise
        return code
    except (ValueError, FileNotFoundError) as err:
        # Our errors name the problem and the fix; a traceback would only bury that.
        print(f"puzzlenas {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
