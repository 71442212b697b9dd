"""Equal-shape BLD jobs trained stacked (bld_stacked.py) against the same jobs one at a time."""

from __future__ import annotations

import dataclasses

import torch

from puzzlenas import BlockConfig, DeciLMConfig, DeciLMForCausalLM
from puzzlenas.bld import BLDConfig, BLDTrainer, decoupled_jobs
from puzzlenas.bld_stacked import stack_groups
from puzzlenas.library import LibraryConfig, search_space

T, B = 12, 2


def parent() -> DeciLMForCausalLM:
    torch.manual_seed(0)
    # Three equal layers and one with a wider FFN: its attention jobs train behind another
    # parent FFN, so they may not join the others' groups.
    blocks = [BlockConfig.parent(2, 128)] * 3 + [BlockConfig.parent(2, 192)]
    config = DeciLMConfig.from_blocks(blocks, vocab_size=96, hidden_size=64, num_attention_heads=4, rms_norm_eps=1e-5)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.requires_grad_(False)


def trainer(model, out_dir, **changes) -> BLDTrainer:
    cfg = dataclasses.replace(BLDConfig(tokens=4 * B * T, batch_size=B, lr=3e-3, warmup_fraction=0.25,
                                        grad_clip=0.05, checkpoint_every=1), **changes)  # clipping bites
    lib = LibraryConfig(ffn_ratios=[1.0, 0.5], ffn_multiple=32, linear_ffn_init="product",
                        linear_attention_init="product")
    return BLDTrainer(model, None, lib, cfg, out_dir, T, log=lambda *a: None)


def batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (B, T), generator=g) for _ in range(n)]


def trained(tr: BLDTrainer, data, resume: bool = False) -> dict:
    jobs = decoupled_jobs(search_space(tr.config, tr.lib_cfg), range(tr.config.num_hidden_layers))
    states = [tr.build(j) for j in jobs]
    if resume:
        for s in states:
            tr._maybe_resume(s)
    training = [s for s in states if s.optimizer is not None]
    tr._train(training, data)
    return {s.job.relpath: (float(s.metrics["last_loss"]), s.step,
                            {n: p.detach().clone() for u in s.trainables for n, p in u.state_dict().items()})
            for s in training}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 16
    for job in a:
        (loss_a, step_a, w_a), (loss_b, step_b, w_b) = a[job], b[job]
        assert step_a == step_b
        assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_b) + 1e-7, job
        for name in w_b:
            torch.testing.assert_close(w_a[name], w_b[name], rtol=1e-4, atol=1e-6, msg=f"{job} {name}")


def test_stacked_jobs_train_as_the_same_jobs_one_at_a_time(tmp_path):
    model = parent()
    tr = trainer(model, tmp_path / "stacked")
    jobs = decoupled_jobs(search_space(tr.config, tr.lib_cfg), range(4))
    states = [s for s in map(tr.build, jobs) if s.optimizer is not None]
    groups, alone = stack_groups(states, tr.config.blocks, 1 << 30, tr.config, tr.cfg)
    sizes = sorted((g.kind, len(g.states)) for g in groups)
    # attention variants (kv1, linear): layers 0-2 (layer 3 has another parent FFN); FFN variants:
    # 64 wide in layers 0-2, linear in all 4 (layer 3's 96 trains alone; full width is the parent's)
    assert sizes == [("attention", 3)] * 2 + [("ffn", 3), ("ffn", 4)]
    assert {s.job.layer for s in alone} == {3} and len(alone) == 3
    stacked = trained(tr, batches())
    alone_ = trained(trainer(model, tmp_path / "alone", stack_jobs=1), batches())
    assert_same(stacked, alone_)
    first_losses = {k: v[0] for k, v in stacked.items()}
    assert all(0 < loss for loss in first_losses.values())


def test_a_stacked_run_resumes_from_its_job_checkpoints(tmp_path):
    model = parent()
    trained(trainer(model, tmp_path / "run"), batches()[:2])  # killed after 2 of 4 steps
    resumed = trained(trainer(model, tmp_path / "run"), batches(), resume=True)
    reference = trained(trainer(model, tmp_path / "ref", stack_jobs=1), batches())
    assert_same(resumed, reference)
