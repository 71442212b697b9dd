"""What every stage shares: its declaration (`Stage`), where artifacts live (`RunDir`), and the
one place that writes and checks `DONE` markers.

A stage declares what it reads: config fields and upstream stages. Its fingerprint is derived
from that declaration: the hash of those config values and of the upstream stages'
fingerprints. Its `DONE` marker records the fingerprint, the artifact's files with their
sizes, and the content id of every upstream artifact it read; the stage counts as done only
while all three still hold, so redoing (or changing) a stage redoes exactly what follows it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..checkpoint import atomic_write_json
from ..integrity import checksum, first_file_problem

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: what it reads, hence its fingerprint and when it is done.

    config: top-level fields or sections ("seed", "bld"), dotted fields ("search.time_margin",
        hashed under "time_margin"), or (key, function of the config) for a derived value; a
        derived None is left out (a setting added later hashes nothing where it changes nothing,
        so runs made before it still resume).
    upstream: the stages whose artifacts it reads: their fingerprints are hashed (under their
        names) and their content ids recorded in its DONE.
    per_child: folder prefix ("child", "gkd") of a stage with one artifact per solution: its
        fingerprint hashes the stage the solution came from (search, or peers for a peer's
        child) under "search", and its inputs are that stage and the child's upstream folder.
    when: the stage runs only where when(cfg) holds (peers: only with peers.methods); `unasked`
        says so when it does not.
    extra_inputs: more artifacts whose content it reads (eval: every model it evaluates).
    checks_own_work: its partial work records what it was made from (eval's per-model results):
        when its inputs change it is rerun over it; other stages are emptied first.
    table: the file of its folder that `puzzlenas <stage> RUN` prints.
    all_ranks: under torchrun its `run` is called on every rank, which split the work (bld,
        scores, gkd); it still writes each file from one rank (or rank-local parts that one rank
        merges) and returns only when every rank is done. Other stages run on rank 0 alone
        while the other ranks wait (README, design notes: "Several ranks").
    """

    name: str
    config: tuple = ()
    upstream: tuple[Stage, ...] = ()
    per_child: str | None = None
    when: Callable[[RunConfig], bool] | None = None
    unasked: str = ""
    extra_inputs: Callable[[RunConfig, Path], dict[str, Path]] | None = None
    checks_own_work: bool = False
    table: str | None = "table.txt"
    all_ranks: bool = False

    def active(self, cfg: RunConfig) -> bool:
        return self.when is None or bool(self.when(cfg))

    def config_values(self, cfg: RunConfig) -> dict[str, Any]:
        values = {}
        for entry in self.config:
            if isinstance(entry, tuple):
                key, value = entry[0], entry[1](cfg)
                if value is None:  # a setting added later, at the value that reproduces the old behaviour
                    continue
            else:
                key, value = entry.rsplit(".", 1)[-1], cfg
                for part in entry.split("."):
                    value = getattr(value, part)
            values[key] = value
        return values

    def fingerprint(self, cfg: RunConfig, record: dict | None = None) -> str:
        """Hash of the declared config and the upstream fingerprints (per child: of `record`'s)."""
        from ..config import config_hash

        parts = self.config_values(cfg)
        if self.per_child:
            parts["search"] = self.solution_source(record).fingerprint(cfg)
        else:
            parts.update({u.name: u.fingerprint(cfg) for u in self.upstream if u.active(cfg)})
        return config_hash(parts)

    def solution_source(self, record: dict) -> Stage:
        """The stage a child's solution came from: peers for a peer's child, else search."""
        first = self.upstream[0]
        if first.per_child:
            return first.solution_source(record)
        wanted = "peers" if record.get("peer") else "search"
        return next(u for u in self.upstream if u.name == wanted)

    def folder(self, run_dir: Path, record: dict | None = None) -> Path:
        return RunDir(run_dir).child(self.per_child, record["name"]) if self.per_child else run_dir / self.name

    def inputs(self, cfg: RunConfig, run_dir: Path, record: dict | None = None) -> dict[str, Path]:
        """The upstream artifacts this stage (or this child) reads, by name."""
        if self.per_child:
            source = self.solution_source(record)
            found = {source.name: run_dir / source.name}
            if self.upstream[0].per_child:
                before = self.upstream[0].folder(run_dir, record)
                found[before.name] = before
        else:
            found = {u.name: run_dir / u.name for u in self.upstream if u.active(cfg)}
        if self.extra_inputs:
            found.update(self.extra_inputs(cfg, run_dir))
        return found

    def why_not_done(self, cfg: RunConfig, run_dir: Path, record: dict | None = None) -> str | None:
        """None when this stage's artifact (or this child's) is finished for this config and these
        inputs; else why not."""
        return why_not_done(self.folder(run_dir, record), self.fingerprint(cfg, record),
                            self.inputs(cfg, run_dir, record))

    def mark_done(self, cfg: RunConfig, run_dir: Path, folder: Path | None = None, record: dict | None = None,
                  **info) -> None:
        """Write the DONE marker into `folder` (default: the stage's own; a temp folder before it is
        renamed into place)."""
        mark_done(folder or self.folder(run_dir, record), self.fingerprint(cfg, record),
                  self.inputs(cfg, run_dir, record), **info)


class RunDir:
    """Where each artifact of a run directory lives: `runs/NAME/{config.yaml, run.log, parent/,
    data/, library/, bld/, scores/, costs/, search/, peers/, child-*/, gkd-*/, eval/, report/}`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def child(self, prefix: str, name: str) -> Path:
        """child-<name>/ (assembled) or gkd-<name>/ (distilled); names are checked at config load."""
        from ..sections import check_name

        check_name(f"{prefix} name", name)
        return self.root / f"{prefix}-{name}"

    config = property(lambda self: self.root / "config.yaml")
    log = property(lambda self: self.root / "run.log")
    parent = property(lambda self: self.root / "parent")
    data = property(lambda self: self.root / "data")
    library = property(lambda self: self.root / "library")
    space = property(lambda self: self.root / "library" / "space.json")
    calibration = property(lambda self: self.root / "library" / "calibration.safetensors")
    bld = property(lambda self: self.root / "bld")
    scores = property(lambda self: self.root / "scores" / "scores.jsonl")
    costs = property(lambda self: self.root / "costs" / "costs.json")
    solutions = property(lambda self: self.root / "search" / "solutions.jsonl")
    peer_solutions = property(lambda self: self.root / "peers" / "solutions.jsonl")
    unreachable = property(lambda self: self.root / "peers" / "unreachable.json")
    eval = property(lambda self: self.root / "eval")
    report = property(lambda self: self.root / "report")
    chat_rows = property(lambda self: self.root / "gkd-chat" / "rows.safetensors")


# ---- DONE markers: the one place that writes and reads them -------------------------------------
NOT_FINISHED = "not finished"  # no marker: a first run, or one killed half-way (resume its checkpoints)
SETTINGS_CHANGED = "its settings changed"  # other reasons: what it holds is stale, start over


def read_done(folder: Path) -> dict | None:
    try:
        done = json.loads((folder / "DONE").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done if isinstance(done, dict) else None


def content_id(folder: Path) -> str | None:
    """The id of what an artifact holds, new with every DONE written (markers written before
    content ids existed: their fingerprint)."""
    done = read_done(folder) or {}
    return done.get("content", done.get("config_hash"))


def artifact_files(folder: Path) -> dict[str, int]:
    """Every file of an artifact folder (the DONE marker excepted), relative path -> size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != "DONE"}


def mark_done(folder: Path, fingerprint: str, inputs: dict[str, Path] | None = None, **info) -> None:
    """The marker a finished artifact ends with: its fingerprint, files with sizes and checksums
    (integrity.py: whole-file CRC-32 up to 16 MiB, sampled above), the content ids of what it
    read, and a content id of its own."""
    files = artifact_files(folder)
    checksums = {rel: checksum(folder / rel) for rel in files}
    read = {key: content_id(path) for key, path in (inputs or {}).items()}
    finished = time.strftime("%Y-%m-%d %H:%M:%S")
    content = hashlib.sha256(json.dumps([fingerprint, time.time_ns(), files, read]).encode()).hexdigest()[:16]
    atomic_write_json(folder / "DONE", {"config_hash": fingerprint, "finished": finished, "content": content,
                                        "inputs": read, "files": files, "checksums": checksums, **info})


def why_not_done(folder: Path, fingerprint: str, inputs: dict[str, Path] | None = None) -> str | None:
    """None when `folder` holds a finished artifact for `fingerprint` whose files are intact and
    whose inputs are the ones it was made from; else the reason."""
    done = read_done(folder)
    if done is None:
        return NOT_FINISHED
    if done.get("config_hash") != fingerprint:
        return SETTINGS_CHANGED
    problem = first_file_problem(folder, done)
    if problem:
        return problem
    recorded = done.get("inputs")
    if recorded is not None:  # markers written before inputs were recorded: the fingerprint alone
        for key, path in (inputs or {}).items():
            if recorded.get(key) != content_id(path):
                return f"{key} changed since it ran"
    return None


def damaged_units(folder: Path) -> list[Path]:
    """The finished units of work (sub-folders with a DONE of their own: BLD jobs) that hold the
    files of `folder` found missing or changed; [] when a damaged file belongs to no such unit
    (then the whole stage is redone) or nothing is damaged."""
    from ..integrity import file_problem

    done = read_done(folder) or {}
    files, checksums = done.get("files", {}), done.get("checksums", {})
    units = []
    for rel, size in files.items():
        if file_problem(folder / rel, size, checksums.get(rel)) is None:
            continue
        # the innermost enclosing folder whose own DONE the stage recorded (even if deleted since)
        unit = next((p for p in (folder / rel).parents if folder in p.parents and
                     f"{p.relative_to(folder).as_posix()}/DONE" in files), None)
        if unit is None:
            return []
        if unit not in units:
            units.append(unit)
    return units
