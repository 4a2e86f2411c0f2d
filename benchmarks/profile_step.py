"""Where one training step's time goes, shoestring against Hugging Face side by side: torch.profiler per bucket.

    PYTHONPATH=src python benchmarks/profile_step.py [--preset small --batch 8 --seq 256 --threads 2]
                                                     [--systems shoestring,hf] [--precisions fp32,bf16] [--modes eager,compiled]

For each system x precision x mode (eager / compiled) it runs `--warmup` untimed steps, times `--steps` (the median is
the step time, MFU against `probe.matmul_peak_flops` for the compute dtype: the yardstick `shoestring train` reports),
then profiles `--steps` more and splits their self CPU time into the buckets of `bucket()`. It prints one markdown
table (as pasted into docs/performance.md).

What each side runs (the same weights, tokens, AdamW settings; `bench/incumbents.py`'s `Work` and `hf_model`):
* shoestring: its single-device strategy (chunked loss, fused AdamW, its bf16 policy: autocast around fp32 weights);
  compiled = `train.compile = true` (each block compiled, the loss and optimizer eager).
* hf: `LlamaForCausalLM` (sdpa) driven by the step HF Trainer takes on CPU, in a plain loop (as the fsdp2-hf peer
  does): accelerate's `torch.autocast(cpu, bf16)` around the forward with the loss inside it, `backward`,
  `clip_grad_norm_`, fused AdamW (`optim="adamw_torch_fused"`), `zero_grad`; compiled = `model.compile()`, the whole
  model with its loss, which is what `TrainingArguments(torch_compile=True)` does. A plain loop rather than the
  Trainer because the profiler needs the step boundaries and the phases labelled; the Trainer's own per-step work
  (collation, callbacks, logging) is not the model step, and `benchmarks/incumbents.py` times the Trainer itself.

The profiler's "CPU time" of an op is the calling thread's wall time inside it (intra-op threads work under it), so
on a machine shared with other jobs the milliseconds are contended; the *shares* are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Callable, Iterable, Protocol

import torch
from torch.profiler import profile, record_function

from shoestring.bench.incumbents import SIZES, Work, hf_model
from shoestring.levers import compile as compile_lever
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models import build_model
from shoestring.parallel.base import make_adamw
from shoestring.parallel.single import SingleDevice
from shoestring.plan import probe

OPTIMIZER = "optimizer step"  # the record_function label around each side's optimizer phase
BUCKETS = ("matmul", "attention", "element-wise/norm/rope/act", "loss", "optimizer", "alloc/copies", "other")

# Which op goes in which bucket: the first rule that matches, in this order.
#  optimizer: anything under the OPTIMIZER label (clip_grad_norm_, fused AdamW, zero_grad, master-weight copies).
#  attention: anything under an attention op or our attention autograd Function (its matmuls too), and batched matmuls
#    (only attention uses them in these models); compiled kernels whose fused name contains the SDPA op.
#  matmul: the linear layers' and the LM head's GEMMs.
#  loss: anything under our chunked loss Function or torch's cross-entropy ops, except its GEMMs (matmul above);
#    compiled kernels whose fused name contains log_softmax / nll_loss (HF compiled: the loss is inside the graph).
#  alloc/copies: allocation, fills and dtype/layout copies.
#  element-wise: the other aten ops and the other compiled (`cpp_fused_*`) kernels: norms, rope, SiLU, residual adds.
#  other: views, autograd-engine and compiled-graph wrappers, and the Python between ops (the labels' self time).
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "BlockedCausalAttention", "attention_forward")
MATMUL = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::_addmm_activation"}
BATCHED = {"aten::bmm", "aten::baddbmm"}
LOSS = ("_ChunkedLinearCrossEntropy", "cross_entropy", "log_softmax", "nll_loss", "logsumexp")
ALLOC = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::empty", "aten::empty_like", "aten::empty_strided",
         "aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_", "aten::clone", "aten::contiguous",
         "aten::resize_", "aten::new_empty", "aten::new_empty_strided", "aten::new_zeros", "aten::full", "aten::ones_like"}
VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::as_strided", "aten::transpose", "aten::t",
         "aten::slice", "aten::select", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::permute",
         "aten::narrow", "aten::split", "aten::chunk", "aten::unflatten", "aten::flatten", "aten::detach",
         "aten::alias", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias"}


def bucket(name: str, ancestors: Iterable[str]) -> str:
    """The bucket of one profiler event, from its name and its callers' names (innermost first)."""
    context = [name, *ancestors]
    fused = name.startswith("graph_") and "cpp_fused" in name  # an inductor CPU kernel (enable_kernel_profile)
    if OPTIMIZER in context:
        return "optimizer"
    if any(a in c for c in context for a in ATTENTION) or name in BATCHED:
        return "attention"
    if name in MATMUL or "mkldnn" in name or "onednn" in name:
        return "matmul"
    if any(w in c for c in ([name] if fused else context) for w in LOSS):
        return "loss"
    if name in ALLOC:
        return "alloc/copies"
    if fused or (name.startswith("aten::") and name not in VIEWS):
        return "element-wise/norm/rope/act"
    return "other"


class Event(Protocol):
    name: str
    self_cpu_time_total: float
    cpu_parent: "Event | None"


def split(events: Iterable[Event]) -> dict[str, float]:
    """Self CPU time (us) per bucket over a profiler's `events()`."""
    out = dict.fromkeys(BUCKETS, 0.0)
    for e in events:
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        out[bucket(e.name, chain)] += e.self_cpu_time_total
    return out


# ---- the two steps ------------------------------------------------------------------------------
def shoestring_step(work: Work, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    torch.manual_seed(work.seed)
    model = build_model(work.args)
    if compiled:
        compile_lever.compile_blocks(model)
    strategy = SingleDevice(model, PrecisionPolicy(work.precision), work.settings, torch.device("cpu"))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        strategy.forward_backward(x, y, 1.0, True)
        with record_function(OPTIMIZER):
            strategy.step(work.lr)

    return step


def hf_step(work: Work, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model = hf_model(work)
    if compiled:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(params, work.settings, torch.device("cpu"))
    policy = PrecisionPolicy(work.precision)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with policy.autocast("cpu"):
            loss = model(input_ids=x, labels=x, shift_labels=y).loss
        loss.backward()
        with record_function(OPTIMIZER):
            torch.nn.utils.clip_grad_norm_(params, work.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


STEPS = {"shoestring": shoestring_step, "hf": hf_step}


def measure(system: str, work: Work, compiled: bool, warmup: int, steps: int) -> dict[str, float]:
    torch._dynamo.reset()
    step = STEPS[system](work, compiled)
    x, y = (torch.randint(0, work.vocab, (work.batch, work.seq_len)) for _ in range(2))
    for _ in range(warmup):  # the first compiles and creates the optimizer state
        step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    with profile() as prof:
        for _ in range(steps):
            step(x, y)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"step_s": statistics.median(times), **{b: t / 1e6 / steps for b, t in split(prof.events()).items()},
            "top": [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in top]}


def main() -> None:
    small = SIZES["small"][0]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=small.preset)
    ap.add_argument("--vocab", type=int, default=small.vocab)
    ap.add_argument("--batch", type=int, default=small.batch)
    ap.add_argument("--seq", type=int, default=small.seq_len)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median), then as many profiled")
    ap.add_argument("--systems", default="shoestring,hf")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--top", type=int, default=0, help="also list each configuration's N ops with the most self CPU time")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # name each compiled kernel in the profile
    torch._dynamo.config.cache_size_limit = 64

    base = Work(a.preset, a.vocab, a.batch, a.seq, steps=a.steps)
    flops_per_token = build_model(base.args, "meta").flops_per_token(base.seq_len)
    tokens = base.batch * base.seq_len
    print(f"preset {base.preset}, batch {base.batch} x {base.seq_len}, vocab {base.vocab}, {a.threads} threads, "
          f"torch {torch.__version__}; ms per step (median of {a.steps} after {a.warmup} warm-up); buckets: self CPU "
          f"time per step over {a.steps} profiled steps, share of the profiled total\n")
    tops, peaks = [], {}
    print("| system | precision | mode | step ms | tokens/s | MFU | " + " | ".join(BUCKETS) + " |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(BUCKETS))
    for precision in a.precisions.split(","):
        work = replace(base, precision=precision)
        peak = peaks[precision] = probe.matmul_peak_flops(torch.device("cpu"), PrecisionPolicy(precision).compute_dtype,
                                                          a.threads)
        for mode in a.modes.split(","):
            for system in a.systems.split(","):
                r = measure(system, work, mode == "compiled", a.warmup, a.steps)
                total = sum(r[b] for b in BUCKETS)
                tps = tokens / r["step_s"]
                mfu = probe.mfu(tps * flops_per_token, peak)
                cells = " | ".join(f"{r[b] * 1e3:.0f} ({r[b] / total:.0%})" for b in BUCKETS)
                print(f"| {system} | {precision} | {mode} | {r['step_s'] * 1e3:.0f} | {tps:,.0f} | "
                      f"{'error' if mfu is None else f'{mfu:.1%}'} | {cells} |", flush=True)
                tops.append((f"{system} {precision} {mode}", total, r["top"][: a.top]))
    print(f"\nMFU: model FLOPs ({flops_per_token / 1e6:.1f} MFLOP/token, the same architecture on both sides) per second "
          f"over `probe.matmul_peak_flops` for the compute dtype at {a.threads} threads: "
          + ", ".join(f"{p} {f / 1e9:,.0f} GFLOP/s" for p, f in peaks.items()) + ".")
    for label, total, top in tops if a.top else ():
        print(f"\n{label}: ops with the most self CPU time\n\n| op | ms per step | share |\n|---|---:|---:|")
        for key, t in top:
            print(f"| `{key[:90]}` | {t * 1e3:.1f} | {t / total:.1%} |")


if __name__ == "__main__":
    main()
