"""Training progress for people: rich's live bar on a terminal, plain lines anywhere else.

A live bar redraws itself in place. Written to a file or a pipe (a cluster job, `make demo >
log`, CI), rich draws it once, at the end, so such a run would print nothing for minutes. Off a
terminal the trainer prints one line per logging step (`train.log_every`) instead: step, loss,
tokens/s, elapsed time and ETA.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress(Protocol):
    def update(self, step: int, loss: float, tokens_per_s: float) -> None: ...

    def set_total(self, total: int) -> None: ...

    def print(self, text: str) -> None: ...


class BarProgress:
    """rich's live bar, for a terminal."""

    def __init__(self, bar: Progress, total: int, start: int):
        self._bar = bar
        self._task = bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self._bar.update(self._task, completed=step, loss=loss, tps=tokens_per_s)

    def set_total(self, total: int) -> None:
        self._bar.update(self._task, total=total)

    def print(self, text: str) -> None:
        self._bar.console.print(text)


class LineProgress:
    """One plain line per update, for a log file or a pipe. The ETA runs at the pace of the
    steps since the previous line (evals and saves in between included)."""

    def __init__(self, console: Console, total: int, start: int):
        self._console, self._total = console, total
        self._t0 = time.perf_counter()
        self._last = (start, self._t0)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = time.perf_counter()
        last_step, last_t = self._last
        eta = (self._total - step) * (now - last_t) / max(1, step - last_step)
        self._last = (step, now)
        self.print(f"step {step}/{self._total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                   f"elapsed {_clock(now - self._t0)}  ETA {_clock(eta)}")

    def set_total(self, total: int) -> None:
        self._total = total

    def print(self, text: str) -> None:
        self._console.print(text, highlight=False)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


@contextmanager
def train_progress(console: Console, total: int, start: int, enabled: bool) -> Iterator[TrainProgress]:
    """The bar on a terminal, lines elsewhere; nothing shown when not `enabled` (ranks other than 0)."""
    if not console.is_terminal:
        yield LineProgress(console if enabled else Console(quiet=True), total, start)
        return
    bar = Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )
    with bar:
        yield BarProgress(bar, total, start)
