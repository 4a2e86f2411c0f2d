"""shoestring against what a team would use instead, on the same work, each at its best.

Single device: our Llama trained by shoestring's strategy (its defaults: chunked loss, fused
AdamW) versus the same architecture and the same initial weights as
`transformers.LlamaForCausalLM` (sdpa attention) trained by Hugging Face `Trainer` (fused AdamW,
`optim="adamw_torch_fused"`), each **eager and compiled** (ours: `train.compile = true`,
regional, each block; HF: `TrainingArguments(torch_compile=True)`, the whole model), each also
with activation checkpointing on (HF: its own `gradient_checkpointing`; not at `small`). Every system runs in the
trainer's `auto` precision for this machine (`Work.precision`, resolved once by the parent): bf16
where its matmuls are fast (for HF Trainer on CPU that is accelerate's `torch.autocast(cpu,
bf16)` around fp32 weights, the same arithmetic as our bf16 policy), else fp32.
Two ranks (gloo): shoestring's fsdp2 versus `fully_shard` applied by hand to the HF model in a
plain loop (the FSDP2 tutorial's way; compiled: each decoder layer `compile()`d before it is
sharded, as torchtitan does), versus DeepSpeed ZeRO-3 through its own engine on the HF model
(compiled: `engine.compile()`). A peer that fails to compile here is a row with its error.
Every system's process gets shoestring's default allocator setting for its number of ranks
(`levers/host_memory.py`: one process keeps the host memory its steps free, ranks do not; tuning
the allocator is what a competent user does for CPU training, as the jemalloc/tcmalloc advice in
CPU performance guides says), so that the comparison is of the training, not of malloc.

The goals are judged best against best: our fastest row against the peer's fastest, eager or
compiled (bench/goals.py). Every system sees the same token batches in the same order (a seeded
random bigram chain: a learnable stream whose best loss is ln 4), the same sequence length and
micro-batch, AdamW with the same lr/betas/weight decay/clipping and the same schedule
(`shoestring.train.schedule`), for the same number of steps: the warm-up and every round, one
run per system. Each configuration's processes start once and take their timed rounds in turns
with the others' (A B C ... A B C ...) through the measuring harness (bench/harness.py: its
warm-up rule, timer and per-round peak); the row is the round with the median step time, every
round's figure beside it. The single-device systems without and with checkpointing, and the
two-rank systems, are three groups: each takes turns among its own processes.

    PYTHONPATH=src python benchmarks/incumbents.py --size small     (or `run(size)` from code)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from shoestring.bench import harness
from shoestring.levers import host_memory
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models import build_model, preset_args
from shoestring.models.llama import ModelArgs
from shoestring.parallel import OptimizerSettings
from shoestring.train.schedule import lr_at

RANKS = 2


@dataclass(frozen=True)
class System:
    name: str  # shoestring | hf-trainer | shoestring-fsdp2 | fsdp2-hf | deepspeed-zero3-hf
    compiled: bool
    checkpointing: str = "none"

    @property
    def ranks(self) -> int:
        return 1 if self.name in ("shoestring", "hf-trainer") else RANKS

    @property
    def case(self) -> str:
        """The name `shoestring bench`'s goals (bench/goals.py) look the row up by."""
        base = {"shoestring": "shoestring", "hf-trainer": "hf-trainer", "shoestring-fsdp2": "shoestring fsdp2",
                "fsdp2-hf": "torch fsdp2", "deepspeed-zero3-hf": "deepspeed zero3"}[self.name]
        return f"{base}{' ckpt' if self.checkpointing != 'none' else ''} {'compiled' if self.compiled else 'eager'}"


SINGLE = tuple(System(n, c, k) for k in ("none", "full") for n in ("shoestring", "hf-trainer") for c in (False, True))
DISTRIBUTED = tuple(System(n, c) for n in ("shoestring-fsdp2", "fsdp2-hf", "deepspeed-zero3-hf") for c in (False, True))


@dataclass(frozen=True)
class Work:
    preset: str
    vocab: int
    batch: int  # sequences per optimizer step (global: split over the ranks)
    seq_len: int
    steps: int  # timed per round, after the warm-up steps
    # untimed steps first: HF Trainer and the plain loops create their optimizer state in their
    # first step, so their second still grows the heap (bench/harness.py); every system the same
    warmup: int = harness.LAZY_STATE_WARMUP
    rounds: int = 1  # timed rounds, taken in turns (set by `run`)
    precision: str = "auto"  # resolved by `run` before any worker starts: every system the same
    lr: float = 1e-3  # low enough that bf16 rounding differences are not amplified into other curves
    warmup_steps: int = 3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 1337

    @property
    def total_steps(self) -> int:
        return self.warmup + self.rounds * self.steps

    @property
    def args(self) -> ModelArgs:
        return preset_args(self.preset, vocab_size=self.vocab, max_seq_len=self.seq_len)

    @property
    def settings(self) -> OptimizerSettings:
        return OptimizerSettings(self.lr, self.weight_decay, self.betas, self.grad_clip)

    def lr_at(self, step: int) -> float:
        return lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_lr_ratio=0.1)


# size -> (single-device work, two-rank work, rounds). `small`: the `small` preset at 8 x 256
# (a compute-bound step of ~350 GFLOP, 1-3 s here), 5 rounds of 1 timed step in turns (set-up, HF's
# whole-model compile above all, costs more than the rounds), 10 configurations:
# to fit the suite's 15 minutes it leaves out the checkpointing rows (`CHECKPOINTED_AT`), which
# `full` and `smoke` keep; eager and compiled, ours and HF's, all run.
SIZES: dict[str, tuple[Work, Work, int]] = {
    "smoke": (Work("micro", 512, 4, 32, steps=2), Work("micro", 512, 4, 32, steps=1), 1),
    "small": (Work("small", 8192, 8, 256, steps=1), Work("small", 8192, 8, 256, steps=1), 5),
    "full": (Work("small", 8192, 16, 512, steps=10), Work("small", 8192, 16, 512, steps=10), 7),
}
CHECKPOINTED_AT = ("smoke", "full")  # the sizes that run the single-device checkpointing rows


# ---- the shared work --------------------------------------------------------------------------
def token_batches(work: Work) -> torch.Tensor:
    """(steps, batch, seq_len + 1) tokens every system trains on (the harness's bigram chain)."""
    return harness.bigram_batches(work.vocab, work.total_steps, work.batch, work.seq_len, work.seed)


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


def _train_loop(work: Work, step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], rank: int = 0,
                world: int = 1) -> dict[str, Any]:
    """`step(i, x, y) -> loss` over this rank's share of every batch, through the harness's timer
    (its figures, each round's, and every step's loss)."""
    data = token_batches(work)

    def one(i: int) -> torch.Tensor:
        batch = data[i].tensor_split(world)[rank]
        return step(i, batch[:, :-1].contiguous(), batch[:, 1:].contiguous())

    return harness.timed_steps(one, work.steps, work.warmup)


# ---- shoestring ---------------------------------------------------------------------------------
def _shoestring_tree(work: Work, system: System) -> dict[str, Any]:
    return {
        "model": {"preset": work.preset, "vocab_size": work.vocab, "max_seq_len": work.seq_len},
        "data": {"seq_len": work.seq_len},
        "train": {"steps": work.total_steps, "batch_size": work.batch, "lr": work.lr, "warmup_steps": work.warmup_steps,
                  "weight_decay": work.weight_decay, "beta1": work.betas[0], "beta2": work.betas[1],
                  "grad_clip": work.grad_clip, "seed": work.seed, "compile": system.compiled},
        "precision": {"mode": work.precision},
        "checkpointing": {"mode": system.checkpointing},
        "parallel": {"strategy": "single" if system.ranks == 1 else "fsdp2"},
    }


def run_shoestring(work: Work, system: System) -> dict[str, Any]:
    strategy = harness.build(_shoestring_tree(work, system), work.vocab)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = strategy.forward_backward(x, y, 1.0, True)
        strategy.step(work.lr_at(i))
        return loss

    return _train_loop(work, step, strategy.rank, strategy.world_size)


# ---- Hugging Face Trainer -------------------------------------------------------------------
def run_hf_trainer(work: Work, system: System) -> dict[str, Any]:
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class SameSchedule(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lambda s: work.lr_at(s) / work.lr)
            return self.lr_scheduler

    class Record(TrainerCallback):
        """The harness's turns around each optimizer step: timed from its begin to its end, so
        that a wait for a turn, the data loader and the logging are outside the timed step."""

        def __init__(self) -> None:
            self.turns = harness.Turns(work.steps, work.warmup)
            self.t0 = 0.0
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.turns.before(state.global_step)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # the step is counted by now
            self.turns.after(state.global_step - 1, time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    data = token_batches(work).flatten(0, 1)
    # labels feed HF's token count; shift_labels are the targets as given (no shift inside).
    dataset = [{"input_ids": s[:-1], "labels": s[:-1], "shift_labels": s[1:]} for s in data]
    model = hf_model(work)  # Trainer turns its gradient checkpointing on from the arguments
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=work.batch, max_steps=work.total_steps, learning_rate=work.lr,
            adam_beta1=work.betas[0], adam_beta2=work.betas[1], weight_decay=work.weight_decay,
            max_grad_norm=work.grad_clip, bf16=work.precision == "bf16", use_cpu=True, optim="adamw_torch_fused",
            gradient_checkpointing=system.checkpointing == "full", torch_compile=system.compiled,
            logging_steps=1, save_strategy="no", report_to="none", train_sampling_strategy="sequential",
            dataloader_num_workers=0, disable_tqdm=True, seed=work.seed, remove_unused_columns=False)
        record = Record()
        trainer = SameSchedule(model=model, args=args, train_dataset=dataset, callbacks=[record])
        trainer.train()
        precision = str(trainer.accelerator.mixed_precision)
    return {**record.turns.result(), "losses": record.losses, "note": f"accelerate mixed_precision={precision}"}


# ---- two-rank peers on the HF model -----------------------------------------------------------
def run_fsdp2_hf(work: Work, system: System) -> dict[str, Any]:
    """The HF model sharded by hand the way the FSDP2 tutorial does it: each decoder layer, then
    the root; compiled: each layer first (torchtitan's order)."""
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard

    from shoestring.parallel.base import make_adamw

    model = hf_model(work)
    for layer in model.model.layers:
        if system.compiled:
            layer.compile()
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


def run_deepspeed_hf(work: Work, system: System) -> dict[str, Any]:
    """The HF model in DeepSpeed's engine, ZeRO-3, the work's precision (autocast around fp32
    weights); compiled: `engine.compile()`."""
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
    if system.compiled:
        engine.compile()

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for group in engine.optimizer.param_groups:
            group["lr"] = work.lr_at(i)
        with policy.autocast("cpu"):
            loss = engine(input_ids=x, labels=x, shift_labels=y).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return _train_loop(work, step, tdist.get_rank(), tdist.get_world_size())


RUNNERS = {"shoestring": run_shoestring, "shoestring-fsdp2": run_shoestring, "hf-trainer": run_hf_trainer,
           "fsdp2-hf": run_fsdp2_hf, "deepspeed-zero3-hf": run_deepspeed_hf}


def measure_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of one system, all its rounds (the harness starts its processes)."""
    work = Work(**{**spec["work"], "betas": tuple(spec["work"]["betas"])})
    if work.rounds != harness.worker_rounds():
        raise RuntimeError(f"the work says {work.rounds} rounds, the harness {harness.worker_rounds()}")
    system = System(**spec["system"])
    if host_memory.decide("auto", system.ranks).value:  # the peers' processes as ours: a fair allocator
        host_memory.keep_freed_memory()
    return RUNNERS[system.name](work, system)


# ---- the parent: rounds, rows, table ------------------------------------------------------------
def _row(system: System, work: Work, rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The round with the median step time (the slowest rank's), every round's figure beside it;
    the losses are the whole run's (warm-up and every round), averaged over the ranks."""
    per_round = []
    for ranks in rounds:
        if "error" in ranks[0]:
            per_round.append(ranks[0])
            continue
        slowest = max(ranks, key=lambda r: r["step_s"])
        losses = [statistics.fmean(step) for step in zip(*(r["losses"] for r in ranks))]  # ranks saw halves
        per_round.append({"step_s": slowest["step_s"], "steps_s": slowest["steps_s"], "losses": losses,
                          "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks), "note": ranks[0].get("note", "")})
    best = harness.median_round(per_round)
    row = {"system": system.name, "compiled": system.compiled, "case": system.case, "ranks": system.ranks,
           "checkpointing": system.checkpointing, "work": asdict(work), "precision": work.precision, **best}
    if "error" not in row:
        row.update(tokens_per_s=work.batch * work.seq_len / row["step_s"], peak_bytes=row["peak_rss_bytes"],
                   spread=harness.spread(row["step_s_all"]))
    return row


def run(size: str = "small", parts: tuple[str, ...] = ("single", "distributed"),
        progress: Callable[[str], None] = lambda s: None, rounds: int | None = None,
        only: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Measure every system at `size` (smoke | small | full) in interleaved rounds, one row per
    system (`only`: the systems whose `case` is named; else every system `size` runs)."""
    from shoestring.levers.precision import resolve_precision
    from shoestring.plan.probe import device_facts

    precision = str(resolve_precision(device_facts(torch.device("cpu"))).value)
    single, two, default_rounds = SIZES[size]
    rounds = rounds or default_rounds
    single, two = (replace(w, precision=precision, rounds=rounds) for w in (single, two))
    systems = [(s, single) for s in SINGLE if "single" in parts] + [(s, two) for s in DISTRIBUTED if "distributed" in parts]
    systems = [(s, w) for s, w in systems
               if (s.case in only if only is not None else s.checkpointing == "none" or size in CHECKPOINTED_AT)]
    # The rows a goal compares take turns together (a group); within a group the compiled systems
    # start first, so that the longest set-ups overlap the others'.
    order = sorted(systems, key=lambda sw: (sw[0].ranks, sw[0].checkpointing != "none", not sw[0].compiled))
    jobs = {s.case: harness.Job("shoestring.bench.incumbents:measure_job", {"system": asdict(s), "work": asdict(w)}, s.ranks,
                                group=f"{s.ranks} {s.checkpointing}")
            for s, w in order}
    measured = harness.interleaved(jobs, rounds, progress, keep_going=True, timed_extras=False)  # nothing after the rounds
    return [_row(s, w, measured[s.case]) for s, w in systems]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _best(rows: list[dict[str, Any]], name: str, checkpointing: str = "none") -> dict[str, Any] | None:
    mine = [r for r in rows if r["system"] == name and r["checkpointing"] == checkpointing and "error" not in r]
    return min(mine, key=lambda r: r["step_s"]) if mine else None


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: throughput and memory per system and mode, the best-against-best ratios the goals
    name, every loss curve."""
    work = rows[0]["work"]
    lines = [f"`{work['preset']}` preset, {work['batch']} x {work['seq_len']} tokens per step, precision "
             f"{rows[0]['precision']} (the trainer's `auto` here), {len(rows[0].get('step_s_all', [0]))} interleaved "
             f"rounds x {work['steps']} timed steps after {work['warmup']} untimed; the median round, spread = (slowest - fastest) / median.", "",
             "| system | ranks | checkpointing | blocks | tokens/s | spread | peak RSS MiB (per rank) | loss first -> last |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        if "error" in r:
            lines.append(f"| {r['system']} | {r['ranks']} | {r['checkpointing']} | {mode} | failed: {r['error'][:120]} ||||")
            continue
        lines.append(f"| {r['system']} | {r['ranks']} | {r['checkpointing']} | {mode} | {r['tokens_per_s']:,.0f} | "
                     f"{r['spread']:.0%} | {_mib(r['peak_rss_bytes'])} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    notes = []
    for ckpt in ("none", "full"):
        ours, theirs = _best(rows, "shoestring", ckpt), _best(rows, "hf-trainer", ckpt)
        if ours and theirs:
            gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
            notes.append(f"- checkpointing {ckpt}, best against best: shoestring {_mode(ours)} / HF Trainer {_mode(theirs)} = "
                         f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s (goal >= 1.3x), peak memory "
                         f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x (goal <= 1x); largest loss difference "
                         f"over the {len(ours['losses'])} steps {gap:.4f}")
    fsdp = _best(rows, "shoestring-fsdp2")
    for other in ("fsdp2-hf", "deepspeed-zero3-hf"):
        if fsdp and (o := _best(rows, other)):
            notes.append(f"- {RANKS} ranks, best against best: shoestring fsdp2 {_mode(fsdp)} / {other} {_mode(o)} = "
                         f"{fsdp['tokens_per_s'] / o['tokens_per_s']:.2f}x tokens/s (goal >= 1x), peak memory per rank "
                         f"{fsdp['peak_rss_bytes'] / o['peak_rss_bytes']:.2f}x")
    good = [r for r in rows if "error" not in r]
    curves = ["", "Loss per step (same tokens, same initial weights; the warm-up steps and every round):", "",
              "| step | " + " | ".join(r["case"] for r in good) + " |", "|---:|" + "---:|" * len(good)]
    for i in range(max((len(r["losses"]) for r in good), default=0)):
        cells = [f"{r['losses'][i]:.4f}" if i < len(r["losses"]) else "" for r in good]
        curves.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + notes + curves)


def _mode(row: dict[str, Any]) -> str:
    return "(compiled)" if row["compiled"] else "(eager)"
