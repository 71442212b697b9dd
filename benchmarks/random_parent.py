"""A Llama parent with random weights, written offline as a Hugging Face folder that
`puzzlenas convert` / `parent: DIR` read: config.json, sharded model.safetensors + index, and the
bundled SmolLM2 tokenizer (its ids fit any vocabulary of at least 49,152).

    python benchmarks/random_parent.py OUT               # Llama-3.1-8B's shape (32 layers, 8.0B)
    python benchmarks/random_parent.py OUT --shape tiny  # the same head layout, 2 narrow layers

Weights are drawn tensor by tensor (normal, std 0.02; norms 1) straight into bf16 shards, so
the 8B folder (16 GB) is written in about a minute without building the model in memory.
For timings and memory only: the model says nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct's config.json), and a CPU-sized copy with the
# same attention layout (32 query heads, 8 KV heads, so the example's KV-head variants 8/4/2/1)
# and the same FFN ratio (14336 / 4096 = 3.5).
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "tiny": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=49152, rope_theta=500000.0, max_position_embeddings=4096),
}
SHARD_BYTES = 4 << 30


def write_random_parent(out: Path, shape: str = "8b", seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzlenas.checkpoint import atomic_save_tensors
    from puzzlenas.model.parent import bundled_parent_dir, copy_tokenizer_files

    tokenizer_dir = bundled_parent_dir("smollm2-135m")
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(tokenizer_dir, out)
    special = json.loads((tokenizer_dir / "config.json").read_text())
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype=str(dtype)[6:],
                         bos_token_id=special.get("bos_token_id"), eos_token_id=special.get("eos_token_id"))
    with torch.device("meta"):  # names and shapes only
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    shards, current, size, weight_map = [], {}, 0, {}
    for name, shape_ in names.items():
        tensor = torch.ones(shape_, dtype=dtype) if "norm" in name else \
            (torch.randn(shape_, generator=g) * 0.02).to(dtype)
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_tensors(shard, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    print(f"wrote {out}: {shape} Llama, {sum(t.numel() for s in shards for t in s.values()) / 1e9:.2f}B "
          f"parameters in {len(shards)} shards")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_random_parent(args.out, args.shape, args.seed)


if __name__ == "__main__":
    main()
