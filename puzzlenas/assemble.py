"""Assemble: a search solution + the trained library -> a child checkpoint (Nemotron-NAS layout).

Layer i of the child takes its attention and FFN from wherever they live: the parent (its own
block), the BLD folder (a trained decoupled variant, or the coupled pair), or nowhere (no-op).
Embedding, final norm and LM head are the parent's.
"""

from __future__ import annotations

from pathlib import Path

from .integrity import load_weights

from .model.blocks import BlockConfig
from .library import Variant
from .model.modeling import DeciLMConfig, DeciLMForCausalLM
from .model.parent import ParentError, model_from_state

ATTENTION_PARAMS = ("input_layernorm.", "self_attn.")
FFN_PARAMS = ("post_attention_layernorm.", "mlp.")


def child_config(parent_config: DeciLMConfig, blocks: list[BlockConfig]) -> DeciLMConfig:
    nas = [b.to_nas_dict(parent_config.num_attention_heads, parent_config.hidden_size) for b in blocks]
    return DeciLMConfig(**{**parent_config.to_dict(), "block_configs": nas, "num_hidden_layers": len(blocks)})


def _variant_dir(bld_dir: Path, layer: int, attention: Variant, ffn: Variant, subblock: str) -> Path:
    """Where a trained subblock's weights are: the coupled pair if it was trained, else decoupled."""
    coupled = bld_dir / f"layers/{layer:03d}/coupled/{attention.name}+{ffn.name}"
    if (coupled / "DONE").is_file() and (coupled / "weights.safetensors").is_file():
        return coupled
    return bld_dir / f"layers/{layer:03d}/{attention.name if subblock == 'attention' else ffn.name}"


def assemble_state(parent: DeciLMForCausalLM, bld_dir: Path, pairs: list[tuple[Variant, Variant]]) -> dict:
    """The child's state dict (our weight names), from the parent and the library."""
    parent_state = parent.state_dict()
    state = {k: v for k, v in parent_state.items() if not k.startswith("model.layers.")}
    for i, (attention, ffn) in enumerate(pairs):
        for subblock, variant, names in (("attention", attention, ATTENTION_PARAMS), ("ffn", ffn, FFN_PARAMS)):
            if variant.config.kind == "no_op":
                continue
            prefix = f"model.layers.{i}."
            if variant.is_parent:
                for k, v in parent_state.items():
                    if k.startswith(prefix) and k[len(prefix):].startswith(names):
                        state[k] = v
                continue
            path = _variant_dir(bld_dir, i, attention, ffn, subblock) / "weights.safetensors"
            if not path.is_file():
                raise ParentError(f"{path} is missing: layer {i}'s {variant.name} was never trained; run the "
                                  f"bld stage (with this variant in the library) first")
            for k, v in load_weights(path, f"delete {path.parent} and rerun: puzzlenas run {bld_dir.parent} (only that BLD "
                                                     f"job is retrained)").items():
                if k.startswith(f"{subblock}."):
                    state[prefix + k[len(subblock) + 1:]] = v.to(parent.dtype)
    return state


def assemble_child(parent: DeciLMForCausalLM, bld_dir: Path, pairs: list[tuple[Variant, Variant]],
                   out_dir: Path | None = None) -> DeciLMForCausalLM:
    """Build the child (and save it with `save_pretrained` when out_dir is given)."""
    blocks = [BlockConfig(a.config, f.config) for a, f in pairs]
    config = child_config(parent.config, blocks)
    state = {k: v.detach().clone() for k, v in assemble_state(parent, bld_dir, pairs).items()}
    child = model_from_state(config, state, where=f"the child assembled from {bld_dir}")
    if out_dir is not None:
        child.save_pretrained(out_dir)
    return child


def pairs_from_record(record: dict, space) -> list[tuple[Variant, Variant]]:
    """(attention, FFN) variants per layer of a saved search solution."""
    pairs = []
    for i, name in enumerate(record["names"]):
        a_name, f_name = name.split("+")
        attention = {v.name: v for v in space[i][0]}
        ffn = {v.name: v for v in space[i][1]}
        pairs.append((attention[a_name], ffn[f_name]))
    return pairs
