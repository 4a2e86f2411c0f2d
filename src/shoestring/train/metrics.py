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
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # a line cut by a kill: everything after it is gone too
                if record.get("step", -1) < step:
                    kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
