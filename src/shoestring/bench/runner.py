"""Run many `StepSpec`s side by side: one fresh process per measurement, rounds interleaved."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from typing import Callable

from shoestring.bench.step import StepSpec


def run_worker(spec: StepSpec) -> dict:
    proc = subprocess.run([sys.executable, "-m", "shoestring.bench.step", json.dumps(asdict(spec))],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_by_side(specs: dict[str, StepSpec], rounds: int, progress: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """name -> the measurement with the median step time over `rounds` fresh processes, plus
    `step_s_all` (every round's figure) so the spread is visible."""
    results: dict[str, list[dict]] = {name: [] for name in specs}
    for r in range(rounds):
        for name, spec in specs.items():
            progress(f"round {r + 1}/{rounds}: {name}")
            results[name].append(run_worker(spec))
    out = {}
    for name, runs in results.items():
        runs.sort(key=lambda m: m["step_s"])
        median = dict(runs[len(runs) // 2])
        median["step_s_all"] = [m["step_s"] for m in runs]
        median["peak_rss_bytes"] = statistics.median(m["peak_rss_bytes"] for m in runs)
        out[name] = median
    return out
