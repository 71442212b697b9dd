"""The command line: help everywhere, convert / info / generate / config / run, one command per stage."""

import json
import subprocess
import sys

import pytest

from puzzlenas.cli import main
from puzzlenas.pipeline import STAGE_NAMES

COMMANDS = ["convert", "info", "generate", "config", "tasks", "run", "score", *STAGE_NAMES]  # export: a stage and a command


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    assert "usage: puzzlenas" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "puzzlenas.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout


def test_convert_then_info(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_llama_dir), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas"
    capsys.readouterr()
    assert main(["info", str(out), "--kv-dtype", "float32"]) == 0
    table = capsys.readouterr().out
    # 3 layers of GQA with 2 KV heads of dim 16: 2 * 2 * 16 * 4 bytes = 256 B/token each.
    total = next(line for line in table.splitlines() if line.startswith("total"))
    assert table.count("gqa kv=2") == 3 and total.split()[-1] == "768"


def test_generate_runs_on_a_tiny_parent(tmp_path, tiny_llama_dir, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0").save_pretrained(tiny_llama_dir)
    assert main(["generate", str(tiny_llama_dir), "w5 w6 w7", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_errors_are_one_clear_line(capsys):
    assert main(["info", "no-such-parent"]) == 2
    err = capsys.readouterr().err
    assert "error: parent 'no-such-parent' not found" in err and "Traceback" not in err


def test_run_converts_the_parent_and_resumes(tmp_path, tiny_llama_dir, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "--run-dir", str(run_dir), "--set", f"parent={tiny_llama_dir}", "--until", "parent"]
    assert main(args) == 0
    assert (run_dir / "parent" / "DONE").is_file()
    first = (run_dir / "parent" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert "done already" in capsys.readouterr().out
    assert (run_dir / "parent" / "model.safetensors").stat().st_mtime_ns == first


def test_run_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent: smollm2-135m\nparnet_dtype: float32\n")
    assert main(["run", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown config key(s) ['parnet_dtype']" in capsys.readouterr().err
    assert main(["run", "--set", "parent_dtype=int8", "--run-dir", str(tmp_path / "r")]) == 2
    assert "allowed: float32, bfloat16" in capsys.readouterr().err


def test_stage_commands_print_their_own_table_only(finished_run, capsys):
    tables = {"scores": "replace-1-block kl", "costs": "check: whole model", "search": "frontier",
              "library": "search space: 3 layers", "parent": "params  KV B/token"}
    for stage, needle in tables.items():
        assert main([stage, str(finished_run)]) == 0
        out = capsys.readouterr().out
        assert needle in out, stage
        assert all(other not in out for name, other in tables.items() if name != stage), stage
        assert f"[{stage}] done already" in out
    assert main(["score", str(finished_run), "--per-layer"]) == 0
    assert "kl by layer" in capsys.readouterr().out
    assert main(["search", str(finished_run.parent / "nowhere")]) == 2
    assert "neither a run directory nor a config file" in capsys.readouterr().err


def test_version_and_the_resolved_config(tmp_path, capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("puzzlenas 0.")
    path = tmp_path / "cfg.yaml"
    path.write_text("name: mine\nbld: {lr: 2.0e-4}\n")
    assert main(["config", str(path), "--set", "gkd.lr=1e-3", "--set", "search.alpha=0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["name"] == "mine" and cfg["bld"]["lr"] == 2e-4 and cfg["gkd"]["lr"] == 1e-3
    assert cfg["search"]["alpha"] == 0.5 and cfg["search"]["targets"][0]["name"] == "decode-1.5x"
    assert main(["config", str(path), "--set", "gkd.lr=[1"]) == 2
    assert "gkd.lr=[1" in capsys.readouterr().err


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_loads_no_method_code():
    """`puzzlenas --help` answers without torch, transformers or numpy (torch alone takes ~1.7 s here)."""
    loaded = _modules_after("from puzzlenas.cli import build_parser; build_parser()")
    assert not {m.split(".")[0] for m in loaded} & {"torch", "transformers", "numpy", "scipy", "safetensors"}
    # the parser is built from them (export's command has its own parser, export.py's)
    assert {f"puzzlenas.stages.{name}" for name in STAGE_NAMES if name != "export"} <= loaded


def test_the_package_is_light_and_its_model_names_load_on_use():
    loaded = _modules_after("import puzzlenas")
    assert "torch" not in loaded
    loaded = _modules_after("from puzzlenas import DeciLMForCausalLM\n"
                            "from transformers import AutoConfig\n"
                            "assert AutoConfig.for_model('nemotron-nas').model_type == 'nemotron-nas'")
    assert "puzzlenas.model.modeling" in loaded


def test_tasks_writes_offline_lm_eval_yamls_and_the_command(tmp_path, capsys):
    pytest.importorskip("gensim")
    assert main(["tasks", str(tmp_path / "t"), "--task", "news-continuation", "--max-examples", "5"]) == 0
    out = capsys.readouterr().out
    yaml_path = tmp_path / "t" / "puzzlenas_news_continuation.yaml"
    assert "dataset_path: json" in yaml_path.read_text()
    assert len((tmp_path / "t" / "puzzlenas_news_continuation.jsonl").read_text().splitlines()) == 5
    assert f"--tasks {yaml_path.resolve()} " in out and "pretrained=EXPORT,trust_remote_code=True" in out


@pytest.mark.skipif(__import__("pathlib").Path("/dev/nvidiactl").exists(), reason="only machines without an NVIDIA GPU")
def test_cpu_runs_let_idle_openmp_threads_sleep_unless_the_user_chose():
    """Spinning OpenMP threads beside a busy process made CPU timings 4x slower and their ratios
    meaningless (RESULTS.md): the CLI asks for passive ones before torch loads, never over a
    user's own setting."""
    import os

    code = ("import os, sys; from puzzlenas.cli import passive_cpu_threads; passive_cpu_threads(); "
            "import torch; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["PASSIVE", "True"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split() == ["ACTIVE", "True"], out.stderr


def test_cpu_threads_default_to_the_cores_other_processes_leave_idle(tmp_path):
    """Beside a busy process, torch takes the idle cores only (a thread sharing a busy core stalls
    every parallel region and distorts timings); never over the user's OMP_NUM_THREADS."""
    import os

    from puzzlenas.cli import cpu_busy_fraction

    code = ("import os, sys; from puzzlenas.cli import threads_for_idle_cores; "
            "os.sched_getaffinity = lambda pid: set(range(4)); os.cpu_count = lambda: 4; "
            "threads_for_idle_cores(busy_fraction=lambda: float(sys.argv[1])); "
            "import torch; print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def threads(busy: str, **extra) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code, busy], capture_output=True, text=True,
                             env={**env, **extra})
        return out.stdout.split()[-2:]

    if not __import__("pathlib").Path("/dev/nvidiactl").exists():
        assert threads("0.5") == ["2", "2"]  # two of four cores busy: two threads
        assert threads("0.8") == ["1", "1"]  # never fewer than one
        assert threads("0.1")[0] == "None"  # an idle machine: torch keeps its own default
        assert threads("0.5", OMP_NUM_THREADS="3")[0] == "3"  # the user's choice stays
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    assert cpu_busy_fraction(0.0, str(stat)) is None  # no time passed between the samples
    assert cpu_busy_fraction(0.0, str(tmp_path / "missing")) is None
    busy = cpu_busy_fraction(0.05)
    assert busy is None or 0.0 <= busy <= 1.0
