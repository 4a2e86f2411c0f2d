"""The precision and checkpointing levers, side by side on one model and batch.

Claims checked (this CPU has AVX-512 BF16): bf16 >= 2x fp32 tokens/s; `full` checkpointing cuts
saved activations >= 70% at < 30% extra step time; `selective` cuts >= 30% at < 10%.
"""

from __future__ import annotations

from dataclasses import replace

from shoestring.bench.runner import side_by_side
from shoestring.bench.step import StepSpec

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure")
CHECKPOINTING = ("none", "full", "every:2", "selective")


def run(base: StepSpec, rounds: int, progress=lambda s: None) -> dict[str, dict]:
    specs = {f"precision {p}": replace(base, precision=p, checkpointing="none") for p in PRECISIONS}
    specs.update({f"checkpointing {c}": replace(base, checkpointing=c) for c in CHECKPOINTING if c != "none"})
    results = side_by_side(specs, rounds, progress)
    results["checkpointing none"] = results[f"precision {base.precision}"]
    return results


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def report(base: StepSpec, results: dict[str, dict]) -> str:
    lines = [f"Model `{base.preset}`{' (blocks compiled)' if base.compile else ''}, batch {base.batch} x {base.seq_len} tokens, vocab {base.vocab_size}; "
             f"median of {len(next(iter(results.values()))['step_s_all'])} fresh-process rounds x {base.steps} steps.", ""]
    fp32 = results["precision fp32"]
    lines += ["| precision | step (s) | tokens/s | vs fp32 | params+grads+optim+master (MiB) | saved activations (MiB) | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for p in PRECISIONS:
        r = results[f"precision {p}"]
        state = sum(r["state_bytes"].get(k, 0) for k in ("params", "grads", "optimizer", "master"))
        lines.append(f"| {p} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x "
                     f"| {_mib(state)} | {_mib(r['saved_activation_bytes'])} | {_mib(r['peak_rss_bytes'])} |")
    none = results["checkpointing none"]
    lines += ["", f"Checkpointing under `{base.precision}`:", "",
              "| mode | step (s) | extra step time | saved activations (MiB) | cut vs none | lever's estimate, blocks (MiB) | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for c in CHECKPOINTING:
        r = results[f"checkpointing {c}"]
        lines.append(f"| {c} | {r['step_s']:.3f} | {r['step_s'] / none['step_s'] - 1:+.1%} | {_mib(r['saved_activation_bytes'])} "
                     f"| {1 - r['saved_activation_bytes'] / none['saved_activation_bytes']:.1%} "
                     f"| {_mib(r['estimated_block_activation_bytes'])} | {_mib(r['peak_rss_bytes'])} |")
    bf16_speedup = results["precision bf16"]["tokens_per_s"] / fp32["tokens_per_s"]

    def cut(c: str) -> float:
        return 1 - results[f"checkpointing {c}"]["saved_activation_bytes"] / none["saved_activation_bytes"]

    def extra(c: str) -> float:
        return results[f"checkpointing {c}"]["step_s"] / none["step_s"] - 1

    checks = [
        ("bf16 >= 2x fp32 tokens/s", bf16_speedup >= 2, f"{bf16_speedup:.2f}x"),
        ("full: >= 70% cut, < 30% extra time", cut("full") >= 0.7 and extra("full") < 0.3, f"{cut('full'):.1%} cut, {extra('full'):+.1%}"),
        ("selective: >= 30% cut, < 10% extra time", cut("selective") >= 0.3 and extra("selective") < 0.1,
         f"{cut('selective'):.1%} cut, {extra('selective'):+.1%}"),
    ]
    lines += ["", "| claim | measured | holds |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, ok, value in checks]
    return "\n".join(lines)
