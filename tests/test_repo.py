"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command_exactly():
    main_job, test_command = readme_commands()[:2]
    assert "puzzlenas run" in main_job and "pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_every_example_and_preset_config_loads():
    from puzzlenas.config import PRESETS_DIR, load_run_config

    paths = sorted((ROOT / "examples").glob("*.yaml")) + sorted(PRESETS_DIR.glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        cfg = load_run_config(path)
        assert cfg.search.targets, path
