"""Predicted vs measured peak memory and tokens/s on this machine, one fresh process group per
configuration (precisions x checkpointing modes x single / ddp / fsdp2 on 2 ranks).

    PYTHONPATH=src python benchmarks/planner_accuracy.py [--rounds 3] [--steps 4]

Prints a Markdown table (paste it into docs/benchmarks.md). Measured memory is the largest
per-rank peak RSS (VmHWM) over the ranks; tokens/s is the median over rounds of the median step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

CONFIGS = [  # (preset, strategy, precision, checkpointing, global batch, seq_len)
    ("small", "single", "fp32", "none", 8, 256),
    ("small", "single", "bf16", "none", 8, 256),
    ("small", "single", "bf16", "full", 8, 256),
    ("small", "single", "bf16-pure", "selective", 8, 256),
    ("small", "ddp", "bf16", "none", 8, 256),
    ("small", "ddp", "fp32", "full", 8, 256),
    ("small", "fsdp2", "bf16", "none", 8, 256),
    ("small", "fsdp2", "bf16-pure", "full", 8, 256),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, spec: list, steps: int, queue) -> None:
    """One rank: build the strategy from a config (the trainer's path), time `steps` steps."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from shoestring.build import build_strategy
    from shoestring.config import build_config
    from shoestring.parallel import dist
    from shoestring.train.memory import PeakRSS

    preset, strategy, precision, ckpt, batch, seq = spec
    vocab = 8192
    with dist.process_group(torch.device("cpu"), 120, required=world > 1):
        cfg = build_config({"model": {"preset": preset}, "data": {"seq_len": seq}, "precision": {"mode": precision},
                            "checkpointing": {"mode": ckpt}, "parallel": {"strategy": strategy}})
        s = build_strategy(cfg, vocab, torch.device("cpu"))
        gen = torch.Generator().manual_seed(rank)
        local = batch // world
        x, y = (torch.randint(0, vocab, (local, seq), generator=gen) for _ in range(2))
        times = []
        for i in range(steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            s.forward_backward(x, y, 1.0, True)
            s.step(1e-3)
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        queue.put({"rank": rank, "peak_rss": PeakRSS().peak_bytes(), "step_s": statistics.median(times),
                   "state": s.memory()})


def measure(spec: tuple, steps: int) -> dict:
    import torch.multiprocessing as mp

    world = 1 if spec[1] == "single" else 2
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=worker, args=(r, world, port, list(spec), steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return {"peak_rss": max(o["peak_rss"] for o in out), "step_s": max(o["step_s"] for o in out)}


def predict(spec: tuple) -> tuple[float, float, dict]:
    from shoestring.plan.search import Request, search

    preset, strategy, precision, ckpt, batch, seq = spec
    world = 1 if strategy == "single" else 2
    fixed = (("precision", precision), ("checkpointing", ckpt), ("strategy", strategy), ("micro_batch", batch // world),
             ("grad_accum", 1), ("reshard_after_forward", True), ("offload", False))
    req = Request(preset, tokens=1e6, hardware=(f"local:{world}",), seq_len=seq, global_batch_tokens=batch * seq,
                  fixed=fixed, ranks=world)
    plans = search(req)
    p = (plans.plans or plans.misses)[0]
    return p.memory.total, p.tokens_per_s, p.memory.components


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="also write the raw measurements here")
    ap.add_argument("--from-json", help="re-predict against measurements saved by --json (no runs)")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            rows = {tuple(r["spec"]): r["runs"] for r in json.load(f)}
    else:
        rows = {spec: [] for spec in CONFIGS}
        for r in range(a.rounds):
            for spec in CONFIGS:
                print(f"round {r + 1}/{a.rounds}: {spec}", file=sys.stderr, flush=True)
                rows[spec].append(measure(spec, a.steps))
    lines = ["| model | strategy | precision | ckpt | batch x seq | mem pred (MiB) | mem meas (MiB) | err | tok/s pred | tok/s meas | err | step s (all rounds) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    raw = []
    for spec, runs in rows.items():
        mem_p, tps_p, parts = predict(spec)
        mem_m = statistics.median(r["peak_rss"] for r in runs)
        step = statistics.median(r["step_s"] for r in runs)
        tps_m = spec[4] * spec[5] / step
        lines.append(f"| {spec[0]} | {spec[1]} | {spec[2]} | {spec[3]} | {spec[4]}x{spec[5]} | {mem_p / 2**20:.0f} | "
                     f"{mem_m / 2**20:.0f} | {mem_p / mem_m - 1:+.1%} | {tps_p:.0f} | {tps_m:.0f} | {tps_p / tps_m - 1:+.1%} | "
                     + ", ".join(f"{r['step_s']:.2f}" for r in runs) + " |")
        raw.append({"spec": spec, "runs": runs, "predicted": {"memory": mem_p, "tokens_per_s": tps_p, "components": parts}})
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
