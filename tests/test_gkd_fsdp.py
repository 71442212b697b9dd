"""GKD with two ranks (gloo, FSDP2 on CPU) equals one rank on the concatenated batches."""

import os
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from puzzlenas.gkd import GKDConfig, GKDTrainer, _full_state, parallelize
from tests.test_child import make_child

STEPS, B, T = 3, 2, 16


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 128, (B, T), generator=g) for _ in range(STEPS)]


def config() -> GKDConfig:
    return GKDConfig(tokens=STEPS * B * T * 2, batch_size=B, lr=1e-3, warmup_fraction=0.0)


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    parent, child = make_child(seed=0), make_child(seed=1)
    parent.requires_grad_(False)
    parallelize(child, parent)
    trainer = GKDTrainer(child, parent, config(), Path(out) / "ckpt", T, world_size=2, log=lambda *a: None)
    trainer.train(batches(rank))
    state = _full_state(child)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "sharded.safetensors"))
    dist.destroy_process_group()


def test_fsdp2_two_ranks_match_one_rank(tmp_path):
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    sharded = load_file(str(tmp_path / "sharded.safetensors"))

    parent, child = make_child(seed=0), make_child(seed=1)
    parent.requires_grad_(False)
    cfg = config()
    cfg.batch_size = 2 * B  # one rank sees both ranks' rows at every step
    single = GKDTrainer(child, parent, cfg, tmp_path / "single", T, log=lambda *a: None)
    single.train([torch.cat([a, b]) for a, b in zip(batches(0), batches(1))])
    moved = 0
    for name, value in child.state_dict().items():
        assert torch.allclose(sharded[name], value, atol=2e-5), name
        moved += not torch.equal(value, make_child(seed=1).state_dict()[name])
    assert moved > 10  # training changed the weights
