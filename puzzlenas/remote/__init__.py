"""Code shipped next to exported weights (`puzzlenas export`).

The two modules here are copied as they are into an export folder and named in its
config.json `auto_map`, so that tools which never import puzzlenas (vLLM, TensorRT-LLM,
lm-evaluation-harness, plain transformers) load the child with `trust_remote_code=True`.
They therefore import only torch and transformers, never puzzlenas, and import each other
relatively. puzzlenas itself never loads them from a model folder: parents and children are
read by its own classes, without remote code.
"""

from pathlib import Path

REMOTE_DIR = Path(__file__).parent
CONFIGURATION_FILE = "configuration_decilm.py"
MODELING_FILE = "modeling_decilm.py"
