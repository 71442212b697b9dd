"""One place for torchrun: rank and world size, barriers, shutdown, the device of this rank.

World size 1 never touches torch.distributed, so single-device code runs without it.
"""

from __future__ import annotations

import os


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
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
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
