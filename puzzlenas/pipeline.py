"""The pipeline: a chain of stages, each writing one folder of the run directory.

Each stage's `run(cfg, run_dir) -> Path` writes its folder and finishes with a `DONE` marker
holding the hash of the config fields it depends on; a stage whose marker matches is
skipped, so a killed run resumes at the first unfinished stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .config import RunConfig, config_hash, dump_yaml, load_run_config

Stage = Callable[[RunConfig, Path], Path]


def stage_done(stage_dir: Path, fingerprint: str) -> bool:
    marker = stage_dir / "DONE"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("config_hash") == fingerprint
    except json.JSONDecodeError:
        return False


def mark_done(stage_dir: Path, fingerprint: str, **info) -> None:
    tmp = stage_dir / "DONE.tmp"
    tmp.write_text(json.dumps({"config_hash": fingerprint, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                               **info}, indent=2))
    tmp.rename(stage_dir / "DONE")


# ---- stage: parent ----------------------------------------------------------------------------
def parent_fingerprint(cfg: RunConfig) -> str:
    return config_hash({"parent": cfg.parent, "parent_dtype": cfg.parent_dtype})


def run_parent(cfg: RunConfig, run_dir: Path) -> Path:
    """Convert the parent into `run_dir/parent` (Nemotron-NAS layout, all-parent blocks)."""
    import shutil

    import torch

    from .info import architecture_table
    from .modeling import DeciLMConfig
    from .parent import convert_parent

    out = run_dir / "parent"
    fingerprint = parent_fingerprint(cfg)
    if stage_done(out, fingerprint):
        print(f"[parent] done already: {out}")
    else:
        if out.exists():
            shutil.rmtree(out)  # a half-written conversion: redo it, it is one step
        tmp = run_dir / "parent.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        convert_parent(cfg.parent, tmp, getattr(torch, cfg.parent_dtype))
        table = architecture_table(DeciLMConfig.from_pretrained(tmp))
        (tmp / "architecture.txt").write_text(table + "\n")
        mark_done(tmp, fingerprint, parent=cfg.parent)
        tmp.rename(out)
    print((out / "architecture.txt").read_text(), end="")
    return out


STAGES: list[tuple[str, Stage]] = [("parent", run_parent)]


def run_pipeline(config_path: str | Path | None, run_dir: Path | None = None, until: str | None = None,
                 force: list[str] = (), overrides: list[str] = ()) -> Path:
    """Run every stage in order, skipping finished ones; return the run directory."""
    import shutil

    cfg = load_run_config(config_path, overrides)
    names = [name for name, _ in STAGES]
    for name in [*force, *([until] if until else [])]:
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    run_dir = Path(run_dir) if run_dir else Path("runs") / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    print(f"puzzlenas run {cfg.name}: parent {cfg.parent} -> {run_dir}")
    for name, stage in STAGES:
        if name in force and (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
        started = time.time()
        stage(cfg, run_dir)
        print(f"[{name}] {time.time() - started:.1f} s")
        if name == until:
            break
    return run_dir
