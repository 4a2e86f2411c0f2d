"""Metrics on disk: one JSON line per step in `metrics.jsonl`, flushed as written, so a crash
loses nothing already logged. On resume, lines past the checkpoint's step are dropped so the
file always describes one continuous run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._file = open(path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = [record for record in intact_records(self.path) if record.get("step", -1) < step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullMetrics:
    """What ranks other than 0 log to: rank 0 alone writes the run's files."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def intact_records(path: Path) -> list[dict[str, Any]]:
    """The records of `path` (none when it does not exist) up to the first line a kill cut short:
    everything after that line is gone too."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
