"""shoestring versus Hugging Face Trainer (1 device) and plain FSDP2 / DeepSpeed ZeRO-3 (2 ranks),
each eager and compiled, in interleaved rounds.

    PYTHONPATH=src python benchmarks/incumbents.py [--size smoke|small|full] [--parts single distributed] [--rounds R] [--json out.json]

Prints a Markdown report (tokens/s, spread, peak memory, every loss curve); the work and the
method are described in `shoestring.bench.incumbents`. Needs the `hf` extra (transformers) and deepspeed.
"""

from __future__ import annotations

import argparse
import json
import sys

from shoestring.bench import incumbents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(incumbents.SIZES))
    p.add_argument("--parts", nargs="+", default=["single", "distributed"], choices=["single", "distributed"])
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: the size's)")
    p.add_argument("--json", help="also write the raw rows here")
    a = p.parse_args()
    rows = incumbents.run(a.size, tuple(a.parts), progress=lambda s: print(f"... {s}", file=sys.stderr, flush=True),
                          rounds=a.rounds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(incumbents.table(rows))


if __name__ == "__main__":
    main()
