"""Progress off a terminal: a plain line every train.log_every steps; on a terminal, the live bar."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from rich.console import Console

from shoestring.train.progress import BarProgress, LineProgress, train_progress
from tests.runs import write_config

LINE = re.compile(r"^step (\d+)/12  loss \d+\.\d{4}  [\d,]+ tok/s  elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$")


def test_piped_run_prints_a_line_per_log_every(make_config, tmp_path):
    cfg = write_config(make_config, tmp_path / "cfg.toml", train__steps=12, train__log_every=4, train__eval_every=12)
    proc = subprocess.run([sys.executable, "-m", "shoestring", "train", str(cfg)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    steps = [int(m.group(1)) for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert steps == [4, 8, 12], proc.stdout
    assert "\x1b[" not in proc.stdout  # no terminal control codes in a log file


def test_bar_on_a_terminal_lines_elsewhere():
    with train_progress(Console(file=io.StringIO(), force_terminal=True), 10, 0, enabled=True) as progress:
        assert isinstance(progress, BarProgress)
    out = io.StringIO()
    with train_progress(Console(file=out, width=200), 10, 0, enabled=True) as progress:
        assert isinstance(progress, LineProgress)
        progress.update(5, 2.5, 1234.0)
        progress.set_total(20)
        progress.update(10, 2.0, 1234.0)
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == ["step 5/10", "step 10/20"]
