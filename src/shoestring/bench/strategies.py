"""Strategies side by side: the same model, data and global batch trained under each
data-parallel strategy, built as `shoestring train` builds it, in interleaved rounds through the
measuring harness (bench/harness.py: each configuration's processes started once, taking their
rounds in turns with the others; its warm-up rule and timer).

Per configuration: step time (the median timed step, then the median round), tokens/s,
model-state bytes each rank owns (counted), the round's process peak of the largest rank and how
far it is above the peak at the end of the warm-up (negative: below it), and what one rank sends per step with the
time collectives ran (measured by `shoestring.parallel.comm.CommMeter` on one more step, after
the peaks are read: the profiler holds its event buffers).

Runs use the trainer's default precision (`auto`: bf16 autocast where this machine's bf16 matmuls
are fast, else fp32; each row records the mode that ran) with `train.compile = false`: the
strategies' own difference, without the compiler's. The table names the preset and shape it ran.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from shoestring.bench import harness

from shoestring.measure.memory import MiB


# name -> (overrides of the run's config, ranks). The sharded engines run twice more with full
# activation checkpointing (a recomputed block re-gathers its weights), and each overlap
# mechanism is also switched off on its own: FSDP2's explicit prefetch, YaFSDP's async collectives.
# YaFSDP also runs once with torch's gloo collectives instead of its point-to-point ones
# (`parallel.gloo_collectives`): the effect of those alone.
FULL = {"checkpointing.mode": "full"}
CASES: dict[str, tuple[dict, int]] = {
    "single": ({"parallel.strategy": "single"}, 1),
    "ddp": ({"parallel.strategy": "ddp"}, 2),
    "fsdp2 reshard": ({"parallel.strategy": "fsdp2", "parallel.reshard_after_forward": True}, 2),
    "fsdp2 no-prefetch": ({"parallel.strategy": "fsdp2", "parallel.prefetch": 0}, 2),
    "fsdp2 no-reshard": ({"parallel.strategy": "fsdp2", "parallel.reshard_after_forward": False}, 2),
    "zero1": ({"parallel.strategy": "deepspeed", "parallel.zero_stage": 1}, 2),
    "zero2": ({"parallel.strategy": "deepspeed", "parallel.zero_stage": 2}, 2),
    "zero3": ({"parallel.strategy": "deepspeed", "parallel.zero_stage": 3}, 2),
    "yafsdp sync": ({"parallel.strategy": "yafsdp", "parallel.async_collectives": False}, 2),
    "yafsdp async": ({"parallel.strategy": "yafsdp"}, 2),
    "yafsdp async native": ({"parallel.strategy": "yafsdp", "parallel.gloo_collectives": "native"}, 2),
    "fsdp2 reshard + full ckpt": ({"parallel.strategy": "fsdp2", **FULL}, 2),
    "zero3 + full ckpt": ({"parallel.strategy": "deepspeed", "parallel.zero_stage": 3, **FULL}, 2),
    "yafsdp async + full ckpt": ({"parallel.strategy": "yafsdp", **FULL}, 2),
}

# The cases `--size small` leaves out to fit its time budget (15 minutes for the whole suite):
# ZeRO-1/2 and FSDP2 without resharding trade memory for speed in ways ddp and fsdp2 already
# bracket; ddp stands for the unsharded baseline; yafsdp on torch's collectives, yafsdp without
# async collectives and fsdp2 without prefetch are ablations; the checkpointed strategies repeat
# the comparison on a step with a longer backward (their goals are judged at `full` only).
FULL_ONLY = ("single", "fsdp2 no-reshard", "zero1", "zero2", "yafsdp async native", "fsdp2 no-prefetch",
             "yafsdp sync", "zero3 + full ckpt", "fsdp2 reshard + full ckpt", "yafsdp async + full ckpt")
# The cases that take their rounds in turns together (bench/harness.py: one group's processes
# are alive at once): those the goals compare (bench/goals.py), then the rest, then checkpointed.
COMPARED = ("ddp", "fsdp2 reshard", "fsdp2 no-prefetch", "zero3", "yafsdp sync", "yafsdp async")
GROUPS = ("compared", "others", "full ckpt")


def _group(case: str) -> str:
    return "full ckpt" if case.endswith("full ckpt") else "compared" if case in COMPARED else "others"


# size -> (preset, global batch, seq len, timed steps per round, rounds). `small` runs the
# `small` preset (a compute-bound step: the shape the yafsdp goal is about), 1 timed step (1-2 s)
# in each of 3 rounds (the suite's 15 minutes); `smoke` the smallest one.
SIZES = {
    "smoke": ("micro", 4, 32, 1, 1),
    "small": ("small", 8, 256, 1, 3),
    "full": ("small", 16, 256, 8, 5),
}


def _tree(sets: dict[str, Any]) -> dict[str, Any]:
    """A config tree from dotted keys."""
    tree: dict[str, Any] = {}
    for key, value in sets.items():
        *path, leaf = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def measure_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank: build the case's strategy, time its rounds, then meter one step's communication."""
    from shoestring.models import PRESETS
    from shoestring import dist
    from shoestring.parallel.comm import CommMeter
    from shoestring.measure.memory import PeakRSS

    sets = spec["sets"]
    vocab = PRESETS[sets["model.preset"]].vocab_size
    s = harness.build(_tree(sets), vocab)
    batch, seq = sets["train.batch_size"], sets["data.seq_len"]
    warmup = harness.warmup_steps()
    data = harness.bigram_batches(vocab, warmup + harness.worker_rounds() * spec["steps"] + 1, batch, seq, seed=0)
    rss = PeakRSS()
    peaks: list[int] = []

    def step(i: int) -> torch.Tensor:
        part = data[i].tensor_split(dist.world_size())[dist.rank()]
        loss = s.forward_backward(part[:, :-1].contiguous(), part[:, 1:].contiguous(), 1.0, True)
        s.step(1e-3)
        peaks.append(rss.peak_bytes())
        return loss

    timing = harness.timed_steps(step, spec["steps"], warmup)
    warm = peaks[warmup - 1]  # the peak at the end of the warm-up
    with CommMeter(dist.world_size()) as meter:
        step(len(data) - 1)
    mem = s.memory()
    return {"step_s": timing["step_s"], "steps_s": timing["steps_s"], "final_loss": timing["losses"][-1],
            "state_bytes": mem["params"] + mem["optimizer"] + mem["master"],  # gradients are freed between steps by some
            "peak_bytes": timing["peak_rss_bytes"], "peak_growth_bytes": timing["peak_rss_bytes"] - warm,
            "comm_bytes": meter.stats.bytes_sent, "comm_busy_s": meter.stats.busy_s, "precision": s.policy.mode,
            "rounds": [{"step_s": r["step_s"], "steps_s": r["steps_s"], "peak_bytes": r["peak_rss_bytes"],
                        "peak_growth_bytes": r["peak_rss_bytes"] - warm} for r in timing["rounds"]]}


def run(size: str = "small", rounds: int | None = None, only: list[str] | None = None, precision: str = "auto",
        progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per case: the round with the median step time, plus every round's step time."""
    preset, batch, seq, steps, default_rounds = SIZES[size]
    base = {"model.preset": preset, "train.batch_size": batch, "data.seq_len": seq, "precision.mode": precision,
            "train.compile": False}
    names = only or [c for c in CASES if size == "full" or c not in FULL_ONLY]
    jobs = {name: harness.Job("shoestring.bench.strategies:measure_job", {"sets": {**base, **CASES[name][0]}, "steps": steps},
                              CASES[name][1], group=_group(name))
            for name in sorted(names, key=lambda n: GROUPS.index(_group(n)))}
    measured = harness.interleaved(jobs, rounds or default_rounds, progress, keep_going=True)
    rows = []
    for name in names:
        per_round = [_merge(ranks) for ranks in measured[name]]
        row = harness.median_round(per_round)
        row.update(case=name, ranks=CASES[name][1], preset=preset, size=size, batch=batch, seq_len=seq,
                   tokens_per_step=batch * seq)
        rows.append(row)
    return rows


def _merge(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's figures: the slowest rank's time, the largest rank's memory, rank 0's traffic."""
    if "error" in ranks[0]:
        return ranks[0]
    slowest = max(ranks, key=lambda r: r["step_s"])
    return {**ranks[0], "step_s": slowest["step_s"], "steps_s": slowest["steps_s"],
            "peak_bytes": max(r["peak_bytes"] for r in ranks), "peak_growth_bytes": max(r["peak_growth_bytes"] for r in ranks)}


def table(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"`{first['preset']}` preset, global batch {first['batch']} x {first['seq_len']} tokens, "
             f"precision {next((r['precision'] for r in rows if 'precision' in r), '?')}, blocks eager; "
             f"{len(next((r['step_s_all'] for r in rows if 'step_s_all' in r), [0]))} interleaved rounds, the median round.", "",
             "| strategy | ranks | step ms | tokens/s | spread | params+optimizer/rank MiB (counted) | peak RSS, largest rank MiB "
             "| peak growth after warm-up MiB | sent/rank/step MiB (measured) | collectives busy ms/step | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['ranks']} | failed: {r['error']} ||||||||")
            continue
        lines.append(f"| {r['case']} | {r['ranks']} | {1000 * r['step_s']:.0f} | {r['tokens_per_step'] / r['step_s']:,.0f} "
                     f"| {harness.spread(r['step_s_all']):.0%} | {r['state_bytes'] / MiB:.1f} | {r['peak_bytes'] / MiB:.0f} "
                     f"| {r['peak_growth_bytes'] / MiB:.1f} | {r['comm_bytes'] / MiB:.1f} | {1000 * r['comm_busy_s']:.0f} "
                     f"| {r['final_loss']:.4f} |")
    return "\n".join(lines)
