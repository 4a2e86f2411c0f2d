"""How fast attention runs against the rest of a step: the same tokens a step at longer sequences.

    PYTHONPATH=src python benchmarks/attention_share.py [--precision bf16] [--eager] [--rounds 5]

The `small` preset's step (our single-device strategy as `benchmarks/profile_step.py` builds it;
blocks compiled unless --eager; freed host memory kept, as a one-process run keeps it) at 8 x 256,
4 x 512 and 2 x 1024: 2,048 tokens each, so the dense matmuls' FLOPs are the same and only
attention's (scores and values, forward and backward) grow, doubling each time. The shapes take
turns in one process (3 untimed steps each, then `--rounds` rounds). The step's growth over the
attention FLOPs' growth at the probed matmul peak is the fraction of the peak attention reaches;
beside it, the fraction the whole step reaches. The planner prices attention at a rate of its own
(`attention_mfu` in `[calibration.cpu]`, fitted from its 8 x 256 and 2 x 1024 rows; this script
is why: docs/planner.md, "On record").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

SHAPES = ((8, 256), (4, 512), (2, 1024))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import shoestring_step

    from shoestring.bench.incumbents import SIZES
    from shoestring.levers import host_memory
    from shoestring.models import preset_args
    from shoestring.plan import probe
    from shoestring.plan.throughput import compute_dtype

    host_memory.keep_freed_memory()
    torch.set_num_threads(2)
    steps = {}
    for batch, seq in SHAPES:
        work = replace(SIZES["small"][0], precision=a.precision, batch=batch, seq_len=seq)
        step, x, y = shoestring_step(work, not a.eager), *(torch.randint(0, work.vocab, (batch, seq)) for _ in range(2))
        for _ in range(3):
            step(x, y)
        steps[(batch, seq)] = (step, x, y, [])
    for _ in range(a.rounds):
        for step, x, y, times in steps.values():
            t0 = time.perf_counter()
            step(x, y)
            times.append(time.perf_counter() - t0)

    args = preset_args("small")
    peak = probe.matmul_peaks(torch.device("cpu"))[compute_dtype(a.precision)].flops
    print(f"`small`, {a.precision}, {'eager' if a.eager else 'compiled'}, 2 threads, {a.rounds} rounds in turns; "
          f"matmul peak {peak / 1e9:,.0f} GFLOP/s\n")
    print("| shape | median step (s) | steps (s) | dense at peak (s) | attention at peak (s) "
          "| whole step's fraction of peak |")
    print("|---|---:|---|---:|---:|---:|")
    rows = []
    for (batch, seq), (_, _, _, times) in steps.items():
        attention = batch * seq * args.attention_flops_per_token(seq) / peak
        dense = batch * seq * args.flops_per_token(seq) / peak - attention
        step_s = statistics.median(times)
        rows.append((step_s, attention))
        print(f"| {batch} x {seq} | {step_s:.3f} | {min(times):.3f}-{max(times):.3f} | {dense:.3f} | {attention:.3f} | "
              f"{(dense + attention) / step_s:.3f} |")
    fractions = [(a1 - a0) / (s1 - s0) for (s0, a0), (s1, a1) in zip(rows, rows[1:])]
    print("\nattention's fraction of the peak, from each doubling: " + ", ".join(f"{f:.2f}" for f in fractions))


if __name__ == "__main__":
    main()
