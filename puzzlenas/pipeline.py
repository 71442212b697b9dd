"""The pipeline: the stage list, `run_pipeline`, and the run log.

Each stage is a module of `puzzlenas/stages/` with a declaration (`STAGE`: the config it
reads and the stages upstream of it), `run(cfg, run_dir) -> Path` and a table. The pipeline
runs them in order; a stage whose DONE marker still matches (same fingerprint, files intact,
same upstream content: `stages/base.py`) is skipped, so a killed run resumes at the first
unfinished stage and a redone stage redoes exactly the stages after it. Stages with one
artifact per child (assemble, gkd) skip the children that are done themselves.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from .dist import barrier, distributed_rank, on_rank_zero, rank_zero_value
from .integrity import verify_artifact
from .stages.base import NOT_FINISHED, SETTINGS_CHANGED, RunDir, damaged_units

# The stage list, in the order they run; each name is a module of puzzlenas/stages/.
STAGE_NAMES = ("parent", "data", "teacher", "library", "bld", "scores", "costs", "search", "peers", "assemble", "gkd",
               "eval", "report", "export")


def stage_module(name: str) -> ModuleType:
    """`puzzlenas.stages.<name>` (light: method code is imported inside its `run`)."""
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"puzzlenas.stages.{name}")


def run_pipeline(config_path: str | Path | None, run_dir: Path | None = None, until: str | None = None,
                 force: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Run every stage in order (up to `until`), skipping finished ones and redoing the `force`d
    ones; return the run directory. Under torchrun every rank calls it (see `run_stage`)."""
    from .checkpoint import atomic_write_text
    from .config import dump_yaml, load_run_config

    from .progress import quiet_library_bars

    cfg = load_run_config(config_path, overrides)
    quiet_library_bars()
    for name in [*force, *([until] if until else [])]:
        stage_module(name)  # an unknown name fails before anything runs
    run_dir = Path(run_dir) if run_dir else Path("runs") / cfg.name
    rank, world = distributed_rank()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(world)
    with run_lock(run_dir):  # before anything is written: a second run must not touch the first's files
        if rank == 0:
            atomic_write_text(RunDir(run_dir).config, dump_yaml(cfg))
        barrier(world)
        run_stages(cfg, config_path, run_dir, until, force, overrides, world)
    return run_dir


def run_lock(run_dir: Path):
    """The run directory's lock (integrity.RunLock); under torchrun rank 0 alone takes it (the
    ranks of one run share the folder; if rank 0 is refused it exits, and torchrun stops the
    others)."""
    from .integrity import RunLock

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return RunLock(run_dir)


def run_stages(cfg, config_path, run_dir: Path, until: str | None, force, overrides, world: int) -> None:
    with log_to(RunDir(run_dir).log, f"config {config_path or 'default preset'}, overrides {list(overrides)}, "
                                     f"until {until}, force {list(force)}"
                                     + (f", {world} ranks" if world > 1 else "")):
        rank = distributed_rank()[0]
        if rank == 0:  # under torchrun the run's own lines once, from rank 0 (two ranks' prints interleave)
            print(f"puzzlenas run {cfg.name}: parent {cfg.parent} -> {run_dir}")
        for name in STAGE_NAMES:
            module = stage_module(name)
            if name in force:
                forget(module.STAGE, cfg, run_dir)
            started = time.time()
            if run_stage(module, cfg, run_dir, show_table=name == until) and rank == 0:
                print(f"[{name}] {time.time() - started:.1f} s")
            if name == until:
                break
        if until is None or STAGE_NAMES.index(until) >= STAGE_NAMES.index("eval"):
            print_missed_targets(run_dir)  # the summary of a run that measured its children


def print_missed_targets(run_dir: Path) -> None:
    """The run summary's last word: every child that missed its speedup target when measured."""
    import json

    path = RunDir(run_dir).eval / "results.json"
    if not path.is_file():
        return
    from .stages.eval import missed_lines

    lines = missed_lines(json.loads(path.read_text()))
    print(f"puzzlenas run: {len(lines)} target(s) missed when measured" + "".join(f"\n  {line}" for line in lines)
          if lines else "puzzlenas run: every child meets its speedup target when measured")


def run_stage(module: ModuleType, cfg, run_dir: Path, show_table: bool = False) -> bool:
    """One stage: skipped when not asked for or done already (then its table is printed when
    `show_table`), run otherwise. Returns whether it ran.

    Under torchrun (the rule every stage follows; README, design notes): rank 0 judges whether
    the stage is done and every rank takes its answer; deletions are rank 0's, then a barrier;
    a stage declared `all_ranks` runs on every rank (it splits its work and writes each file
    from one rank), any other runs on rank 0 while the others wait; no rank starts the next
    stage before the stage is finished on every rank."""
    stage = module.STAGE
    if not stage.active(cfg):
        print(f"[{stage.name}] {stage.unasked or 'not asked for in this config'}")
        return False
    rank, world = distributed_rank()
    if not stage.per_child:  # each child is checked by the stage itself
        reason = rank_zero_value(stage.why_not_done(cfg, run_dir) if rank == 0 else None)
        if reason is None:
            print(f"[{stage.name}] done already: {stage.folder(run_dir)}")
            if show_table:
                print(stage_table(stage, run_dir), end="")
            return False
        if reason != NOT_FINISHED:
            print(f"[{stage.name}] redone: {reason}")
        if reason not in (NOT_FINISHED, SETTINGS_CHANGED) and not stage.checks_own_work:
            units = damaged_units(stage.folder(run_dir)) if rank == 0 else []
            if units:  # damage confined to finished units of work (BLD jobs): redo only those
                print(f"[{stage.name}] redoing only {', '.join(str(u.relative_to(run_dir)) for u in units)}")
                forget_units(units + [stage.folder(run_dir) / "DONE"])
            else:
                forget(stage, cfg, run_dir)  # made from other inputs, or changed since: none of it is worth resuming
        if rank == 0:
            for folder in stage.inputs(cfg, run_dir).values():
                verify_artifact(folder)  # what it reads is what its DONE recorded (else: the file, the stage to rerun)
    if stage.all_ranks:
        module.run(cfg, run_dir)
        barrier(world)
    else:
        on_rank_zero(lambda: module.run(cfg, run_dir), f"stage {stage.name}")
    return True


def forget_units(paths: list[Path]) -> None:
    """Delete damaged units of work (folders) and a stage's DONE, rank 0 alone under torchrun."""
    rank, world = distributed_rank()
    if rank == 0:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    barrier(world)


def stage_table(stage, run_dir: Path) -> str:
    """The table a finished stage wrote (empty for stages without one)."""
    path = stage.folder(run_dir) / stage.table if stage.table else None
    return path.read_text() if path and path.is_file() else ""


def forget(stage, cfg, run_dir: Path) -> None:
    """`--force`: delete the stage's artifacts (for per-child stages, every child's folder and its
    work folders). Only folders named by the run's layout, all inside `run_dir`. Under torchrun
    rank 0 deletes while the others wait."""
    from .stages.common import solutions

    rank, world = distributed_rank()
    if rank == 0:
        if stage.per_child:
            if not RunDir(run_dir).solutions.is_file():
                folders = []  # no child yet
            else:
                folders = [stage.folder(run_dir, r) for r in solutions(run_dir, cfg)]
                folders += [f.with_name(f.name + suffix) for f in list(folders) for suffix in (".tmp", ".work")]
        else:
            folders = [stage.folder(run_dir)]
        for folder in folders:
            if folder.exists():
                shutil.rmtree(folder)
    barrier(world)


class _Tee:
    """A stdout that also appends to a log file (progress bars go to stderr and stay out of it)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def log_to(path: Path, header: str):
    """Everything the run prints, appended to `path` with a dated header per invocation (rank 0
    only under torchrun); an error ends the log with its message."""
    from .checkpoint import atomic_write_text

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if path.exists() and path.stat().st_nlink > 1:  # a hard-linked copy of a run: append to our own file
        atomic_write_text(path, path.read_text(encoding="utf-8"))
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} puzzlenas run: {header}\n")
        original = sys.stdout
        sys.stdout = _Tee(original, log)
        try:
            yield
        except BaseException as err:
            log.write(f"==== stopped: {type(err).__name__}: {err}\n{traceback.format_exc()}")
            err.run_log = path  # the CLI's one-line message says where the traceback is
            raise
        finally:
            sys.stdout = original
