"""The goals the issues hold shoestring to, each judged from a benchmark section's rows.

One place lists every promise and how it is judged, so docs/benchmarks.md says "met" or
"missed, by how much" from the same run that made its tables. A goal whose rows a run lacks (a
section not run, a case not measured) is reported as not judged, never guessed.

A goal about speed in bf16 makes sense only where bf16 is fast. On a machine whose bf16 matmul
does not run `BF16_GAIN` x its fp32 one (a CPU without AVX-512-BF16 or AMX: there bf16 is ~100x
slower and the trainer picks fp32), bf16's own speed-up, and any speed goal whose rows ran in
bf16, are "not applicable here", with the two measured rates as the reason: such a machine
neither fails them silently nor passes a ratio of two equally slow bf16 runs. Goals about bytes,
and speed goals measured in the precision that machine trains in, are judged as anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shoestring.bench import levers
from shoestring.levers.precision import BF16_GAIN

Rows = list[dict]
Judged = tuple[str, bool | None]  # (what was measured, with the margin; met, or None: not judged)

MET, MISSED, NOT_JUDGED, NOT_APPLICABLE = "met", "missed", "not judged", "not applicable here"


@dataclass(frozen=True)
class Goal:
    text: str
    judge: Callable[[Rows], Judged]
    # A speed goal: the rows its figure comes from (their precision decides whether it applies
    # where bf16 is slow). None: a goal about bytes or the planner's accuracy, true on any machine.
    speed_of: Callable[[Rows], Rows] | None = None
    about_bf16: bool = False  # bf16's own speed: applies only where bf16 is fast, whatever the rows


def row_precision(row: dict) -> str:
    """The precision a row ran in. Rows that do not record it (the incumbents before they ran
    in the trainer's `auto` precision) come from harnesses that ran bf16 only."""
    return str(row.get("precision") or row.get("work", {}).get("precision") or "bf16")


@dataclass(frozen=True)
class MatmulPeaks:
    """The measured dense matmul FLOP/s of the machine a section ran on, fp32 and bf16."""

    fp32: float
    bf16: float

    @property
    def bf16_fast(self) -> bool:
        return self.bf16 >= BF16_GAIN * self.fp32

    def describe(self) -> str:
        return (f"bf16 matmul {self.bf16 / 1e9:,.1f} GFLOP/s vs fp32 {self.fp32 / 1e9:,.1f} here, "
                f"{self.bf16 / self.fp32:.2f}x; bf16 pays from {BF16_GAIN}x")

    def applies(self, goal: Goal, rows: Rows) -> bool:
        """Whether `goal` says anything on this machine (see the module docstring)."""
        if self.bf16_fast or (goal.speed_of is None and not goal.about_bf16):
            return True
        if goal.about_bf16:
            return False
        try:
            measured_on = goal.speed_of(rows)
        except (KeyError, StopIteration, ValueError):
            return True  # no rows for it: judged as not judged
        return not any(row_precision(r).startswith("bf16") for r in measured_on)

    @classmethod
    def from_rows(cls, rows: Rows) -> "MatmulPeaks | None":
        """The peaks a section measured itself (the levers rows carry their dtype's), if it did."""
        got = {r["precision"]: r["matmul_peak_flops"] for r in rows if "matmul_peak_flops" in r and "precision" in r}
        return cls(got["fp32"], got["bf16"]) if {"fp32", "bf16"} <= got.keys() else None

    @classmethod
    def probed(cls) -> "MatmulPeaks":
        """This machine's, from the probe the trainer's MFU uses (cached), on the device the
        sections train on by default."""
        import torch

        from shoestring.plan import probe

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(probe.matmul_peak_flops(device, torch.float32), probe.matmul_peak_flops(device, torch.bfloat16))


@dataclass(frozen=True)
class Verdict:
    goal: str
    measured: str
    status: str  # MET, MISSED, NOT_JUDGED or NOT_APPLICABLE
    reason: str = ""  # why not applicable

    def line(self) -> str:
        mark = f"**{MISSED}**" if self.status == MISSED else self.status
        if self.status == NOT_APPLICABLE:
            return f"- {mark}: {self.goal} ({self.reason}; measured: {self.measured})"
        return f"- {mark}: {self.goal} (measured: {self.measured})"


def at_least(value: float, target: float, shown: str) -> Judged:
    """`value >= target`, the margin relative to the target."""
    return f"{shown}, {value / target - 1:+.0%} vs the goal", value >= target


def at_most(value: float, limit: float, shown: str) -> Judged:
    """`value <= limit` for fractions, the margin in percentage points."""
    return f"{shown}, {100 * (value - limit):+.1f} points vs the goal", value <= limit


def _best(rows: Rows, names: tuple[str, ...]) -> dict:
    """The fastest of the named cases that ran (e.g. an engine's variants on the same work)."""
    return min((r for r in rows if r.get("case") in names and "error" not in r), key=lambda r: r["step_s"])


# --- levers (single process) --------------------------------------------------------------

def _lever(rows: Rows, precision: str, mode: str = "none") -> dict:
    """An eager lever row: each lever's effect on its own."""
    return levers.row(rows, precision, mode, compiled=False)


def _bf16_speedup(rows: Rows) -> Judged:
    x = _lever(rows, "bf16")["tokens_per_s"] / _lever(rows, "fp32")["tokens_per_s"]
    return at_least(x, 2.0, f"{x:.2f}x")


def _ckpt_cut(mode: str, goal: float) -> Callable[[Rows], Judged]:
    def judge(rows: Rows) -> Judged:
        base = levers.base_precision(rows)
        c = 1 - _lever(rows, base, mode)["saved_activation_bytes"] / _lever(rows, base)["saved_activation_bytes"]
        return at_least(c, goal, f"{c:.1%} fewer")

    return judge


def _ckpt_time(mode: str, limit: float) -> Callable[[Rows], Judged]:
    def judge(rows: Rows) -> Judged:
        base = levers.base_precision(rows)
        e = _lever(rows, base, mode)["step_s"] / _lever(rows, base)["step_s"] - 1
        return at_most(e, limit, f"{e:+.1%}")

    return judge


def _mfu(rows: Rows) -> Judged:
    """Judged on the trainer's default (blocks compiled) where the run has it: what a user gets."""
    try:
        r = levers.row(rows, "bf16", compiled=True)
    except StopIteration:  # a run without the default's row: the eager one
        r = _lever(rows, "bf16")
    how = "blocks compiled" if r["spec"].get("compile", False) else "eager"
    if r["mfu"] is None:
        return f"a measuring error: {r.get('mfu_error')}", None
    shown = f"{r['mfu']:.1%} of {r['matmul_peak_flops'] / 1e12:.2f} TFLOP/s, `{r['spec']['preset']}` preset, {how}"
    if r["spec"]["preset"] != "small":
        return shown + ": the goal is for `small`", None
    return at_least(r["mfu"], 0.35, shown)


# Which rows a speed goal's figure comes from (`Goal.speed_of`).
def _all(rows: Rows) -> Rows:
    return rows


def _checkpointing_rows(rows: Rows) -> Rows:
    return [r for r in rows if r.get("checkpointing", "none") != "none"]


def _default_rows(rows: Rows) -> Rows:
    """The row the MFU goal is judged on: the trainer's default, else the eager bf16 one."""
    return [r for r in rows if r.get("config") == levers.DEFAULT] or [_lever(rows, "bf16")]


# --- two ranks: strategies and incumbents, rows named by `case` ---------------------------

def _speedup(a: tuple[str, ...], b: tuple[str, ...], factor: float = 1.0) -> Callable[[Rows], Judged]:
    def judge(rows: Rows) -> Judged:
        x, y = _best(rows, a), _best(rows, b)
        ratio = y["step_s"] / x["step_s"]
        return at_least(ratio, factor, f"`{x['case']}` {ratio:.2f}x the tokens/s of `{y['case']}`")

    return judge


def _memory_ratio(a: tuple[str, ...], b: tuple[str, ...]) -> Callable[[Rows], Judged]:
    def judge(rows: Rows) -> Judged:
        x, y = _best(rows, a), _best(rows, b)
        ratio = x["peak_bytes"] / y["peak_bytes"]
        return f"`{x['case']}` peak {ratio:.2f}x `{y['case']}`'s", ratio <= 1.0

    return judge


# --- planner accuracy ---------------------------------------------------------------------

def _within(key: str, limit: float) -> Callable[[Rows], Judged]:
    """Judged on the check set: the configurations the calibration was not fitted to."""
    def judge(rows: Rows) -> Judged:
        rows = [r for r in rows if r.get("set", "check") == "check"]
        worst = max(rows, key=lambda r: abs(r[key]))
        inside = sum(abs(r[key]) <= limit for r in rows)
        return f"{inside}/{len(rows)} check-set rows within; worst {worst[key]:+.1%} ({worst['config']})", inside == len(rows)

    return judge


# --- fine-tuning --------------------------------------------------------------------------

def _lora_optimizer(rows: Rows) -> Judged:
    lora, full = (next(r for r in rows if r["mode"] == m) for m in ("lora", "full"))
    x = lora["measured"]["optimizer"] / full["measured"]["optimizer"]
    return f"{x:.1%}", x < 0.1


def _finetune_prediction(rows: Rows) -> Judged:
    worst = max(rows, key=lambda r: abs(r["state_error"]))
    return at_most(abs(worst["state_error"]), 0.10, f"worst {worst['state_error']:+.1%} ({worst['mode']})")


# The strategies benchmark's cases (bench/strategies.py) that do the same work: every engine
# here gathers the parameters again in backward.
FSDP2, ZERO3, YAFSDP = ("fsdp2 reshard", "fsdp2 no-prefetch"), ("zero3",), ("yafsdp sync", "yafsdp async")
FSDP2_CKPT, ZERO3_CKPT, YAFSDP_CKPT = ("fsdp2 reshard + full ckpt",), ("zero3 + full ckpt",), ("yafsdp async + full ckpt",)



def _modes(case: str) -> tuple[str, ...]:
    """An incumbents case's rows, eager and compiled: a system is judged at its best."""
    return f"{case} eager", f"{case} compiled"


OURS, HF, OURS_CKPT, HF_CKPT = _modes("shoestring"), _modes("hf-trainer"), _modes("shoestring ckpt"), _modes("hf-trainer ckpt")

GOALS: dict[str, list[Goal]] = {
    "levers": [
        Goal("bf16 autocast >= 2x fp32 tokens/s", _bf16_speedup, about_bf16=True),
        Goal("`full` checkpointing keeps >= 70% fewer activation bytes", _ckpt_cut("full", 0.70)),
        Goal("`full` checkpointing costs < 30% extra step time", _ckpt_time("full", 0.30), speed_of=_checkpointing_rows),
        Goal("`selective` checkpointing keeps >= 30% fewer activation bytes", _ckpt_cut("selective", 0.30)),
        Goal("`selective` checkpointing costs < 10% extra step time", _ckpt_time("selective", 0.10),
             speed_of=_checkpointing_rows),
        Goal("MFU of the `small` preset in bf16 (the trainer's default) >= 35% of the measured bf16 matmul peak", _mfu,
             speed_of=_default_rows),
    ],
    "strategies": [
        Goal("fsdp2 at least as fast as DeepSpeed ZeRO-3", _speedup(FSDP2, ZERO3), speed_of=_all),
        Goal("... with full checkpointing in both", _speedup(FSDP2_CKPT, ZERO3_CKPT), speed_of=_all),
        Goal("yafsdp >= 1.1x fsdp2's tokens/s", _speedup(YAFSDP, FSDP2, 1.1), speed_of=_all),
        Goal("... at no more peak memory", _memory_ratio(YAFSDP, FSDP2)),
        Goal("... with full checkpointing in both", _speedup(YAFSDP_CKPT, FSDP2_CKPT, 1.1), speed_of=_all),
        Goal("yafsdp faster than DeepSpeed ZeRO-3", _speedup(YAFSDP, ZERO3), speed_of=_all),
    ],
    "planner": [
        Goal("planner's peak memory within 10% of measured on every check-set configuration", _within("memory_error", 0.10)),
        Goal("planner's tokens/s within 20% of measured on every check-set configuration", _within("tokens_per_s_error", 0.20)),
    ],
    "incumbents": [
        Goal("single device, the trainer's default precision: >= 1.3x HF Trainer's tokens/s, best against best "
             "(eager or compiled)", _speedup(OURS, HF, 1.3), speed_of=_all),
        Goal("... at no more peak memory", _memory_ratio(OURS, HF)),
        Goal("checkpointing on in both: >= 1.3x HF Trainer's tokens/s, best against best",
             _speedup(OURS_CKPT, HF_CKPT, 1.3), speed_of=_all),
        Goal("... at no more peak memory", _memory_ratio(OURS_CKPT, HF_CKPT)),
        Goal("2 ranks: shoestring fsdp2 at least as fast as plain FSDP2 on the HF model, best against best",
             _speedup(_modes("shoestring fsdp2"), _modes("torch fsdp2")), speed_of=_all),
        Goal("2 ranks: shoestring fsdp2 at least as fast as DeepSpeed ZeRO-3's own engine, best against best",
             _speedup(_modes("shoestring fsdp2"), _modes("deepspeed zero3")), speed_of=_all),
    ],
    "finetune": [
        Goal("LoRA's optimizer state < 10% of full fine-tuning's (counted)", _lora_optimizer),
        Goal("predicted weights + optimizer state within 10% of counted, LoRA and full", _finetune_prediction),
    ],
}


def verdicts(section: str, rows: Rows, peaks: MatmulPeaks) -> list[Verdict]:
    """Every goal of `section` judged on `rows`; one whose figures are missing is not judged, a
    bf16 speed goal is not applicable where bf16 is slow. `peaks`: the machine's measured matmul
    rates, for sections whose rows do not carry their own."""
    peaks = MatmulPeaks.from_rows(rows) or peaks
    out = []
    for goal in GOALS.get(section, []):
        try:
            measured, met = goal.judge(rows)
        except (KeyError, StopIteration, ValueError, ZeroDivisionError):
            measured, met = "no rows for it in this run", None
        if peaks.applies(goal, rows):
            out.append(Verdict(goal.text, measured, {True: MET, False: MISSED, None: NOT_JUDGED}[met]))
        else:
            out.append(Verdict(goal.text, measured, NOT_APPLICABLE, f"no fast bf16: {peaks.describe()}"))
    return out
