"""Predicted vs measured peak memory and tokens/s on this machine (shoestring.bench.planner_accuracy).

    PYTHONPATH=src python benchmarks/planner_accuracy.py [--size small] [--only yafsdp] [--json benchmarks/planner_accuracy_raw.json]
    PYTHONPATH=src python benchmarks/planner_accuracy.py --from-json RAW.json             # re-fit and re-check saved rows
    PYTHONPATH=src python benchmarks/planner_accuracy.py --from-json RAW.json --write-calibration

A run measures the fit set and the check set, fits `[calibration.cpu]` to the fit set alone and
predicts both with it (the verdict is on the check set). `--from-json` does the same on saved
measurements (no runs); `--write-calibration` writes the fit into src/shoestring/plan/hardware.toml
(the shipped default; `shoestring calibrate` writes this machine's own instead).
"""

from __future__ import annotations

import argparse
import json
import sys

from shoestring.bench.planner_accuracy import SIZES, calibrate_and_predict, run, table, write_calibration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=1, help="fresh-process rounds per configuration")
    ap.add_argument("--only", default="", help="run only the cases whose label contains this (e.g. yafsdp)")
    ap.add_argument("--json", help="also write the rows (raw measurements and the probe included) here")
    ap.add_argument("--from-json", help="fit and predict rows saved by --json (no runs)")
    ap.add_argument("--write-calibration", action="store_true", help="write the fit into hardware.toml")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            rows = calibrate_and_predict(json.load(f))
    else:
        rows = run(a.size, a.rounds, progress=lambda s: print(s, file=sys.stderr, flush=True), only=a.only)
    print(table(rows))
    if a.write_calibration:
        if "fitted" not in rows[0]:
            sys.exit(f"not written: {rows[0]['calibration']}")
        write_calibration(rows[0]["fitted"], a.from_json or "this run")
        print("written to hardware.toml")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: r[k] for k in ("case", "set", "runs", "probe")} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
