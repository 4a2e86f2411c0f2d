"""shoestring against what a team would use instead, on the same work.

Single device: our Llama trained by shoestring's strategy (its defaults: chunked loss, compile
where it pays, fused AdamW) versus the same architecture and the same initial weights as
`transformers.LlamaForCausalLM` (sdpa attention) trained by Hugging Face `Trainer`, each also
with activation checkpointing on. Every system runs in the trainer's `auto` precision for this
machine (`Work.precision`, resolved once by the parent): bf16 where its matmuls are fast (for HF
Trainer on CPU that is accelerate's `torch.autocast(cpu, bf16)` around fp32 weights, the same
arithmetic as our bf16 policy), else fp32.
Two ranks (gloo): shoestring's fsdp2 versus `fully_shard` applied by hand to the HF model in a
plain loop, versus DeepSpeed ZeRO-3 through its own engine on the HF model.

Every system sees the same token batches in the same order (a seeded random bigram chain: a
learnable stream whose best loss is ln 4), the same sequence length and micro-batch, AdamW with
the same lr/betas/weight decay/clipping and the same schedule (`shoestring.train.schedule`), for
the same number of steps. Each system runs in a fresh process, so its peak resident memory
(VmHWM, reset after set-up, before the first step) is its own. Tokens/s is the median over the
steps after the first `skip` (which hold compilation and allocator warm-up).

    PYTHONPATH=src python benchmarks/incumbents.py --size small     (or `run(size)` from code)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from shoestring.levers.precision import PrecisionPolicy
from shoestring.models import build_model, preset_args
from shoestring.models.llama import ModelArgs
from shoestring.parallel import OptimizerSettings
from shoestring.measure.memory import PeakRSS
from shoestring.train.schedule import lr_at

SINGLE = (("shoestring", "none"), ("hf-trainer", "none"), ("shoestring", "full"), ("hf-trainer", "full"))
RANKS = 2
DISTRIBUTED = ("shoestring-fsdp2", "fsdp2-hf", "deepspeed-zero3-hf")
# (system, checkpointing) -> the `case` name `shoestring bench`'s goals (bench/goals.py) look up
CASES = {("shoestring", "none"): "shoestring", ("hf-trainer", "none"): "hf-trainer",
         ("shoestring", "full"): "shoestring ckpt", ("hf-trainer", "full"): "hf-trainer ckpt",
         ("shoestring-fsdp2", "none"): "shoestring fsdp2", ("fsdp2-hf", "none"): "torch fsdp2",
         ("deepspeed-zero3-hf", "none"): "deepspeed zero3"}


@dataclass(frozen=True)
class Work:
    preset: str
    vocab: int
    batch: int  # sequences per optimizer step (global: split over the ranks)
    seq_len: int
    steps: int
    skip: int  # first steps left out of the timing
    compile: bool | str = "auto"
    precision: str = "auto"  # resolved by `run` before any worker starts: every system the same
    lr: float = 1e-3  # low enough that bf16 rounding differences are not amplified into other curves
    warmup_steps: int = 3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 1337

    @property
    def args(self) -> ModelArgs:
        return preset_args(self.preset, vocab_size=self.vocab, max_seq_len=self.seq_len)

    @property
    def settings(self) -> OptimizerSettings:
        return OptimizerSettings(self.lr, self.weight_decay, self.betas, self.grad_clip)

    def lr_at(self, step: int) -> float:
        return lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps, min_lr_ratio=0.1)


SIZES: dict[str, tuple[Work, Work]] = {  # (single device, two ranks)
    "smoke": (Work("micro", 512, 4, 32, steps=4, skip=1, compile=False), Work("micro", 512, 4, 32, steps=3, skip=1, compile=False)),
    "small": (Work("small", 4096, 16, 256, steps=10, skip=3), Work("small", 4096, 16, 256, steps=6, skip=2)),
    "full": (Work("small", 4096, 16, 256, steps=60, skip=5), Work("small", 4096, 16, 256, steps=30, skip=5)),
}


# ---- the shared work --------------------------------------------------------------------------
def token_batches(work: Work) -> torch.Tensor:
    """(steps, batch, seq_len + 1) tokens of a random bigram chain: each token has 4 equally
    likely successors, so the loss falls from ln(vocab) towards ln 4 as the model learns them."""
    g = torch.Generator().manual_seed(work.seed)
    successors = torch.randint(0, work.vocab, (work.vocab, 4), generator=g)
    n = work.steps * work.batch
    out = torch.empty(n, work.seq_len + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, work.vocab, (n,), generator=g)
    for t in range(work.seq_len):
        out[:, t + 1] = successors[out[:, t], torch.randint(0, 4, (n,), generator=g)]
    return out.view(work.steps, work.batch, work.seq_len + 1)


def hf_model(work: Work):
    """`LlamaForCausalLM` (sdpa) holding exactly the weights shoestring initialises from the seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoestring.models.hf import hf_config_from_args, ours_to_hf

    torch.manual_seed(work.seed)
    ours = build_model(work.args)
    config = LlamaConfig(**hf_config_from_args(work.args, torch.float32, {}))
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(ours_to_hf(ours.state_dict(), work.args), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def _median_tps(times: list[float], work: Work) -> float:
    return work.batch * work.seq_len / statistics.median(times[work.skip:] or times)


# ---- single-device workers ------------------------------------------------------------------
def _shoestring_config(work: Work, checkpointing: str, strategy: str = "single"):
    from shoestring.config import build_config

    return build_config({
        "model": {"preset": work.preset, "max_seq_len": work.seq_len},
        "data": {"seq_len": work.seq_len},
        "train": {"steps": work.steps, "batch_size": work.batch, "lr": work.lr, "warmup_steps": work.warmup_steps,
                  "weight_decay": work.weight_decay, "beta1": work.betas[0], "beta2": work.betas[1],
                  "grad_clip": work.grad_clip, "seed": work.seed, "compile": work.compile},
        "precision": {"mode": work.precision},
        "checkpointing": {"mode": checkpointing},
        "parallel": {"strategy": strategy},
    })


def _train_loop(work: Work, step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], rank: int = 0,
                world: int = 1) -> dict[str, Any]:
    """Run `step(i, x, y) -> loss` over this rank's share of every batch; time, memory, losses."""
    data = token_batches(work)
    rss = PeakRSS()
    rss.reset()
    times, losses = [], []
    for i in range(work.steps):
        t0 = time.perf_counter()
        batch = data[i].tensor_split(world)[rank]
        losses.append(step(i, batch[:, :-1].contiguous(), batch[:, 1:].contiguous()))
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": _median_tps(times, work), "peak_rss_bytes": rss.peak_bytes(),
            "losses": [float(v) for v in losses]}


def run_shoestring(work: Work, checkpointing: str, strategy_name: str = "single") -> dict[str, Any]:
    from shoestring.build import build_strategy, resolve_auto
    from shoestring.plan.probe import device_facts

    cpu = torch.device("cpu")
    cfg = resolve_auto(_shoestring_config(work, checkpointing, strategy_name), device_facts(cpu)).cfg
    strategy = build_strategy(cfg, work.vocab, cpu)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = strategy.forward_backward(x, y, 1.0, True)
        strategy.step(work.lr_at(i))
        return loss

    return _train_loop(work, step, strategy.rank, strategy.world_size)


def run_hf_trainer(work: Work, checkpointing: str) -> dict[str, Any]:
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class SameSchedule(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda s: work.lr_at(s) / work.lr)
            return self.lr_scheduler

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    data = token_batches(work).flatten(0, 1)
    # labels feed HF's token count; shift_labels are the targets as given (no shift inside).
    dataset = [{"input_ids": s[:-1], "labels": s[:-1], "shift_labels": s[1:]} for s in data]
    model = hf_model(work)  # Trainer turns its gradient checkpointing on from the arguments
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=work.batch, max_steps=work.steps, learning_rate=work.lr,
            adam_beta1=work.betas[0], adam_beta2=work.betas[1], weight_decay=work.weight_decay,
            max_grad_norm=work.grad_clip, bf16=work.precision == "bf16", use_cpu=True, optim="adamw_torch_fused",
            gradient_checkpointing=checkpointing == "full", logging_steps=1, save_strategy="no", report_to="none",
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True, seed=work.seed,
            remove_unused_columns=False)
        record = Record()
        trainer = SameSchedule(model=model, args=args, train_dataset=dataset, callbacks=[record])
        rss = PeakRSS()
        rss.reset()
        trainer.train()
        precision = str(trainer.accelerator.mixed_precision)
    times = [b - a for a, b in zip(record.ends, record.ends[1:])]
    return {"tokens_per_s": _median_tps(times, work), "peak_rss_bytes": rss.peak_bytes(), "losses": record.losses,
            "note": f"accelerate mixed_precision={precision}"}


# ---- two-rank workers (run under torchrun) ------------------------------------------------------
def run_fsdp2_hf(work: Work) -> dict[str, Any]:
    """The HF model sharded by hand the way the FSDP2 tutorial does it: each decoder layer, then the root."""
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard

    from shoestring.parallel.base import make_adamw

    model = hf_model(work)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = make_adamw([p for p in model.parameters() if p.requires_grad], work.settings, torch.device("cpu"))
    policy = PrecisionPolicy(work.precision)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = work.lr_at(i)
        with policy.autocast("cpu"):
            loss = model(input_ids=x, labels=x, shift_labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), work.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return _train_loop(work, step, tdist.get_rank(), tdist.get_world_size())


def run_deepspeed_hf(work: Work) -> dict[str, Any]:
    """The HF model in DeepSpeed's engine, ZeRO-3, the work's precision (autocast around fp32 weights)."""
    import torch.distributed as tdist

    from shoestring.config import ParallelSection
    from shoestring.parallel.base import make_adamw
    from shoestring.parallel.deepspeed import ds_config, import_deepspeed

    deepspeed = import_deepspeed("cpu")
    policy = PrecisionPolicy(work.precision)
    model = hf_model(work)
    opt = make_adamw([p for p in model.parameters() if p.requires_grad], work.settings, torch.device("cpu"))
    # Our adapter's config, buckets sized to one block (DeepSpeed's defaults suit billion-parameter models).
    block_numel = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    config = ds_config(policy, work.settings, ParallelSection(strategy="deepspeed", zero_stage=3), block_numel)
    engine = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)[0]

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for group in engine.optimizer.param_groups:
            group["lr"] = work.lr_at(i)
        with policy.autocast("cpu"):
            loss = engine(input_ids=x, labels=x, shift_labels=y).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return _train_loop(work, step, tdist.get_rank(), tdist.get_world_size())


def _distributed_worker(system: str, work: Work) -> dict[str, Any] | None:
    """One rank: run `system`, then gather every rank's figures on rank 0."""
    import torch.distributed as tdist

    from shoestring import dist

    with dist.process_group(torch.device("cpu"), 600, required=True):
        if system == "shoestring-fsdp2":
            result = run_shoestring(work, "none", "fsdp2")
        elif system == "fsdp2-hf":
            result = run_fsdp2_hf(work)
        else:
            result = run_deepspeed_hf(work)
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, result)
        return {"per_rank": gathered} if tdist.get_rank() == 0 else None


# ---- the parent: fresh processes, rows, table ---------------------------------------------------
RESULT_MARK = "INCUMBENT-RESULT "


def _spawn(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line.removeprefix(RESULT_MARK))
    errors = [line for line in proc.stderr.splitlines() if "Error" in line][-5:]
    raise RuntimeError(f"benchmark worker failed ({proc.returncode}): {' '.join(argv[-2:])}\n" + "\n".join(errors))


def _row(system: str, ranks: int, checkpointing: str, work: Work, result: dict[str, Any]) -> dict[str, Any]:
    per_rank = result.get("per_rank", [result])
    losses = [statistics.fmean(step) for step in zip(*(r["losses"] for r in per_rank))]  # ranks saw halves
    tps, peak = statistics.median(r["tokens_per_s"] for r in per_rank), max(r["peak_rss_bytes"] for r in per_rank)
    return {"system": system, "case": CASES[system, checkpointing], "ranks": ranks, "checkpointing": checkpointing,
            "work": asdict(work), "tokens_per_s": tps, "step_s": work.batch * work.seq_len / tps,
            "peak_rss_bytes": peak, "peak_bytes": peak,
            "losses": losses, "note": per_rank[0].get("note", "")}


def run(size: str = "small", parts: tuple[str, ...] = ("single", "distributed"),
        progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every system at `size` (smoke | small | full); one row per system."""
    from shoestring.levers.precision import resolve_precision
    from shoestring.plan.probe import device_facts

    precision = str(resolve_precision(device_facts(torch.device("cpu"))).value)
    single, two = (replace(w, precision=precision) for w in SIZES[size])
    rows = []
    python = [sys.executable, "-m", "shoestring.bench.incumbents"]
    if "single" in parts:
        for system, ckpt in SINGLE:
            if progress:
                progress(f"{system} (checkpointing {ckpt})")
            spec = json.dumps({"system": system, "checkpointing": ckpt, "work": asdict(single)})
            rows.append(_row(system, 1, ckpt, single, _spawn(python + [spec], {})))
    if "distributed" in parts:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}"]
        for system in DISTRIBUTED:
            if progress:
                progress(f"{system} ({RANKS} ranks)")
            spec = json.dumps({"system": system, "checkpointing": "none", "work": asdict(two)})
            result = _spawn(torchrun + ["-m", "shoestring.bench.incumbents", spec],
                            {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
            rows.append(_row(system, RANKS, "none", two, result))
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: throughput and memory per system, the ratios the goals name, both loss curves."""
    lines = ["| system | ranks | checkpointing | tokens/s | peak RSS MiB (per rank) | loss first -> last |",
             "|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['ranks']} | {r['checkpointing']} | {r['tokens_per_s']:,.0f} | "
                     f"{_mib(r['peak_rss_bytes'])} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    by = {(r["system"], r["checkpointing"]): r for r in rows}
    notes = []
    for ckpt in ("none", "full"):
        ours, theirs = by.get(("shoestring", ckpt)), by.get(("hf-trainer", ckpt))
        if ours and theirs:
            gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
            notes.append(f"- checkpointing {ckpt}: shoestring / HF Trainer = {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
                         f"tokens/s (goal >= 1.3x), peak memory {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x "
                         f"(goal <= 1x); largest loss difference over the {len(ours['losses'])} steps {gap:.4f}")
    fsdp = by.get(("shoestring-fsdp2", "none"))
    for other in ("fsdp2-hf", "deepspeed-zero3-hf"):
        if fsdp and (o := by.get((other, "none"))):
            notes.append(f"- {RANKS} ranks: shoestring fsdp2 / {other} = {fsdp['tokens_per_s'] / o['tokens_per_s']:.2f}x tokens/s "
                         f"(goal >= 1x), peak memory per rank {fsdp['peak_rss_bytes'] / o['peak_rss_bytes']:.2f}x")
    curves = ["", "Loss per step (same tokens, same initial weights):", "",
              "| step | " + " | ".join(f"{r['system']} ({r['checkpointing']})" for r in rows) + " |",
              "|---:|" + "---:|" * len(rows)]
    for i in range(max(len(r["losses"]) for r in rows)):
        cells = [f"{r['losses'][i]:.4f}" if i < len(r["losses"]) else "" for r in rows]
        curves.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + notes + curves)


def worker(spec_json: str) -> None:
    """One measurement, in its own process (plain, or one rank under torchrun)."""
    spec = json.loads(spec_json)
    work = Work(**{**spec["work"], "betas": tuple(spec["work"]["betas"])})
    if spec["system"] == "shoestring":
        result = run_shoestring(work, spec["checkpointing"])
    elif spec["system"] == "hf-trainer":
        result = run_hf_trainer(work, spec["checkpointing"])
    else:
        result = _distributed_worker(spec["system"], work)
    if result is not None:
        print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1])
