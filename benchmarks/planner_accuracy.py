"""Predicted vs measured peak memory and tokens/s on this machine (shoestring.bench.planner_accuracy).

    PYTHONPATH=src python benchmarks/planner_accuracy.py [--size small] [--rounds 3] [--only yafsdp] [--json benchmarks/planner_accuracy_raw.json]
    PYTHONPATH=src python benchmarks/planner_accuracy.py --from-json benchmarks/planner_accuracy_raw.json [--fit]

Prints a Markdown table (docs/benchmarks.md records it). `--from-json` re-predicts saved
measurements with the current planner (no runs); `--fit` prints the `[calibration.cpu]` constants
those measurements give (paste them into src/shoestring/plan/hardware.toml, then re-predict).
"""

from __future__ import annotations

import argparse
import json
import sys

from shoestring.bench.planner_accuracy import SIZES, fit, fit_toml, predict_rows, run, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="run only the cases whose label contains this (e.g. yafsdp)")
    ap.add_argument("--json", help="also write the rows (raw measurements included) here")
    ap.add_argument("--from-json", help="re-predict rows saved by --json (no runs)")
    ap.add_argument("--fit", action="store_true", help="print [calibration.cpu] fitted to the rows")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            rows = predict_rows(json.load(f))
    else:
        rows = run(a.size, a.rounds, progress=lambda s: print(s, file=sys.stderr, flush=True), only=a.only)
    print(table(rows))
    if a.fit:
        print("\n[calibration.cpu] fitted to these rows:\n" + fit_toml(fit(rows)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
