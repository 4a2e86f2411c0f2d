"""PNG charts of a section's rows: tokens/s and peak memory per configuration, and the
memory/time frontier of the checkpointing modes. Needs matplotlib (the `plots` extra); without
it the suite says so and writes the tables alone."""

from __future__ import annotations

from pathlib import Path

from shoestring.measure.memory import MiB


def _label(r: dict) -> str | None:
    return r.get("config") if isinstance(r.get("config"), str) else r.get("case") or r.get("mode")


def _tokens_per_s(r: dict) -> float | None:
    if "tokens_per_s" in r:
        return r["tokens_per_s"]
    if "tokens_per_step" in r and "step_s" in r:
        return r["tokens_per_step"] / r["step_s"]
    return r.get("tokens_per_s_measured")


def _peak(r: dict) -> float | None:
    return r.get("peak_bytes") or r.get("peak_rss_bytes") or r.get("memory_measured")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_and_memory(name: str, rows: list[dict], out: Path) -> Path | None:
    """Two bar panels side by side, one bar per row that has both figures."""
    points = [(_label(r), _tokens_per_s(r), _peak(r)) for r in rows if "error" not in r]
    points = [p for p in points if None not in p]
    if not points:
        return None
    plt = _pyplot()
    labels, tps, peak = zip(*points)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 0.35 * len(points) + 1.4), sharey=True)
    a.barh(labels, tps, color="tab:blue")
    a.set_xlabel("tokens/s (higher is better)")
    b.barh(labels, [p / MiB for p in peak], color="tab:orange")
    b.set_xlabel("peak memory, MiB (lower is better)")
    a.invert_yaxis()
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def checkpointing_frontier(rows: list[dict], out: Path) -> Path | None:
    """Step time vs saved activation bytes of the checkpointing modes (levers rows): the modes on
    the lower-left frontier are the ones worth choosing."""
    from shoestring.bench.levers import base_precision

    precision = base_precision(rows)
    modes = [r for r in rows if r.get("precision") == precision and "saved_activation_bytes" in r]
    if len(modes) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in modes:
        ax.scatter(r["step_s"], r["saved_activation_bytes"] / MiB, color="tab:green")
        ax.annotate(r["checkpointing"], (r["step_s"], r["saved_activation_bytes"] / MiB), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.margins(0.2)
    ax.set_xlabel("step time, s")
    ax.set_ylabel("saved activations, MiB")
    ax.set_title(f"checkpointing modes ({precision}): memory vs time", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def section_charts(name: str, rows: list[dict], img_dir: Path) -> list[Path]:
    """The charts this section's rows support, written under `img_dir`; raises ImportError
    without matplotlib."""
    img_dir.mkdir(parents=True, exist_ok=True)
    made = [throughput_and_memory(name, rows, img_dir / f"{name}.png")]
    if name == "levers":
        made.append(checkpointing_frontier(rows, img_dir / "checkpointing-frontier.png"))
    return [p for p in made if p is not None]
