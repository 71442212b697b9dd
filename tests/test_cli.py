"""The command line: help everywhere, convert / info / generate / run on a tiny parent."""

import json
import subprocess
import sys

import pytest

from puzzlenas.cli import main

COMMANDS = ["convert", "info", "generate", "library", "score", "costs", "search", "run"]


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
