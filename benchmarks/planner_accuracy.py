"""Predicted vs measured peak memory and tokens/s on this machine (shoestring.bench.planner_accuracy).

    PYTHONPATH=src python benchmarks/planner_accuracy.py [--size small] [--only yafsdp] [--json benchmarks/planner_accuracy_raw.json]
    PYTHONPATH=src python benchmarks/planner_accuracy.py --from-json RUN_A.json --fit [--write-calibration]
    PYTHONPATH=src python benchmarks/planner_accuracy.py --from-json RUN_B.json        # check the fit on another run

Prints a Markdown table (docs/benchmarks.md records it). `--from-json` re-predicts saved
measurements with the current planner (no runs); `--fit` prints the `[calibration.cpu]` tables
those measurements give, `--write-calibration` writes them into src/shoestring/plan/hardware.toml
and re-predicts with them.
"""

from __future__ import annotations

import argparse
import json
import sys

from shoestring.bench.planner_accuracy import SIZES, calibration_toml, fit, predict_rows, run, table, write_calibration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=1, help="fresh-process rounds per configuration")
    ap.add_argument("--only", default="", help="run only the cases whose label contains this (e.g. yafsdp)")
    ap.add_argument("--json", help="also write the rows (raw measurements and the probe included) here")
    ap.add_argument("--from-json", help="re-predict rows saved by --json (no runs)")
    ap.add_argument("--fit", action="store_true", help="print [calibration.cpu] fitted to the rows")
    ap.add_argument("--write-calibration", action="store_true", help="with --fit: write it into hardware.toml")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            rows = predict_rows(json.load(f))
    else:
        rows = run(a.size, a.rounds, progress=lambda s: print(s, file=sys.stderr, flush=True), only=a.only)
    if a.fit:
        fitted = fit(rows)
        source = a.from_json or "this run"
        print(calibration_toml(fitted, source))
        if a.write_calibration:
            write_calibration(fitted, source)
            rows = predict_rows(rows)
            print("written to hardware.toml; the rows re-predicted with it (the fit's own rows: check on another run):")
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
