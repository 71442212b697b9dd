"""Export: a child (or parent) checkpoint -> a clean folder that a serving runtime loads as it is.

`export_child(model_dir, out_dir, runtime)` writes, and nothing else:
- the weights as safetensors (sharded above 5 GB), in the export dtype (see `export_dtype`),
  named as the runtime expects: Llama names plus `self_attn.linear_attn` / `mlp.linear_mlp`
  (NVIDIA's DeciLM code, TensorRT-LLM) or, for mlx-lm, `self_attn.linear` / `mlp.linear`;
- config.json (Nemotron-NAS, `architectures: [DeciLMForCausalLM]`) with an `auto_map` to the
  configuration module shipped beside it (puzzlenas/remote/), whose `block_configs` give the
  attribute access vLLM / TensorRT-LLM read; plus the modeling module for transformers and
  lm-eval (every runtime but mlx, whose weight names differ);
- the tokenizer, with a tokenizer_config.json that transformers 4.x and 5.x both read
  (PreTrainedTokenizerFast, model_max_length = max_position_embeddings), generation_config.json;
- README.md, a model card (base model, inherited license, architecture, speedups, evaluation).
Files are 0644. Run bookkeeping (DONE, history.json, solution.json) stays in the run folder.
A model the runtime cannot run is refused, naming the layers and the runtimes that can.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .model.info import RUNTIMES, architecture_table, runtime_problems, runtime_support, total_params
from .model.modeling import DeciLMConfig
from .model.parent import BUNDLED_PARENTS, nas_config_from_hf, read_hf_config, resolve_parent_dir
from .remote import CONFIGURATION_FILE, MODELING_FILE, REMOTE_DIR

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
MAX_SHARD_SIZE = "5GB"
# Parents known by name: hub id and license of the model they were made from.
KNOWN_PARENTS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
# mlx-lm names a linear subblock's matrix `.linear`; NVIDIA's code and TensorRT-LLM `.linear_attn` / `.linear_mlp`.
MLX_NAMES = ((".self_attn.linear_attn.", ".self_attn.linear."), (".mlp.linear_mlp.", ".mlp.linear."))
# Tokenizer-config keys that describe how transformers 5 loaded a tokenizer, not the tokenizer.
_RUNTIME_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only", "name_or_path", "_commit_hash")
FILE_MODE, DIR_MODE = 0o644, 0o755


class ExportError(ValueError):
    """A model that cannot be exported for the runtime asked for (the message names the fix)."""


# =============================================================================================
# Entry point
# =============================================================================================
def export_child(model_dir: str | os.PathLike, out_dir: str | os.PathLike, runtime: str = "vllm",
                 dtype: str | None = None, *, parent: str | None = None, base_model: str | None = None,
                 license: str | None = None, speedups: dict | None = None, device: str | None = None,
                 evaluation: dict | None = None, overwrite: bool = False) -> Path:
    """Write `out_dir`, a folder `runtime` (vllm | trtllm | mlx | hf) loads as it is; return it.

    dtype: the weights' dtype; None = `export_dtype(model, parent)`. parent: the run's parent source
    (a name, directory or hub id) for the dtype, base model and license when not given.
    speedups: {scenario: {metric: x}} measured on `device`; evaluation: the model's eval results
    (a dict as in eval/results.json), both shown on the model card."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    source = resolve_parent_dir(model_dir)
    config = nas_config_from_hf(read_hf_config(source))
    check_runtime(config, runtime)
    dtype = dtype or export_dtype(source, parent)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype!r}; allowed: {', '.join(EXPORT_DTYPES)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; remove it, choose another folder or overwrite")
    base_model, license = _base_model_and_license(parent, source, base_model, license)

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = export_state(source, config, runtime, getattr(torch, dtype))
    write_weights(state, tmp)
    write_config(config, tmp, runtime, dtype)
    shutil.copyfile(REMOTE_DIR / CONFIGURATION_FILE, tmp / CONFIGURATION_FILE)
    if runtime != "mlx":
        shutil.copyfile(REMOTE_DIR / MODELING_FILE, tmp / MODELING_FILE)
    write_tokenizer(source, tmp, config)
    write_generation_config(source, tmp, config)
    card = model_card(config, runtime=runtime, dtype=dtype, base_model=base_model, license=license,
                      speedups=speedups, device=device, evaluation=evaluation, name=out_dir.name)
    card.save(tmp / "README.md")
    set_modes(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def check_runtime(config: DeciLMConfig, runtime: str) -> None:
    """Raise ExportError naming the layers `runtime` cannot run and the runtimes that can."""
    problems = runtime_problems(config, runtime)
    if not problems:
        return
    able = [r for r, p in runtime_support(config).items() if not p]
    raise ExportError(f"{RUNTIMES[runtime]} cannot run this model: {'; '.join(problems)}. Runtimes that can: "
                      f"{', '.join(able)} (export with --runtime {able[0]}), or search again without these "
                      f"blocks for {runtime}")


# =============================================================================================
# Weights
# =============================================================================================
def export_dtype(model_dir: Path, parent: str | None = None) -> str:
    """The dtype an export is written in when none is given: the parent's release dtype.

    puzzlenas keeps checkpoints in float32 for training (parent_dtype), while released parents
    (Llama, Qwen2, SmolLM2) are bfloat16: a 16-bit parent's dtype is used; a float32 parent
    config (the bundled SmolLM2, dequantized from GGUF, was released in bf16) and a float32 model
    without a known parent give bfloat16. Pass dtype="float32" to keep float32."""
    for dtype in (_release_dtype(parent), _stored_dtype(model_dir)):
        if dtype in ("bfloat16", "float16"):
            return dtype
    return "bfloat16"


def _release_dtype(parent: str | None) -> str | None:
    if parent is None or parent in BUNDLED_PARENTS:
        return None
    try:
        return _stored_dtype(resolve_parent_dir(parent))
    except (ValueError, OSError):
        return None


def _stored_dtype(model_dir: Path) -> str | None:
    hf = read_hf_config(model_dir)
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    return str(dtype).removeprefix("torch.") if dtype else None


def export_state(source: Path, config: DeciLMConfig, runtime: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under the runtime's names, in `dtype`, without a tied LM head."""
    from .model.parent import load_parent

    model = load_parent(source, dtype)
    state = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()
             if "rotary_emb" not in name}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: readers take the embedding
    if runtime == "mlx":
        state = {_mlx_name(name): t for name, t in state.items()}
    return state


def _mlx_name(name: str) -> str:
    for ours, theirs in MLX_NAMES:
        name = name.replace(ours, theirs)
    return name


def write_weights(state: dict[str, torch.Tensor], out: Path) -> list[str]:
    """model.safetensors, or shards of at most 5 GB with model.safetensors.index.json."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)


# =============================================================================================
# Config, tokenizer, generation config
# =============================================================================================
def export_config_dict(config: DeciLMConfig, runtime: str, dtype: str) -> dict[str, Any]:
    out = config.to_dict()
    for key in ("transformers_version", "dtype", "torch_dtype", "auto_map", "architectures"):
        out.pop(key, None)
    if out.get("rope_scaling") is None:  # absent = none for every reader; a null trips transformers 5's alias
        out.pop("rope_scaling", None)
    auto_map = {"AutoConfig": f"{Path(CONFIGURATION_FILE).stem}.DeciLMConfig"}
    if runtime != "mlx":  # mlx weight names differ from the modeling module's
        auto_map["AutoModel"] = f"{Path(MODELING_FILE).stem}.DeciLMModel"
        auto_map["AutoModelForCausalLM"] = f"{Path(MODELING_FILE).stem}.DeciLMForCausalLM"
    head = {"architectures": ["DeciLMForCausalLM"], "model_type": DeciLMConfig.model_type, "auto_map": auto_map,
            # transformers 5 reads `dtype`, transformers 4 and TensorRT-LLM `torch_dtype`.
            "dtype": dtype, "torch_dtype": dtype}
    return {**head, **{k: v for k, v in out.items() if k not in head}}


def write_config(config: DeciLMConfig, out: Path, runtime: str, dtype: str) -> None:
    (out / "config.json").write_text(json.dumps(export_config_dict(config, runtime, dtype), indent=2) + "\n")


def write_tokenizer(source: Path, out: Path, config: DeciLMConfig) -> list[str]:
    """Copy the tokenizer; rewrite tokenizer_config.json so that transformers 4.x and 5.x read it."""
    written = []
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            written.append(name)
    path = source / "tokenizer_config.json"
    if not path.is_file():
        return written
    tok = json.loads(path.read_text())
    for key in _RUNTIME_TOKENIZER_KEYS:
        tok.pop(key, None)
    # transformers 5 writes the class it loaded through ("TokenizersBackend"), unknown to 4.x;
    # a tokenizer.json is read by PreTrainedTokenizerFast in both.
    if (out / "tokenizer.json").is_file() and tok.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    length = tok.get("model_max_length")
    if not isinstance(length, (int, float)) or length > 10 * config.max_position_embeddings:
        tok["model_max_length"] = config.max_position_embeddings  # not the 1e30 "unknown" sentinel
    if "chat_template" not in tok and (source / "chat_template.jinja").is_file():
        tok["chat_template"] = (source / "chat_template.jinja").read_text()  # transformers < 4.43 reads it here
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
    return [*written, "tokenizer_config.json"]


def write_generation_config(source: Path, out: Path, config: DeciLMConfig) -> None:
    """The model's generation_config.json, or one with its special tokens."""
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
        return
    fields = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(
        json.dumps({k: v for k, v in fields.items() if v is not None}, indent=2) + "\n")


def set_modes(folder: Path) -> None:
    """0644 files, 0755 folders: readable by a serving user other than the one who exported."""
    folder.chmod(DIR_MODE)
    for path in folder.rglob("*"):
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


# =============================================================================================
# Model card
# =============================================================================================
def _base_model_and_license(parent: str | None, source: Path, base_model: str | None,
                            license: str | None) -> tuple[str | None, str | None]:
    """The parent's hub id and license: given, known by name, or read from the parent's own card."""
    if parent in KNOWN_PARENTS:
        known = KNOWN_PARENTS[parent]
        return base_model or known[0], license or known[1]
    card_meta = {}
    for folder in [p for p in (_local_dir(parent), source) if p is not None]:
        card_meta = _card_metadata(folder)
        if card_meta:
            break
    if base_model is None and parent and re.fullmatch(r"[\w.-]+/[\w.-]+", parent) and not Path(parent).exists():
        base_model = parent
    base_model = base_model or card_meta.get("base_model")
    if isinstance(base_model, list):
        base_model = base_model[0] if base_model else None
    return base_model, license or card_meta.get("license")


def _local_dir(parent: str | None) -> Path | None:
    if parent is None or parent in BUNDLED_PARENTS:
        return None
    try:
        return resolve_parent_dir(parent)
    except (ValueError, OSError):
        return None


def _card_metadata(folder: Path) -> dict:
    if not (folder / "README.md").is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(folder / "README.md").data.to_dict()
    except Exception:  # a README without metadata
        return {}


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def architecture_markdown(config: DeciLMConfig) -> str:
    from .model.info import layer_costs

    rows = [[c.index, c.block.attention.short, c.block.ffn.short, f"{c.params:,}", f"{c.kv_cache_bytes_per_token:,}"]
            for c in layer_costs(config)]
    return _markdown_table(["layer", "attention", "FFN", "parameters", "KV bytes / token (bf16)"], rows)


def _evaluation_rows(evaluation: dict) -> list[list[Any]]:
    rows = []
    for key in ("perplexity", "kl_to_parent", "top1_agreement", "loss"):
        if isinstance(evaluation.get(key), (int, float)):
            rows.append([key, "test split", f"{evaluation[key]:.4g}"])
    for task, result in sorted(evaluation.get("tasks", {}).items()):
        if isinstance(result, dict) and isinstance(result.get("acc"), (int, float)):
            n = f" ({result['n']} examples)" if "n" in result else ""
            rows.append([f"{task} accuracy", f"{task}{n}", f"{result['acc']:.4g}"])
    for key, value in sorted(evaluation.get("retention", {}).items()):
        if isinstance(value, (int, float)):
            rows.append([f"retention {key}", "child / parent", f"{value:.4g}"])
    return rows


def _eval_results(evaluation: dict):
    from huggingface_hub import EvalResult

    results = []
    for task, result in sorted(evaluation.get("tasks", {}).items()):
        if isinstance(result, dict) and isinstance(result.get("acc"), (int, float)):
            results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type="accuracy", metric_value=float(result["acc"])))
    if isinstance(evaluation.get("perplexity"), (int, float)):
        results.append(EvalResult(task_type="text-generation", dataset_type="puzzlenas-test-split",
                                  dataset_name="puzzlenas test split", metric_type="perplexity",
                                  metric_value=float(evaluation["perplexity"])))
    return results


def serving_snippet(runtime: str, name: str) -> str:
    """How to run the export with its runtime."""
    return {
        "vllm": f"vllm serve ./{name} --trust-remote-code",
        "trtllm": f"trtllm-serve ./{name} --trust_remote_code",
        "mlx": f"mlx_lm.generate --model ./{name} --prompt 'Hello'",
        "hf": (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
               f"model = AutoModelForCausalLM.from_pretrained('./{name}', trust_remote_code=True)\n"
               f"tokenizer = AutoTokenizer.from_pretrained('./{name}')\n"
               f"# lm_eval --model hf --model_args pretrained=./{name},trust_remote_code=True --tasks ..."),
    }[runtime]


def model_card(config: DeciLMConfig, *, runtime: str, dtype: str, base_model: str | None = None,
               license: str | None = None, speedups: dict | None = None, device: str | None = None,
               evaluation: dict | None = None, name: str = "model"):
    """A huggingface_hub ModelCard: metadata (base model, license, evaluation) and the body."""
    from huggingface_hub import ModelCard, ModelCardData

    evaluation = evaluation or {}
    speedups = speedups if speedups is not None else evaluation.get("speedup") or {}
    results = _eval_results(evaluation)
    data = ModelCardData(
        base_model=base_model, license=license, library_name="transformers", pipeline_tag="text-generation",
        tags=["puzzlenas", "nemotron-nas", "puzzle", f"runtime-{runtime}"],
        model_name=name if results else None, eval_results=results or None)
    params = total_params(config)
    lines = [
        f"# {name}", "",
        f"A heterogeneous Nemotron-NAS child{f' of [{base_model}](https://huggingface.co/{base_model})' if base_model else ''}, "
        f"made with puzzlenas (Puzzle, arXiv 2411.19146): each layer keeps, shrinks or drops "
        f"its attention and FFN. {params / 1e6:.1f}M parameters, weights in {dtype}, exported for "
        f"{RUNTIMES[runtime]}.", "",
        f"License: {license or 'not found in the parent folder: the parent model’s license applies'} "
        f"(inherited from the parent).", "",
        "## How to run it", "", "```", serving_snippet(runtime, name), "```", "",
    ]
    if runtime == "mlx":
        lines += ["Linear subblocks are named `.linear` as mlx-lm expects; export with `--runtime hf` for "
                  "transformers or lm-eval.", ""]
    support = runtime_support(config)
    lines += ["Runtimes that can run this architecture: " + ", ".join(r for r, p in support.items() if not p) + ".", ""]
    lines += ["## Architecture", "", architecture_markdown(config), ""]
    if speedups:
        rows = [[scenario, metric.removesuffix("_s").replace("_", " "), f"{value:.2f}x"]
                for scenario, metrics in speedups.items() for metric, value in metrics.items()
                if isinstance(value, (int, float))]
        lines += ["## Measured speedup over the parent", "",
                  f"Measured on {device or 'the run’s device'} with the same inference code for parent and child "
                  f"(parent time / child time).", "", _markdown_table(["scenario", "metric", "speedup"], rows), ""]
    rows = _evaluation_rows(evaluation)
    if rows:
        lines += ["## Evaluation", "", _markdown_table(["metric", "data", "value"], rows), ""]
    text = "\n".join(lines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


# =============================================================================================
# Command line
# =============================================================================================
def cmd_export(args: argparse.Namespace) -> int:
    """`puzzlenas export MODEL OUT --runtime R [--dtype D]`."""
    model_dir = Path(args.model)
    parent, evaluation, speedups, device = _run_context(model_dir)
    if parent is None and str(args.model) in BUNDLED_PARENTS:  # exporting the bundled parent itself
        parent = str(args.model)
    out = export_child(model_dir, args.out, args.runtime, args.dtype, parent=parent, evaluation=evaluation,
                       speedups=speedups, device=device, overwrite=getattr(args, "force", False))
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out} for {RUNTIMES[args.runtime]}: {', '.join(files)}")
    print(serving_snippet(args.runtime, out.name))
    return 0


def _run_context(model_dir: Path) -> tuple[str | None, dict | None, dict | None, str | None]:
    """For a model inside a run folder: the run's parent source and the model's eval results."""
    run_dir = model_dir.resolve().parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None, None, None, None
    import yaml

    parent = (yaml.safe_load(config.read_text()) or {}).get("parent")
    results_path = run_dir / "eval" / "results.json"
    evaluation = None
    if results_path.is_file():
        evaluation = json.loads(results_path.read_text()).get(model_dir.resolve().name)
    return (str(parent) if parent else None), evaluation, None, None


def add_export_parser(sub) -> None:
    """The `export` subcommand on an argparse subparsers object."""
    p = sub.add_parser("export", help="write a model as a folder vLLM / TensorRT-LLM / mlx-lm / transformers load",
                       description="Export MODEL (a child or parent checkpoint) into OUT for a serving runtime: "
                                   "weights in the parent's dtype, config with its remote code, tokenizer, "
                                   "generation config and model card.")
    p.add_argument("model", help="child folder (e.g. runs/NAME/gkd-2x), parent directory or smollm2-135m")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--runtime", choices=tuple(RUNTIMES), default="vllm", help="runtime to load it (default vllm)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                   help="weight dtype (default: the parent's, bfloat16 for float32 checkpoints)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)
