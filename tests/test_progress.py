"""Progress bars: on a terminal only, off with PUZZLENAS_PROGRESS=0 or when stderr is a file."""

from __future__ import annotations

import io
import sys

from puzzlenas.progress import progress, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("PUZZLENAS_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled()
    assert list(progress(range(5), desc="x")) == list(range(5))  # a plain pass-through
    assert sys.stderr.getvalue() == ""


def test_bars_on_a_terminal_and_the_switch(monkeypatch):
    monkeypatch.delenv("PUZZLENAS_PROGRESS", raising=False)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_enabled()
    assert list(progress(range(3), desc="[test] steps", mininterval=0)) == [0, 1, 2]
    assert "[test] steps" in terminal.getvalue() and "3/3" in terminal.getvalue()
    monkeypatch.setenv("PUZZLENAS_PROGRESS", "0")
    assert not progress_enabled()
    monkeypatch.setenv("PUZZLENAS_PROGRESS", "1")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_enabled()  # forced on, for a log that wants them
    monkeypatch.setenv("RANK", "1")
    assert not progress_enabled()  # torchrun: rank 0 draws the only bar


def test_pipeline_stages_write_no_bar_to_a_non_terminal(finished_run, tmp_path, capfd, monkeypatch):
    """A stage run with stderr redirected (as in CI) leaves no bar characters behind."""
    import shutil

    from puzzlenas.pipeline import run_pipeline

    monkeypatch.delenv("PUZZLENAS_PROGRESS", raising=False)
    run = shutil.copytree(finished_run, tmp_path / "run")
    run_pipeline(run / "config.yaml", run_dir=run, until="scores", force=["scores"])
    err = capfd.readouterr().err
    assert "it/s" not in err and "batch/s" not in err and "\r" not in err
