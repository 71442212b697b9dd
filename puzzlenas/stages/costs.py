"""costs: measured prefill / decode cost of every subblock shape, memory, and the whole-model check.

Costs depend on the shapes of the space (the library config) and the device, not on the
trained weights: retraining the library never remeasures them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from . import parent
from .base import RunDir, Stage
from .common import read_table
from .library import runtime_narrowing

if TYPE_CHECKING:
    from ..config import RunConfig

# It prices the library's shapes (space.json): the runtime that may narrow them counts as the library does.
STAGE = Stage("costs", config=("library", "costs", "device", ("runtime", runtime_narrowing)), upstream=(parent.STAGE,))


def run(cfg: RunConfig, run_dir: Path) -> Path:
    """Write costs/costs.json (per subblock and scenario) and check.json (whole models measured)."""
    from ..checkpoint import atomic_write_json, atomic_write_text
    from ..costs import (OtherLoad, calibrate, calibrated_check, check_against_whole_models, costs_table,
                         load_recorded_table, measure_costs, other_load_warning, random_children)
    from ..dist import resolve_device
    from ..library import read_space
    from ..model.modeling import DeciLMConfig

    paths = RunDir(run_dir)
    out = paths.costs.parent
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    config = DeciLMConfig.from_pretrained(paths.parent)
    space = read_space(paths.space)
    attention = [v.config for att, _ in space for v in att]
    ffn = [v.config for _, f in space for v in f]
    # A GPU's timings do not share its cores; under torchrun the other ranks are this run's own processes.
    other_load = OtherLoad() if device.type == "cpu" and os.environ.get("WORLD_SIZE", "1") == "1" else None
    if cfg.costs.recorded:  # priced elsewhere (or earlier): the check below reports how well it fits here
        table = load_recorded_table(cfg.costs.recorded, attention, ffn, cfg.costs.scenarios)
    else:
        table = measure_costs(config, attention, ffn, cfg.costs, device)
    children = {"parent": config.blocks}
    for k, blocks in enumerate(random_children(space, cfg.costs.check_children, cfg.seed)):
        children[f"random-{k}"] = blocks
    check = check_against_whole_models(config, table, children, cfg.costs, device)
    if cfg.costs.calibrate and not cfg.costs.recorded:
        calibrate(table, check, cfg.costs.scenarios)
        check = calibrated_check(table, check, children)
    atomic_write_json(paths.costs, table)
    atomic_write_json(out / "check.json", check)
    text = costs_table(table, check)
    warning = other_load_warning(other_load.share()) if other_load is not None else None
    if warning:
        text += "\n" + warning
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    STAGE.mark_done(cfg, run_dir, device=table["device"].get("name"))
    return out


def read_costs(run_dir: Path) -> dict:
    return read_table(RunDir(run_dir).costs, "costs")
