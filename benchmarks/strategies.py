"""Strategies side by side on 2 ranks (see shoestring.bench.strategies); prints a markdown table.

usage: python benchmarks/strategies.py [--size smoke|small|full] [--rounds R] [--only CASE ...]
"""

from __future__ import annotations

import argparse

from shoestring.bench import strategies


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="small", choices=list(strategies.SIZES))
    p.add_argument("--rounds", type=int)
    p.add_argument("--precision", default="auto")
    p.add_argument("--only", nargs="*", help="subset of: " + ", ".join(strategies.CASES))
    args = p.parse_args()
    rows = strategies.run(args.size, args.rounds, args.only, precision=args.precision,
                          progress=lambda s: print(s, flush=True))
    print(strategies.table(rows))


if __name__ == "__main__":
    main()
