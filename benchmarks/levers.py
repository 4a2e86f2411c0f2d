"""Precision and activation-checkpointing levers side by side (one section of `shoestring bench`).

    python benchmarks/levers.py [--size smoke|small|full] [--rounds R] [--compile]

Prints the Markdown table; `shoestring bench --only levers` also writes it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys

from shoestring.bench import levers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=list(levers.SIZES))
    p.add_argument("--rounds", type=int, help="timed rounds per configuration, taken in turns (median taken)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (regional) in every configuration")
    a = p.parse_args()
    rows = levers.run(a.size, a.rounds, progress=lambda s: print(s, file=sys.stderr, flush=True), compile=a.compile)
    print(levers.table(rows))


if __name__ == "__main__":
    main()
