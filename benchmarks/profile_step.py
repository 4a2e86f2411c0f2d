"""Where one training step's time goes: torch.profiler over a few steps of a preset, top ops.

    PYTHONPATH=src python benchmarks/profile_step.py --preset small [--precision auto|fp32|bf16|...] [--compile auto|on|off]

Prints the step time (median of the timed steps), tokens/s, MFU against the measured matmul peak, and the ops with the most
self CPU time per step (a markdown table, as pasted into docs/performance.md).

On a machine shared with other jobs, wall-clock times are unreliable: `--threads 1` runs every kernel on this thread,
and the step's CPU time (also printed, the minimum over the timed steps) then measures the work done, far less
disturbed by other jobs (not immune: they share caches and memory bandwidth). Compare configurations by it, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from shoestring.levers import compile as compile_lever
from shoestring.levers.precision import PrecisionPolicy, resolve_precision
from shoestring.models import build_model, preset_args
from shoestring.parallel import OptimizerSettings
from shoestring.parallel.single import SingleDevice
from shoestring.plan import probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--precision", default="auto", help="as precision.mode")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median) and profiled steps")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="as train.compile")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(preset_args(a.preset, vocab_size=a.vocab, max_seq_len=a.seq), device)
    facts = probe.device_facts(device)
    policy = PrecisionPolicy(str(resolve_precision(facts).value) if a.precision == "auto" else a.precision)
    compiled = compile_lever.decide({"on": True, "off": False}.get(a.compile, "auto"), facts, policy).value \
        and compile_lever.compile_blocks(model, device)
    strategy = SingleDevice(model, policy, OptimizerSettings(1e-3, 0.1, (0.9, 0.95), 1.0), device)
    x, y = (torch.randint(0, a.vocab, (a.batch, a.seq), device=device) for _ in range(2))

    def step() -> None:
        strategy.forward_backward(x, y, 1.0, True)
        strategy.step(1e-3)

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(3):  # warm-up (and compilation)
        step()
    times, cpu_times = [], []
    for _ in range(a.steps):
        sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
    step_s = statistics.median(times)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(a.steps):
            step()
        sync()

    tokens = a.batch * a.seq
    tps = tokens / step_s
    peak = facts.rate(policy.mode)
    mfu = probe.mfu(tps * model.flops_per_token(a.seq), peak)
    print(f"preset {a.preset}, {policy.mode}, batch {a.batch} x {a.seq}, blocks compiled {compiled}, "
          f"threads {torch.get_num_threads()}: step {step_s * 1e3:.0f} ms, {tps:,.0f} tok/s, "
          f"MFU {'error (above 1)' if mfu is None else f'{mfu:.1%}'} of the measured {peak / 1e12:.2f} TFLOP/s matmul peak; "
          f"CPU time of this thread per step {min(cpu_times) * 1e3:.0f} ms\n")
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    print("| op | ms per step | share | calls per step |\n|---|---:|---:|---:|")
    for e in events[: a.top]:
        t = getattr(e, key)
        print(f"| `{e.key}` | {t / 1e3 / a.steps:.1f} | {t / total:.1%} | {e.count // a.steps} |")


if __name__ == "__main__":
    main()
