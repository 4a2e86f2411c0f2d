"""The precision and checkpointing levers, side by side on one model and batch.

One row per configuration: every precision without checkpointing, then every checkpointing
mode under the base precision (bf16: this CPU has AVX-512 BF16), all eager so that each lever's
effect is its own; then the trainer's default configuration (bf16 with its blocks compiled,
`train.compile = "auto"`), which is what a user gets and what the MFU goal is about. MFU is against the measured
matmul peak of the row's compute dtype (plan/probe.py), the same yardstick `shoestring train`
reports. The goals these rows are held to live in bench/goals.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from shoestring.bench.runner import side_by_side
from shoestring.bench.step import StepSpec

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure")
CHECKPOINTING = ("none", "full", "every:2", "selective")
BASE_PRECISION = "bf16"

# fp16 is emulated on a CPU (no gain, ~2 s a step on `small`): measured at `full` only, to fit
# `small` in its time budget.
CPU_SMALL_SKIPS = ("fp16",)
# size -> (the step every configuration takes, rounds)
SIZES = {
    "smoke": (StepSpec(preset="micro", vocab_size=512, batch=2, seq_len=32, warmup=1, steps=1), 1),
    "small": (StepSpec(preset="small", vocab_size=8192, batch=8, seq_len=256, warmup=1, steps=3), 3),
    "full": (StepSpec(preset="small", vocab_size=8192, batch=8, seq_len=512, warmup=2, steps=4), 5),
}
MiB = 2**20


DEFAULT = "bf16, blocks compiled (the trainer's default)"


def specs(base: StepSpec, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, StepSpec]:
    out = {f"precision {p}": replace(base, precision=p, checkpointing="none") for p in precisions}
    out.update({f"checkpointing {c}": replace(base, precision=BASE_PRECISION, checkpointing=c)
                for c in CHECKPOINTING if c != "none"})
    if not base.compile:  # a run that compiles every row has the default among them already
        out[DEFAULT] = replace(base, precision=BASE_PRECISION, checkpointing="none", compile=True)
    return out


def matmul_peak(precision: str) -> float:
    """Measured dense matmul FLOP/s of the precision's compute dtype on this CPU (cached)."""
    import torch

    from shoestring.plan import probe

    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision == "fp16" else torch.float32
    return probe.matmul_peak_flops(torch.device("cpu"), dtype)


def run(size: str = "small", rounds: int | None = None, progress: Callable[[str], None] = lambda s: None,
        compile: bool = False) -> list[dict]:
    """One row per configuration (see `specs`); `compile`: torch.compile each block (regional) in all."""
    from shoestring.plan import probe

    base, default_rounds = SIZES[size]
    base = replace(base, compile=compile)
    precisions = tuple(p for p in PRECISIONS if size != "small" or p not in CPU_SMALL_SKIPS)
    probe.forget()  # MFU against the peak as it is now, not a cached figure from other conditions
    peaks = {p: matmul_peak(p) for p in precisions}
    results = side_by_side(specs(base, precisions), rounds or default_rounds, progress)
    rows = []
    for name, r in results.items():
        precision, mode = r["spec"]["precision"], r["spec"]["checkpointing"]
        rows.append({**r, "config": name, "precision": precision, "checkpointing": mode,
                     "mfu": r["tokens_per_s"] * r["flops_per_token"] / peaks[precision], "matmul_peak_flops": peaks[precision]})
    return rows


def row(rows: list[dict], precision: str = BASE_PRECISION, checkpointing: str = "none",
        compiled: bool | None = None) -> dict:
    """A configuration's row; `compiled=None`: a lever row (compiled only if the whole run is)."""
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
             f"median of {len(none['step_s_all'])} fresh-process rounds x {spec['steps']} steps.", "",
             "| precision | step (s) | tokens/s | vs fp32 | MFU | params+grads+optim+master (MiB) | saved activations (MiB) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    precisions = [p for p in PRECISIONS if any(r["precision"] == p for r in rows)]
    precision_rows = [(p, row(rows, p)) for p in precisions] + [(r["config"], r) for r in rows if r["config"] == DEFAULT]
    for label, r in precision_rows:
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x "
                     f"| {r['mfu']:.1%} | {_state_mib(r)} | {r['saved_activation_bytes'] / MiB:,.1f} | {r['peak_rss_bytes'] / MiB:,.1f} |")
    lines += ["", f"Checkpointing under `{BASE_PRECISION}`:", "",
              "| mode | step (s) | extra step time | saved activations (MiB) | cut vs none | lever's estimate, blocks (MiB) | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for c in CHECKPOINTING:
        r = row(rows, BASE_PRECISION, c)
        lines.append(f"| {c} | {r['step_s']:.3f} | {r['step_s'] / none['step_s'] - 1:+.1%} | {r['saved_activation_bytes'] / MiB:,.1f} "
                     f"| {1 - r['saved_activation_bytes'] / none['saved_activation_bytes']:.1%} "
                     f"| {r['estimated_block_activation_bytes'] / MiB:,.1f} | {r['peak_rss_bytes'] / MiB:,.1f} |")
    return "\n".join(lines)
