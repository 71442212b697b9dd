"""One place for torchrun: rank and world size, barriers, shutdown, the device of this rank, and
the pipeline's rule for several ranks: rank 0 decides, one rank writes each artifact.

World size 1 never touches torch.distributed, so single-device code runs without it.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# A rank waits at a barrier while rank 0 alone runs a stage (eval of an 8B model takes hours):
# the process group's timeout must outlast the longest such stage. A rank that dies is not
# waited for: torchrun stops the whole group as soon as one rank fails.
TIMEOUT_ENV = "PUZZLENAS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment, initializing the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank; NCCL uses the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """After a torchrun job: every rank done talking, then the process group destroyed (a gloo or
    NCCL group left to interpreter shutdown can abort the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world_size: int) -> None:
    """Wait for every rank (nothing to wait for with one)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def rank_zero_value(value: Any) -> Any:
    """Rank 0's `value` on every rank (a collective; the others' `value` is ignored). For the
    decisions every rank must take alike: is a stage done, which children are left, which
    parallelism: judged once, from the files as rank 0 saw them."""
    rank, world = distributed_rank()
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class FailedOnRankZero(RuntimeError):
    """What the other ranks raise when the work rank 0 did alone failed there."""


def on_rank_zero(work: Callable[[], T], what: str) -> T | None:
    """Run `work` on rank 0 while the other ranks wait; every rank returns together (the others
    get None). When it fails on rank 0 the others raise FailedOnRankZero instead of waiting at
    the next collective for a rank that is gone."""
    rank, world = distributed_rank()
    if world == 1:
        return work()
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except BaseException as err:  # the others must hear of it before rank 0 goes down
            error = f"{type(err).__name__}: {err}"
            rank_zero_value(error)
            raise
    error = rank_zero_value(error)
    if error is not None:
        raise FailedOnRankZero(f"{what} failed on rank 0: {error}")
    return result


def resolve_device(name: str):
    """`auto` is this rank's GPU when there is one, else the CPU; other names as torch reads them."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():  # else a bare AssertionError from torch
        raise ValueError(f"device={name} but torch sees no CUDA GPU here: use device=cpu or device=auto")
    return device
