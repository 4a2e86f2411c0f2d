"""What interruptions (spot reclaims, lost nodes) are expected to cost a run, and how often to save.

A job on N nodes, each interrupted at rate λ per day, is interrupted as a whole every
MTBF = 1 / (N·λ) on average: each interruption restarts it from its last checkpoint. The
first-order model of Young (1974, "A first order approximation to the optimum checkpoint
interval", CACM 17(9)) and Daly (2006, "A higher order estimate of the optimum
checkpoint interval for restart dumps", FGCS 22(3)) prices a save interval τ at

    time added = (run / τ)·δ  +  (run / MTBF)·(τ/2 + set-up + read)

(δ one checkpoint write; each interruption loses half an interval of work on average, the
set-up of a replacement node and the checkpoint's read), minimised at τ = sqrt(2·δ·MTBF).
First order: interruptions are counted over the uninterrupted run, so it holds while the time
added stays small beside the run (which the planner shows). It assumes no save at the notice:
SIGTERM does save first (train/), so where a spot notice is long enough to write a checkpoint
the steps redone fall to the one in flight, and the periodic saves guard against the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoestring.errors import UserError

DAY_S = 86400.0
GB = 1e9


@dataclass(frozen=True)
class Interruptions:
    """The figures an interruption's price rests on: its rate, and what a restart takes."""

    per_node_day: float  # λ: interruptions of one node per day
    write_gbs: float  # checkpoint bytes one node writes per second, GB/s
    read_gbs: float  # and reads back on restart
    setup_s: float  # a replacement node provisioned and the job running again, before the read

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_node_day) and self.per_node_day >= 0):
            raise UserError(f"--interruptions-per-day {self.per_node_day} is not a rate",
                            "give interruptions per node per day, >= 0 (e.g. 0.5; 0: not priced)")
        for flag, value in (("--checkpoint-write-gbs", self.write_gbs), ("--checkpoint-read-gbs", self.read_gbs)):
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{flag} {value} is not a transfer rate", f"give {flag} in GB/s, > 0 (e.g. 1.5)")
        if not (math.isfinite(self.setup_s) and self.setup_s >= 0):
            raise UserError(f"--restart-minutes {self.setup_s / 60:g} is negative", "give the minutes a restart takes, >= 0")

    @property
    def priced(self) -> bool:
        """A rate of 0 leaves a plan as it would be without interruptions."""
        return self.per_node_day > 0


@dataclass(frozen=True)
class ExpectedLoss:
    """What interruptions are expected to cost one plan."""

    restarts: float  # interruptions, each a restart from the last checkpoint
    save_every: int  # steps between checkpoints (`run.save_every`) that minimises `lost_s`
    steps_redone: float
    lost_s: float  # wall time added: redone steps, set-ups, reads, and the periodic writes
    lost_usd: float
    write_s: float  # one checkpoint write (δ)
    mtbf_s: float  # the whole job's mean time between interruptions


def mtbf_s(per_node_day: float, nodes: int) -> float:
    """The job's mean time between interruptions: any of its nodes stops it."""
    return DAY_S / (per_node_day * nodes)


def lost_seconds(save_every: int, step_s: float, run_s: float, write_s: float, read_s: float, setup_s: float,
                 mtbf: float) -> float:
    """Young's expected time added to a run of `run_s` by saving every `save_every` steps."""
    interval = save_every * step_s
    return run_s / interval * write_s + run_s / mtbf * (interval / 2 + setup_s + read_s)


def save_interval(step_s: float, write_s: float, read_s: float, setup_s: float, mtbf: float, run_s: float) -> int:
    """The whole number of steps that minimises `lost_seconds`: Young's sqrt(2·δ·MTBF) in steps,
    rounded to whichever neighbour costs less (the cost is convex in the interval), at least 1."""
    ideal = math.sqrt(2 * write_s * mtbf) / step_s
    near = {max(1, math.floor(ideal)), max(1, math.ceil(ideal))}
    return min(sorted(near), key=lambda k: lost_seconds(k, step_s, run_s, write_s, read_s, setup_s, mtbf))


def expected_loss(rates: Interruptions, nodes: int, run_s: float, step_s: float, checkpoint_bytes: int,
                  dollars_per_h: float) -> ExpectedLoss:
    """The expected cost of interruptions to a run of `run_s` uninterrupted seconds of `step_s`
    steps on `nodes` nodes whose busiest node writes `checkpoint_bytes` per save, billed at
    `dollars_per_h` for the whole job (every device waits while one node is replaced)."""
    mtbf = mtbf_s(rates.per_node_day, nodes)
    write_s, read_s = checkpoint_bytes / (rates.write_gbs * GB), checkpoint_bytes / (rates.read_gbs * GB)
    every = save_interval(step_s, write_s, read_s, rates.setup_s, mtbf, run_s)
    lost = lost_seconds(every, step_s, run_s, write_s, read_s, rates.setup_s, mtbf)
    restarts = run_s / mtbf
    return ExpectedLoss(restarts, every, restarts * every / 2, lost, lost / 3600 * dollars_per_h, write_s, mtbf)
