"""Files that survive a kill: atomic writes (temp name, then rename) and optimizer state as
safetensors (never pickled). Shared by BLD, GKD, scoring and the stage markers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _temp_name(path: Path) -> Path:
    # Per process: ranks writing the same file (a run's config.yaml) must not share a temp file,
    # or one rank's rename finds the other's already gone.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = _temp_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def optimizer_state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state ({param key: {name: tensor}}, the key a parameter id
    or name) as flat tensors named opt.<param key>.<name>; the scalar step becomes shape (1,)."""
    out = {}
    for param, entries in state.items():
        for key, value in entries.items():
            out[f"opt.{param}.{key}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    return out


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of `optimizer_state_tensors` (parameter keys come back as strings)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            param, key = name[len("opt."):].rsplit(".", 1)
            state.setdefault(param, {})[key] = t.reshape(()) if key == "step" else t
    return state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors named opt.<param id>.<key>."""
    return optimizer_state_tensors(optimizer.state_dict()["state"])


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list) -> None:
    """Inverse of `optimizer_tensors` (+ the param groups saved as JSON)."""
    # AdamW keeps a non-capturable step counter on the CPU.
    state = {int(pid): {k: v.cpu() if k == "step" else v for k, v in entries.items()}
             for pid, entries in optimizer_state_from_tensors(tensors).items()}
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
