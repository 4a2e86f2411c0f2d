"""The matmul ceiling at a preset's shapes: every linear layer's GEMMs of one training step, timed alone.

    PYTHONPATH=src python benchmarks/gemm_ceiling.py [--preset small --tokens 2048 --threads 2 --rounds 7]

A linear layer y = x W^T (x: tokens x in, W: out x in) costs three GEMMs per step: the forward (tokens x in @ in x out),
the input gradient dX = dY W (tokens x out @ out x in) and the weight gradient dW = dY^T X (out x tokens @ tokens x in).
For each layer of a block, and the LM head, this prints the achieved GFLOP/s of each GEMM against
`probe.matmul_peak_flops` (the yardstick MFU divides by), and the step's matmul floor: the time of all of them for all
layers, which is what a step would take if everything else cost nothing (attention's own matmuls are not in it).

Then horizontal fusion: q, k, v as one GEMM against three (and gate, up as one against two), forward, dX (separate:
three GEMMs and the adds that sum their input gradients) and dW. Each variant is timed in interleaved rounds (A B A B
...) and the median kept, so a shared machine's noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from shoestring.models import preset_args
from shoestring.plan import probe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layers(preset: str) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one block, and of the LM head."""
    a = preset_args(preset)
    head_dim = a.dim // a.n_heads
    return {"q": (a.dim, a.n_heads * head_dim), "k": (a.dim, a.n_kv_heads * head_dim), "v": (a.dim, a.n_kv_heads * head_dim),
            "o": (a.n_heads * head_dim, a.dim), "gate": (a.dim, a.ffn_dim), "up": (a.dim, a.ffn_dim),
            "down": (a.ffn_dim, a.dim), "head": (a.dim, a.vocab_size)}


def gemms(tokens: int, fan_in: int, fan_out: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of a linear layer's three GEMMs."""
    return {"fwd": (tokens, fan_in, fan_out), "dX": (tokens, fan_out, fan_in), "dW": (fan_out, tokens, fan_in)}


def operands(m: int, k: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)


def seconds(fn: Callable[[], object], min_s: float = 0.05) -> float:
    """Seconds per call: repeat until `min_s` has passed."""
    fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s or n < 2:
        fn()
        n += 1
    return elapsed / n


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant over `rounds` rounds, the variants alternating within a round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def fusion_variants(tokens: int, fan_in: int, outs: list[int], dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Separate and fused forward, dX and dW of layers sharing the input (q, k, v; gate, up)."""
    x = torch.randn(tokens, fan_in, dtype=dtype)
    ws = [torch.randn(fan_in, o, dtype=dtype) for o in outs]  # W^T, as the forward multiplies by it
    dys = [torch.randn(tokens, o, dtype=dtype) for o in outs]
    w_cat, dy_cat = torch.cat(ws, 1), torch.cat(dys, 1)

    def dx_separate() -> torch.Tensor:
        dx = dys[0] @ ws[0].T
        for dy, w in zip(dys[1:], ws[1:]):
            dx = dx + dy @ w.T
        return dx

    return {"fwd separate": lambda: [x @ w for w in ws], "fwd fused": lambda: x @ w_cat,
            "dX separate": dx_separate, "dX fused": lambda: dy_cat @ w_cat.T,
            "dW separate": lambda: [dy.T @ x for dy in dys], "dW fused": lambda: dy_cat.T @ x}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch x seq)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    args, shapes = preset_args(a.preset), layers(a.preset)
    print(f"preset {a.preset}, {a.tokens} tokens, {a.threads} threads, torch {torch.__version__}; "
          f"median of {a.rounds} interleaved rounds\n")
    for dname, dtype in DTYPES.items():
        peak = probe.matmul_peak_flops(torch.device("cpu"), dtype, a.threads)
        print(f"### {dname} (yardstick: {peak / 1e9:,.0f} GFLOP/s)\n\n| layer | GEMM | M x K x N | ms | GFLOP/s | of peak |\n"
              "|---|---|---|---:|---:|---:|")
        variants, flops = {}, {}
        for layer, (fan_in, fan_out) in shapes.items():
            for g, (m, k, n) in gemms(a.tokens, fan_in, fan_out).items():
                lhs, rhs = operands(m, k, n, dtype)
                variants[(layer, g)] = (lambda l=lhs, r=rhs: l @ r)
                flops[(layer, g)] = 2 * m * k * n
        measured = interleaved(variants, a.rounds)
        floor = total_flops = 0.0
        for (layer, g), s in measured.items():
            m, k, n = gemms(a.tokens, *shapes[layer])[g]
            print(f"| {layer} | {g} | {m} x {k} x {n} | {s * 1e3:.2f} | {flops[layer, g] / s / 1e9:,.0f} | "
                  f"{flops[layer, g] / s / peak:.0%} |")
            per_step = 1 if layer == "head" else args.n_layers
            floor += per_step * s
            total_flops += per_step * flops[layer, g]
        print(f"\nAll linear GEMMs of one step ({args.n_layers} blocks + head): {total_flops / 1e9:,.1f} GFLOP in "
              f"{floor * 1e3:,.0f} ms = {total_flops / floor / 1e9:,.0f} GFLOP/s, {total_flops / floor / peak:.0%} of the "
              f"yardstick: the step's matmul floor.\n")
        print("| fused | GEMM | separate ms | fused ms | fused speed-up |\n|---|---|---:|---:|---:|")
        for label, outs in (("q,k,v", [shapes[n][1] for n in ("q", "k", "v")]), ("gate,up", [args.ffn_dim] * 2)):
            t = interleaved(fusion_variants(a.tokens, args.dim, outs, dtype), a.rounds)
            for g in ("fwd", "dX", "dW"):
                sep, fused = t[f"{g} separate"], t[f"{g} fused"]
                print(f"| {label} | {g} | {sep * 1e3:.2f} | {fused * 1e3:.2f} | {sep / fused:.2f}x |")
            sep = sum(t[f"{g} separate"] for g in ("fwd", "dX", "dW"))
            fused = sum(t[f"{g} fused"] for g in ("fwd", "dX", "dW"))
            print(f"| {label} | all three | {sep * 1e3:.2f} | {fused * 1e3:.2f} | {sep / fused:.2f}x |")
        print()


if __name__ == "__main__":
    main()
