"""A run directory that does not lie: checksums of finished artifacts, their check before use,
non-finite weights named where they are loaded, and the lock that keeps two runs out of one folder.

Checksums (recorded in each DONE marker under "checksums": {file: [mtime_ns, digest]}):
- a file up to FULL_HASH_BYTES (16 MiB) is checksummed whole (CRC-32: ~2 GB/s on an idle core,
  ~0.05 s per 100 MB);
- a larger file (a parent, a child) hashes its size and SAMPLES evenly spaced 64 KiB blocks
  (first and last included): constant time whatever the size. A truncation or an appended tail
  always shows (the size is recorded too); a change inside a large file shows when it touches a
  sampled block, and NaN weights are caught anyway where weights are loaded.
- a check first compares size and mtime: an untouched file costs one stat(). Only a file whose
  mtime moved (edited in place, or copied without keeping times) is hashed again, so a file that
  was merely touched or copied still passes.

Torch-free except `first_non_finite` / `check_finite` (torch imported inside).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FULL_HASH_BYTES = 16 * 2**20
SAMPLES = 64
SAMPLE_BYTES = 64 * 2**10


class ArtifactError(ValueError):
    """A finished artifact that changed since it was written (or weights that are not finite)."""


class LockError(RuntimeError):
    """Another process holds the run directory."""


# ---- checksums ----------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """CRC-32 of the whole file, or of its size and SAMPLES blocks when it is larger than
    FULL_HASH_BYTES ("s:" prefix). CRC-32 is made to detect accidental damage (not tampering),
    and is the cheapest check zlib has: ~2x faster than SHA-256 here."""
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(2**20):
                crc = zlib.crc32(chunk, crc)
            return f"{crc:08x}"
        crc = zlib.crc32(str(size).encode())
        step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
        for k in range(SAMPLES):
            f.seek(int(k * step))
            crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return f"s:{crc:08x}"


def checksum(path: Path) -> list:
    """[mtime_ns, digest] of a file, as a DONE marker records it."""
    return [path.stat().st_mtime_ns, file_digest(path)]


def file_problem(path: Path, size: int, recorded: list | None) -> str | None:
    """None when `path` is as a DONE marker recorded it (size, and checksum when recorded); else
    what is wrong with it."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path} is missing"
    if stat.st_size != size:
        return f"{path} has {stat.st_size:,} bytes, {size:,} when it was written (truncated or changed)"
    if recorded and stat.st_mtime_ns != recorded[0] and file_digest(path) != recorded[1]:
        return f"{path} changed since it was written (its checksum differs)"
    return None


def stage_of(folder: Path) -> str:
    """The stage whose artifact `folder` is (child-* folders: assemble; gkd-*: gkd)."""
    name = folder.name
    if name.startswith("child-"):
        return "assemble"
    if name.startswith("gkd-"):
        return "gkd"
    return name


def rerun_hint(folder: Path) -> str:
    """How to redo the stage that wrote `folder` (a stage folder of a run directory)."""
    return f"rerun its stage: puzzlenas run {folder.parent} --force {stage_of(folder)}"


def verify_artifact(folder: Path) -> None:
    """Raise ArtifactError naming the file and the stage to rerun when a finished artifact (a
    folder with a DONE marker) is not what its marker recorded. Folders without a marker (a
    model from elsewhere) pass: there is nothing to compare them with."""
    try:
        done = json.loads((folder / "DONE").read_text())
    except (OSError, json.JSONDecodeError):
        return
    problem = first_file_problem(folder, done)
    if problem:
        raise ArtifactError(f"{problem}: {rerun_hint(folder)}")


def first_file_problem(folder: Path, done: dict) -> str | None:
    """The first recorded file of `folder` that is missing, resized or changed (None: all intact)."""
    checksums = done.get("checksums", {})
    for rel, size in done.get("files", {}).items():
        problem = file_problem(folder / rel, size, checksums.get(rel))
        if problem:
            return problem
    return None


# ---- non-finite weights --------------------------------------------------------------------------
def first_non_finite(tensors) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor with a NaN or an infinity, else None.
    `tensors`: a dict of tensors or (name, tensor) pairs (a module's named_parameters)."""
    import torch

    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, t in items:
        if t.is_floating_point() and t.device.type != "meta":
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad
    return None


def check_finite(tensors, where: str, fix: str) -> None:
    """Raise ArtifactError naming `where` (a file) and the tensor when a weight is not finite."""
    found = first_non_finite(tensors)
    if found:
        name, bad = found
        raise ArtifactError(f"{where}: tensor {name} has {bad:,} non-finite values (NaN or inf); {fix}")


def load_weights(path: Path, fix: str) -> dict:
    """A safetensors file's tensors; an unreadable (truncated, corrupted) file or a non-finite
    tensor is an ArtifactError naming the file (and the tensor) and `fix`."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # SafetensorError, OSError: the file, not the code, is at fault
        raise ArtifactError(f"{path} is not a readable safetensors file ({err}); {fix}") from err
    check_finite(tensors, str(path), fix)
    return tensors


def check_model_finite(model: torch.nn.Module, where: str, fix: str) -> None:
    check_finite(list(model.state_dict().items()), where, fix)


def weights_name(folder: Path) -> str:
    """The weights file of a model folder (its only *.safetensors, else the folder) for messages."""
    files = sorted(Path(folder).glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else str(folder)


def fix_for(folder: Path) -> str:
    """What to do about damaged weights in `folder`: rerun the stage that wrote it (a run's
    artifact), else replace the checkpoint (a model from elsewhere)."""
    if (Path(folder) / "DONE").is_file():
        return rerun_hint(Path(folder))
    return "the checkpoint itself is damaged: re-download or re-export it"


def load_model_checked(folder: Path, dtype: torch.dtype):
    """A puzzlenas model folder (parent, child): verified against its DONE marker, loaded, and
    its weights checked finite; damage is an ArtifactError naming the file and the fix."""
    from safetensors import SafetensorError

    from .model.modeling import DeciLMForCausalLM

    verify_artifact(Path(folder))
    try:
        model = DeciLMForCausalLM.from_pretrained(folder, dtype=dtype)
    except SafetensorError as err:
        raise ArtifactError(f"{weights_name(folder)} is not a readable safetensors file ({err}); "
                            f"{fix_for(folder)}") from err
    check_model_finite(model, weights_name(folder), fix_for(folder))
    return model


# ---- the run lock --------------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory while a run works in it: `run_dir/LOCK`, held with
    flock (released by the kernel when the process dies, so a killed run never leaves a lock
    that blocks) and naming its holder (PID, host, start time, command) for the message a second
    run gets. A LOCK file still naming a holder while nobody holds it is what a killed run left:
    it is taken over, and said so."""

    def __init__(self, run_dir: Path, log=print):
        self.path = Path(run_dir) / "LOCK"
        self.log = log
        self.handle = None

    def acquire(self) -> None:
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(handle)
            handle.close()
            raise LockError(f"{self.path.parent} is in use by {describe(holder)}: wait for it to finish or stop "
                            f"it; two runs in one folder would overwrite each other's files") from None
        previous = self._holder(handle)
        if previous:  # nobody holds it, yet it names a holder: a run killed before releasing it
            self.log(f"[lock] took over the lock left by {describe(previous)}, which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        """Empty the file, then unlock (the file stays: deleting it would let two processes lock
        two different files of the same name)."""
        if self.handle is None:
            return
        import fcntl

        self.handle.seek(0)
        self.handle.truncate()
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None

    @staticmethod
    def _holder(handle) -> dict | None:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "null")
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (f"PID {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}: "
            f"{holder.get('command', '?')})")
