"""The run config: torch-free loading, overrides, names that become paths, the fingerprints'
section form."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from puzzlenas.config import ConfigError, load_run_config


def test_reading_a_yaml_config_imports_no_torch(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("bld: {lr: 1e-3}\n")
    code = (f"import sys\nfrom puzzlenas.config import load_run_config\ncfg = load_run_config({str(path)!r})\n"
            "assert cfg.bld.lr == 1e-3\nprint(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch" not in out.stdout.split()


def test_floats_written_1e_3_are_floats(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("gkd: {lr: 1e-4}\n")
    cfg = load_run_config(path, ["bld.lr=1e-3", "search.time_margin=5E-2"])
    assert cfg.bld.lr == 1e-3 and cfg.gkd.lr == 1e-4 and cfg.search.time_margin == 0.05
    with pytest.raises(ConfigError, match="bld.lr = 'fast' has type str; expected float"):
        load_run_config(path, ["bld.lr=fast"])


def test_empty_target_list_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"search.targets is empty"):
        load_run_config(_preset(), ["search.targets=[]"])


def _preset():
    from puzzlenas.config import PRESETS_DIR

    return PRESETS_DIR / "cpu.yaml"


@pytest.mark.parametrize("override, key", [("name=..", "name"), ("name=.", "name"), ("name=a/b", "name"),
                                           ("name=''", "name"),
                                           ('search.targets=[{name: "x/../../victim", speedup: 1.3}]', "targets"),
                                           ('search.targets=[{name: "..", speedup: 1.3}]', "targets")])
def test_names_that_become_paths_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"{key}.*becomes a folder name"):
        load_run_config(_preset(), [override])


def test_a_traversal_name_deletes_nothing(tmp_path, monkeypatch, capsys):
    from puzzlenas.cli import main

    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("mine")
    work = tmp_path / "work"
    (work / "parent").mkdir(parents=True)
    (work / "parent" / "keep.txt").write_text("mine")
    monkeypatch.chdir(work / "parent")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"search": {"targets": [{"name": "x/../../victim", "speedup": 1.3}]}}))
    assert main(["run", str(path), "--run-dir", str(work)]) == 2
    assert main(["run", str(_preset()), "--set", "name=..", "--force", "parent"]) == 2
    assert "becomes a folder name" in capsys.readouterr().err
    assert (tmp_path / "victim" / "keep.txt").read_text() == "mine"
    assert (work / "parent" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["parent"]  # nothing written either


def test_the_optimizer_sections_keep_their_historical_repr():
    """Fingerprints hash a section's repr: BLD's and GKD's list every field in their old order."""
    from puzzlenas.sections import BLDConfig, GKDConfig

    for cls in (BLDConfig, GKDConfig):
        assert sorted(cls.REPR_ORDER) == sorted(f.name for f in dataclasses.fields(cls)), cls
    assert repr(BLDConfig()).startswith("BLDConfig(mode='decoupled', coupled_pairs=[], tokens=1000000, ")
    assert repr(GKDConfig()).startswith("GKDConfig(tokens=1000000, batch_size=8, lr=5e-05, min_lr_fraction=0.1")


def test_bad_overrides_are_one_config_error():
    with pytest.raises(ConfigError, match="not a section"):
        load_run_config(_preset(), ["name.x=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(_preset(), ["bld.betas=[0.9"])
