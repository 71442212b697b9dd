"""GKD's fast path (fused chunked KL on the head, the trunk without HF plumbing, compile
switch) against the plain definitions of its loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from puzzlenas.gkd import (GKDConfig, GKDError, GKDTrainer, fused_head_kl, hidden_cosine_loss, student_forward,
                           teacher_hidden_states, trunk_hidden_states)
from tests.test_child import make_child


def pair():
    parent, child = make_child(seed=0), make_child(seed=1)
    parent.requires_grad_(False)
    return parent, child


def plain_loss(child, parent, ids, cfg: GKDConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GKD loss from its definition: HF forwards, whole (B, T, V) logits."""
    c_out = child(ids, output_hidden_states=True)
    with torch.no_grad():
        p_out = parent(ids, output_hidden_states=True)
    logq = torch.log_softmax(c_out.logits[:, :-1].float(), -1)
    logp = torch.log_softmax(p_out.logits[:, :-1].float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    lm = F.nll_loss(logq.flatten(0, 1), ids[:, 1:].flatten())
    cos = hidden_cosine_loss(c_out.hidden_states, p_out.hidden_states)
    return cfg.cosine_weight * cos + cfg.kl_weight * kl + cfg.lm_loss_weight * lm, cos, kl, lm


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_fused_kl_equals_the_plain_kl_and_its_gradient(lm_weight):
    parent, child = pair()
    ids = torch.randint(0, 128, (2, 9))
    cfg = GKDConfig(logits_chunk=5, kl_weight=0.7, lm_loss_weight=lm_weight, cosine_weight=0.0)
    h_child = trunk_hidden_states(child, ids)[-1]
    with torch.no_grad():
        h_parent = trunk_hidden_states(parent, ids)[-1]
    loss, kl, lm = fused_head_kl(child, parent, h_child, h_parent, ids, cfg, None)
    loss.backward()
    fused = grads(child)
    ref_loss, _, ref_kl, ref_lm = plain_loss(child, parent, ids, cfg)
    ref_loss.backward()
    plain = grads(child)
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert lm.item() == pytest.approx(ref_lm.item() if lm_weight else 0.0, rel=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert fused.keys() == plain.keys() and "lm_head.weight" in fused  # tied with the embedding
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trunk_and_cosine_term_equal_the_hf_forward():
    parent, child = pair()
    ids = torch.randint(0, 128, (3, 7))
    hf = child.model(ids, output_hidden_states=True).hidden_states
    mine = trunk_hidden_states(child, ids)
    assert len(mine) == len(hf) == child.config.num_hidden_layers + 1
    for a, b in zip(mine, hf):
        assert torch.equal(a, b)
    with torch.no_grad():
        stacked = teacher_hidden_states(parent, ids)  # (L + 1, B, T, C)
        reference = parent.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(stacked, torch.stack(reference))
    h_last, cos = student_forward(child, ids, stacked)
    assert torch.equal(h_last, hf[-1])
    expected = sum((1 - F.cosine_similarity(c, p, dim=-1)).mean() for c, p in zip(hf[1:], reference[1:]))
    assert cos.item() == pytest.approx(expected.item(), rel=1e-6) and cos.item() > 0.1


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_a_gkd_step_has_the_gradient_of_the_plain_loss(tmp_path, checkpointing, monkeypatch):
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    parent, child = pair()
    ids = torch.randint(0, 128, (2, 8))
    cfg = GKDConfig(logits_chunk=4, lm_loss_weight=0.3, batch_size=2, tokens=16,
                    activation_checkpointing=checkpointing)
    trainer = GKDTrainer(child, parent, cfg, tmp_path, 8, log=lambda *a: None)
    assert not trainer.compiled  # compile=auto stays eager on the CPU
    child.train()
    parts = trainer.loss_and_backward(ids)
    fast = grads(child)
    layers = sum(not (layer.self_attn is None and layer.mlp is None) for layer in child.model.layers)
    assert len(calls) == (layers if checkpointing else 0)  # each student layer but the identity ones recomputed
    child.model.gradient_checkpointing = False
    ref_loss, cos, kl, lm = plain_loss(child, parent, ids, cfg)
    ref_loss.backward()
    plain = grads(child)
    for key, ref in (("loss", ref_loss), ("cosine", cos), ("kl", kl), ("lm", lm)):
        assert parts[key].item() == pytest.approx(ref.item(), rel=1e-5), key
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_embeddings_keep_the_parents_rows_and_the_other_gradients(tmp_path):
    """gkd.train_embeddings false: the tied embedding / head gets no gradient and no decay (so it
    stays the parent's), every other gradient is the one of the trained-embedding step."""
    parent, child = pair()
    ids = torch.randint(0, 128, (2, 8))
    base = dict(logits_chunk=4, cosine_weight=0.0, batch_size=2, tokens=64, lr=1e-2, weight_decay=0.1)
    child.train()
    GKDTrainer(child, parent, GKDConfig(**base), tmp_path / "a", 8, log=lambda *a: None).loss_and_backward(ids)
    trained = grads(child)
    embedding = child.model.embed_tokens.weight.detach().clone()
    trainer = GKDTrainer(child, parent, GKDConfig(**base, train_embeddings=False), tmp_path / "b", 8,
                         log=lambda *a: None)
    parts = trainer.loss_and_backward(ids)
    frozen = grads(child)
    assert "lm_head.weight" in trained and "lm_head.weight" not in frozen
    assert frozen.keys() == trained.keys() - {"lm_head.weight", "model.embed_tokens.weight"}
    for name in frozen:
        torch.testing.assert_close(frozen[name], trained[name], rtol=1e-5, atol=1e-7, msg=name)
    history = trainer.train([ids] * 4)
    assert torch.equal(child.model.embed_tokens.weight, embedding)  # neither trained nor decayed
    assert history[-1]["kl"] < parts["kl"].item()  # the rest of the child still learns
    assert "train_embeddings" not in repr(GKDConfig()) and "train_embeddings=False" in repr(trainer.cfg)


@pytest.mark.slow  # ~40 s on 2 CPU cores with a cold Inductor cache (C++ codegen)
def test_compiled_gkd_step_compiles_one_graph_per_block_kind_and_keeps_the_gradient(tmp_path):
    """gkd.compile=on: the layers run through one compiled function; every layer of a kind reuses
    its graph (here 2 child kinds + the parent's kind + the KL reduction = 4 graphs for 8 layers,
    the identity layer skipped; 14 rows in two chunks of 7), and the step's loss and gradients are the eager ones."""
    from torch._dynamo.utils import counters

    from puzzlenas.model.blocks import AttentionConfig, BlockConfig, FFNConfig
    from tests.test_child import make_child as build

    a = BlockConfig(AttentionConfig("gqa", 1), FFNConfig("gated", 256))
    b = BlockConfig(AttentionConfig("no_op"), FFNConfig("gated", 512))
    empty = BlockConfig(AttentionConfig("no_op"), FFNConfig("no_op"))
    parent = build([BlockConfig.parent(4, 512)] * 4, seed=0).requires_grad_(False)
    child = build([a, b, a, empty], seed=1)
    ids = torch.randint(0, 128, (2, 8))
    eager = GKDTrainer(child, parent, GKDConfig(logits_chunk=7, batch_size=2, tokens=16, compile="off"), tmp_path / "e",
                       8, log=lambda *a: None).loss_and_backward(ids)
    reference = grads(child)
    torch._dynamo.reset()
    counters.clear()
    trainer = GKDTrainer(child, parent, GKDConfig(logits_chunk=7, batch_size=2, tokens=16, compile="on"),
                         tmp_path / "c", 8, log=lambda *a: None)
    parts = trainer.loss_and_backward(ids)
    assert trainer.compiled and counters["stats"]["unique_graphs"] == 4
    assert parts["loss"].item() == pytest.approx(eager["loss"].item(), rel=1e-5)
    compiled = grads(child)
    assert compiled.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(compiled[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def failing_compile(monkeypatch):
    def compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C++ compiler found\nmore lines")
        return compiled
    monkeypatch.setattr(torch, "compile", compile)


def test_compile_failure_falls_back_to_eager_with_auto(tmp_path, monkeypatch):
    failing_compile(monkeypatch)
    monkeypatch.setattr(GKDTrainer, "_use_compile", lambda self: True)  # as on a GPU
    parent, child = pair()
    ids = torch.randint(0, 128, (2, 8))
    logs: list[str] = []
    trainer = GKDTrainer(child, parent, GKDConfig(batch_size=2, tokens=16), tmp_path, 8, log=logs.append)
    assert trainer.compiled
    parts = trainer.loss_and_backward(ids)
    assert not trainer.compiled
    assert logs == ["  gkd: torch.compile failed (RuntimeError: no C++ compiler found); running eagerly"]
    fast = grads(child)
    plain_loss(child, parent, ids, trainer.cfg)[0].backward()
    assert parts["loss"].item() > 0
    for name, g in grads(child).items():  # the failed attempt left no gradient behind
        torch.testing.assert_close(fast[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_on_that_fails_is_a_gkd_error_naming_the_setting(tmp_path, monkeypatch):
    failing_compile(monkeypatch)
    parent, child = pair()
    trainer = GKDTrainer(child, parent, GKDConfig(batch_size=2, tokens=16, compile="on"), tmp_path, 8)
    with pytest.raises(GKDError, match="torch.compile failed for GKD .*gkd.compile=auto or off"):
        trainer.loss_and_backward(torch.randint(0, 128, (2, 8)))


def test_compile_setting_is_validated():
    with pytest.raises(ValueError, match="gkd.compile = 'yes'; allowed: auto, on, off"):
        GKDConfig(compile="yes").validate()


def test_gkd_lowers_its_loss_and_the_report_exists(finished_run):
    history = json.loads((finished_run / "gkd-fast" / "history.json").read_text())
    assert history["validation_after"]["loss"] < history["validation_before"]["loss"]
    assert [h["step"] for h in history["steps"]] == list(range(1, 17))  # 16 steps, each logged
    results = json.loads((finished_run / "eval" / "results.json").read_text())
    assert {"parent", "child-fast", "gkd-fast"} <= set(results)
    assert results["parent"]["kl_to_parent"] < 1e-9 and results["parent"]["top1_agreement"] == 1.0
    assert "decode_step_s" in results["gkd-fast"]["speedup"]["tiny"]
    for name in ("README.md", "frontier.png", "layers.png"):
        assert (finished_run / "report" / name).is_file()


def test_auto_compile_weighs_the_tokens_its_graphs_serve(tmp_path):
    """gkd.compile=auto on a GPU compiles long runs only; a short GKD whose graphs the run's long
    GKD reuses in the same process (the search's candidate repair) is weighed by those tokens."""
    from puzzlenas.gkd import COMPILE_MIN_TOKENS

    parent, child = pair()
    short = GKDConfig(batch_size=2, tokens=16)
    alone = GKDTrainer(child, parent, short, tmp_path / "a", 8)
    shared = GKDTrainer(child, parent, short, tmp_path / "b", 8, compile_tokens=COMPILE_MIN_TOKENS)
    assert not alone._use_compile() and not shared._use_compile()  # never on the CPU
    alone.device = shared.device = torch.device("cuda")  # the decision a GPU run makes (no kernel runs)
    assert not alone._use_compile()
    assert shared._use_compile()
    off = GKDTrainer(child, parent, GKDConfig(batch_size=2, tokens=16, compile="off"), tmp_path / "c", 8,
                     compile_tokens=COMPILE_MIN_TOKENS)
    off.device = torch.device("cuda")
    assert not off._use_compile()
