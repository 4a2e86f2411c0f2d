"""Measure one training configuration's step: time, throughput, counted and real memory.

Run as a worker process (`python -m shoestring.bench.step '<json spec>'`) so each measurement
starts from a clean heap: the process peak (VmHWM) is then the configuration's own.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from shoestring.levers.checkpointing import apply_checkpointing, estimate_saved_activation_bytes
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models import build_model, preset_args
from shoestring.parallel import OptimizerSettings
from shoestring.parallel.single import SingleDevice
from shoestring.measure.memory import PeakRSS, SavedActivationCounter


@dataclass(frozen=True)
class StepSpec:
    preset: str = "tiny"
    vocab_size: int = 4096
    batch: int = 16
    seq_len: int = 256
    precision: str = "auto"  # as precision.mode: "auto" is the trainer's choice for this machine
    checkpointing: str = "none"
    compile: bool = False
    warmup: int = 2
    steps: int = 5
    seed: int = 0


def resolved_precision(mode: str) -> str:
    """`mode`, or for "auto" the precision lever's rule on this CPU's measured facts."""
    if mode != "auto":
        return mode
    from shoestring.levers.precision import resolve_precision
    from shoestring.plan.probe import device_facts

    return str(resolve_precision(device_facts(torch.device("cpu"))).value)


def measure(spec: StepSpec) -> dict:
    torch.manual_seed(spec.seed)
    args = preset_args(spec.preset, vocab_size=spec.vocab_size, max_seq_len=max(spec.seq_len, 16))
    model = build_model(args)
    apply_checkpointing(model, spec.checkpointing)
    if spec.compile:
        from shoestring.levers.compile import compile_blocks

        compile_blocks(model)
    policy = PrecisionPolicy(resolved_precision(spec.precision))
    strategy = SingleDevice(model, policy, OptimizerSettings(1e-3, 0.1, (0.9, 0.95), 1.0), torch.device("cpu"))
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randint(0, spec.vocab_size, (spec.batch, spec.seq_len), generator=gen)
    y = torch.randint(0, spec.vocab_size, (spec.batch, spec.seq_len), generator=gen)

    def step() -> None:
        strategy.forward_backward(x, y, 1.0, True)
        strategy.step(1e-3)

    for _ in range(spec.warmup):
        step()
    with SavedActivationCounter() as counter:
        strategy.forward_backward(x, y, 1.0, True)
    strategy.step(1e-3)
    rss = PeakRSS()
    rss.reset()
    times = []
    for _ in range(spec.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = spec.batch * spec.seq_len
    return {
        "spec": asdict(spec),
        "precision": policy.mode,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "saved_activation_bytes": counter.bytes,
        "estimated_block_activation_bytes": estimate_saved_activation_bytes(
            args, spec.checkpointing, spec.batch, spec.seq_len, policy.mode),
        "state_bytes": strategy.memory(),
        "peak_rss_bytes": rss.peak_bytes(),
        "flops_per_token": model.flops_per_token(spec.seq_len),
    }


if __name__ == "__main__":
    print(json.dumps(measure(StepSpec(**json.loads(sys.argv[1])))))
