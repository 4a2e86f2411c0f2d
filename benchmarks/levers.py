"""Precision and activation-checkpointing levers side by side.

    python benchmarks/levers.py [--preset tiny] [--batch 16] [--seq-len 256] [--rounds 3] [--compile]

Prints a Markdown report (recorded in docs/benchmarks.md with the command that made it).
"""

from __future__ import annotations

import argparse
import sys

from shoestring.bench import levers
from shoestring.bench.step import StepSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per configuration (median taken)")
    p.add_argument("--precision", default="bf16", help="precision for the checkpointing comparison")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (regional) in every configuration")
    a = p.parse_args()
    base = StepSpec(preset=a.preset, vocab_size=a.vocab_size, batch=a.batch, seq_len=a.seq_len, steps=a.steps,
                    precision=a.precision, compile=a.compile)
    results = levers.run(base, a.rounds, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(levers.report(base, results))


if __name__ == "__main__":
    main()
