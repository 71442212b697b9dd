"""Progress bars with ETA for the long loops (BLD steps, scoring, GKD steps, costs, eval, tasks).

Bars go to stderr, so the run log (stdout, teed to run.log) stays clean. They are shown when
stderr is a terminal, on rank 0 only; `PUZZLENAS_PROGRESS=0` turns them off and
`PUZZLENAS_PROGRESS=1` turns them on even when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

ENV = "PUZZLENAS_PROGRESS"


def progress_enabled() -> bool:
    """Whether bars are drawn: PUZZLENAS_PROGRESS decides when set, else a terminal on rank 0."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: one bar, not one per rank
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def quiet_library_bars() -> None:
    """Turn off the bars transformers and huggingface_hub draw (loading weights, writing shards)
    where ours are off, so a log of a run without a terminal holds no bar fragments."""
    if progress_enabled():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
    if "transformers" in sys.modules:  # imported already: its own switch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", initial: int = 0, **kwargs: Any):
    """A tqdm bar over `iterable` (or updated by hand when None) on stderr; disabled (a plain
    pass-through) when `progress_enabled()` is false."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                disable=not progress_enabled(), leave=False, dynamic_ncols=True, **kwargs)
