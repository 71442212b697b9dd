"""The whole pipeline under torchrun: two gloo ranks on the CPU, a tiny parent, two targets.
Killed (SIGKILL to torchrun and its workers) in the middle of GKD, then rerun: it resumes the
child from its two-rank checkpoint and finishes; every child holds its weights and loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import pipeline_config

ROOT = Path(__file__).resolve().parents[1]


def two_rank_config(inputs: dict, cache: Path | None = None) -> dict:
    cfg = pipeline_config(inputs)
    if cache is not None:  # a teacher corpus, its shards written by both ranks
        cfg["data"]["sources"] = cfg["data"]["sources"] + ["teacher:3k"]
        cfg["data"]["cache_dir"] = str(cache)
        cfg["teacher"] = {"max_new_tokens": 24, "batch_size": 16, "shard_samples": 32, "validation_fraction": 0.2}
    cfg["search"]["targets"] = [{"name": "fast", "metric": "decode", "speedup": 1.3},
                                {"name": "small", "params": 60000}]
    # 16 steps per child over 2 ranks, a checkpoint every 3: a kill during GKD finds one to resume
    cfg["gkd"].update(tokens=4096, checkpoint_every=3)
    cfg["eval"]["throughput"] = False
    return cfg


def torchrun(config: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), "-m", "puzzlenas.cli", "run", str(config),
                             "--run-dir", str(run_dir)],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's workers in /proc (Linux)")
def test_two_rank_pipeline_killed_during_gkd_resumes_and_every_child_loads(tmp_path, tiny_run_inputs):
    from puzzlenas.model.modeling import DeciLMForCausalLM
    from puzzlenas.pipeline import STAGE_NAMES

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(two_rank_config(tiny_run_inputs, tmp_path / "cache")))
    run = tmp_path / "run"

    first = torchrun(config, run)
    deadline = time.time() + 600
    while not list(run.glob("gkd-*.work/ckpt.json")):  # a two-rank GKD checkpoint on disk: kill
        assert first.poll() is None, f"the run ended before GKD wrote a checkpoint:\n{first.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.01)
    kill_tree(first)
    assert not (run / "eval" / "DONE").exists()

    second = torchrun(config, run)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert "resumed GKD at step" in out, out
    for stage in ("parent", "bld", "scores", "search"):
        assert f"[{stage}] done already" in out, stage
    assert (run / "report" / "DONE").is_file() and (run / "eval" / "DONE").is_file()
    # the run's own lines once (rank 0): two ranks' prints ran together on one line before
    assert re.findall(r"^\[eval\] [0-9.]+ s$", out, re.M) and "s[eval]" not in out, out
    assert len(re.findall(r"^\[eval\] [0-9.]+ s$", out, re.M)) == 1, out
    # eval split its models over the ranks (each wrote its own models' results)
    assert "rank 1/2: " in out and len(list((run / "eval" / "models").glob("*.json"))) == 5, out

    # the teacher shards were written by both ranks, and one rank reads them into the same rows
    from puzzlenas.pipeline import run_pipeline

    meta = json.loads((run / "teacher" / "meta.json").read_text())
    assert meta["ranks"] == 2 and meta["shards"] >= 2
    one = run_pipeline(config, run_dir=tmp_path / "one-rank", until="teacher")
    again = json.loads((one / "teacher" / "meta.json").read_text())
    assert again["shards_reused"] == again["shards"] == meta["shards"]
    assert (one / "teacher" / "rows.safetensors").read_bytes() == (run / "teacher" / "rows.safetensors").read_bytes()

    names = ["fast", "small"]
    for name in names:
        assembled = DeciLMForCausalLM.from_pretrained(run / f"child-{name}", dtype=torch.float32).state_dict()
        distilled = DeciLMForCausalLM.from_pretrained(run / f"gkd-{name}", dtype=torch.float32).state_dict()
        assert assembled.keys() == distilled.keys()
        moved = [k for k in assembled if not torch.equal(assembled[k], distilled[k])]
        assert len(moved) > len(assembled) // 2, name  # GKD trained the child's own weights
        assert all(torch.isfinite(v).all() for v in distilled.values())
        assert not (run / f"gkd-{name}.work").exists()  # checkpoints cleared once the child is done
        if "export" in STAGE_NAMES:  # the served copy: the distilled weights (in bf16), loadable
            exported = DeciLMForCausalLM.from_pretrained(run / f"export-{name}", dtype=torch.float32).state_dict()
            assert all(torch.equal(exported[k], distilled[k].bfloat16().float()) for k in distilled), name


def test_gkd_parallel_is_chosen_by_size_and_changes_no_fingerprint(tmp_path, tiny_run_inputs):
    from puzzlenas.config import ConfigError, load_run_config
    from puzzlenas.gkd import choose_parallel
    from puzzlenas.stages import gkd

    cpu = torch.device("cpu")
    assert choose_parallel("fsdp", 1, 10**9, 10**9, cpu) == "single"
    assert choose_parallel("auto", 2, 10**12, 10**12, cpu) == "ddp"  # host memory: replicate
    assert choose_parallel("fsdp", 2, 10, 10, cpu) == "fsdp"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(two_rank_config(tiny_run_inputs)))
    record = {"name": "fast"}
    prints = {gkd.STAGE.fingerprint(load_run_config(config, [f"gkd.parallel={p}"]), record)
              for p in ("auto", "ddp", "fsdp")}
    assert len(prints) == 1  # how GKD spreads over GPUs is not what it computes
    with pytest.raises(ConfigError, match="gkd.parallel"):
        load_run_config(config, ["gkd.parallel=zero3"])
