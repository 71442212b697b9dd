"""puzzlenas: Puzzle (arXiv 2411.19146) distillation-based NAS for inference-optimized LLMs.

The package is light to import (the command line answers `--help` without torch); the model
classes below load on first use, and importing them registers the Nemotron-NAS model with
transformers, so that after `from puzzlenas import DeciLMForCausalLM`
`AutoModelForCausalLM.from_pretrained(child_dir)` loads puzzlenas children.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {"AttentionConfig": "model.blocks", "BlockConfig": "model.blocks", "BlockConfigError": "model.blocks",
         "FFNConfig": "model.blocks", "DeciLMConfig": "model.modeling", "DeciLMForCausalLM": "model.modeling",
         "DeciLMModel": "model.modeling"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'puzzlenas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
