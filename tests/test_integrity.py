"""A run directory that does not lie (issue 14, items 4-6): checksummed DONE markers, damaged
artifacts named with the file and the stage to rerun, non-finite weights named with the file and
the tensor, one run per folder (a lock), and one line (exit 2) for every expected failure."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from puzzlenas.cli import main
from puzzlenas.integrity import (FULL_HASH_BYTES, ArtifactError, LockError, RunLock, file_digest,
                                 load_model_checked, load_weights, verify_artifact)
from puzzlenas.pipeline import run_pipeline
from puzzlenas.stages.base import mark_done, why_not_done


def _copy(run, to):
    shutil.copytree(run, to)  # copy2 keeps mtimes, as `cp -a` and rsync -a do
    return to


def _poison(path, name=None, value=float("nan")):
    """Write a NaN (or inf) into one tensor of a safetensors file, in place (same size)."""
    tensors = load_file(str(path))
    name = name or sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


# ---- item 4: checksums ---------------------------------------------------------------------------
def test_done_marker_checksums_catch_a_same_size_change_and_let_a_touch_pass(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    table = folder / "scores.jsonl"
    table.write_text('{"kl": 0.125}\n')
    mark_done(folder, "fp")
    assert why_not_done(folder, "fp") is None
    os.utime(table, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, or copied without times
    assert why_not_done(folder, "fp") is None
    table.write_text('{"kl": 0.625}\n')  # same size, other content
    assert why_not_done(folder, "fp") == f"{table} changed since it was written (its checksum differs)"
    table.write_text('{"kl": 0.6}\n')
    assert "truncated or changed" in why_not_done(folder, "fp")
    with pytest.raises(ArtifactError, match=rf"{table}.*rerun its stage: puzzlenas run {tmp_path} --force scores"):
        verify_artifact(folder)


def test_large_files_are_sampled_yet_a_truncation_or_a_sampled_change_shows(tmp_path):
    path = tmp_path / "big.bin"
    data = bytearray(os.urandom(FULL_HASH_BYTES + 4096))
    path.write_bytes(data)
    digest = file_digest(path)
    assert digest.startswith("s:")
    data[0] ^= 1  # the first block is always sampled
    path.write_bytes(data)
    assert file_digest(path) != digest


def test_checksums_cost_little_on_100_mb(tmp_path):
    """Not a timing assertion (busy CI machines): the sampled hash reads a bounded amount."""
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.truncate(100 * 2**20)
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import puzzlenas.integrity as integrity

    integrity.open = lambda p, mode: Counting(real_open(p, mode))
    try:
        file_digest(path)
    finally:
        del integrity.open
    assert sum(reads) <= 4 * 2**20  # 64 blocks of 64 KiB, not 100 MB


# ---- item 4: damaged upstream artifacts, named --------------------------------------------------
def test_a_truncated_library_file_is_named_with_the_stage_to_rerun(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    calibration = run / "library" / "calibration.safetensors"
    calibration.write_bytes(calibration.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=rf"{calibration} has 100 bytes.*--force library"):
        verify_artifact(run / "library")  # what a stage checks before it reads the library
    with pytest.raises(ArtifactError, match=rf"{calibration} is not a readable safetensors file.*--force library"):
        load_weights(calibration, f"rerun its stage: puzzlenas run {run} --force library")
    capsys.readouterr()
    run_pipeline(run / "config.yaml", run_dir=run, until="library")  # the pipeline redoes it, saying why
    assert f"[library] redone: {calibration} has 100 bytes" in capsys.readouterr().out
    verify_artifact(run / "library")


def test_a_truncated_bld_job_is_retrained_alone(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    jobs = sorted((run / "bld" / "layers").glob("*/*/weights.safetensors"))
    damaged = jobs[0]
    stamps = {p.parent: (p.parent / "DONE").stat().st_mtime_ns for p in jobs}
    damaged.write_bytes(damaged.read_bytes()[:100])
    from puzzlenas.assemble import assemble_state
    from puzzlenas.bld import Job, load_job_block
    from puzzlenas.library import read_space

    capsys.readouterr()
    run_pipeline(run / "config.yaml", run_dir=run, until="bld")
    out = capsys.readouterr().out
    assert f"[bld] redone: {damaged} has 100 bytes" in out
    assert f"[bld] redoing only {damaged.parent.relative_to(run)}" in out
    assert {d for d, t in stamps.items() if (d / "DONE").stat().st_mtime_ns != t} == {damaged.parent}
    verify_artifact(run / "bld")
    # where a child reads it: a damaged job file is named (never a bare SafetensorError)
    damaged.write_bytes(damaged.read_bytes()[:100])
    layer = int(damaged.parent.parent.name)
    attention, ffn = read_space(run / "library" / "space.json")[layer]
    variant = next(v for v in attention + ffn if v.name == damaged.parent.name)
    from puzzlenas.model.parent import load_parent

    parent = load_parent(run / "parent")
    pairs = [(a[0], f[0]) for a, f in read_space(run / "library" / "space.json")]
    pairs[layer] = (variant, pairs[layer][1]) if variant.subblock == "attention" else (pairs[layer][0], variant)
    with pytest.raises(ArtifactError, match=rf"{damaged} is not a readable safetensors file.*delete {damaged.parent}"):
        assemble_state(parent, run / "bld", pairs)
    job = Job(layer, variant, None) if variant.subblock == "attention" else Job(layer, None, variant)
    with pytest.raises(ArtifactError, match=str(damaged)):
        load_job_block(run / "bld", job, parent, torch.float32)


# ---- item 4: non-finite weights, named -----------------------------------------------------------
def test_nan_weights_are_named_with_file_and_tensor(finished_run, tiny_run_inputs, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    model = shutil.copytree(run / "parent", tmp_path / "model", ignore=shutil.ignore_patterns("DONE"))
    name = _poison(model / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ArtifactError, match=rf"{model / 'model.safetensors'}: tensor {name} has 1 non-finite values"):
        load_model_checked(model, torch.float32)  # a model without a DONE: the values are checked
    calibration = run / "library" / "calibration.safetensors"
    stat = _poison(calibration)
    with pytest.raises(ArtifactError, match=rf"{calibration}: tensor {stat} has 1 non-finite"):
        load_weights(calibration, "rerun the library stage")
    child = run / "gkd-fast" / "model.safetensors"
    _poison(child, value=float("inf"))  # a run's artifact changed in place: its checksum names it first
    with pytest.raises(ArtifactError, match=rf"{child} changed since it was written.*--force gkd"):
        load_model_checked(run / "gkd-fast", torch.float32)
    # a parent from elsewhere (the run's source): named too, before any stage trains on it
    source = shutil.copytree(tiny_run_inputs["parent"], tmp_path / "source")
    _poison(source / "model.safetensors", "model.layers.0.self_attn.q_proj.weight", float("inf"))
    from puzzlenas.model.parent import load_parent

    with pytest.raises(ArtifactError, match=r"model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has 1 non-finite"):
        load_parent(source)


def test_a_malformed_scores_file_names_file_line_and_stage(finished_run, tmp_path):
    from puzzlenas.stages.scores import read_scores

    run = _copy(finished_run, tmp_path / "run")
    scores = run / "scores" / "scores.jsonl"
    lines = scores.read_text().splitlines()
    lines[2] = lines[2][:40]
    scores.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{scores} line 3 is not JSON.*--force scores"):
        read_scores(run)


# ---- item 5: one run per folder -----------------------------------------------------------------
HOLD = """
import sys, time
from puzzlenas.integrity import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_holder(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    config = (run / "config.yaml").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["run", str(run / "config.yaml"), "--run-dir", str(run), "--set", "seed=7"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert f"{run} is in use by PID {holder.pid} on " in err
        assert (run / "config.yaml").read_bytes() == config  # nothing of the first run overwritten
    finally:
        holder.kill()
        holder.wait()
    # killed without releasing it: the next run takes the lock over, and says so
    lock = json.loads((run / "LOCK").read_text())
    assert lock["pid"] == holder.pid
    capsys.readouterr()
    run_pipeline(run / "config.yaml", run_dir=run, until="data")
    assert f"[lock] took over the lock left by PID {holder.pid}" in capsys.readouterr().out
    assert (run / "LOCK").read_text() == ""  # released at the end


def test_the_lock_is_refused_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockError, match=f"PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


# ---- item 6: one line and exit code 2 ------------------------------------------------------------
def _one_line(capsys, code, *names):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # progress bars aside
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize("override, key", [("bld.lr=[1", "bld.lr"), ("bld.lr=abc", "bld.lr"),
                                           ("bld.tokens=1.5", "bld.tokens"), ("bld=3", "bld"),
                                           ("search.targets=nonsense", "search.targets"),
                                           ("bld.lr={a: 1}", "bld.lr"), ("bld.lr", "bld.lr")])
def test_config_and_override_errors_are_one_line(override, key, capsys):
    _one_line(capsys, main(["config", "--set", override]), key)


def test_config_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    _one_line(capsys, main(["config", str(bad)]), bad)
    _one_line(capsys, main(["run", str(tmp_path / "missing.yaml")]), "missing.yaml")


def test_an_unwritable_run_dir_is_one_line(finished_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line(capsys, main(["run", str(finished_run / "config.yaml"), "--run-dir", str(blocker / "run")]), blocker)


def test_diverging_bld_and_gkd_are_one_line_with_the_traceback_in_run_log(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    line = _one_line(capsys, main(["bld", str(run), "--force", "--set", "bld.lr=1.0e+6"]), "bld.lr")
    assert "non-finite loss" in line
    log = (run / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "BLDError" in log
    run = _copy(finished_run, tmp_path / "run2")
    _one_line(capsys, main(["gkd", str(run), "--force", "--set", "gkd.lr=1.0e+6"]), "gkd.lr")


def test_a_truncated_child_is_one_line_naming_it(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    weights = run / "gkd-fast" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    _one_line(capsys, main(["generate", str(run / "gkd-fast"), "w5 w6", "--max-new-tokens", "2"]), weights,
              "--force gkd")
    _one_line(capsys, main(["export", str(run / "gkd-fast"), str(tmp_path / "out"), "--runtime", "hf"]), weights)


def test_a_bug_says_so_in_one_line_and_debug_shows_the_traceback(finished_run, tmp_path, capsys, monkeypatch):
    from puzzlenas.stages import report

    run = _copy(finished_run, tmp_path / "run")

    def broken(cfg, run_dir):
        raise KeyError("oops")

    monkeypatch.setattr(report, "run", broken)
    assert main(["report", str(run), "--force"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error (a bug" in err and f"{run / 'run.log'}" in err
    assert "KeyError: 'oops'" in (run / "run.log").read_text()
    assert main(["report", str(run), "--force", "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
