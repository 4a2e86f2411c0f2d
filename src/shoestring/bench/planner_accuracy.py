"""The planner against measurement on this machine, out of sample: predicted vs measured peak
memory and tokens/s on a **check set** of configurations the calibration never saw.

The cases come in two disjoint sets, chosen here before anything is fitted: a **fit set** on the
`small` preset at 8 x 256 that isolates each calibrated constant (each precision's MFU, and
attention's beside it from one more row of the same tokens at 2 x 1024, each
checkpointing mode's multiplier, each strategy's communication: the share hidden behind compute
and the cost per collective call, the process's own memory), and a **check set** in other
presets, sequence lengths, micro-batches, and other combinations of checkpointing mode, strategy
and precision. `run(size)` measures both (interleaved rounds), fits `[calibration.cpu]` to the
fit set alone (`fit`), predicts every row with that fit, and reports both sets' errors; the
verdict is on the check set. A fitted constant outside its physical bounds (an MFU above 1, a
recompute that makes a step faster, a step hiding more than all of its communication, a negative
memory) stops the fit with `FitError` naming it, instead of being absorbed into a meaningless
number: the rows are then predicted with the calibration in force, and the table says why.

`predict_rows(raw)` re-predicts saved measurements (iterate on the model without re-measuring);
`calibration_toml` writes a fit as hardware.toml's tables; `shoestring calibrate` runs the fit
set on this machine and writes its own calibration (plan/catalogue.py reads it from then on).

Method: each configuration runs in fresh processes through the measuring harness
(bench/harness.py: the trainer's `resolve_auto` + `build_strategy`, its warm-up rule and timer,
the ranks splitting the cores), fit and check cases alternating, so the planner is asked about
exactly what ran (the compile lever's rule included). Tokens/s is the median timed step of the
slowest rank, measured memory the largest per-rank peak RSS (VmHWM from the end of set-up). What
the probe measured (matmul peak, all-reduce bandwidth) is saved with each row, so a re-prediction
or a fit later uses the machine as it was during the run.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np

from shoestring.bench import harness

from shoestring.measure.memory import MiB
FIT, CHECK = "fit", "check"


@dataclass(frozen=True)
class Case:
    preset: str
    strategy: str  # single | ddp | fsdp2 | yafsdp (2 ranks unless single)
    precision: str
    checkpointing: str
    batch: int  # global batch, sequences
    seq_len: int
    mode: str = "pretrain"  # pretrain | full-finetune | lora
    lora_rank: int = 16
    lora_base_dtype: str = "fp32"
    steps: int = 2  # timed (their median), after the harness's warm-up
    threads: int = 0  # 0: the cores split over the ranks, as a run gets them; else this many (one process)
    memory_only: bool = False  # a toy model: its step says nothing of a real one's speed (no MFU, no speed verdict)
    again: bool = False  # a case measured once more, in processes of its own: how far a step moves between processes

    @property
    def first(self) -> "Case":
        """The case this one measures again (itself when it is not `again`)."""
        return replace(self, again=False)

    @property
    def world(self) -> int:
        return 1 if self.strategy == "single" else 2

    @property
    def label(self) -> str:
        lora = f" r{self.lora_rank} base {self.lora_base_dtype}" if self.mode == "lora" else ""
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return (f"{self.preset} {self.mode}{lora}, {self.strategy}{threads}, {self.precision}, ckpt {self.checkpointing}, "
                f"{self.batch}x{self.seq_len}{', again' if self.again else ''}")

    def in_fp32(self) -> "Case":
        """This case with every bf16 matmul in fp32: what it is on a CPU whose bf16 is slow."""
        return replace(self, precision="fp32", lora_base_dtype="fp32")

    def config_tree(self) -> dict[str, Any]:
        """The trainer's config for this case: measured through the same build path."""
        tree: dict[str, Any] = {"model": {"preset": self.preset}, "data": {"seq_len": self.seq_len},
                                "precision": {"mode": self.precision}, "checkpointing": {"mode": self.checkpointing},
                                "parallel": {"strategy": self.strategy}}
        if self.mode == "lora":
            from shoestring.plan.model import LORA_TARGETS

            tree["lora"] = {"enabled": True, "rank": self.lora_rank, "targets": list(LORA_TARGETS),
                            "base_dtype": self.lora_base_dtype}
        return tree


# The fit set: `small` at 8 x 256, one row per constant it isolates: each precision's MFU without
# checkpointing; attention's apart from it (the same tokens at 2 x 1024, where attention does 0.23
# of the FLOPs against 0.07); each checkpointing mode beside it in the same precision; a model too
# small to matter (the process's own memory, beside the heap's share that grows with the tensors;
# its step is no MFU row: it cannot keep the cores busy); what a rank on part of the cores reaches
# (one process on one thread at a rank's share of the batch); each strategy's collectives; LoRA's
# memory; and the bf16 row once more in processes of its own (`again`: the rows' noise then
# includes how far a step moves between processes, `noise`). 14 rows of 0.3-3 s steps: ~4 minutes
# on 2 idle cores with inductor's on-disk cache warm; each compiled row whose graph is not cached
# adds 10-30 s.
_FIT = [
    Case("small", "single", "fp32", "none", 8, 256),
    Case("small", "single", "fp32", "full", 8, 256),
    Case("micro", "single", "fp32", "none", 8, 128, memory_only=True),
    Case("small", "single", "bf16", "none", 8, 256),
    Case("small", "single", "bf16", "none", 2, 1024),
    Case("small", "single", "bf16", "full", 8, 256),
    Case("small", "single", "bf16", "selective", 8, 256),
    Case("small", "single", "bf16-pure", "none", 8, 256, mode="full-finetune"),
    Case("small", "single", "bf16", "none", 4, 256, threads=1),
    # 3 timed steps: a strategy's communication constants come from its one row, whose median must
    # not be one slow step (ranks keep glibc's default allocator, levers/host_memory.py: fsdp2's
    # steps spread up to 40%)
    Case("small", "ddp", "bf16", "none", 8, 256, steps=3),
    Case("small", "fsdp2", "bf16", "none", 8, 256, steps=3),
    Case("small", "yafsdp", "bf16", "none", 8, 256, steps=3),
    Case("small", "single", "bf16", "none", 8, 256, mode="lora"),
    Case("small", "single", "bf16", "none", 8, 256, again=True),
]
# The check set: none of its rows shares preset, sequence length and micro-batch with a fit row,
# and every one combines levers differently (`every:2`, selective in fp32, a sharded strategy
# with checkpointing, bf16-pure sharded, LoRA on a bf16 base with checkpointing on 2 ranks).
_CHECK = [
    Case("tiny", "single", "fp32", "every:2", 16, 128),
    Case("tiny", "ddp", "fp32", "selective", 8, 512),
    Case("tiny", "fsdp2", "bf16", "full", 16, 256),
    Case("small", "yafsdp", "bf16-pure", "full", 4, 512),
    Case("small", "single", "bf16-pure", "selective", 4, 512, mode="full-finetune"),
    Case("small", "ddp", "bf16", "every:2", 8, 128, mode="lora", lora_base_dtype="bf16"),
]
SIZES: dict[str, dict[str, list[Case]]] = {
    "smoke": {FIT: [Case("micro", "single", "bf16", "none", 2, 64, steps=1),
                    Case("micro", "single", "bf16", "none", 2, 64, mode="lora", steps=1)],
              CHECK: [Case("micro", "single", "fp32", "full", 4, 32, steps=1)]},
    "small": {FIT: _FIT, CHECK: _CHECK},
    "full": {FIT: [replace(c, preset="medium") for c in _FIT],
             CHECK: [replace(c, preset="small" if c.preset == "tiny" else "medium") for c in _CHECK]},
}


def measure_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of a case: build the strategy from the case's config (the trainer's path), time its steps."""
    from shoestring import dist
    from shoestring.models import PRESETS

    case = Case(**spec)
    vocab = PRESETS[case.preset].vocab_size
    s = harness.build(case.config_tree(), vocab)
    x, y = harness.random_batch(vocab, case.batch // case.world, case.seq_len, seed=dist.rank())
    timing, peak = harness.timed_training(s, x, y, case.steps)
    return {"peak_rss": peak, "step_s": timing["step_s"], "steps_s": timing["steps_s"],
            "compiled": harness.compiled_blocks(s)}


def job(case: Case) -> harness.Job:
    env = {"OMP_NUM_THREADS": str(case.threads)} if case.threads else {}
    return harness.Job("shoestring.bench.planner_accuracy:measure_job", asdict(case), case.world, env)


def for_this_machine(cases: dict[Case, str], bf16_fast: bool) -> dict[Case, str]:
    """The cases as this machine runs them: where bf16 matmuls are slow (a CPU without AVX-512
    BF16: ~1 GFLOP/s, so a `small` bf16 step takes minutes, and the trainer picks fp32) every
    bf16 case runs in fp32, the one precision a plan there uses; cases that then coincide run once."""
    if bf16_fast:
        return cases
    out: dict[Case, str] = {}
    for case, which in cases.items():
        out.setdefault(case.in_fp32(), which)
    return out


def _slowest(out: list[dict[str, Any]]) -> dict[str, Any]:
    """One round of a case: the slowest rank's step, the largest rank's peak."""
    slowest = max(out, key=lambda o: o["step_s"])
    return {"peak_rss": max(o["peak_rss"] for o in out), "step_s": slowest["step_s"], "steps_s": slowest["steps_s"],
            "compiled": out[0]["compiled"]}


def predict(case: Case, probed: dict[str, Any], compiled: bool | str = "auto") -> dict[str, Any]:
    """The planner's plan for exactly this case's levers on the local CPU as `probed` found it,
    with the blocks compiled as they were in the run (`compiled`)."""
    from shoestring.plan.catalogue import cpu_device
    from shoestring.plan.memory import Levers
    from shoestring.plan.search import Request, plan_exactly

    req = Request(case.preset, tokens=1e6, mode=case.mode, seq_len=case.seq_len, global_batch_tokens=case.batch * case.seq_len,
                  lora_rank=case.lora_rank, lora_base_dtype=case.lora_base_dtype, compile=compiled)
    levers = Levers(case.precision, case.checkpointing, case.strategy, micro_batch=case.batch // case.world)
    p = plan_exactly(req, cpu_device(probed), case.world, levers)
    s = p.step
    return {"memory": p.memory.total, "tokens_per_s": p.tokens_per_s, "components": p.memory.components,
            "compiled": p.levers.compiled,
            "step": {"compute": s.compute_s, "recompute": s.recompute_s, "comm": s.comm_s, "offload": s.offload_s}}


def _row(case: Case, runs: list[dict], probed: dict[str, Any], which: str) -> dict[str, Any]:
    pred = predict(case, probed, runs[0].get("compiled", "auto"))
    mem = statistics.median(r["peak_rss"] for r in runs)
    tps = case.batch * case.seq_len / statistics.median(r["step_s"] for r in runs)
    return {"case": asdict(case), "set": which, "config": case.label, "runs": runs, "probe": probed,
            "memory_predicted": pred["memory"], "memory_measured": mem, "memory_error": pred["memory"] / mem - 1,
            "tokens_per_s_predicted": pred["tokens_per_s"], "tokens_per_s_measured": tps,
            "tokens_per_s_error": pred["tokens_per_s"] / tps - 1, "predicted": pred}


def run(size: str = "small", rounds: int = 1, progress: Callable[[str], None] = lambda s: None,
        only: str = "") -> list[dict]:
    """Measure every case of `size` ("smoke": seconds; "small": minutes on 2 cores; "full": a
    larger model) whose label contains `only`, `rounds` fresh-process rounds, fit and check cases
    alternating (`_alternating`); fit the calibration to the fit set and predict every row with
    it (`calibrate_and_predict`)."""
    import torch

    from shoestring.levers.precision import resolve_precision
    from shoestring.plan import probe
    from shoestring.plan.catalogue import probe_cpu

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    probe.forget()  # predict against the machine as it is now, not a stale cached peak
    bf16_fast = resolve_precision(probe.device_facts(torch.device("cpu"))).value == "bf16"
    sets = SIZES[size]
    cases = for_this_machine({c: which for c, which in _alternating(sets[FIT], sets[CHECK]) if only in c.label}, bf16_fast)
    # probed before the runs, in the same conditions: per (ranks, threads) a case runs on
    probed = {k: probe_cpu(*k) for k in sorted({(c.world, c.threads or None) for c in cases}, key=str)}
    measured = harness.fresh_rounds({c.label: job(c) for c in cases}, rounds, progress)
    raw = [{"case": asdict(c), "set": which, "runs": [_slowest(ranks) for ranks in measured[c.label]],
            "probe": probed[(c.world, c.threads or None)]} for c, which in cases.items()]
    return calibrate_and_predict(raw)


def _alternating(fit_set: list[Case], check_set: list[Case]) -> list[tuple[Case, str]]:
    """Both sets' cases spread evenly through one order, each set in its own order: a slow phase
    of the machine (minutes, on a shared host) then falls on fit and check rows alike, instead of
    on the fit rows that set a check row's prediction alone."""
    tagged = [((i + 0.5) / len(cases), k, case, which)
              for k, (which, cases) in enumerate(((FIT, fit_set), (CHECK, check_set))) for i, case in enumerate(cases)]
    return [(case, which) for *_, case, which in sorted(tagged, key=lambda t: t[:2])]


def predict_rows(raw: list[dict], which: str | None = None) -> list[dict]:
    """Rows re-predicted by the planner's calibration in force from saved measurements (no runs);
    a row saved before the sets were split is in `which` (default: the check set)."""
    return [_row(Case(**r["case"]), r["runs"], r["probe"], r.get("set", which or CHECK)) for r in raw]


def calibrate_and_predict(raw: list[dict]) -> list[dict]:
    """Fit the calibration to the fit-set rows of `raw` and predict every row with it. When the fit
    refuses (`FitError`), the rows are predicted with the calibration in force and each says why."""
    from shoestring.plan.catalogue import calibrated

    rows = predict_rows(raw)
    try:
        fitted = fit([r for r in rows if r["set"] == FIT])
    except FitError as err:
        return [{**r, "calibration": f"the calibration in force (the fit refused: {err})", "fit_error": str(err)} for r in rows]
    with calibrated("cpu", fitted):
        return [{**r, "calibration": "the calibration fitted to this run's fit set", "fitted": fitted} for r in predict_rows(raw)]


def _step_times(run: dict) -> list[float]:
    """A round's timed steps, or its median where only that was kept."""
    return run.get("steps_s", [run["step_s"]])


def _steps(runs: list[dict]) -> str:
    """Each round's timed steps (rounds apart by ';')."""
    return "; ".join(", ".join(f"{t:.2f}" for t in _step_times(x)) for x in runs)


def _within(rows: list[dict]) -> str:
    mem_ok = sum(abs(r["memory_error"]) <= 0.10 for r in rows)
    timed = [r for r in rows if not r["case"].get("memory_only")]
    tps_ok = sum(abs(r["tokens_per_s_error"]) <= 0.20 for r in timed)
    return f"memory within 10%: {mem_ok}/{len(rows)} rows; tokens/s within 20%: {tps_ok}/{len(timed)} rows"


def table(rows: list[dict]) -> str:
    """The check set first (the verdict is on it), then the fit set; ** marks a miss."""
    lines = []
    for which, title in ((CHECK, "Check set (configurations the fit never saw: the verdict)"),
                         (FIT, "Fit set (the calibration's own rows: how well it fits, not how well it predicts)")):
        mine = [r for r in rows if r.get("set", CHECK) == which]
        if not mine:
            continue
        lines += [f"**{title}**", "",
                  "| configuration | mem pred (MiB) | mem meas (MiB) | err | tok/s pred | tok/s meas | err | timed steps (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mine:
            miss = ("" if abs(r["memory_error"]) <= 0.10 else " **"), (
                " (memory only)" if r["case"].get("memory_only") else "" if abs(r["tokens_per_s_error"]) <= 0.20 else " **")
            lines.append(f"| {r['config']} | {r['memory_predicted'] / MiB:,.0f} | {r['memory_measured'] / MiB:,.0f} | "
                         f"{r['memory_error']:+.1%}{miss[0]} | {r['tokens_per_s_predicted']:,.0f} | "
                         f"{r['tokens_per_s_measured']:,.0f} | {r['tokens_per_s_error']:+.1%}{miss[1]} | "
                         + _steps(r["runs"]) + " |")
        lines += ["", f"{which} set: {_within(mine)}", ""]
    if rows and "calibration" in rows[0]:
        lines.append(f"Predicted with {rows[0]['calibration']}.")
    if rows and "fitted" in rows[0]:
        lines += ["", "```toml", calibration_toml(rows[0]["fitted"], "this run").strip(), "```"]
    return "\n".join(lines).strip()


def _measured_step(r: dict) -> float:
    return statistics.median(x["step_s"] for x in r["runs"])


class FitError(ValueError):
    """A fitted constant outside its physical bounds: the model term it stands for is wrong, or
    the measurement is (noise, a contended machine). Never written."""


# constant -> (lower bound, upper bound, why); a fitted value within the noise of its rows of a
# bound is taken at the bound, farther out the fit stops (`bounded`).
BOUNDS: dict[str, tuple[float | None, float | None, str]] = {
    "mfu": (0.0, 1.0, "a step cannot run its matmuls faster than the measured peak"),
    "attention_mfu": (0.0, 1.0, "attention cannot run its matmuls faster than the measured peak"),
    "time_full": (1.0, None, "recomputing blocks cannot make a step faster"),
    "time_selective": (1.0, None, "recomputing blocks cannot make a step faster"),
    "rank_mfu_gain": (0.0, None, "a step cannot take negative time"),
    "collective_s": (0.0, None, "a collective call cannot take negative time"),
    "comm_overlap": (0.0, 1.0, "a step hides none to all of its communication's time, no more: a share"
                               " above 1 means the step was shorter than its compute alone"),
    "rss_base_gb": (0.0, None, "a process's own memory cannot be negative"),
    "rss_compile_gb": (0.0, None, "compiled blocks' runtime cannot give memory back"),
    "fragmentation": (0.0, None, "a heap cannot hold less than the tensors in it"),
}
NOISE = 0.03  # the least noise a fitted value is allowed: a step's time moves by a few % run to run


def noise(rows: list[dict]) -> float:
    """How far a value fitted from `rows` may be off from step-time noise alone: the widest
    spread (slowest over fastest timed step, less 1) of any of their cases, at least NOISE; the
    steps of a case measured again in other processes (`Case.again`) count together, so the
    spread includes how far a step moves from one process to the next, which a process's own
    steps do not show."""
    steps: dict[str, list[float]] = {}
    for r in rows:
        key = Case(**r["case"]).first.label if "case" in r else r["config"]
        steps.setdefault(key, []).extend(t for run in r.get("runs", []) for t in _step_times(run))
    return max([NOISE, *(max(s) / min(s) - 1 for s in steps.values() if len(s) > 1)])


def bounded(name: str, value: float, scale: float, rows: list[dict], beside: list[dict] = ()) -> float:
    """`value` of constant `name` ("compiled.mfu.bf16") checked against its kind's bounds
    (`BOUNDS["mfu"]`); `scale`: what the noise is a fraction of (1 for ratios and multipliers; a
    step's or a process's size for absolute constants). A value beyond a bound by less than the
    noise of the rows it came from (`rows`, and `beside`: the rows it is measured against) is
    taken at the bound: it is no evidence against it. Farther out, FitError names the constant,
    its bound and rows."""
    lo, hi, why = BOUNDS[name.removeprefix("compiled.").split(".")[0]]
    for bound, outside in ((lo, lo is not None and value < lo), (hi, hi is not None and value > hi)):
        if not outside:
            continue
        allowed = noise([*rows, *beside])
        if abs(value - bound) <= allowed * scale:
            return bound
        kind = "lower" if bound == lo else "upper"
        raise FitError(f"{name} = {value:.4g} is beyond its {kind} bound {bound} ({why}) by more than its rows' noise"
                       f" ({allowed:.1%}); fitted from: " + "; ".join(r["config"] for r in rows)
                       + ". Re-measure on an idle machine (more rounds), or fix the model term it stands in for.")
    return value


def fit(rows: list[dict]) -> dict[str, Any]:
    """`[calibration.cpu]` from measured rows (the fit set), eager and compiled blocks apart
    (`compiled`: the constants that apply over the eager ones), each constant from the rows that
    isolate it, in this order, each checked against its physical bounds (`bounded`):

    * `mfu.<precision>` and `attention_mfu.<compute dtype>`: the fraction of the probed peak a
      step reaches outside attention and attention's FLOPs reach, from the single-device rows
      without checkpointing: a precision measured at two sequence lengths (the same tokens a
      step, so attention's share of the FLOPs differs) gives both, by least squares over its
      rows (`_rates`); one measured at one length gives its MFU, attention at its dtype's
      calibrated rate (else at the step's: FLOPs at the peak / measured step). A case measured
      `again` sets no rate: it only widens the noise its bounds allow (`noise`);
    * `time_full` / `time_selective`: the step-time multiplier of those modes, from the
      single-device rows with them, against the compute their own precision's fitted rates give
      (never another precision's: that would measure the precision, not the recompute);
    * `rank_mfu_gain`: what a process on part of the cores (a rank of several) reaches over one
      on every core, from the one-process rows on fewer threads (the compute their precision's
      fitted rates give against the peak probed on that many threads, over their measured
      step); each rate times it stays within its bound;
    * `comm_overlap.<strategy>` and `collective_s.<strategy>`: the share of the bytes' time
      hidden behind compute and the fixed cost of one collective call, from the 2-rank rows: the
      measured step less the predicted compute (with the gain) and recompute is the exposed
      communication, split by the inverse of the rule the prediction uses
      (`throughput.split_exposed`: the least hidden that explains it);
    * `rss_base_gb`, `fragmentation`, `compiled.rss_compile_gb`: the process memory that is not
      tensors, what the heap holds over the tensors, what the compiled runtime adds
      (`_memory_fit`: least squares over every row).

    A constant with no row to fit it keeps its current value. Judge a fit on the check set
    (`calibrate_and_predict`), never on the rows it came from."""
    from shoestring.plan.catalogue import calibration, with_compiled
    from shoestring.plan.throughput import compute_dtype, split_exposed

    cal = calibration("cpu")
    out: dict[str, Any] = {k: v for k, v in cal.items() if k not in ("how", "compiled")}
    out["compiled"] = dict(cal.get("compiled", {}))
    terms = [_terms(r) for r in rows]
    # the rows an MFU comes from: one process on every core, every weight training, a real model,
    # measured once (a case measured again says how far its step moves between processes: noise)
    mfu_rows = [(r, t) for r, t in zip(rows, terms) if r["case"]["strategy"] == "single" and r["case"]["mode"] != "lora"
                and t["cores_share"] == 1 and not r["case"].get("memory_only") and not r["case"].get("again")]
    again = [(r, t) for r, t in zip(rows, terms) if r["case"].get("again")]
    if mfu_rows:  # the model the MFU is fitted on (the fit set runs one): what `elementwise_scale` is relative to
        out["elementwise_ref"] = round(statistics.median(t["elementwise"] for _, t in mfu_rows), 3)
    for group, compiled in ((out, False), (out["compiled"], True)):
        where = "compiled." if compiled else ""
        mine = [(r, t) for r, t in zip(rows, terms) if t["compiled"] == compiled]
        plain = [(r, t) for r, t in mfu_rows if t["compiled"] == compiled]
        fitted, fitted_from = {}, {}
        attention = dict(group.get("attention_mfu", {}))
        by_lengths = sorted({r["case"]["precision"] for r, _ in plain if r["case"]["checkpointing"] == "none"},
                            key=lambda p: -len({r["case"]["seq_len"] for r, _ in plain if r["case"]["precision"] == p}))
        for prec in by_lengths:  # those measured at two lengths first: they set their dtype's attention rate
            src = [(r, t) for r, t in plain if r["case"]["precision"] == prec and r["case"]["checkpointing"] == "none"]
            fitted_from[prec] = [r for r, _ in src] + [r for r, t in again
                                                        if r["case"]["precision"] == prec and t["compiled"] == compiled]
            mfu, att = _rates(src, out, attention.get(compute_dtype(prec)))
            fitted[prec] = _sig(bounded(f"{where}mfu.{prec}", mfu, 1.0, fitted_from[prec]))
            if att is not None:
                attention[compute_dtype(prec)] = _sig(bounded(f"{where}attention_mfu.{compute_dtype(prec)}", att, 1.0,
                                                              fitted_from[prec]))
        mfu = {**group.get("mfu", {}), **fitted}
        for prec in {r["case"]["precision"] for r, _ in mine} - set(fitted):  # no plain row: this run's figure
            same = [v for k, v in fitted.items() if compute_dtype(k) == compute_dtype(prec)]  # for its compute dtype
            if same:
                mfu[prec] = same[0]
        if mfu:
            group["mfu"] = dict(sorted(mfu.items()))
        if attention:
            group["attention_mfu"] = dict(sorted(attention.items()))
        for mode in ("full", "selective"):
            src = [(r, t) for r, t in plain if r["case"]["checkpointing"] == mode and r["case"]["precision"] in fitted]
            if src:
                value = statistics.median(_measured_step(r) / _compute(t, r, out) for r, t in src)
                against = [x for prec in {r["case"]["precision"] for r, _ in src} for x in fitted_from[prec]]
                group[f"time_{mode}"] = _sig(bounded(f"{where}time_{mode}", value, 1.0, [r for r, _ in src], against))
    few = [(r, t) for r, t in zip(rows, terms) if t["cores_share"] < 1 and not t["collectives"]]
    if few:
        gains = [_compute(t, r, {**out, "rank_mfu_gain": 1.0}) / _measured_step(r) for r, t in few]
        out["rank_mfu_gain"] = _sig(bounded("rank_mfu_gain", statistics.median(gains), 1.0, [r for r, _ in few]))
        for name, value in _constants(out):
            if name.removeprefix("compiled.").split(".")[0] in ("mfu", "attention_mfu"):
                bounded(name, value * out["rank_mfu_gain"], 1.0, [r for r, _ in few])
    per_strategy: dict[str, list[tuple[tuple[float, float], float, dict]]] = {}
    for r, t in zip(rows, terms):
        if t["collectives"]:
            g = with_compiled(out, t["compiled"])
            mode = r["case"]["checkpointing"]
            kind = "none" if mode == "none" else ("selective" if mode == "selective" else "full")
            compute = _compute(t, r, out) * (1 + t["share"] * (g.get(f"time_{kind}", 1.0) - 1))
            split = split_exposed(_measured_step(r) - compute, t["comm_bw"], t["collectives"])
            per_strategy.setdefault(r["case"]["strategy"], []).append((split, _measured_step(r) / t["collectives"], r))
    for k, v in sorted(per_strategy.items()):
        src = [r for _, _, r in v]
        overlap = _sig(bounded(f"comm_overlap.{k}", statistics.median(o for (o, _), _, _ in v), 1.0, src))
        per_call = _sig(bounded(f"collective_s.{k}", statistics.median(c for (_, c), _, _ in v),
                                statistics.median(s for _, s, _ in v), src))
        for key, value in (("comm_overlap", overlap), ("collective_s", per_call)):
            kept = out.get(key, {})  # a calibration written before the share was per strategy: one figure
            out[key] = {**(kept if isinstance(kept, dict) else {}), k: value}
    memory = _memory_fit(rows, terms, cal)
    out["compiled"].update(memory.pop("compiled"))
    out.update(memory)
    for name, value in _constants(out):  # those no row refitted: kept from the calibration in force
        bounded(name, value, 0.0, [{"config": "none of these rows (kept from the calibration in force)"}])
    return out


def _compute(t: dict, row: dict, cal: dict[str, Any]) -> float:
    """A row's compute as the prediction prices it (`throughput.compute_seconds`) under the
    calibration `cal` being fitted: its precision's rates, on the cores it ran on."""
    from shoestring.plan.catalogue import with_compiled
    from shoestring.plan.throughput import attention_rate, compute_seconds, elementwise_scale, on_cores

    g = with_compiled(cal, t["compiled"])
    prec = row["case"]["precision"]
    mfu = g["mfu"][prec]
    attention = attention_rate(g, prec, mfu)
    return compute_seconds(t["at_peak"], t["full_at_peak"], t["attention_at_peak"], on_cores(g, mfu, t["cores_share"]),
                           on_cores(g, attention, t["cores_share"]), elementwise_scale(cal, t["elementwise"]))


def _rates(src: list[tuple[dict, dict]], cal: dict[str, Any], attention: float | None) -> tuple[float, float | None]:
    """(MFU, attention's MFU) of one precision from its plain rows (one process, no recompute):
    each measured step = A / attention + W + W (1/MFU - 1) s, with A and W attention's and the
    rest's FLOPs at the peak and s the rows' `elementwise_scale`. Rows at two sequence lengths or
    more give both by least squares (their attention shares differ); at one length, attention
    takes `attention` when calibrated (its MFU then from the median row), else the step's own
    rate (None)."""
    from shoestring.plan.throughput import elementwise_scale

    points = []  # (W s, A, measured less what does not depend on the rates)
    for r, t in src:
        w, a, s = t["at_peak"] - t["attention_at_peak"], t["attention_at_peak"], elementwise_scale(cal, t["elementwise"])
        points.append((w * s, a, _measured_step(r) - w * (1 - s)))
    if len({r["case"]["seq_len"] for r, _ in src}) > 1:  # a time per FLOP of 0 or less: no rate (the bounds say so)
        inverse = np.linalg.lstsq(np.array([p[:2] for p in points]), np.array([p[2] for p in points]), rcond=None)[0]
        return tuple(1 / float(inv) if inv > 0 else math.inf for inv in inverse)  # type: ignore[return-value]
    if attention is not None:
        return statistics.median(ws / (y - a / attention) for ws, a, y in points), None
    return statistics.median((ws + a) / y for ws, a, y in points), None


def _memory_fit(rows: list[dict], terms: list[dict], cal: dict[str, Any]) -> dict[str, Any]:
    """The process memory that is not tensors and the heap's share over them, from the rows'
    peaks: measured = `rss_base_gb` + (1 + `fragmentation`) x tensors on the eager rows, and
    + `rss_compile_gb` + (1 + compiled `fragmentation`) x tensors on the compiled ones (each a
    line by least squares; the tensors are the model's own count: a row's predicted memory
    without these terms). `fragmentation` is what glibc's heap holds beyond the live tensors at
    the peak (blocks freed by earlier steps that a step's new tensors do not fit into); compiled
    blocks allocate fewer, planned buffers, so they get their own. Rows of one size cannot tell
    a base from a share: then the share in force is kept and the base is the median residual."""
    from shoestring.plan.catalogue import with_compiled

    parts = ("fragmentation", "framework", "compile_runtime")
    points = [(sum(v for k, v in r["predicted"]["components"].items() if k not in parts), r["memory_measured"], r)
              for r in rows]
    size = statistics.median(m for _, m, _ in points) / 1e9 if points else 1.0
    out: dict[str, Any] = {"compiled": {}}
    base = cal.get("rss_base_gb", 0.3) * 1e9
    for compiled, where, key in ((False, out, "rss_base_gb"), (True, out["compiled"], "rss_compile_gb")):
        mine = [(x, m - (base if compiled else 0.0), r) for (x, m, r), t in zip(points, terms) if t["compiled"] == compiled]
        if not mine:
            continue
        share = with_compiled(cal, compiled).get("fragmentation", 0.0)
        xs = [x for x, _, _ in mine]
        if len(mine) > 2 and max(xs) > 1.5 * min(xs):
            intercept, slope = _line(xs, [y for _, y, _ in mine])
            share = _sig(bounded(f"{'compiled.' if compiled else ''}fragmentation", slope - 1, 1.0, [r for *_, r in mine]))
        else:
            intercept = statistics.median(y - (1 + share) * x for x, y, _ in mine)
        where["fragmentation"] = share
        where[key] = round(bounded(f"{'compiled.' if compiled else ''}{key}", intercept / 1e9, size, [r for *_, r in mine]), 3)
        if not compiled:
            base = where[key] * 1e9
    return out


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _sig(x: float) -> float:
    """Three significant digits: a contended or tiny model's MFU of 0.0004 must not round to 0."""
    return float(f"{x:.3g}")


def _constants(table: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of every bounded constant in a calibration table."""
    out = []
    for k, v in table.items():
        if isinstance(v, dict):
            out += _constants(v, f"{prefix}{k}.")
        elif f"{prefix}{k}".removeprefix("compiled.").split(".")[0] in BOUNDS:
            out.append((f"{prefix}{k}", v))
    return out


def _terms(row: dict) -> dict[str, Any]:
    """A row's model terms that do not depend on the constants being fitted: FLOPs time at the
    probed peak (and the full model's, for LoRA), bytes over the bandwidth, collective calls,
    the checkpointed share of blocks."""
    from shoestring.levers.checkpointing import checkpointed_blocks
    from shoestring.plan.catalogue import cpu_device
    from shoestring.plan.memory import Levers
    from shoestring.plan.model import model_info
    from shoestring.plan.search import Request, trainable_for
    from shoestring.plan.throughput import collectives, comm_bytes, compute_dtype, elementwise_per_mflop

    case = Case(**row["case"])
    device = cpu_device(row["probe"])
    info = model_info(case.preset)
    req = Request(case.preset, tokens=1e6, mode=case.mode, seq_len=case.seq_len, lora_rank=case.lora_rank,
                  lora_base_dtype=case.lora_base_dtype)
    trainable, flops = trainable_for(req, info, case.seq_len)
    levers = Levers(case.precision, case.checkpointing, case.strategy, micro_batch=case.batch // case.world,
                    compiled=row["predicted"]["compiled"])
    tokens, peak = levers.micro_batch * case.seq_len, device.peak_flops(compute_dtype(case.precision))
    return {"compiled": levers.compiled, "at_peak": tokens * flops / peak,
            "full_at_peak": tokens * info.flops_per_token(case.seq_len) / peak,
            "attention_at_peak": tokens * info.args.attention_flops_per_token(case.seq_len) / peak,
            "comm_bw": comm_bytes(info, trainable, levers, case.world) / (device.link_gbs(case.world) * 1e9),
            "collectives": collectives(info, trainable, levers, case.world), "cores_share": device.cores_share,
            "elementwise": elementwise_per_mflop(info),
            "share": len(checkpointed_blocks(info.args.n_layers, case.checkpointing)) / info.args.n_layers}


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' if "-" in k else f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v) if not isinstance(v, str) else f'"{v}"'


def calibration_toml(fitted: dict[str, Any], source: str) -> str:
    """`fitted` as the `[calibration.cpu]` and `[calibration.cpu.compiled]` tables of hardware.toml."""
    flat = {k: v for k, v in fitted.items() if k not in ("compiled", "how")}
    lines = ["[calibration.cpu]", f"# Fitted to the fit set of {source}; judged on its check set."]
    lines += [f"{k} = {_toml_value(v)}" for k, v in flat.items()]
    lines += ['how = "fitted: shoestring calibrate / benchmarks/planner_accuracy.py (docs/planner.md, Calibration)"', "",
              "[calibration.cpu.compiled]", "# Blocks under torch.compile (the compile lever): these apply over the above."]
    lines += [f"{k} = {_toml_value(v)}" for k, v in fitted.get("compiled", {}).items()]
    return "\n".join(lines) + "\n"


def write_calibration(fitted: dict[str, Any], source: str) -> None:
    """Replace the `[calibration.cpu]` tables in plan/hardware.toml with `fitted`."""
    from shoestring.plan.catalogue import CATALOGUE_PATH, calibration

    text = CATALOGUE_PATH.read_text()
    pattern = re.compile(r"^\[calibration\.cpu\]\n.*?(?=^\[calibration\.(?!cpu))", re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f"no [calibration.cpu] table followed by another [calibration.*] in {CATALOGUE_PATH}")
    CATALOGUE_PATH.write_text(pattern.sub(lambda _: calibration_toml(fitted, source) + "\n", text, count=1))
    calibration.cache_clear()


def write_local_calibration(fitted: dict[str, Any], source: str) -> str:
    """Write `fitted` as this machine's own calibration (plan/catalogue.py reads it from then on,
    for this CPU, kernel set and torch only); returns the file's path."""
    from shoestring.plan.catalogue import calibration, local_calibration_path, machine_key

    path = local_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"machine = {_toml_value(machine_key())}\n\n" + calibration_toml(fitted, source))
    calibration.cache_clear()
    return str(path)


def calibrate(size: str = "small", rounds: int = 1, progress: Callable[[str], None] = lambda s: None) -> tuple[list[dict], str]:
    """`shoestring calibrate`: measure both sets here, fit the fit set, and write the fit as this
    machine's calibration when the fit holds its bounds; the rows (predicted with the fit) and
    what was done. Raises FitError (nothing written) when it does not."""
    rows = run(size, rounds, progress)
    if "fitted" not in rows[0]:
        raise FitError(rows[0]["fit_error"])
    return rows, write_local_calibration(rows[0]["fitted"], f"`shoestring calibrate --size {size}` on this machine")
