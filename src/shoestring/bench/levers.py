"""The precision and checkpointing levers, side by side on one model and batch.

One row per configuration: every precision without checkpointing, then every checkpointing
mode under the base precision (the trainer's `auto` choice for this machine: bf16 where its
matmuls are fast, else fp32), all eager so that each lever's effect is its own; then the
trainer's default configuration (`precision.mode` and `train.compile` "auto", as resolved here),
which is what a user gets and what the MFU goal is about. A precision whose matmuls the probe
measured more than 2x slower than fp32 here (fp16 on any CPU, bf16 without AVX-512 BF16) is
not run beyond `smoke`: a `small` step would take minutes; the table says so with the figures.
MFU is against the measured matmul peak of the row's compute dtype (plan/probe.py), the same
yardstick `shoestring train` reports. The goals these rows are held to live in bench/goals.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from shoestring.bench.step import StepSpec, side_by_side
from shoestring.measure.memory import MiB

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure")
CHECKPOINTING = ("none", "full", "every:2", "selective")

# size -> (the step every configuration takes: `steps` timed per round, rounds). `small` times 1
# step per round (3 rounds in turns; a step is 1-3 s): `shoestring bench --size small` must fit
# in 15 minutes, and set-up, not the rounds, is most of this section's time.
SIZES = {
    "smoke": (StepSpec(preset="micro", vocab_size=512, batch=2, seq_len=32, steps=1), 1),
    "small": (StepSpec(preset="small", vocab_size=8192, batch=8, seq_len=256, steps=1), 3),
    "full": (StepSpec(preset="small", vocab_size=8192, batch=8, seq_len=512, steps=4), 5),
}


DEFAULT = "the trainer's default (auto)"


def specs(base: StepSpec, default: StepSpec, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, StepSpec]:
    """The rows' steps; `default`: the trainer's resolved defaults (its precision is the base
    the checkpointing modes run under)."""
    out = {f"precision {p}": replace(base, precision=p, checkpointing="none") for p in precisions}
    out.update({f"checkpointing {c}": replace(base, precision=default.precision, checkpointing=c)
                for c in CHECKPOINTING if c != "none"})
    if not base.compile:  # a run that compiles every row has the default among them already
        out[DEFAULT] = replace(base, precision=default.precision, checkpointing="none", compile=default.compile)
    return out


def run(size: str = "small", rounds: int | None = None, progress: Callable[[str], None] = lambda s: None,
        compile: bool = False) -> list[dict]:
    """One row per configuration (see `specs`); `compile`: torch.compile each block (regional) in all."""
    import torch

    from shoestring.build import resolve_auto
    from shoestring.config import Config
    from shoestring.levers.precision import SLOW, DeviceFacts, rates_line
    from shoestring.plan import probe

    base, default_rounds = SIZES[size]
    base = replace(base, compile=compile)
    probe.forget()  # MFU against the peak as it is now, not a cached figure from other conditions
    facts: DeviceFacts = probe.device_facts(torch.device("cpu"))
    auto = resolve_auto(Config(), facts)
    default = replace(base, precision=auto.cfg.precision.mode, compile=auto.cfg.train.compile)
    slow = {p: rates_line(facts, p) for p in PRECISIONS if facts.rate(p) * SLOW < facts.rate("fp32")}
    skipped = {p: reason for p, reason in slow.items() if size != "smoke"}
    results = side_by_side(specs(base, default, tuple(p for p in PRECISIONS if p not in skipped)),
                           rounds or default_rounds, progress)
    rows = []
    for name, r in results.items():
        precision, mode = r["precision"], r["spec"]["checkpointing"]
        peak, flops = facts.rate(precision), r["tokens_per_s"] * r["flops_per_token"]
        rows.append({**r, "config": name, "precision": precision, "checkpointing": mode, "mfu": probe.mfu(flops, peak),
                     "mfu_error": probe.mfu_error(flops, peak), "matmul_peak_flops": peak,
                     "auto": {"precision": auto.precision.reason, "compile": auto.compile.reason},
                     "not_measured": skipped})
    return rows


def base_precision(rows: list[dict]) -> str:
    """The precision the checkpointing rows ran under (the trainer's `auto` choice there)."""
    return next((r["precision"] for r in rows if r["checkpointing"] != "none"), "bf16")


def row(rows: list[dict], precision: str | None = None, checkpointing: str = "none",
        compiled: bool | None = None) -> dict:
    """A configuration's row (`precision` None: the base precision); `compiled=None`: a lever
    row (compiled only if the whole run is)."""
    precision = precision or base_precision(rows)
    if compiled is None:
        compiled = rows[0]["spec"].get("compile", False)
    return next(r for r in rows if r["precision"] == precision and r["checkpointing"] == checkpointing
                and r["spec"].get("compile", False) == compiled)


def _state_mib(r: dict) -> str:
    return f"{sum(r['state_bytes'].get(k, 0) for k in ('params', 'grads', 'optimizer', 'master')) / MiB:,.1f}"


def table(rows: list[dict]) -> str:
    spec = rows[0]["spec"]
    fp32, none = row(rows, "fp32"), row(rows)
    lines = [f"Model `{spec['preset']}`{' (blocks compiled)' if spec['compile'] else ''}, batch {spec['batch']} x {spec['seq_len']} tokens, vocab {spec['vocab_size']}; "
             f"median of {len(none['step_s_all'])} interleaved rounds x {spec['steps']} steps.", "",
             "| precision | step (s) | tokens/s | vs fp32 | MFU of the measured peak | params+grads+optim+master (MiB) | saved activations (MiB) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    precisions = [p for p in PRECISIONS if any(r["precision"] == p for r in rows)]
    precision_rows = [(p, row(rows, p)) for p in precisions]
    precision_rows += [(f"{r['config']}: {r['precision']}, blocks {'compiled' if r['spec']['compile'] else 'eager'}", r)
                       for r in rows if r["config"] == DEFAULT]
    for label, r in precision_rows:
        mfu = "error" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x "
                     f"| {mfu} of {r['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s | {_state_mib(r)} "
                     f"| {r['saved_activation_bytes'] / MiB:,.1f} | {r['peak_rss_bytes'] / MiB:,.1f} |")
    auto = rows[0].get("auto")
    if auto:
        lines += ["", f"`auto` here: precision {base_precision(rows)} ({auto['precision']}); compile: {auto['compile']}."]
    lines += [f"- {r['config']}: {r['mfu_error']}" for r in rows if r.get("mfu_error")]
    lines += [f"- precision {p} not measured at this size: {why}, more than 2x slower than fp32"
              for p, why in rows[0].get("not_measured", {}).items()]
    lines += ["", f"Checkpointing under `{base_precision(rows)}`:", "",
              "| mode | step (s) | extra step time | saved activations (MiB) | cut vs none | lever's estimate, blocks (MiB) | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for c in CHECKPOINTING:
        r = row(rows, None, c)
        lines.append(f"| {c} | {r['step_s']:.3f} | {r['step_s'] / none['step_s'] - 1:+.1%} | {r['saved_activation_bytes'] / MiB:,.1f} "
                     f"| {1 - r['saved_activation_bytes'] / none['saved_activation_bytes']:.1%} "
                     f"| {r['estimated_block_activation_bytes'] / MiB:,.1f} | {r['peak_rss_bytes'] / MiB:,.1f} |")
    return "\n".join(lines)
