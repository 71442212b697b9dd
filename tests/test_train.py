"""Shared trainer plumbing (train.py) and run-dir files (checkpoint.py): schedule, optimizer
groups, autocast, clipping, non-finite losses, checkpoints stamped with their settings."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from puzzlenas.checkpoint import read_jsonl, reset_if_stale, write_jsonl
from puzzlenas.gkd import GKDConfig, GKDError, GKDTrainer
from puzzlenas.train import (TrainingCheckpoint, TrainingError, adamw, autocast, autocast_dtype, clip_gradients,
                             lr_scheduler, raise_if_non_finite, warmup_cosine)
from tests.test_child import MIXED_BLOCKS, make_child

STEPS, B, T = 4, 2, 16


@pytest.fixture(autouse=True)
def one_thread():
    # Bitwise comparisons between runs need the same CPU reduction order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- schedule, optimizer, autocast, gradients -----------------------------------------------
def test_warmup_then_cosine_to_the_floor():
    values = [warmup_cosine(s, 100, warmup_fraction=0.1, min_lr_fraction=0.2) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:10], values[1:10]))  # rising through the warm-up
    assert all(a >= b for a, b in zip(values[10:100], values[11:101]))  # then falling
    assert values[55] == pytest.approx(0.2 + 0.8 * 0.5)  # half way down the cosine
    assert values[100:] == [pytest.approx(0.2)] * 20  # the floor, also past the end
    assert warmup_cosine(0, 10, 0.0, 0.0) == 1.0  # no warm-up: the full lr at once


def test_scheduler_and_adamw_groups_follow_the_config():
    cfg = GKDConfig(lr=1e-3, weight_decay=0.3, betas=[0.8, 0.9], warmup_fraction=0.5, min_lr_fraction=0.0)
    model = make_child()
    optimizer = adamw(model.parameters(), cfg, torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms and norms <= {id(p) for p in no_decay["params"]}
    assert decay["betas"] == (0.8, 0.9)
    scheduler = lr_scheduler(optimizer, 4, cfg)
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # warm-up 2 steps, then the cosine from 1


def test_autocast_setting():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, None), torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert (a @ b).dtype == torch.float32


def test_clip_gradients_caps_the_global_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0)  # norm 5
    clip_gradients(params, 1.0)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    assert norm.item() == pytest.approx(1.0, rel=1e-5)
    clip_gradients(params, 10.0)  # below the cap: unchanged
    assert torch.sqrt(sum(p.grad.pow(2).sum() for p in params)).item() == pytest.approx(1.0, rel=1e-5)


def test_non_finite_loss_names_what_diverged_and_the_fix():
    raise_if_non_finite({"a": torch.tensor(1.0), "b": 2.0}, 3, "bld", 1e-3)  # finite: nothing happens
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7 in b, c\. Lower bld\.lr \(now 0\.001\)"):
        raise_if_non_finite({"a": torch.tensor(1.0), "b": torch.tensor(float("nan")), "c": float("inf")},
                            7, "bld", 1e-3)


# ---- GKD killed and resumed ----------------------------------------------------------------
def gkd_config(**changes) -> GKDConfig:
    return dataclasses.replace(GKDConfig(tokens=STEPS * B * T, batch_size=B, lr=1e-3, warmup_fraction=0.25,
                                         checkpoint_every=1), **changes)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (B, T), generator=g) for _ in range(STEPS)]


def gkd(cfg: GKDConfig, out, logs: list, data: list[torch.Tensor]) -> tuple[GKDTrainer, dict]:
    parent, child = make_child(seed=0), make_child(seed=1)
    parent.requires_grad_(False)
    trainer = GKDTrainer(child, parent, cfg, out, T, log=logs.append)
    trainer.train(data)
    return trainer, {k: v.clone() for k, v in child.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gkd_resumes_a_killed_run_to_the_uninterrupted_result(tmp_path):
    _, reference = gkd(gkd_config(), tmp_path / "reference", [], batches())
    killed, _ = gkd(gkd_config(), tmp_path / "run", [], batches()[:2])  # stops like a run killed after 2 steps
    meta = json.loads((tmp_path / "run" / "ckpt.json").read_text())
    assert meta["step"] == 2 and len(meta["fingerprint"]) == 16
    logs = []
    resumed, got = gkd(gkd_config(), tmp_path / "run", logs, batches())
    assert [line for line in logs if "gkd step" not in line] == ["  resumed GKD at step 2"]
    assert [line.split(":")[0] for line in logs if "gkd step" in line] == ["  gkd step 3/4", "  gkd step 4/4"]
    assert resumed.step == STEPS and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert_same_weights(got, reference)
    assert resumed.history == killed.history + resumed.history[2:]


def test_gkd_with_changed_settings_starts_over(tmp_path):
    changed = gkd_config(lr=3e-3)
    _, reference = gkd(changed, tmp_path / "reference", [], batches())
    gkd(gkd_config(), tmp_path / "run", [], batches()[:2])  # killed with the old lr
    logs = []
    trainer, got = gkd(changed, tmp_path / "run", logs, batches())
    (line,) = [line for line in logs if "gkd step" not in line]
    assert "GKD checkpoint" in line and "made with other settings" in line and "starting over" in line
    assert [h["step"] for h in trainer.history] == [1, 2, 3, 4]
    assert_same_weights(got, reference)  # as if the old checkpoint had never been there


def test_gkd_non_finite_loss_is_a_gkd_error(tmp_path, monkeypatch):
    real = GKDTrainer.loss_and_backward

    def nan_loss(self, batch):
        parts = real(self, batch)
        return {**parts, "loss": parts["loss"] * float("nan")}

    monkeypatch.setattr(GKDTrainer, "loss_and_backward", nan_loss)
    with pytest.raises(GKDError, match="non-finite loss at step 1 in the GKD loss. Lower gkd.lr"):
        gkd(gkd_config(), tmp_path / "nan", [], batches())
    assert not (tmp_path / "nan" / "ckpt.json").exists()  # stopped before the checkpoint


# ---- the checkpoint files ------------------------------------------------------------------
def tiny_training(seed: int = 0, tied: bool = False):
    model = make_child(seed=seed, tie_word_embeddings=tied)
    cfg = GKDConfig(lr=1e-2)
    optimizer = adamw(model.parameters(), cfg, torch.device("cpu"))
    scheduler = lr_scheduler(optimizer, 10, cfg)
    return model, optimizer, scheduler


def take_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        model(input_ids=torch.randint(0, 128, (1, 8))).logits.float().pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip_restores_model_optimizer_schedule_and_rng(tmp_path, tied):
    model, optimizer, scheduler = tiny_training(tied=tied)
    take_steps(model, optimizer, scheduler, 2)
    TrainingCheckpoint(tmp_path, "abc").save(model, optimizer, scheduler, 2, extra={"note": [1, 2]})
    expected_draw = torch.rand(3)  # the RNG state was saved before this draw

    other, other_opt, other_sched = tiny_training(seed=5, tied=tied)
    saved = TrainingCheckpoint(tmp_path, "abc").load(other, other_opt, other_sched)
    assert saved == {"step": 2, "world_size": 1, "extra": {"note": [1, 2]}}
    assert torch.equal(torch.rand(3), expected_draw)
    assert other_sched.last_epoch == 2 and other_sched.get_last_lr() == scheduler.get_last_lr()
    assert_same_weights(other.state_dict(), model.state_dict())
    if tied:
        assert other.lm_head.weight is other.model.embed_tokens.weight
    names = {id(p): n for n, p in model.named_parameters()}
    other_params = dict(other.named_parameters())
    assert len(optimizer.state) > 10
    for p, state in optimizer.state.items():
        restored = other_opt.state[other_params[names[id(p)]]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[key], state[key]), (names[id(p)], key)


def test_checkpoint_continues_bit_identically(tmp_path):
    model, optimizer, scheduler = tiny_training()
    take_steps(model, optimizer, scheduler, 2)
    TrainingCheckpoint(tmp_path, "abc").save(model, optimizer, scheduler, 2)
    take_steps(model, optimizer, scheduler, 2)  # draws its batches from the RNG saved above
    other, other_opt, other_sched = tiny_training(seed=5)
    TrainingCheckpoint(tmp_path, "abc").load(other, other_opt, other_sched)
    take_steps(other, other_opt, other_sched, 2)  # same RNG state restored: the same batches
    assert_same_weights(other.state_dict(), model.state_dict())


def test_torn_or_foreign_checkpoints_start_over_in_one_line(tmp_path):
    model, optimizer, scheduler = tiny_training()
    take_steps(model, optimizer, scheduler, 1)
    ckpt = TrainingCheckpoint(tmp_path, "abc", label="test checkpoint")
    ckpt.save(model, optimizer, scheduler, 1)
    meta = json.loads(ckpt.meta_path.read_text())

    logs = []
    assert TrainingCheckpoint(tmp_path, "other", log=logs.append).load(*tiny_training()) is None
    assert len(logs) == 1 and "made with other settings" in logs[0]

    ckpt.meta_path.write_text(json.dumps({**meta, "step": 3}))  # killed between the two writes
    logs.clear()
    assert TrainingCheckpoint(tmp_path, "abc", log=logs.append).load(*tiny_training()) is None
    assert len(logs) == 1 and "unreadable" in logs[0] and "step 1" in logs[0]

    ckpt.meta_path.write_text(json.dumps(meta))
    ckpt.tensors_path.write_bytes(ckpt.tensors_path.read_bytes()[:100])  # truncated
    logs.clear()
    assert TrainingCheckpoint(tmp_path, "abc", log=logs.append).load(*tiny_training()) is None
    assert len(logs) == 1 and "unreadable" in logs[0]

    ckpt.clear()
    assert not ckpt.exists() and TrainingCheckpoint(tmp_path, "abc").load(*tiny_training()) is None


def test_checkpoint_of_another_model_starts_over_and_loads_nothing(tmp_path):
    model, optimizer, scheduler = tiny_training()
    TrainingCheckpoint(tmp_path, "abc").save(model, optimizer, scheduler, 0)
    logs = []
    for other in (make_child(blocks=MIXED_BLOCKS[:3]), make_child(blocks=MIXED_BLOCKS[1:2] + MIXED_BLOCKS[1:])):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        opt = adamw(other.parameters(), GKDConfig(), torch.device("cpu"))
        assert TrainingCheckpoint(tmp_path, "abc", log=logs.append).load(other, opt, lr_scheduler(opt, 10, GKDConfig())) is None
        assert_same_weights(other.state_dict(), before)
    assert len(logs) == 2 and all("of another model" in line and "starting over" in line for line in logs)
    assert "9 unexpected" in logs[0] and "other shapes" in logs[1]


def test_checkpoint_that_fails_while_loading_is_an_error(tmp_path, monkeypatch):
    model, optimizer, scheduler = tiny_training()
    TrainingCheckpoint(tmp_path, "abc").save(model, optimizer, scheduler, 0)
    other, opt, sched = tiny_training()
    monkeypatch.setattr(opt, "load_state_dict", lambda state: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(TrainingError, match="does not fit this model.*boom.*delete"):
        TrainingCheckpoint(tmp_path, "abc").load(other, opt, sched)


# ---- run-dir files -------------------------------------------------------------------------
def test_jsonl_round_trip_and_corruption_names_line_and_stage(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"a": 1}, {"b": [1.5, "x"]}]
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    path.write_text('{"a": 1}\n{"b": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 2 is not JSON.*--force scores"):
        read_jsonl(path, "scores")
    with pytest.raises(ValueError, match=r"missing.jsonl is missing.*--force search"):
        read_jsonl(tmp_path / "missing.jsonl", "search")


def test_reset_if_stale_names_the_stage_it_resets(tmp_path):
    out = tmp_path / "scores"
    logs = []
    reset_if_stale(out, "one", log=logs.append)
    (out / "part.json").write_text("{}")
    reset_if_stale(out, "one", log=logs.append)
    assert logs == [] and (out / "part.json").is_file()  # same settings: kept
    reset_if_stale(out, "two", log=logs.append)
    assert len(logs) == 1 and logs[0].startswith("[scores] ")
    assert not (out / "part.json").exists() and (out / "fingerprint").read_text() == "two"
    (stale,) = tmp_path.glob("scores.stale-*")
    assert (stale / "part.json").is_file()


# ---- two ranks (gloo, FSDP2 on CPU) ----------------------------------------------------------
def _two_rank_main(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from puzzlenas.gkd import parallelize

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    logs: list[str] = []

    def sharded_gkd(cfg: GKDConfig, data: list[torch.Tensor]) -> GKDTrainer:
        parent, child = make_child(seed=0), make_child(seed=1)
        parent.requires_grad_(False)
        parallelize(child, parent)
        trainer = GKDTrainer(child, parent, cfg, Path(out) / "ckpt", T, world_size=2, log=logs.append)
        trainer.train(data)
        return trainer

    data = batches()[:STEPS // 2] if rank == 0 else batches()[STEPS // 2:]  # any rows: 2 steps per rank
    cfg = gkd_config(tokens=2 * B * T * 2)  # 2 steps over 2 ranks
    sharded_gkd(cfg, data[:1])  # killed after its first step
    steps_after_resume = sharded_gkd(cfg, data).step
    changed = sharded_gkd(dataclasses.replace(cfg, lr=3e-3), data)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"logs": [line for line in logs if "gkd step" not in line],
                                                          "steps": [steps_after_resume, changed.step],
                                                          "history": [h["step"] for h in changed.history]}))
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_two_ranks_resume_together_and_start_over_together(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["steps"] == [2, 2] and got["history"] == [1, 2]
        resumed, restarted = got["logs"]
        assert resumed == "  resumed GKD at step 1"
        assert "made with other settings" in restarted and "starting over" in restarted
