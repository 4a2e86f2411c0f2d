"""What a run did, for people: the end-of-run table and PNG plots of `metrics.jsonl`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shoestring.errors import UserError
from shoestring.rundir import METRICS_FILE
from shoestring.train.metrics import read_metrics


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _or_dash(value: float | None, spec: str) -> str:
    """A figure a run may not have (no eval yet, no steps run) shows as a dash."""
    return "—" if value is None else spec.format(value)


def _padding(summary: dict[str, Any]) -> str:
    """How much of what was computed was padding (tokens/s and MFU leave it out)."""
    pad, processed = summary.get("padding_tokens", 0), summary.get("tokens_processed", 0)
    return f", + {pad:,} padding ({pad / processed:.1%} of those processed; not in tokens/s or MFU)" if pad else ""


def print_summary(console: Console, summary: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"run {run_dir}", show_header=False)
    table.add_row("tokens", f"{summary['tokens']:,} in {summary['steps_run']} steps" + _padding(summary))
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:,.0f}")
    precision = summary["precision"]
    table.add_row("precision", f"{precision['mode']} ({precision['reason']})")
    table.add_row("MFU", summary["mfu_error"] or _or_dash(summary["mfu"], "{:.1%}") +
                  f" of the measured {precision['mode']} matmul peak, {summary['peak_flops'] / 1e9:,.1f} GFLOP/s")
    table.add_row("final train loss", _or_dash(summary["final_train_loss"], "{:.4f}"))
    table.add_row("final val loss", _or_dash(summary["final_val_loss"], "{:.4f}") + f" (unigram baseline {summary['unigram_val_loss']:.4f})")
    for name, value in summary["memory_bytes"].items():
        table.add_row(f"memory: {name}", human_bytes(value))
    table.add_row("cost", f"${summary['cost_usd']:.4f} at ${summary['price_per_device_hour']}/device-hour ({summary['price_source']})")
    adapted = summary.get("adapt")
    if adapted is not None:
        table.add_row("micro-batch", f"{adapted['micro_batch']} per rank x {adapted['grad_accum']} accumulation"
                      + (f" (started at {adapted['micro_batch_start']})" if adapted["micro_batch_start"] != adapted["micro_batch"] else ""))
        if adapted["oom_events"] or adapted["restarts"]:
            table.add_row("adapted", f"{adapted['oom_events']} out-of-memory, {adapted['restarts']} restarts: "
                                     f"{adapted['steps_redone']} steps redone, {adapted['lost_s']:,.1f} s, ${adapted['lost_usd']:.4f} lost")
    budget = summary.get("budget")
    if budget is not None:
        planned = "not planned yet" if budget["steps"] is None else f"{budget['steps']} steps"
        table.add_row("budget", f"{budget['requested']} ({budget['seconds']:,.0f} s, ${budget['budget_usd']:.4f}) -> "
                                f"{planned}; spent {budget['spent_s']:,.1f} s, ${budget['spent_usd']:.4f} (start to final save)")
    console.print(table)


def plot_run(run_dir: Path) -> list[Path]:
    """Write loss.png, throughput.png and memory.png into the run directory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib", "pip install 'shoestring[plots]'") from None
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}", "give the run.dir of a training run")
    records = read_metrics(path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        raise UserError(f"{path} holds no training steps yet", "let the run log at least one step")
    steps = [r["step"] for r in train]
    out = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in train], label="train loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    out.append(_save(fig, run_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["tokens_per_s"] for r in train])
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    out.append(_save(fig, run_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in train[-1]["memory"]:
        ax.plot(steps, [r["memory"].get(key, 0) / 2**20 for r in train], label=key)
    ax.set(xlabel="step", ylabel="MiB", title="memory")
    ax.legend(fontsize=7)
    out.append(_save(fig, run_dir / "memory.png"))
    return out


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
