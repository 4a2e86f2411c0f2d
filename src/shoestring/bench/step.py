"""Measure one single-process training configuration's step: time, throughput, counted and real
memory, through the measuring harness (bench/harness.py: the trainer's build path, its warm-up
rule and timer, one process per configuration taking its rounds in turns with the others).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from shoestring.bench import harness


@dataclass(frozen=True)
class StepSpec:
    preset: str = "tiny"
    vocab_size: int = 4096
    batch: int = 16
    seq_len: int = 256
    precision: str = "auto"  # as precision.mode: "auto" is the trainer's choice for this machine
    checkpointing: str = "none"
    compile: bool = False
    steps: int = 5  # timed, after the harness's warm-up
    seed: int = 0

    def tree(self) -> dict[str, Any]:
        """The trainer's config for this step."""
        return {"model": {"preset": self.preset, "vocab_size": self.vocab_size}, "data": {"seq_len": self.seq_len},
                "train": {"batch_size": self.batch, "compile": self.compile, "seed": self.seed},
                "precision": {"mode": self.precision}, "checkpointing": {"mode": self.checkpointing}}

    def job(self) -> harness.Job:
        return harness.Job("shoestring.bench.step:measure_job", asdict(self))


def measure(spec: StepSpec) -> dict:
    """Build the step as `shoestring train` would, time its rounds, then count its saved
    activations on one more step (after the peaks are read: the counter holds what it counts)."""
    from shoestring.levers.checkpointing import estimate_saved_activation_bytes
    from shoestring.models import preset_args
    from shoestring.measure.memory import SavedActivationCounter

    strategy = harness.build(spec.tree(), spec.vocab_size)
    x, y = harness.random_batch(spec.vocab_size, spec.batch, spec.seq_len, spec.seed)
    timing, peak = harness.timed_training(strategy, x, y, spec.steps)
    with SavedActivationCounter() as counter:
        strategy.forward_backward(x, y, 1.0, True)
    strategy.step(1e-3)
    precision = strategy.policy.mode
    args = preset_args(spec.preset, vocab_size=spec.vocab_size)
    return {
        "spec": asdict(spec),
        "precision": precision,
        "compiled": harness.compiled_blocks(strategy),
        "step_s": timing["step_s"],
        "steps_s": timing["steps_s"],
        "tokens_per_s": spec.batch * spec.seq_len / timing["step_s"],
        "saved_activation_bytes": counter.bytes,
        "estimated_block_activation_bytes": estimate_saved_activation_bytes(
            args, spec.checkpointing, spec.batch, spec.seq_len, precision),
        "state_bytes": strategy.memory(),
        "peak_rss_bytes": peak,
        "flops_per_token": strategy.unwrapped().flops_per_token(spec.seq_len),
        "rounds": [{**r, "tokens_per_s": spec.batch * spec.seq_len / r["step_s"]} for r in timing["rounds"]],
    }


def measure_job(spec: dict) -> dict:
    return measure(StepSpec(**spec))


def side_by_side(specs: dict[str, StepSpec], rounds: int, progress: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """name -> the round with the median step time over `rounds` rounds taken in turns, with
    `step_s_all` (every round's figure) so the spread is visible."""
    # after its rounds a job only counts saved activations (bytes): the jobs finish together
    runs = harness.interleaved({name: spec.job() for name, spec in specs.items()}, rounds, progress, timed_extras=False)
    return {name: harness.median_round([ranks[0] for ranks in rs]) for name, rs in runs.items()}
