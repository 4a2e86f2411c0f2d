"""What the host-memory lever (`levers/host_memory.py`) does to one training process: step time,
minor page faults and kernel CPU time per step, glibc's defaults against freed memory kept.

    PYTHONPATH=src python benchmarks/host_memory.py [--pairs 2] [--steps 8] [--precision bf16] [--eager]
        [--batch 8] [--seq-len 256] [--hf]

Each pair is two fresh processes, one each way (the setting is a process's, and a heap shaped by
one setting would carry over to the other inside one process), taking the `small` preset's step
as `benchmarks/profile_step.py` builds it (our single-device strategy, or with --hf the same model
as `LlamaForCausalLM` in a plain loop, the bench's peer; compiled unless --eager), 3 untimed steps,
then `--steps` timed ones read against `/proc/self/stat`. Prints one Markdown row per process
(with its peak RSS, VmHWM, over the whole run) and the ratio of the medians. Linux only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from shoestring.measure.memory import PeakRSS


def _stat() -> tuple[int, float]:
    """(minor faults, kernel CPU seconds) of this process so far."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / 100


def child(mode: str, a: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import hf_step, shoestring_step

    from shoestring.bench.incumbents import SIZES
    from shoestring.levers import host_memory

    if mode == "kept":
        host_memory.keep_freed_memory()
    torch.set_num_threads(2)
    work = replace(SIZES["small"][0], precision=a.precision, batch=a.batch, seq_len=a.seq_len)
    step = (hf_step if a.hf else shoestring_step)(work, not a.eager)
    x, y = (torch.randint(0, work.vocab, (work.batch, work.seq_len)) for _ in range(2))
    for _ in range(3):
        step(x, y)
    rows = []
    for _ in range(a.steps):
        faults, kernel = _stat()
        t0 = time.perf_counter()
        step(x, y)
        seconds = time.perf_counter() - t0
        after = _stat()
        rows.append((seconds, after[0] - faults, after[1] - kernel))
    return {"mode": mode, "step_s": [r[0] for r in rows], "faults": [r[1] for r in rows], "kernel_s": [r[2] for r in rows],
            "peak_bytes": PeakRSS().peak_bytes()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hf", action="store_true", help="the HF model in a plain loop instead of ours")
    p.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    runs = []
    for _ in range(a.pairs):
        for mode in ("default", "kept"):
            argv = [sys.executable, __file__, "--child", mode] + sys.argv[1:]
            out = subprocess.run(argv, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'HF LlamaForCausalLM' if a.hf else 'shoestring'}, `small` {a.batch} x {a.seq_len}, {a.precision}, "
          f"{'eager' if a.eager else 'compiled'}, 2 threads; {a.steps} timed steps after 3 per fresh process\n")
    print("| process | median step (s) | steps (s) | minor faults a step | kernel CPU s a step | peak RSS MiB |")
    print("|---|---:|---|---|---|---:|")
    for r in runs:
        print(f"| {r['mode']} | {statistics.median(r['step_s']):.3f} | {min(r['step_s']):.3f}-{max(r['step_s']):.3f} | "
              f"{min(r['faults']):,}-{max(r['faults']):,} | {min(r['kernel_s']):.2f}-{max(r['kernel_s']):.2f} | "
              f"{r['peak_bytes'] / 2**20:,.0f} |")
    med = {m: statistics.median(statistics.median(r["step_s"]) for r in runs if r["mode"] == m) for m in ("default", "kept")}
    print(f"\nkept / default, median of the processes' medians: {med['default'] / med['kept']:.2f}x faster")


if __name__ == "__main__":
    main()
