"""Strategies side by side: the same model, data and global batch trained through the real CLI
(`shoestring train --nproc N`) under each data-parallel strategy, in interleaved rounds.

Per configuration: step time (median over the run's steps after warm-up, then median over
rounds), tokens/s, model-state bytes each rank owns (counted), the process peak of the largest
rank and its growth from step 2 to the last step, and what one rank sends per step with the time
collectives ran (measured by `shoestring.parallel.comm.CommMeter` on the run's third step).

Runs use the trainer's default precision (`auto`: bf16 autocast where this machine's bf16 matmuls
are fast, else fp32; each row records the mode that ran) with `train.compile = false`: every run
is a fresh process, and compiling the blocks in each would take longer than the steps measured.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

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

# The cases `--size small` leaves out to fit its time budget of 5 minutes (ZeRO-1/2 and FSDP2
# without resharding trade memory for speed in ways ddp and fsdp2 already bracket; ddp stands
# for the unsharded baseline). A 2-rank run of 8 steps takes ~9 s idle, ~6 s of it start-up:
# 10 cases x 3 rounds fit (5 timed steps each), 5 rounds would not.
FULL_ONLY = ("single", "fsdp2 no-reshard", "zero1", "zero2")
# size -> (preset, global batch, seq len, steps, rounds)
SIZES = {
    "smoke": ("micro", 4, 32, 4, 1),
    "small": ("tiny", 16, 256, 8, 3),
    "full": ("tiny", 16, 256, 40, 5),
}


def train_once(name: str, overrides: dict, ranks: int, base: dict, run_dir: Path, config: str) -> dict:
    """One training run of a configuration; its figures from summary.json and metrics.jsonl."""
    sets = {**base, **overrides, "run.dir": str(run_dir)}
    cmd = [sys.executable, "-m", "shoestring", "train", config, "--overwrite", "--nproc", str(ranks)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return {"case": name, "ranks": ranks, "error": lines[-1] if lines else f"exit code {proc.returncode}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    tokens = base["train.batch_size"] * base["data.seq_len"]
    timed = [r["tokens_per_s"] for r in steps if r["step"] >= 3] or [r["tokens_per_s"] for r in steps]
    mem, comm = summary["memory_bytes"], summary["comm_per_step"]
    return {
        "case": name, "ranks": ranks,
        "step_s": tokens / statistics.median(timed),
        "state_bytes": mem["params"] + mem["optimizer"] + mem["master"],  # gradients are freed between steps by some
        "peak_bytes": mem["device_peak_max_rank"],
        "peak_growth_bytes": steps[-1]["memory"]["device_peak"] - steps[min(1, len(steps) - 1)]["memory"]["device_peak"],
        "comm_bytes": comm["bytes_sent"], "comm_busy_s": comm["busy_s"],
        "final_loss": summary["final_train_loss"], "tokens_per_step": tokens, "precision": summary["precision"]["mode"],
    }


def run(size: str = "small", rounds: int | None = None, only: list[str] | None = None,
        config: str = "configs/tiny.toml", precision: str = "auto",
        progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per case: the round with the median step time, plus every round's step time."""
    preset, batch, seq, steps, default_rounds = SIZES[size]
    base = {"model.preset": preset, "train.steps": steps, "train.budget": "none", "train.batch_size": batch,
            "data.seq_len": seq, "train.eval_every": 10 * steps, "train.log_every": 1, "run.save_every": 0,
            "precision.mode": precision, "train.compile": False}
    names = only or [c for c in CASES if size == "full" or c not in FULL_ONLY]
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds or default_rounds):
            for name in names:
                progress(f"strategies round {r + 1}: {name}")
                overrides, ranks = CASES[name]
                results[name].append(train_once(name, overrides, ranks, base, Path(tmp) / name.replace(" ", "-"), config))
    rows = []
    for name, runs in results.items():
        good = sorted((m for m in runs if "error" not in m), key=lambda m: m["step_s"])
        if not good:
            rows.append(runs[0])
            continue
        row = dict(good[len(good) // 2])
        row["step_s_all"] = [m["step_s"] for m in good]
        row.update(preset=preset, size=size)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| strategy | ranks | step ms | tokens/s | params+optimizer/rank MiB (counted) | peak RSS, largest rank MiB "
             "| peak growth step 2 to last MiB | sent/rank/step MiB (measured) | collectives busy ms/step | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['ranks']} | failed: {r['error']} |||||||")
            continue
        lines.append(f"| {r['case']} | {r['ranks']} | {1000 * r['step_s']:.0f} | {r['tokens_per_step'] / r['step_s']:,.0f} "
                     f"| {r['state_bytes'] / MiB:.1f} | {r['peak_bytes'] / MiB:.0f} | {r['peak_growth_bytes'] / MiB:.1f} "
                     f"| {r['comm_bytes'] / MiB:.1f} | {1000 * r['comm_busy_s']:.0f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)
