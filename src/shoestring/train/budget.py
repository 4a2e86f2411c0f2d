"""A budget as the stopping rule: a wall time or dollars becomes the number of steps that fit.

The run times itself instead of guessing. Its first steps are real training steps: they fall
within the LR warmup, whose LRs do not depend on the run's length (train/schedule.py), so
nothing is spent on measuring alone. At the step where the budget is resolved the run also
evaluates and saves a checkpoint, timed. From those figures and the time already spent (data
preparation, model build, compile), `steps_that_fit` finds the largest step count whose steps,
periodic evals and saves, and final eval and save end within the budget; the LR schedule is
planned for that many steps, so the run ends on budget with its decay complete instead of
being cut off mid-decay.

What the budget covers: the trainer from its start to its final save (data preparation, model
build, compile, every step, eval and save). Not covered: the interpreter's start-up before the
trainer starts (imports, a few seconds) and whatever runs after it (e.g. generation). Dollars
are that wall time x devices x price per device-hour. A resumed run counts the time its earlier
attempts spent up to the checkpoint it resumes from; time lost after that checkpoint is not
counted.

The step count is resolved once per run, on rank 0 (all ranks take the same decision at the
same step), and written to RUN_DIR/budget.json before any step whose LR depends on it; a resumed
run reads it back and keeps its step count and schedule.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoestring.checkpoint import write_atomically
from shoestring.config import parse_budget
from shoestring.errors import UserError

BUDGET_FILE = "budget.json"
SKIP = 1  # an attempt's first step compiles and warms the allocator: left out of the step time
TIMED = 5  # steps timed after it; their median is the step time
EARLY = 0.25  # timing the rest of TIMED may take at most this share of what is left of the budget


@dataclass(frozen=True)
class Costs:
    """Measured seconds of one optimizer step, one eval and one checkpoint save."""
    step_s: float
    eval_s: float
    save_s: float


def steady_interval(times: list[float]) -> float:
    """Median gap between successive timestamps, the first gap (one-off work: compile, allocator
    warm-up) left out when there are others."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps[SKIP:] or gaps)


def count_due(done: int, total: int, every: int) -> int:
    """How many evals (or saves) a run does after step `done` up to step `total`: one every
    `every` steps (0: none) and one at the last step."""
    if total <= done:
        return 0
    periodic = total // every - done // every if every else 0
    return periodic + (0 if every and total % every == 0 else 1)


def planned_seconds(total: int, *, done: int, costs: Costs, eval_every: int, save_every: int) -> float:
    """Wall time of the work from step `done` to step `total`."""
    return ((total - done) * costs.step_s + count_due(done, total, eval_every) * costs.eval_s
            + count_due(done, total, save_every) * costs.save_s)


def steps_that_fit(seconds_left: float, *, done: int, costs: Costs, eval_every: int, save_every: int) -> int:
    """The largest step count (at least `done`) whose remaining work fits in `seconds_left`."""
    lo, hi = done, done + max(0, int(seconds_left / max(costs.step_s, 1e-9)))  # evals and saves only add
    while lo < hi:  # planned_seconds grows with the step count
        mid = (lo + hi + 1) // 2
        if planned_seconds(mid, done=done, costs=costs, eval_every=eval_every, save_every=save_every) <= seconds_left:
            lo = mid
        else:
            hi = mid - 1
    return lo


def budget_seconds(text: str, devices: int, price_per_hour: float) -> float:
    """`train.budget` as wall seconds: a time as is, dollars at `devices` x `price_per_hour`."""
    amount, unit = parse_budget(text)
    if unit == "s":
        return amount
    if price_per_hour <= 0:
        raise UserError(f"train.budget {text!r} is in dollars but the price per device-hour is 0",
                        "set run.price_per_hour, or give the budget as a wall time such as '3min'")
    return amount / (devices * price_per_hour) * 3600


@dataclass
class BudgetClock:
    """One run's budget: its clock, the warm-up timings and, once resolved, its step count."""
    requested: str
    seconds: float
    price_per_hour: float
    devices: int
    started: float  # BudgetClock.now() at the trainer's start
    spent_before: float = 0.0  # earlier attempts of this run, up to the checkpoint resumed from
    steps: int | None = None
    fit: int | None = None  # steps the budget fits, before the train.steps cap
    costs: Costs | None = None
    at_step: int | None = None  # the step it was resolved at
    step_laps: list[float] = field(default_factory=list)
    eval_laps: list[float] = field(default_factory=list)

    @staticmethod
    def now() -> float:
        """The budget's clock (every time it counts is read here: tests replace it)."""
        return time.perf_counter()

    def spent(self) -> float:
        return self.spent_before + self.now() - self.started

    def lap_step(self) -> None:
        """Mark the start of the timed steps, then the end of each (the device synchronized)."""
        self.step_laps.append(self.now())

    def lap_eval(self) -> None:
        """Mark the start of the timed eval, then the end of each of its batches."""
        self.eval_laps.append(self.now())

    def ready(self, step: int, warmup_steps: int) -> bool:
        """Whether to resolve now, after `step` steps: enough steps timed, the next step's LR
        would depend on the step count, or steps so slow that timing more of them would eat
        into the budget left to plan. (A run resumed late in its warmup before resolving may
        time a step past it, its LR then planned for train.steps: a small, rare deviation.)"""
        timed = len(self.step_laps) - 1 - SKIP
        if timed < 1:
            return False
        still = (TIMED - timed) * steady_interval(self.step_laps)
        return timed >= TIMED or step >= warmup_steps or still > EARLY * (self.seconds - self.spent())

    def resolve(self, step: int, cap: int, save_s: float, eval_every: int, save_every: int) -> int:
        """Plan the step count from the timed steps, the timed eval (per batch, its first batch
        left out as one-off work) and save, and the time spent so far."""
        self.costs = Costs(step_s=steady_interval(self.step_laps),
                           eval_s=steady_interval(self.eval_laps) * (len(self.eval_laps) - 1), save_s=save_s)
        self.fit = steps_that_fit(self.seconds - self.spent(), done=step, costs=self.costs,
                                  eval_every=eval_every, save_every=save_every)
        self.steps, self.at_step = max(step, min(self.fit, cap)), step
        return self.steps

    def describe_start(self) -> str:
        if parse_budget(self.requested).unit == "$":
            worth = f" ({self.seconds:,.0f} s at ${self.price_per_hour}/device-hour x {self.devices})"
        else:
            worth = ""
        if self.steps is not None:
            return f"budget {self.requested}{worth}: resuming with the {self.steps} steps planned at step {self.at_step}"
        return f"budget {self.requested}{worth}: timing the first warm-up steps"

    def describe(self, cap: int) -> str:
        """What was resolved and from what, in one line."""
        c = self.costs
        if self.fit > cap:
            outcome = f"{cap} steps (train.steps caps it; the budget fits {self.fit})"
        elif self.fit <= self.at_step:
            outcome = f"already spent: stopping at step {self.at_step}"
        else:
            outcome = f"{self.steps} steps"
        return (f"budget {self.requested}: {outcome}; LR schedule planned for {self.steps} steps "
                f"(measured: step {c.step_s:.3g} s, eval {c.eval_s:.3g} s, save {c.save_s:.3g} s; "
                f"{self.spent():.1f} s spent by step {self.at_step})")

    def write(self, run_dir: Path) -> None:
        """Record the resolution (rank 0), atomically: a resumed run plans nothing again."""
        record = {"requested": self.requested, "seconds": self.seconds, "steps": self.steps, "fit": self.fit,
                  "at_step": self.at_step, "costs": asdict(self.costs)}
        write_atomically(run_dir / BUDGET_FILE, json.dumps(record, indent=2).encode())

    def restore(self, run_dir: Path) -> str | None:
        """Take the step count a previous attempt resolved, if any; a line to show when the
        budget asked for now differs from the one it was resolved for."""
        path = run_dir / BUDGET_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        self.steps, self.fit, self.at_step = record["steps"], record["fit"], record["at_step"]
        self.costs = Costs(**record["costs"])
        if record["requested"] != self.requested:
            return (f"train.budget changed ({record['requested']!r} -> {self.requested!r}): the resumed run keeps the "
                    f"{self.steps} steps it was planned for; to change its length set train.budget = \"none\" and train.steps")
        return None

    def report(self) -> dict[str, Any]:
        """Budget against spent, for summary.json."""
        spent = self.spent()
        return {"requested": self.requested, "seconds": self.seconds, "steps": self.steps, "fit": self.fit,
                "resolved_at_step": self.at_step, "costs": asdict(self.costs) if self.costs else None,
                "spent_s": spent, "spent_usd": spent / 3600 * self.devices * self.price_per_hour,
                "budget_usd": self.seconds / 3600 * self.devices * self.price_per_hour}
