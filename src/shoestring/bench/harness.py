"""One measuring harness for every bench section and the planner's accuracy check.

The same rules everywhere, so that two sections' figures can be set side by side:

* **start**: `launch(job, spec, ranks)` runs a job (a module-level function `module:name`
  taking a JSON-able spec and returning a dict) in fresh processes: one rank as a plain
  `python -m shoestring.bench.harness`, N ranks under torchrun (`--standalone`), the launcher
  `shoestring train --nproc` uses. Each rank gets cores / ranks threads; rank 0 gathers every
  rank's result and prints it on a marked line. A fresh process per measurement makes the
  process peak (VmHWM) the configuration's own.
* **build**: `build(tree, vocab)` is the trainer's path: `resolve_auto` on this machine's probed
  facts, then `build_strategy` (levers applied in the fixed order, compile where `auto` says).
* **warm-up and timer**: `timed_steps` runs `WARMUP` untimed steps (the first compiles, allocates
  and creates the optimizer state; the second is the first on warm state) then times each step
  with `time.perf_counter` between barriers; `steady` applies the same rule to a foreign loop's
  step times (Hugging Face Trainer's callbacks). The figure is the median step. Peak memory is
  the process's VmHWM from the end of set-up (`PeakRSS.reset()` before the first step).
* **rounds**: `interleaved` runs every named configuration once per round, A B A B ..., and
  `median_round` keeps the round with the median step time, with every round's figure beside it.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

WARMUP = 2
RESULT_MARK = "SHOESTRING-BENCH-RESULT "
PROCESS_GROUP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Job:
    """A measurement: which function runs it, on what, on how many ranks."""

    target: str  # "module:function"
    spec: dict[str, Any]
    ranks: int = 1
    env: dict[str, str] = field(default_factory=dict)


def launch(job: Job) -> list[dict[str, Any]]:
    """Run `job` in fresh processes; every rank's result, rank 0 first."""
    payload = json.dumps({"target": job.target, "spec": job.spec})
    if job.ranks == 1:
        argv = [sys.executable, "-m", "shoestring.bench.harness", payload]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.ranks}",
                "-m", "shoestring.bench.harness", payload]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads(job.ranks)), "DS_ACCELERATOR": "cpu", **job.env}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line.removeprefix(RESULT_MARK))
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-8:]
    raise RuntimeError(f"benchmark job {job.target} ({job.ranks} rank(s)) failed, exit code {proc.returncode}:\n"
                       + "\n".join(tail))


def threads(ranks: int) -> int:
    """Threads per rank: the ranks split the cores."""
    from shoestring.plan.probe import cpu_cores

    return max(1, cpu_cores() // ranks)


def interleaved(jobs: dict[str, Job], rounds: int, progress: Callable[[str], None] = lambda s: None,
                keep_going: bool = False) -> dict[str, list[list[dict[str, Any]]]]:
    """name -> one entry (every rank's result) per round; the configurations alternate within
    each round (A B A B ...), so a change in the machine's load falls on all of them alike.
    `keep_going`: a failed job is recorded as `[{"error": ...}]` instead of stopping the rest."""
    out: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            progress(f"round {r + 1}/{rounds}: {name}")
            try:
                out[name].append(launch(job))
            except RuntimeError as err:
                if not keep_going:
                    raise
                out[name].append([{"error": str(err).splitlines()[-1]}])
    return out


def median_round(runs: list[dict[str, Any]], key: str = "step_s") -> dict[str, Any]:
    """The round with the median `key` (the upper one of an even count), with `<key>_all`: every
    round's figure, fastest first, so the spread is visible."""
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r[key])
    if not good:
        return dict(runs[0])
    row = dict(good[len(good) // 2])
    row[f"{key}_all"] = [r[key] for r in good]
    return row


def spread(values: list[float]) -> float:
    """(slowest - fastest) / median of a configuration's rounds."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


# ---- inside a rank ------------------------------------------------------------------------

def steady(times: list[float]) -> list[float]:
    """The timed steps of a loop: all after the first `WARMUP` (the last one if there are no more)."""
    return times[WARMUP:] or times[-1:]


def timed_steps(step: Callable[[int], Any], steps: int) -> dict[str, Any]:
    """`WARMUP` untimed steps then `steps` timed ones, each between barriers (the slowest rank
    sets the time); `step(i)` may return the step's loss."""
    from shoestring import dist

    times, losses = [], []
    for i in range(WARMUP + steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = step(i)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        if loss is not None:
            losses.append(float(loss))
    timed = steady(times)
    return {"step_s": statistics.median(timed), "steps_s": timed, "losses": losses}


def timed_training(strategy, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[dict[str, Any], int]:
    """`timed_steps` of whole optimizer steps on one fixed batch, and the process's peak RSS
    (VmHWM) from here to the last of them."""
    from shoestring.measure.memory import PeakRSS

    def step(_: int) -> torch.Tensor:
        loss = strategy.forward_backward(x, y, 1.0, True)
        strategy.step(1e-3)
        return loss

    rss = PeakRSS()
    rss.reset()
    timing = timed_steps(step, steps)
    return timing, rss.peak_bytes()


def random_batch(vocab: int, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded uniform tokens and targets: speed and memory do not depend on what is learnt."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, vocab, (batch, seq_len), generator=gen) for _ in range(2))  # type: ignore[return-value]


def bigram_batches(vocab: int, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len + 1) tokens of a seeded random bigram chain: each token has 4 equally
    likely successors, so the loss falls from ln(vocab) towards ln 4 as a model learns them (a
    learnable stream, the same for every system compared)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    n = steps * batch
    out = torch.empty(n, seq_len + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(seq_len):
        out[:, t + 1] = successors[out[:, t], torch.randint(0, 4, (n,), generator=g)]
    return out.view(steps, batch, seq_len + 1)


def build(tree: dict[str, Any], vocab: int, device: torch.device | None = None):
    """The strategy `shoestring train` would build for this config tree on this machine."""
    from shoestring.build import build_strategy, resolve_auto
    from shoestring.config import build_config
    from shoestring.plan.probe import device_facts

    device = device or torch.device("cpu")
    return build_strategy(resolve_auto(build_config(tree), device_facts(device)).cfg, vocab, device)


def compiled_blocks(strategy) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in strategy.unwrapped().layers)


def _run_rank(target: str, spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    import torch.distributed as tdist

    from shoestring import dist

    module, name = target.split(":")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads(world)))  # a job may ask for fewer
    with dist.process_group(torch.device("cpu"), PROCESS_GROUP_TIMEOUT_S, required=False):
        result = getattr(importlib.import_module(module), name)(spec)
        if not dist.active():
            return [result]
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, result)
        return gathered if tdist.get_rank() == 0 else None


if __name__ == "__main__":
    from shoestring import dist

    request = json.loads(sys.argv[1])
    results = _run_rank(request["target"], request["spec"])
    if results is not None:
        print(RESULT_MARK + json.dumps(results, default=str), flush=True)
    dist.exit_process(0)
