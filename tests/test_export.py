"""Export for serving runtimes: clean folders, runtime names, refusals, remote code that loads
without puzzlenas, and the model card."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from puzzlenas import AttentionConfig, BlockConfig, DeciLMForCausalLM, FFNConfig
from puzzlenas.export import ExportError, export_child, export_dtype
from puzzlenas.model.info import architecture_table, runtime_support

from conftest import save_word_tokenizer
from test_child import HEADS, HIDDEN, VOCAB, make_child

A, F_ = AttentionConfig, FFNConfig
# GQA of two widths, linear attention + linear FFN, no-op attention, no-op FFN, a skipped layer.
LINEAR_CHILD = [
    BlockConfig(A("gqa", 4), F_("gated", 512)),
    BlockConfig(A("gqa", 1), F_("gated", 256)),
    BlockConfig(A("linear"), F_("linear")),
    BlockConfig(A("no_op"), F_("gated", 512)),
    BlockConfig(A("gqa", 2), F_("no_op")),
    BlockConfig(A("no_op"), F_("no_op")),
]
VLLM_CHILD = [b for b in LINEAR_CHILD if "linear" not in (b.attention.kind, b.ffn.kind)]
MLX_ATTENTION_KEYS = {"no_op", "replace_with_linear", "sparsify", "n_heads_in_group", "window_length",
                      "num_sink_tokens", "use_prefill_window_in_sink_attention", "unshifted_sink"}
MLX_FFN_KEYS = {"no_op", "replace_with_linear", "sparsify", "ffn_mult"}


def save_child(path: Path, blocks=LINEAR_CHILD, **fields) -> DeciLMForCausalLM:
    """A child saved as a run saves it (fp32), with run bookkeeping that must not be exported."""
    model = make_child(blocks, **fields)
    model.save_pretrained(path)
    save_word_tokenizer(path)  # transformers 5 writes TokenizersBackend and model_max_length 1e30
    (path / "DONE").write_text("{}")
    (path / "history.json").write_text("{}")
    return model


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> tuple[Path, DeciLMForCausalLM]:
    path = tmp_path_factory.mktemp("child") / "gkd-2x"
    return path, save_child(path)


def weight_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("runtime", ["hf", "trtllm", "mlx"])
def test_export_writes_a_clean_folder_for_the_runtime(child, tmp_path, runtime):
    src, model = child
    out = export_child(src, tmp_path / runtime, runtime)
    files = {p.name for p in out.iterdir()}
    expected = {"config.json", "configuration_decilm.py", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json", "README.md"}
    assert files == expected | ({"modeling_decilm.py"} if runtime != "mlx" else set())
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"]["AutoConfig"] == "configuration_decilm.DeciLMConfig"
    assert ("AutoModelForCausalLM" in config["auto_map"]) == (runtime != "mlx")
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"  # fp32 child, no parent: bf16
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    names = weight_names(out)
    ours = set(model.state_dict())
    if runtime == "mlx":
        assert {"model.layers.2.self_attn.linear.weight", "model.layers.2.mlp.linear.weight"} <= names
        assert not any("linear_attn" in n or "linear_mlp" in n for n in names)
        assert len(names) == len(ours)
    else:
        assert names == ours

    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x has no TokenizersBackend
    assert tok["model_max_length"] == config["max_position_embeddings"]
    assert "backend" not in tok


def test_vllm_refuses_a_linear_child_naming_the_layer(child, tmp_path):
    with pytest.raises(ExportError, match=r"layer 2: linear attention.*layer 2: linear FFN.*can: trtllm, mlx, hf"):
        export_child(child[0], tmp_path / "vllm", "vllm")
    assert not (tmp_path / "vllm").exists()


def test_vllm_exports_a_gqa_and_no_op_child(tmp_path):
    save_child(tmp_path / "child", VLLM_CHILD)
    out = export_child(tmp_path / "child", tmp_path / "vllm", "vllm", "float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_mlx_config_is_what_mlx_lms_reader_takes(child, tmp_path):
    """mlx-lm's nemotron-nas reader (models/nemotron-nas.py, 0.32) builds AttentionConfig(**d) /
    FFNConfig(**d) from each block dict (unknown keys raise), derives head_dim = hidden / heads,
    FFN widths from ffn_mult, and a linear subblock `.linear` of shape (hidden, hidden)."""
    out = export_child(child[0], tmp_path / "mlx", "mlx")
    config = json.loads((out / "config.json").read_text())
    for block in config["block_configs"]:
        assert set(block["attention"]) <= MLX_ATTENTION_KEYS and set(block["ffn"]) <= MLX_FFN_KEYS
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"]
    for key in ("rope_theta", "tie_word_embeddings", "rms_norm_eps", "vocab_size"):
        assert key in config
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.2.self_attn.linear.weight").get_shape() == [HIDDEN, HIDDEN]
        gate = f.get_slice("model.layers.1.mlp.gate_proj.weight").get_shape()
    from puzzlenas.model.blocks import nas_ffn_width

    assert gate[0] == nas_ffn_width(config["block_configs"][1]["ffn"]["ffn_mult"], HIDDEN)


def test_export_refuses_a_non_empty_folder_and_non_expressible_widths(child, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_child(child[0], tmp_path / "busy", "hf")
    save_child(tmp_path / "odd", [BlockConfig(A("gqa", 2), F_("gated", 100))])
    with pytest.raises(ExportError, match="layer 0 are not expressible by ffn_mult"):
        export_child(tmp_path / "odd", tmp_path / "odd-mlx", "mlx")
    export_child(tmp_path / "odd", tmp_path / "odd-hf", "hf")  # our modeling code reads intermediate_size


def test_info_lists_the_runtimes_that_load_a_checkpoint():
    support = runtime_support(make_child(LINEAR_CHILD).config)
    assert [r for r, p in support.items() if not p] == ["trtllm", "mlx", "hf"]
    table = architecture_table(make_child(LINEAR_CHILD).config)
    assert "trtllm, mlx, hf can run this model" in table and "not vllm: layer 2: linear attention" in table
    qwen_like = make_child(VLLM_CHILD, qkv_bias=True).config
    support = runtime_support(qwen_like)
    assert not support["vllm"] and not support["hf"] and support["trtllm"] and support["mlx"]


def test_default_dtype_is_the_parents_release_dtype(tmp_path):
    save_child(tmp_path / "child")
    assert export_dtype(tmp_path / "child") == "bfloat16"  # fp32 puzzlenas checkpoint
    assert export_dtype(tmp_path / "child", parent="smollm2-135m") == "bfloat16"
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    assert export_dtype(tmp_path / "child", parent=str(parent)) == "float16"


def test_model_card_has_base_model_license_speedups_and_evaluation(child, tmp_path):
    from huggingface_hub import ModelCard

    evaluation = {"perplexity": 12.5, "kl_to_parent": 0.07, "tasks": {"arc_easy": {"acc": 0.61, "n": 200}},
                  "speedup": {"decode_b64": {"decode_step_s": 2.04, "prefill_s": 1.71}}}
    out = export_child(child[0], tmp_path / "hf", "hf", parent="smollm2-135m", evaluation=evaluation,
                       device="NVIDIA H100")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.eval_results[0].metric_value == pytest.approx(0.61)
    assert "| decode_b64 | decode step | 2.04x |" in card.text and "NVIDIA H100" in card.text
    assert "| 2 | linear | linear |" in card.text and "| arc_easy accuracy |" in card.text

    parent = tmp_path / "parent"  # a local parent: license read from its own card
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (parent / "README.md").write_text("---\nlicense: llama3.1\nbase_model: meta-llama/Llama-3.1-8B\n---\n# x\n")
    card = ModelCard.load(export_child(child[0], tmp_path / "hf2", "hf", parent=str(parent)) / "README.md")
    assert card.data.license == "llama3.1" and card.data.base_model == "meta-llama/Llama-3.1-8B"


STANDALONE = textwrap.dedent("""
    import json, sys
    sys.modules["puzzlenas"] = None  # `import puzzlenas` fails: the export must stand on its own
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    report = {}
    for folder in sys.argv[1:-1]:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        report[folder] = {"module": type(config).__module__, "blocks": [
            [b.attention.no_op, b.attention.replace_with_linear, b.attention.n_heads_in_group,
             b.ffn.no_op, b.ffn.replace_with_linear, b.ffn.ffn_mult] for b in config.block_configs]}
    hf = sys.argv[-2]
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 64, 100, 7]])
    with torch.no_grad():
        report["logits"] = model(ids).logits.tolist()
    report["generated"] = model.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    report["model_module"] = type(model).__module__
    report["tokens"] = AutoTokenizer.from_pretrained(hf)("w5 w9 w17")["input_ids"]
    json.dump(report, open(sys.argv[-1], "w"))
""")


def test_exports_load_without_puzzlenas_and_match_its_logits(child, tmp_path):
    src, model = child
    vllm_src = tmp_path / "vllm-child"
    save_child(vllm_src, VLLM_CHILD)
    folders = [export_child(vllm_src, tmp_path / "vllm", "vllm"), export_child(src, tmp_path / "mlx", "mlx"),
               export_child(src, tmp_path / "hf", "hf", "float32")]
    (tmp_path / "check.py").write_text(STANDALONE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    # -I: no PYTHONPATH, no script folder, no user site; the venv's site-packages stay (torch, transformers).
    subprocess.run([sys.executable, "-I", str(tmp_path / "check.py"), *map(str, folders),
                    str(tmp_path / "report.json")], check=True, env=env, cwd=tmp_path, timeout=300)
    report = json.loads((tmp_path / "report.json").read_text())

    for folder, blocks in zip(folders, (VLLM_CHILD, LINEAR_CHILD, LINEAR_CHILD)):
        got = report[str(folder)]
        assert got["module"].startswith("transformers_modules.") and got["module"].endswith("configuration_decilm")
        for (a_noop, a_lin, group, f_noop, f_lin, mult), b in zip(got["blocks"], blocks):
            assert (a_noop, a_lin) == (b.attention.kind == "no_op", b.attention.kind == "linear")
            assert group == (HEADS // b.attention.num_kv_heads if b.attention.kind == "gqa" else None)
            assert (f_noop, f_lin) == (b.ffn.kind == "no_op", b.ffn.kind == "linear")
            assert (mult is not None) == (b.ffn.kind == "gated")
    assert report["model_module"].endswith("modeling_decilm")
    ids = torch.tensor([[5, 9, 17, 33, 2, 64, 100, 7]])
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, atol=1e-4, rtol=0)
    assert report["generated"] == model.generate(ids, max_new_tokens=6, do_sample=False).tolist()
    assert report["tokens"] == [5, 9, 17]


@pytest.mark.slow
def test_mlx_lm_loads_the_mlx_export_and_matches_logits(child, tmp_path):
    """Needs mlx (Linux: `pip install "mlx[cpu]" mlx-lm`); mlx-lm is imported in a child process
    without puzzlenas, exactly as a user would load the export."""
    pytest.importorskip("mlx_lm")
    src, model = child
    out = export_child(src, tmp_path / "mlx", "mlx", "float32")
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        sys.modules["puzzlenas"] = None
        import mlx.core as mx
        import numpy as np
        from mlx_lm.utils import load_model
        model, _ = load_model(Path(sys.argv[1]))
        logits = model(mx.array([[5, 9, 17, 33, 2, 64, 100, 7]])).astype(mx.float32)
        json.dump(np.array(logits).tolist(), open(sys.argv[2], "w"))
    """)
    (tmp_path / "mlx_check.py").write_text(script)
    subprocess.run([sys.executable, str(tmp_path / "mlx_check.py"), str(out), str(tmp_path / "logits.json")],
                   check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with torch.no_grad():
        expected = model(torch.tensor([[5, 9, 17, 33, 2, 64, 100, 7]])).logits
    torch.testing.assert_close(torch.tensor(json.loads((tmp_path / "logits.json").read_text())), expected,
                               atol=1e-3, rtol=0)


def test_cli_export_and_info(child, tmp_path, capsys):
    from puzzlenas.cli import main

    assert main(["export", str(child[0]), str(tmp_path / "out"), "--runtime", "vllm"]) == 2
    assert "layer 2: linear attention" in capsys.readouterr().err
    assert main(["export", str(child[0]), str(tmp_path / "out"), "--runtime", "mlx", "--dtype", "float16"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert main(["info", str(tmp_path / "out")]) == 0  # an export reads back in puzzlenas (mlx names aside)
    assert main(["info", str(child[0])]) == 0
    assert "not vllm: layer 2: linear attention" in capsys.readouterr().out


def test_export_stage_writes_one_folder_per_child(tmp_path):
    from puzzlenas.config import load_run_config
    from puzzlenas.stages.export import run as run_export_stage

    run = tmp_path / "run"
    save_child(run / "gkd-fast", VLLM_CHILD)
    save_child(run / "gkd-faster", LINEAR_CHILD)
    (run / "search").mkdir()
    (run / "search" / "solutions.jsonl").write_text("".join(json.dumps({"name": n}) + "\n" for n in ("fast", "faster")))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"gkd-fast": {"perplexity": 9.5}}))
    cfg = load_run_config(None, ["parent=smollm2-135m"])
    run_export_stage(cfg, run)
    assert (run / "export-fast" / "model.safetensors").is_file() and not (run / "export-faster").exists()
    text = (run / "export" / "exports.txt").read_text()
    assert "export-fast: vllm: vllm serve" in text and "export-faster: not written" in text and "layer 2" in text
    assert "| perplexity | test split | 9.5 |" in (run / "export-fast" / "README.md").read_text()
    assert "DONE" not in {p.name for p in (run / "export-fast").iterdir()}


# The `lm_eval` console script's body, run with `import puzzlenas` made to fail: lm-eval must load
# the export through its shipped remote code alone.
LM_EVAL_CLI = ("import sys; sys.modules['puzzlenas'] = None; sys.argv[0] = 'lm_eval'; "
               "from lm_eval.__main__ import cli_evaluate; sys.exit(cli_evaluate())")


def lm_eval_python() -> str:
    """The Python whose `lm_eval` scores the export: $PUZZLENAS_LM_EVAL_PYTHON (a separate
    environment, e.g. a fresh venv with `pip install torch 'lm-eval[hf]'` and no puzzlenas), else
    this one; skips when that environment lacks lm-eval's `hf` model."""
    python = os.environ.get("PUZZLENAS_LM_EVAL_PYTHON")
    if python is None:
        from puzzlenas.eval.tasks.harness import missing_harness_modules

        if missing_harness_modules():
            pytest.skip(f"lm-eval's hf model needs {', '.join(missing_harness_modules())}: pip install -e '.[lm-eval]'")
        return sys.executable
    probe = subprocess.run([python, "-I", "-c", "import lm_eval.models.huggingface"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"PUZZLENAS_LM_EVAL_PYTHON={python} cannot import lm-eval's hf model: {probe.stderr[-300:]}")
    return python


@pytest.mark.slow
def test_lm_eval_command_line_scores_an_export_on_a_local_task(child, tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True --tasks TASK.yaml`,
    as `puzzlenas tasks` prints it, in a process where `import puzzlenas` fails: the same accuracy
    and per-request log-likelihoods as our scorer on the same model. Needs the full lm-eval
    (`pip install -e '.[lm-eval]'`), here or in the environment $PUZZLENAS_LM_EVAL_PYTHON names."""
    python = lm_eval_python()
    from transformers import AutoTokenizer

    from puzzlenas.eval import tasks as T

    src, model = child
    export = export_child(src, tmp_path / "export", "hf", "float32")
    g = torch.Generator().manual_seed(0)
    examples = []
    for k in range(16):
        ids = torch.randint(3, VOCAB, (8,), generator=g).tolist()
        choices = [" " + " ".join(f"w{i}" for i in ids[4 + j: 5 + j + j % 2]) for j in range(4)]
        examples.append((" ".join(f"w{i}" for i in ids[:4]), choices, k % 4))
    task = T.Task("toy-mc", "multiple_choice", examples, "hand", "test")
    name = T.export_lm_eval_task(task, tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([python, "-I", "-c", LM_EVAL_CLI, "--model", "hf", "--model_args",
                          f"pretrained={export},trust_remote_code=True", "--tasks", str(tmp_path / "tasks" / f"{name}.yaml"),
                          "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
                         env=env, cwd=tmp_path, timeout=600, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][name]
    ours = T.evaluate_task(model, AutoTokenizer.from_pretrained(export), task, batch_size=4, return_details=True)
    assert result["acc,none"] == pytest.approx(ours["acc"])
    assert result["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{name}_*.jsonl")).open()]
    assert len(samples) == len(examples)
    for s in samples:  # request by request: lm-eval ran the exported code on the same weights
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(ours["details"][s["doc_id"]]["logliks"], abs=1e-4)
