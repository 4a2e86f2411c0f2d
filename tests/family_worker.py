"""Spawned by tests/test_family_strategies.py: on 2 gloo ranks, for every family x strategy x
{LoRA, full fine-tuning}, one training step from the family's tiny HF directory.

Each case checks, on each rank, that the strategy's loss on this rank's half of the batch equals
the loss the plain single-process model (loaded from the same source, no strategy) gives on it,
that it is finite, and that the step changed what trains (the loss on the same rows moved).
Results go back through the queue, with each case's wall time."""

from __future__ import annotations

import math
import os
import time

import torch

BATCH, SEQ = 4, 20  # global rows; each rank takes half
LORA = {"enabled": True, "rank": 4, "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}


def _batch(vocab: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    from shoestring.models.loss import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, vocab, (BATCH, SEQ), generator=g)
    y = torch.randint(20, vocab, (BATCH, SEQ), generator=g)
    y[:, -5:] = IGNORE_INDEX  # padded tails, as instruction rows have
    half = BATCH // 2
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def _config(source: str, parallel: dict, lora: bool):
    from shoestring.config import build_config

    return build_config({"model": {"source": source}, "data": {"format": "instruct", "corpus": "unused.jsonl", "seq_len": SEQ},
                         "train": {"lr": 1e-2, "weight_decay": 0.0, "device": "cpu", "compile": False}, "precision": {"mode": "fp32"},
                         "parallel": parallel, "lora": LORA if lora else {"enabled": False}})


def run_cases(rank: int, port: int, dirs: dict[str, str], strategies: dict[str, dict], subsets: dict[str, set], queue) -> None:
    """`subsets`: strategy -> the families it runs on (all when absent)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from shoestring.build import build_strategy
    from shoestring.models.hf import load_llama, read_source
    from shoestring import dist
    from shoestring.models.loss import cross_entropy_from_hidden

    out: dict[tuple[str, str, str], dict] = {}
    with dist.process_group(torch.device("cpu"), 120, required=True):
        for family, path in dirs.items():
            src = read_source(f"hf:{path}")
            x, y = _batch(src.args.vocab_size, rank)
            plain = load_llama(src).eval()
            with torch.no_grad():
                reference = cross_entropy_from_hidden(plain(x), plain.lm_head.weight, y, softcap=plain.args.final_softcap).item()
            for name, parallel in strategies.items():
                if family not in subsets.get(name, dirs):
                    continue
                for mode in ("lora", "full"):
                    t = time.perf_counter()
                    s = build_strategy(_config(f"hf:{path}", parallel, mode == "lora"), src.args.vocab_size, torch.device("cpu"), src)
                    s.module.train(False)  # no dropout anywhere; the same numerics as `plain`
                    loss = s.forward_backward(x, y, 1.0, True).item()
                    s.step(1e-2)
                    after = s.eval_loss(x, y).item()
                    out[(family, name, mode)] = {"loss": loss, "reference": reference, "after": after,
                                                 "finite": math.isfinite(loss) and math.isfinite(after),
                                                 "memory": s.memory(), "seconds": time.perf_counter() - t}
                    del s
                    dist.barrier()
    queue.put((rank, out))
