"""Published training runs as a check on the planner: the GPU-hours a model's authors report for
a stated token count on stated hardware, beside what `shoestring plan` predicts for the same
work. A check, not fitting data: no constant in the catalogue or the calibration is set from
these rows. `python -m shoestring.plan.published` prints the table docs/planner.md carries.

What the sources leave unstated is an assumption, the same for every row: the GPU count is the
one that gives each GPU one sequence of the stated global batch, and the planner picks every
other lever (precision, checkpointing, strategy, shard group) as it would for a user.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoestring.plan.search import Plan, Request, search

LLAMA2 = ("Touvron et al., Llama 2 (arXiv:2307.09288), Table 2 (pretraining GPU-hours, A100-80GB) "
          "and Table 1 (2.0T tokens, 4k context, 4M-token global batch)")
LLAMA3 = ("Meta Llama 3 model card (github.com/meta-llama/llama3, MODEL_CARD.md): 1.3M / 6.4M H100-80GB GPU-hours, "
          "15T+ tokens, 8k context; global batch not stated for 8B/70B (16M tokens assumed: the 405B's, Llama 3 paper)")
LLAMA31 = ("Meta Llama 3.1 model card (huggingface.co/meta-llama/Llama-3.1-8B): 1.46M H100-80GB GPU-hours, 15T+ tokens "
           "(this count includes the long-context stage, which the plan at 8k does not)")


@dataclass(frozen=True)
class PublishedRun:
    model: str  # preset
    device: str  # catalogue key
    gpus: int  # assumed (see the module docstring)
    tokens: float
    seq_len: int
    batch_tokens: int
    gpu_hours: float  # published
    source: str


RUNS = (
    PublishedRun("llama2-7b", "a100-80gb", 1024, 2.0e12, 4096, 4 * 2**20, 184_320, LLAMA2),
    PublishedRun("llama2-13b", "a100-80gb", 1024, 2.0e12, 4096, 4 * 2**20, 368_640, LLAMA2),
    PublishedRun("llama2-70b", "a100-80gb", 1024, 2.0e12, 4096, 4 * 2**20, 1_720_320, LLAMA2),
    PublishedRun("llama3-8b", "h100-80gb", 2048, 15e12, 8192, 16 * 2**20, 1.3e6, LLAMA3),
    PublishedRun("llama3-70b", "h100-80gb", 2048, 15e12, 8192, 16 * 2**20, 6.4e6, LLAMA3),
    PublishedRun("llama3.1-8b", "h100-80gb", 2048, 15e12, 8192, 16 * 2**20, 1.46e6, LLAMA31),
)


@dataclass(frozen=True)
class Checked:
    run: PublishedRun
    plan: Plan

    @property
    def predicted_gpu_hours(self) -> float:
        return self.plan.wall_h * self.plan.count

    @property
    def ratio(self) -> float:
        """Predicted over published: above 1, the planner is pessimistic."""
        return self.predicted_gpu_hours / self.run.gpu_hours


def check(run: PublishedRun) -> Checked:
    req = Request(run.model, run.tokens, hardware=(f"{run.device}:{run.gpus}",), seq_len=run.seq_len,
                  global_batch_tokens=run.batch_tokens)
    return Checked(run, search(req).plans[0])


def table() -> str:
    from shoestring.plan.search import describe

    rows = ["| model | hardware | tokens | published GPU-h | predicted GPU-h | predicted / published | plan |",
            "|---|---|---|---:|---:|---:|---|"]
    for c in map(check, RUNS):
        r = c.run
        rows.append(f"| {r.model} | {r.gpus} x {r.device} | {r.tokens:.3g} | {r.gpu_hours:,.0f} | "
                    f"{c.predicted_gpu_hours:,.0f} | {c.ratio:.2f} | {describe(c.plan)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
