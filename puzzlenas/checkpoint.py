"""Files that survive a kill: atomic writes (temp name, then rename), JSON lines, optimizer state
as safetensors (never pickled), and stage folders made with other settings moved aside. One copy
of each helper, shared by every stage. Reading and writing text needs no torch (imported only by
the tensor helpers)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch


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


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path, stage: str | None = None) -> list[dict]:
    """The rows of a JSON-lines file; a missing or corrupted file is a ValueError naming the file,
    the line and (given `stage`) the stage that writes it."""
    fix = f"; rerun its stage: --force {stage}" if stage else ""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ValueError(f"{path} is missing or unreadable ({err}){fix}") from err
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err}): the file is corrupted{fix}") from err
    return rows


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = _temp_name(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
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


def reset_if_stale(out_dir: Path, fingerprint: str, log=print) -> None:
    """A stage folder made with other settings must not be resumed: move it aside (kept, renamed
    `<name>.stale-<time>`), then mark the fresh folder with `fingerprint`."""
    marker = out_dir / "fingerprint"
    if out_dir.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
        stale = out_dir.with_name(out_dir.name + f".stale-{int(time.time())}")
        out_dir.rename(stale)
        log(f"[{out_dir.name}] {out_dir} was made with another config; moved to {stale}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fingerprint)
