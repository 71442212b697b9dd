"""Files that survive a kill: atomic writes (temp name, then rename) and optimizer state as
safetensors (never pickled). Shared by BLD, GKD, scoring and the stage markers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors named opt.<param id>.<key>."""
    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{pid}.{key}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list) -> None:
    """Inverse of `optimizer_tensors` (+ the param groups saved as JSON)."""
    state: dict = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            # AdamW keeps a non-capturable step counter on the CPU.
            state.setdefault(int(pid), {})[key] = t.reshape(()).cpu() if key == "step" else t
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
