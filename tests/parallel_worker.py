"""Spawned by tests/test_parallel.py: build each strategy on 2 gloo ranks, take a step, and
report its counted model-state bytes next to its own estimate."""

from __future__ import annotations

import os

import torch

CASES = [("ddp", 0), ("fsdp2", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def measure(rank: int, port: int, with_deepspeed: bool, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from shoestring.build import build_strategy
    from shoestring.config import build_config
    from shoestring import dist

    out = {}
    with dist.process_group(torch.device("cpu"), 60, required=True):
        for name, stage in CASES:
            if name == "deepspeed" and not with_deepspeed:
                continue
            for mode in ("fp32", "bf16-pure"):
                parallel = {"strategy": name, **({"zero_stage": stage} if stage else {})}
                cfg = build_config({"model": {"preset": "micro"}, "data": {"seq_len": 16}, "train": {"compile": False},
                                    "precision": {"mode": mode}, "parallel": parallel})
                s = build_strategy(cfg, 512, torch.device("cpu"))
                x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
                s.forward_backward(x, y, 1.0, True)
                s.step(1e-3)  # the optimizer state exists from the first step on
                s.forward_backward(x, y, 1.0, True)  # gradients held: the steady state's peak
                n = s.unwrapped().num_params()
                out[(name, stage, mode)] = (s.memory(), type(s).state_bytes(n, 2, s.policy, cfg.parallel), n)
                s.step(1e-3)
    if rank == 0:
        queue.put(out)


def measure_peak_rss(rank: int, port: int, with_deepspeed: bool, queue) -> None:
    """Peak RSS growth of building a strategy and taking two steps, DDP and FSDP2 (fp32), on a
    model whose state (~23M parameters, 16 bytes each replicated) dwarfs its activations."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import gc

    from shoestring.build import build_strategy
    from shoestring.config import build_config
    from shoestring import dist
    from shoestring.measure.memory import PeakRSS

    out = {}
    rss = PeakRSS()
    with dist.process_group(torch.device("cpu"), 60, required=True):
        for name, stage in [("ddp", 0), ("fsdp2", 0)]:
            parallel = {"strategy": name, **({"zero_stage": stage} if stage else {})}
            cfg = build_config({"model": {"preset": "small"}, "data": {"seq_len": 16}, "train": {"compile": False},
                                "precision": {"mode": "fp32"}, "parallel": parallel})
            gc.collect()
            rss.reset()
            base = rss.current_bytes()
            s = build_strategy(cfg, 512, torch.device("cpu"))
            x, y = torch.randint(0, 512, (1, 16)), torch.randint(0, 512, (1, 16))
            for _ in range(2):
                s.forward_backward(x, y, 1.0, True)
                s.step(1e-3)
            out[(name, stage)] = (rss.peak_bytes() - base, sum(s.memory().values()))
            del s
            dist.barrier()
    if rank == 0:
        queue.put(out)
