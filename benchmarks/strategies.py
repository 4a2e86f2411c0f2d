"""Side by side on 2 ranks: single, ddp, fsdp2 (reshard on/off), DeepSpeed ZeRO-1/2/3 — same
model, data and global batch. Prints a markdown table: step time, tokens/s, per-rank model-state
bytes (counted) and peak RSS (rank 0 and the larger of the two), and bytes each rank sends per
step (estimated from the collectives each strategy issues: ring all-reduce moves 2(N-1)/N of
the buffer, all-gather and reduce-scatter (N-1)/N each).

usage: python benchmarks/strategies.py [--preset tiny] [--steps 30] [--batch 16] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "single": ({"strategy": "single"}, 1),
    "ddp": ({"strategy": "ddp"}, 2),
    "fsdp2 reshard": ({"strategy": "fsdp2", "reshard_after_forward": True}, 2),
    "fsdp2 no-reshard": ({"strategy": "fsdp2", "reshard_after_forward": False}, 2),
    "zero1": ({"strategy": "deepspeed", "zero_stage": 1}, 2),
    "zero2": ({"strategy": "deepspeed", "zero_stage": 2}, 2),
    "zero3": ({"strategy": "deepspeed", "zero_stage": 3}, 2),
}


def comm_bytes(case: str, n_params: int, ranks: int) -> float:
    """Bytes one rank sends per optimizer step (fp32 gradients and parameters, 1 micro-step)."""
    if ranks == 1:
        return 0.0
    part = 4 * n_params * (ranks - 1) / ranks
    return {
        "ddp": 2 * part,                        # all-reduce of the gradients
        "fsdp2 reshard": 3 * part,              # all-gather fwd + all-gather bwd + reduce-scatter
        "fsdp2 no-reshard": 2 * part,           # all-gather fwd + reduce-scatter
        "zero1": 2 * part, "zero2": 2 * part,   # reduce-scatter grads + all-gather updated params
        "zero3": 3 * part,                      # as fsdp2 with resharding
    }[case]


def run(case: str, parallel: dict, ranks: int, args: argparse.Namespace, root: Path) -> dict:
    run_dir = root / case.replace(" ", "-")
    sets = [f"model.preset={json.dumps(args.preset)}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
            f"data.seq_len={args.seq}", f"train.eval_every={10 * args.steps}", "train.log_every=1", "run.save_every=0",
            f"precision.mode={json.dumps(args.precision)}", f"run.dir={json.dumps(str(run_dir))}"]
    sets += [f"parallel.{k}={json.dumps(v)}" for k, v in parallel.items()]
    cmd = [sys.executable, "-m", "shoestring", "train", args.config, "--overwrite", "--nproc", str(ranks)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"case": case, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1]}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median(r["tokens_per_s"] for r in records if "loss" in r and r["step"] >= 3)
    mem = summary["memory_bytes"]
    return {"case": case, "ranks": ranks, "tps": tps, "step_ms": 1000 * args.batch * args.seq / tps,
            "state": mem["params"] + mem["optimizer"] + mem["master"], "peak_rss": mem["device_peak"],
            "loss": summary["final_train_loss"]}


def n_params(preset: str, vocab: int) -> int:
    import torch

    from shoestring.models import build_model, preset_args

    return build_model(preset_args(preset, vocab_size=vocab, max_seq_len=None), torch.device("meta")).num_params()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="the config's data.vocab_size")
    p.add_argument("--only", nargs="*", help="subset of: " + ", ".join(CASES))
    args = p.parse_args()
    mib = 1 / 2**20
    params = n_params(args.preset, args.vocab)
    print(f"preset {args.preset}, {args.precision}, global batch {args.batch} x {args.seq} tokens, {args.steps} steps\n")
    print("| strategy | ranks | step ms | tokens/s | state/rank MiB (counted) | peak RSS rank 0 MiB | sent/rank/step MiB (est.) | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.only or CASES:
            parallel, ranks = CASES[case]
            r = run(case, parallel, ranks, args, Path(tmp))
            if "error" in r:
                print(f"| {case} | {ranks} | failed: {r['error']} |||||")
                continue
            print(f"| {case} | {ranks} | {r['step_ms']:.0f} | {r['tps']:,.0f} | {r['state'] * mib:.1f} | "
                  f"{r['peak_rss'] * mib:.0f} | {comm_bytes(case, params, ranks) * mib:.1f} | {r['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
