"""puzzlenas: Puzzle (arXiv 2411.19146) distillation-based NAS for inference-optimized LLMs.

Importing the package registers the Nemotron-NAS model with transformers, so that
`AutoModelForCausalLM.from_pretrained(child_dir)` loads puzzlenas children.
"""

from .model.blocks import AttentionConfig, BlockConfig, BlockConfigError, FFNConfig
from .model.modeling import DeciLMConfig, DeciLMForCausalLM, DeciLMModel

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig)
        AutoModel.register(DeciLMConfig, DeciLMModel)
        AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM)
    except ValueError:  # already registered (module re-imported)
        pass


_register_with_transformers()

__all__ = ["AttentionConfig", "BlockConfig", "BlockConfigError", "FFNConfig", "DeciLMConfig",
           "DeciLMForCausalLM", "DeciLMModel", "__version__"]
