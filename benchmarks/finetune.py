"""LoRA vs full fine-tuning of SmolLM2-135M-Instruct (one section of `shoestring bench`; see
shoestring.bench.finetune).

    python benchmarks/finetune.py [--size smoke|small|full] [--rounds R] [--source SRC]

(The data set alone: `shoestring data instruct-demo OUT.jsonl`.)

Prints the Markdown table; `shoestring bench --only finetune` also writes it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys

from shoestring.bench import finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="full", choices=list(finetune.SIZES))
    ap.add_argument("--rounds", type=int, help="fresh-process rounds per mode (median taken)")
    ap.add_argument("--source", help="model.source (default: SmolLM2-135M-Instruct GGUF)")
    a = ap.parse_args()
    rows = finetune.run(a.size, a.rounds, progress=lambda s: print(s, file=sys.stderr, flush=True), source=a.source)
    print(finetune.table(rows))


if __name__ == "__main__":
    main()
