"""`puzzlenas` command line: one subcommand per stage (generated from the stage list), `run` for
the whole pipeline, `config` for the resolved config, and convert / info / export / generate for models.
Everything heavy is imported inside the command that needs it, so `--help` answers at once."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
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


def resolve_run(target: str, run_dir: Path | None) -> tuple[Path, Path | None]:
    """RUN_OR_CONFIG: a run directory (its own config.yaml) or a YAML config (its run directory:
    --run-dir, else runs/<name>). Returns (config path, run directory or None for the default)."""
    path = Path(target)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path / 'config.yaml'} not found: {path} is not a run directory (start one "
                                    f"with `puzzlenas run [CONFIG] --run-dir {path}`)")
        return path / "config.yaml", run_dir or path
    if path.is_file():
        return path, run_dir
    raise FileNotFoundError(f"{path} is neither a run directory nor a config file")


def stage_command(stage: str):
    """`puzzlenas STAGE RUN_OR_CONFIG`: run the stage (and any unfinished one before it), then
    print its table."""

    def command(args: argparse.Namespace) -> int:
        from .pipeline import run_pipeline

        config, run_dir = resolve_run(args.target, args.run_dir)
        run_dir = run_pipeline(config, run_dir=run_dir, until=stage, overrides=args.set,
                               force=[stage] if args.force else [])
        if stage in ("library", "bld"):
            from .bld import collect_metrics, library_table
            from .stages.base import RunDir

            bld_dir = RunDir(run_dir).bld
            rows = collect_metrics(bld_dir) if bld_dir.is_dir() else []
            if rows and (args.per_layer or stage == "library"):
                print(library_table(rows, per_layer=args.per_layer))
        if stage == "scores" and args.per_layer:
            from .scoring import scores_table
            from .stages.scores import read_scores

            print(scores_table(read_scores(run_dir), args.metric, per_layer=True))
        return 0

    return command


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    run_pipeline(args.config, run_dir=args.run_dir, until=args.until, force=args.force, overrides=args.set)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """`puzzlenas tasks OUT`: our tasks as offline lm-eval task YAMLs (+ jsonl), and the lm_eval command."""
    from .eval.tasks import build_task, export_lm_eval_task

    names = [export_lm_eval_task(build_task(t, seed=args.seed, max_examples=args.max_examples), args.out)
             for t in args.task]
    for name in names:
        print(f"wrote {args.out / name}.yaml")
    yamls = ",".join(str((args.out / f"{n}.yaml").resolve()) for n in names)
    print("# score an export (`puzzlenas export MODEL EXPORT --runtime hf`) on them; needs pip install 'lm-eval[hf]'")
    print(f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=EXPORT,"
          f"trust_remote_code=True --tasks {yamls} --device cpu --batch_size 8")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import dump_yaml, load_run_config

    print(dump_yaml(load_run_config(args.config, args.set)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puzzlenas", description=(
        "Puzzle NAS: turn a parent LLM into a faster heterogeneous child (Nemotron-NAS format). "
        "PARENT / MODEL may be a local checkpoint directory, a hub id, or 'smollm2-135m' (bundled)."))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"puzzlenas {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure (accepted anywhere on "
                                                             "the line; run.log keeps it anyway)")
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

    # listed here; its own parser (export.py, which imports torch) parses `puzzlenas export ...`
    sub.add_parser("export", help="write a model as a folder vLLM / TensorRT-LLM / mlx-lm / transformers load")

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

    p = sub.add_parser("config", help="print the resolved run config (defaults, CONFIG, then --set)",
                       description="Print the run config as YAML after loading CONFIG (default: the preset for "
                                   "this machine) and applying the overrides: what `puzzlenas run` would use.")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the built-in preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("tasks", help="write the downstream tasks as offline lm-eval task YAMLs (for lm_eval on an "
                                     "export)",
                       description="Write each task's examples (jsonl) and an lm-evaluation-harness task YAML "
                                   "reading them into OUT, then print the lm_eval command that scores an export "
                                   "(`puzzlenas export MODEL EXPORT --runtime hf`) on them, offline.")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--task", action="append", default=None, metavar="NAME",
                   help="wiki-lastword, news-continuation, bible-continuation or mmlu-dev (repeatable; "
                        "default: the first three)")
    p.add_argument("--max-examples", type=int, default=None, help="a seeded sample of at most this many per task")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tasks)

    from .pipeline import STAGE_NAMES, stage_module

    for stage in STAGE_NAMES:
        if stage == "export":  # `puzzlenas export MODEL OUT` exports one model; `run` ends with the stage
            continue
        doc = (stage_module(stage).__doc__ or stage).strip().split("\n\n")[0]
        text = doc.split(": ", 1)[-1].replace("\n", " ")
        p = sub.add_parser(stage, aliases=["score"] if stage == "scores" else [], help=text,
                           description=f"{text[0].upper() + text[1:]} Runs the '{stage}' stage (and any unfinished "
                                       f"stage before it), then prints its table.")
        p.add_argument("target", metavar="RUN_OR_CONFIG", help="run directory (e.g. runs/default: its config.yaml) "
                                                               "or a YAML run config")
        p.add_argument("--run-dir", type=Path, default=None, help="run directory for a CONFIG (default runs/<name>)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--force", action="store_true", help=f"redo the {stage} stage even if it is done")
        if stage in ("library", "bld", "scores"):
            p.add_argument("--per-layer", action="store_true", help="one row per (layer, variant) instead of means")
        if stage == "scores":
            p.add_argument("--metric", default="kl", choices=("kl", "lm_loss", "lm_loss_delta"))
        p.set_defaults(func=stage_command(stage))

    p = sub.add_parser("run", help="run the pipeline (default: the bundled parent)",
                       description="Run the pipeline stages of CONFIG into a run directory, resuming "
                                   "finished stages. Without CONFIG: the default job on the bundled parent.")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: built-in default job)")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/<name>)")
    stages = ", ".join(STAGE_NAMES)
    p.add_argument("--until", default=None, help=f"stop after this stage ({stages})")
    p.add_argument("--force", action="append", default=[], help="redo this stage and every stage after it that "
                                                                "read it (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set parent=/path/to/llama (repeatable)")
    p.set_defaults(func=cmd_run)
    return parser


def build_export_parser() -> argparse.ArgumentParser:
    from .export import add_export_parser

    parser = argparse.ArgumentParser(prog="puzzlenas")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def passive_cpu_threads() -> None:
    """On a machine without an NVIDIA GPU, idle OpenMP threads sleep instead of spinning
    (OMP_WAIT_POLICY=PASSIVE, unless the user set it): with another process busy on a 2-core
    machine, spinning threads made every parallel region wait for a time slice, the parent's CPU
    decode step ran 4x slower (101 -> 404 ms) and children's measured speedups were distorted
    (RESULTS.md: "CPU timings on a busy machine"); passive threads cost ~5% on an idle machine.
    Read by the OpenMP runtime when torch loads: set before the first torch import."""
    if "torch" not in sys.modules and not Path("/dev/nvidiactl").exists():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_busy_fraction(seconds: float = 0.3, stat: str = "/proc/stat") -> float | None:
    """Share of the machine's CPU time (0..1) spent busy over `seconds`, from the aggregate `cpu`
    line of /proc/stat sampled twice (idle and iowait count as idle); None where it cannot be read."""
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path(stat).read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return max(0.0, min(1.0, 1 - idle / total))


def threads_for_idle_cores(log=print, busy_fraction=cpu_busy_fraction) -> None:
    """On a machine without an NVIDIA GPU, torch's CPU threads default to the cores that other
    processes leave idle (OMP_NUM_THREADS, unless the user set it). A thread that shares a core
    with a busy process stalls every parallel region it takes part in: beside one busy process
    on 2 cores, 2 threads measured children's speedups 10-15% off their predictions from run to
    run (RESULTS.md), while one thread on the free core times them as an idle machine does.
    Sampled once, before torch loads (it reads OMP_NUM_THREADS then)."""
    if "torch" in sys.modules or "OMP_NUM_THREADS" in os.environ or Path("/dev/nvidiactl").exists():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    machine_cores = os.cpu_count() or cores
    busy = busy_fraction()
    if busy is None or cores < 2:
        return
    busy_cores = round(busy * machine_cores)
    threads = max(1, min(cores, machine_cores - busy_cores))
    if threads < cores:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        log(f"puzzlenas: {busy_cores} of {machine_cores} cores busy with other processes: torch uses {threads} "
            f"thread{'s' if threads > 1 else ''} (set OMP_NUM_THREADS to choose)")


def main(argv: list[str] | None = None) -> int:
    passive_cpu_threads()
    threads_for_idle_cores()
    from .dist import FailedOnRankZero

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PUZZLENAS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere: `puzzlenas run --debug ...`
    args = (build_export_parser() if argv[:1] == ["export"] else build_parser()).parse_args(argv)
    if getattr(args, "command", None) == "tasks" and args.task is None:
        from .eval.tasks.registry import DEFAULT_TASKS

        args.task = list(DEFAULT_TASKS)
    try:
        code = args.func(args)
        if "torch" in sys.modules:  # a command that never loaded torch started no process group
            from .dist import shutdown_distributed

            shutdown_distributed()  # under torchrun; nothing otherwise
        return code
    except FailedOnRankZero as err:  # torchrun: rank 0 said what failed; the other ranks only that it did
        print(f"puzzlenas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"puzzlenas {args.command}: interrupted; the same command resumes from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (sorted below: expected failures vs bugs)
        return report_failure(args.command, err, debug)


def expected_failure(err: BaseException) -> bool:
    """A failure of the input, the files or the machine (one line, exit 2), not of the code.
    Our errors are ValueErrors (ConfigError, ParentError, ArtifactError...) or TrainingErrors;
    OSError covers missing files, read-only folders and full disks."""
    from .integrity import LockError

    kinds: list[type] = [ValueError, OSError, LockError]
    for module, name in (("puzzlenas.train", "TrainingError"), ("puzzlenas.mip", "SearchError"),
                         ("puzzlenas.data.sources", "MissingDependencyError"), ("yaml", "YAMLError"),
                         ("safetensors", "SafetensorError")):
        if module in sys.modules:  # not imported: the error cannot be one of its kind
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(err, tuple(kinds))


def one_line(err: BaseException) -> str:
    """The error's message on one line (OSError: what failed, and on which file)."""
    if isinstance(err, OSError) and err.strerror:
        files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
        text = f"{err.strerror}: {files}" if files else err.strerror
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            text += " (the folder is read-only or not yours: pick a writable one, e.g. --run-dir DIR)"
        elif err.errno == errno.ENOSPC:
            text += " (disk full: free space, then rerun the same command; finished work is kept)"
        return text
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def report_failure(command: str, err: Exception, debug: bool) -> int:
    """Expected failures: one line naming the problem (exit 2). Bugs: one line saying so and where
    the traceback is (exit 1). --debug prints the traceback of either; run.log always has it."""
    import traceback

    log = getattr(err, "run_log", None)
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    if expected_failure(err):
        print(f"puzzlenas {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    if log is None and not debug:
        traceback.print_exception(err, file=sys.stderr)  # nowhere else to find it
    where = f"; the traceback is in {log}" if log else ""
    print(f"puzzlenas {command}: internal error (a bug, please report it): {type(err).__name__}: {one_line(err)}"
          f"{where}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
