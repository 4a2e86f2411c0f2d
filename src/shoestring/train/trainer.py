"""The training loop: data -> strategy.forward_backward / step -> metrics, eval, checkpoints.

The loop is strategy-agnostic: it never asks what it holds. Everything a resumed run needs
(weights, optimizer, loss scaler, step, sampler position, RNG states, config) goes into each
checkpoint, and everything the loop does is a pure function of those, so a run killed at any
moment and resumed follows the uninterrupted run's loss curve exactly.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from rich.console import Console

from shoestring import __version__
from shoestring import checkpoint as ckpt
from shoestring import dist
from shoestring.build import Resolved, build_strategy, pick_device, resolve_auto
from shoestring.config import Config
from shoestring.data.loader import Batch, BatchSampler
from shoestring.data.sources import instruct_data, text_data
from shoestring.errors import RunError, UserError
from shoestring.levers.precision import DeviceFacts
from shoestring.measure.memory import RunPeak, SavedActivationCounter
from shoestring.parallel import StepResult, Strategy
from shoestring.parallel.comm import CommMeter, CommStats
from shoestring.plan import probe
from shoestring.plan.auto import describe_breakdown, fitting_micro_batch, step_memory
from shoestring.plan.catalogue import default_price
from shoestring.rundir import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from shoestring.train import adapt
from shoestring.train.budget import BudgetClock, budget_seconds
from shoestring.train.metrics import MetricsLog, NullMetrics
from shoestring.train.progress import TrainProgress, train_progress
from shoestring.train.schedule import lr_at

# Fields whose change would make a resumed run a different run.
RUN_DEFINING = ("model", "lora", "data.format", "data.corpus", "data.vocab_size", "data.val_fraction", "data.seq_len", "data.packing",
                "train.batch_size", "train.seed", "train.lr", "train.min_lr_ratio", "train.warmup_steps",
                "train.weight_decay", "train.beta1", "train.beta2")


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def config_differences(old: dict[str, Any], new: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    return [f"{f}: {_get(old, f)!r} -> {_get(new, f)!r}" for f in fields if _get(old, f) != _get(new, f)]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_rng_state(device: torch.device) -> list[torch.Tensor]:
    """What a step may draw from (dropout: torch's generators; the sampler has its own, and
    nothing in a step uses numpy's or Python's): cheap enough to take every step."""
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])]


def set_step_rng_state(device: torch.device, state: list[torch.Tensor]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


class StopRequest:
    """SIGTERM/SIGINT: finish the step, save, exit 0. A second signal aborts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: aborting without saving")
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass(frozen=True)
class Logged:
    """A step waiting for the next logging step (its tensors stay on the device until then)."""
    step: int
    loss: torch.Tensor
    lr: float
    grad_norm: torch.Tensor
    skipped: bool
    tokens: int  # real tokens of the step (padding excluded), all ranks
    flops: float  # model FLOPs of those tokens
    micro_batch: int


@dataclass(frozen=True)
class Prepared:
    """What the loop runs on, made once by `Trainer._prepare`."""
    strategy: Strategy
    sampler: BatchSampler
    evals: list[Batch]
    start: int  # the step to run next (a resumed run's saved step)
    ref: ckpt.CheckpointRef | None  # the checkpoint resumed from
    metrics: MetricsLog | NullMetrics
    unigram: float  # val loss of a context-free model: the bar a trained model must clear
    tokens_per_step: int  # processed: batch x seq_len, padding included
    flops_per_token: Callable[[int], float]  # training FLOPs per token of a sequence that long
    peak_flops: float  # measured matmul peak of all ranks in the compute dtype: the MFU yardstick
    resolved: Resolved  # the config's `auto` settings as decided for this device, and why
    facts: DeviceFacts  # what the device measured (rank 0's probe)
    spent_before: float  # a budget run's wall time up to the checkpoint resumed from


@dataclass
class Trainer:
    cfg: Config
    console: Console = field(default_factory=Console)
    # Test hook: called as hook(trainer, step) after each optimizer step.
    after_step: Callable[["Trainer", int], None] | None = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.run.dir)
        self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        self.device = dist.local_device(pick_device(self.cfg.train.device).type)
        self.stop = StopRequest()
        self._mfu_reported = False
        self.restarted = False  # set by `run`: this start continues the job after a torchrun restart

    # ---- set-up ---------------------------------------------------------------------------
    def _claim_run_dir(self, resuming: bool, overwrite: bool) -> None:
        """Every rank checks; rank 0 alone changes the directory, and the others wait for it."""
        cfg_path = self.run_dir / CONFIG_FILE
        if overwrite and self.run_dir.exists():
            if dist.is_main():
                shutil.rmtree(self.run_dir)
        elif cfg_path.exists() and not resuming:
            old = json.loads(cfg_path.read_text())
            same = not config_differences(old, self.cfg.to_dict(), RUN_DEFINING)
            what = "this run" if same else "a different run"
            raise UserError(
                f"run directory {self.run_dir} already holds {what}",
                "pass --resume auto to continue it, --overwrite to replace it, or set run.dir",
            )
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

    def _check_resume_compatible(self, saved: dict[str, Any]) -> None:
        diffs = config_differences(saved, self.cfg.to_dict(), RUN_DEFINING)
        if diffs:
            raise UserError(
                "cannot resume: the config changes what the run is (" + "; ".join(diffs) + ")",
                "restore those values, or start a new run with --overwrite or another run.dir",
            )
        # With a budget, train.steps is a cap and the saved one the resolved count: not a change.
        steps = () if self.cfg.train.budget else ("train.steps",)
        safe = config_differences(saved, self.cfg.to_dict(), (*steps, "train.budget", "train.eval_every", "train.log_every",
                                                               "run.save_every", "run.keep_last", "checkpointing.mode",
                                                               "train.grad_accum", "train.micro_batch",
                                                               "train.memory_budget", "train.compile", "precision.mode",
                                                               "parallel.strategy"))
        for d in safe:
            self.console.print(f"[yellow]resuming with a changed setting[/]: {d}")

    def _find_resume(self, resume: str | None) -> ckpt.CheckpointRef | None:
        if resume is None:
            return None
        if resume == "auto":
            return ckpt.resolve_resume(self.ckpt_dir, fallback=True, warn=lambda m: self.console.print(f"[yellow]{m}[/]"))
        path = Path(resume)
        root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
        if (root / ckpt.MANIFEST).is_file():  # a single checkpoint directory
            ref = ckpt.CheckpointRef(root, int(json.loads((root / ckpt.MANIFEST).read_text())["step"]))
            ckpt.verify(ref)
            return ref
        ref = ckpt.resolve_resume(root, fallback=False, warn=self.console.print)
        if ref is None:
            raise UserError(f"--resume {resume}: no checkpoint found there", "give a run directory with checkpoints, or --resume auto")
        return ref

    # ---- the run ---------------------------------------------------------------------------
    def run(self, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Train; on every rank when torchrun started several (rank 0 alone prints and writes
        the run's files, all ranks take part in steps, evals and checkpoint saves)."""
        with dist.process_group(self.device, self.cfg.parallel.timeout_s, required=self.cfg.parallel.strategy != "single"):
            if not dist.is_main():
                self.console = Console(quiet=True)
            # torchrun started a rank of this job before (a failure, a node lost or joining): every
            # rank continues the run, none wipes it.
            self.restarted = dist.maximum(int(dist.started_before())) > 0
            if self.restarted:
                resume, overwrite = "auto", False
            return self._run(resume, overwrite)

    def _run(self, resume: str | None, overwrite: bool) -> dict[str, Any]:
        t_start = BudgetClock.now()  # a budget counts from here: data preparation and build included
        run = self._prepare(resume, overwrite, t_start)
        strategy, start = run.strategy, run.start
        self.peak = RunPeak(self.device)
        self.budget = self._budget_clock(run, t_start)
        cfg = self.cfg  # resolved by `_prepare` (auto settings) and `_budget_clock` (a resumed budget run's steps)
        total = cfg.train.steps
        measuring = self.budget is not None and self.budget.steps is None

        saved_act_bytes = 0
        comm = CommStats()
        pending: list[Logged] = []
        nan_skips = 0
        last_val: float | None = None
        t_log = t_run = time.perf_counter()
        tokens_run, flops_run = 0, 0.0
        last_ref = self.last_ref = run.ref
        step = self.saved_step = start
        self.saved_at = time.perf_counter()

        with self.stop.installed(), train_progress(self.console, total, start, strategy.is_main) as progress:
            stopping = self._stopping()
            if measuring:
                self.budget.lap_step()
            while step < total and not stopping:
                lr = lr_at(step, lr=cfg.train.lr, warmup_steps=cfg.train.warmup_steps,
                           total_steps=total, min_lr_ratio=cfg.train.min_lr_ratio)
                # The run's first micro-step is counted for saved activations; its third step of a
                # multi-rank run is profiled for its collectives (the first two carry one-off set-up
                # traffic, e.g. DDP's bucket rebuild).
                loss, result, counted, measured = self._optimizer_step(run.sampler, lr, step, count=step == start,
                                                                       measure_comm=step == start + 2)
                saved_act_bytes = counted if counted is not None else saved_act_bytes
                comm = measured or comm
                if result.skipped and not strategy.policy.uses_loss_scaling:
                    nan_skips += 1
                    if cfg.train.nan_policy == "stop" or nan_skips > cfg.train.max_nan_skips:
                        kept = f"last good checkpoint: {last_ref.path}" if last_ref else "no checkpoint was saved yet"
                        raise RunError(f"non-finite loss/gradients at step {step} (update skipped, weights unchanged); {kept}",
                                       "lower train.lr, use precision bf16/fp32, or set train.nan_policy = 'skip'")
                tokens, flops = step_work(run.sampler.documents(step), run.flops_per_token)
                pending.append(Logged(step, loss, lr, result.grad_norm, result.skipped, tokens, flops,
                                      self.split.micro))
                step += 1
                tokens_run, flops_run = tokens_run + tokens, flops_run + flops
                if measuring:
                    self._sync()
                    self.budget.lap_step()
                if self.after_step is not None:
                    self.after_step(self, step - 1)
                stopping = self._stopping()
                # Rank 0's clock decides when the budget is resolved; every rank resolves at that step.
                resolving = measuring and (step == total or dist.broadcast(self.budget.ready(step, cfg.train.warmup_steps)))

                if step % cfg.train.log_every == 0 or step == total or stopping or resolving:
                    now = time.perf_counter()
                    tps = sum(p.tokens for p in pending) / (now - t_log)
                    last_loss = self._log(run, pending, now - t_log, saved_act_bytes)
                    progress.update(step, last_loss, tps)
                    pending.clear()
                    t_log = now

                if step % cfg.train.eval_every == 0 or step == total or resolving:
                    lap = self.budget.lap_eval if resolving else None
                    last_val = self._evaluate(strategy, run.evals, lap)
                    run.metrics.write({"step": step - 1, "val_loss": last_val})
                    progress.print(f"step {step}: val loss {last_val:.4f} (unigram baseline {run.unigram:.4f})")

                save_due = cfg.run.save_every and step % cfg.run.save_every == 0
                t_save = BudgetClock.now()
                if save_due or step == total or stopping or resolving:
                    last_ref = self.last_ref = self._save(strategy, run.sampler, step)
                if resolving:
                    total = self._resolve_budget(step, total, BudgetClock.now() - t_save, progress)
                    measuring = False
            wall = time.perf_counter() - t_run
        run.metrics.close()

        if stopping and step < total:
            self.console.print(f"stopped at step {step}; checkpoint {last_ref.path}\n"
                               f"resume with: shoestring train {self.run_dir / CONFIG_FILE} --resume auto")
        summary = self._summary(run, step - start, wall, tokens_run, flops_run, saved_act_bytes, comm, last_val)
        if strategy.is_main:
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    def _budget_clock(self, run: Prepared, started: float) -> BudgetClock | None:
        """`train.budget` as a clock; a resumed run takes the step count it was resolved to."""
        text = self.cfg.train.budget
        if text is None:
            return None
        price, _ = self._price()
        devices = run.strategy.world_size
        clock = BudgetClock(text, budget_seconds(text, devices, price), price, devices, started, run.spent_before)
        changed = clock.restore(self.run_dir)
        if changed:
            self.console.print(f"[yellow]{changed}[/]")
        if clock.steps is not None:
            self._set_steps(clock.steps)
        self.console.print(clock.describe_start())
        return clock

    def _resolve_budget(self, step: int, cap: int, save_s: float, progress: TrainProgress) -> int:
        """Every rank: the step count rank 0 plans from what it timed, recorded before any step
        whose LR depends on it."""
        cfg = self.cfg
        steps = dist.broadcast(self.budget.resolve(step, cap, save_s, cfg.train.eval_every, cfg.run.save_every))
        self.budget.steps = steps
        self._set_steps(steps)
        if dist.is_main():
            self.budget.write(self.run_dir)
        progress.set_total(steps)
        progress.print(self.budget.describe(cap))
        return steps

    def _set_steps(self, steps: int) -> None:
        """Run for `steps` steps: the config checkpoints and config.json record (the resolved config)."""
        self.cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"steps": steps})})
        if dist.is_main():
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2))

    def _prepare(self, resume: str | None, overwrite: bool, t_start: float) -> Prepared:
        """The run directory claimed, data, the strategy built (and restored when resuming)."""
        cfg = self.cfg
        if resume is not None and resume != "auto":
            self.run_dir = Path(resume) if (Path(resume) / CONFIG_FILE).exists() else self.run_dir
            self.ckpt_dir = self.run_dir / CHECKPOINTS_DIR
        ref = self._find_resume(resume)
        self._claim_run_dir(resuming=ref is not None or resume == "auto", overwrite=overwrite and resume is None)
        saved = ckpt.load_file(ref, "trainer.pt") if ref is not None else None
        resolved, facts = self._resolve(saved["config"] if saved else None)
        cfg = self.cfg = resolved.cfg

        data = instruct_data(cfg, self.run_dir, self.console.print) if cfg.data.format == "instruct" else text_data(cfg)
        strategy = build_strategy(cfg, data.vocab, self.device, data.source)
        data.source = None  # the weights are in the model now; drop the source's copy
        self.strategy = strategy
        sampler = data.sampler(strategy.rank, strategy.world_size)
        self.split = self._split(saved)
        sampler.resplit(self.split.accum)
        # The same eval set on any world size and micro-batch: each rank scores its slice of
        # every batch, a micro-batch at a time.
        evals = [tuple(t.tensor_split(strategy.world_size)[strategy.rank] for t in batch) for batch in
                 data.val_batches(cfg.train.batch_size // cfg.train.grad_accum, cfg.train.eval_batches)]

        start, spent_before = 0, 0.0
        if saved is not None:
            self._check_resume_compatible(saved["config"])
            strategy.load(ref.path)
            sampler.load_state_dict(saved["sampler"])
            set_rng_state(saved["rng"])
            start, spent_before = saved["step"], saved.get("budget_spent_s", 0.0)
            self.console.print(f"resumed from {ref.path} at step {start}")
        if strategy.is_main:
            self._record_restart(start, BudgetClock.now() - t_start, cfg.train.batch_size * cfg.data.seq_len)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
            metrics: MetricsLog | NullMetrics = MetricsLog(self.run_dir / METRICS_FILE,
                                                           resume_step=start if ref is not None else None)
        else:
            metrics = NullMetrics()
        return Prepared(
            strategy=strategy, sampler=sampler, evals=evals, start=start, ref=ref, metrics=metrics, unigram=data.unigram,
            tokens_per_step=cfg.train.batch_size * cfg.data.seq_len,
            flops_per_token=strategy.unwrapped().flops_per_token,
            peak_flops=facts.rate(cfg.precision.mode) * strategy.world_size, resolved=resolved, facts=facts,
            spent_before=spent_before)

    def _resolve(self, saved: dict[str, Any] | None) -> tuple[Resolved, DeviceFacts]:
        """The config's `auto` settings decided on rank 0's measured facts (`saved`: the resumed
        run's config) and given to every rank, so all run the same precision; said in one line each."""
        answer = None
        if dist.is_main():
            facts = probe.device_facts(self.device)
            answer = resolve_auto(self.cfg, facts, saved), facts
        resolved, facts = dist.broadcast(answer)
        for line in resolved.lines():
            self.console.print(line, markup=False, highlight=False)
        if resolved.warning:
            self.console.print(f"[yellow]warning:[/] {resolved.warning}", highlight=False)
        return resolved, facts

    def _split(self, saved: dict[str, Any] | None) -> adapt.Split:
        """The micro-batch this run starts at: a fixed `train.micro_batch`, else the largest (at
        most the config's split, and the smallest an out-of-memory error left the run with) the
        planner predicts fits in every rank's memory budget; said in one line."""
        t, world = self.cfg.train, self.strategy.world_size
        if t.batch_size % world:
            works = ", ".join(str(n) for n in range(1, t.batch_size + 1) if t.batch_size % n == 0)
            raise UserError(f"train.batch_size ({t.batch_size}) does not divide over {world} ranks",
                            f"run on {works} ranks, or make train.batch_size a multiple of {world}")
        per_rank = t.batch_size // world
        if t.micro_batch != "auto":
            if per_rank % t.micro_batch:
                raise UserError(f"train.micro_batch ({t.micro_batch}) does not divide a rank's {per_rank} sequences "
                                f"(train.batch_size {t.batch_size} over {world} ranks)", "use a divisor, or 'auto'")
            split = adapt.Split(per_rank, t.micro_batch, fixed=True)
            self.console.print(f"micro-batch: {split.micro} x {split.accum} accumulation x {world} ranks (set in the config)")
            return split
        largest, why = max(1, t.batch_size // (t.grad_accum * world)), "train.grad_accum's split"
        limits = [m for m in (adapt.settled(adapt.events(self.run_dir)), (saved or {}).get("micro_batch_limit")) if m]
        shrunk = min(limits, default=None)
        if shrunk is not None and shrunk < largest:
            largest, why = shrunk, "what an out-of-memory error left the run with"
        budget, source = adapt.memory_budget(t.memory_budget, self.device)
        micro, estimate = fitting_micro_batch(self.cfg, self.strategy.unwrapped().args, world, per_rank, largest,
                                              self.device, budget)
        micro = -dist.maximum(-micro)  # every rank's budget holds it (all divide the same per_rank)
        split = adapt.Split(per_rank, micro, fixed=False)
        fit = (f"predicted {estimate.total / 2**30:.2f} of {budget / 2**30:.2f} GiB ({source})" if estimate.total <= budget
               else f"predicted not to fit even so ({describe_breakdown(estimate, budget)}): trying it")
        self.console.print(f"micro-batch: {micro} x {split.accum} accumulation x {world} ranks (auto: at most {largest}, "
                           f"{why}; {fit})", highlight=False)
        return split

    def _record_restart(self, step: int, setup_s: float, tokens_per_step: int) -> None:
        """A start that continues a run after a restart (out of memory, or torchrun's after a lost
        rank) is an event: it cost its set-up before the first step and, after a lost rank, the
        steps logged past the checkpoint resumed from (their time from their logged speed; an
        out-of-memory error counted its own)."""
        run_events = adapt.events(self.run_dir)
        reason = "out of memory" if adapt.restart_pending(run_events) else "torchrun restart" if self.restarted else None
        if reason is None:
            return
        redone, lost = (0, 0.0) if reason == "out of memory" else adapt.logged_since(self.run_dir / METRICS_FILE, step,
                                                                                       tokens_per_step)
        adapt.record(self.run_dir, adapt.Event("restart", step, in_process=False, redone=redone, lost_s=setup_s + lost,
                                               devices=self.strategy.world_size, reason=reason))

    def _mfu(self, run: Prepared, flops: float) -> float | None:
        """MFU of `flops` model FLOP/s against the run's measured peak; an impossible one (above
        1) is reported once, as the measuring error it is, and comes back as None."""
        error = probe.mfu_error(flops, run.peak_flops)
        if error and not self._mfu_reported:
            self.console.print(f"[yellow]warning:[/] {error}", highlight=False)
            self._mfu_reported = True
        return probe.mfu(flops, run.peak_flops)

    def _optimizer_step(self, sampler: BatchSampler, lr: float, step: int, count: bool,
                        measure_comm: bool) -> tuple[torch.Tensor, StepResult, int | None, CommStats | None]:
        """`_attempt_step`, redone at a smaller micro-batch while it runs out of memory (or the run
        restarts or stops: `_shrink`)."""
        while True:
            rng, started = step_rng_state(self.device), time.perf_counter()
            self._phase = "micro-step"
            try:
                return self._attempt_step(sampler, lr, count, measure_comm)
            except Exception as err:
                if not adapt.is_oom(err):
                    raise
                failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            # Outside the handler: the failed step's frames, and the activations they held, are freed.
            self._shrink(sampler, step, rng, time.perf_counter() - started, failed)

    def _attempt_step(self, sampler: BatchSampler, lr: float, count: bool,
                      measure_comm: bool) -> tuple[torch.Tensor, StepResult, int | None, CommStats | None]:
        """One optimizer step over the split's micro-steps: the mean loss (on the device: no
        sync), the strategy's result, and when asked the first micro-step's saved-activation
        bytes and the step's measured collectives (the meter costs nothing when off; the
        profiler's own memory on the measured step is left out of the run's peak)."""
        accum = self.split.accum
        loss_sum = torch.zeros((), device=self.device)
        counted = None
        with self.peak.excluding(measure_comm), CommMeter(self.strategy.world_size, measure_comm, self.strategy.comm_groups()) as meter:
            for m in range(accum):
                x, y, *doc = (self._to_device(t) for t in sampler.next_batch())  # doc: packed rows' document ids
                with SavedActivationCounter() if count and m == 0 else nullcontext() as counter:
                    loss = self.strategy.forward_backward(x, y, 1.0 / accum, m == accum - 1, *doc)
                if counter is not None:
                    counted = counter.bytes
                loss_sum += loss.float()
            self._phase = "optimizer step"
            result = self.strategy.step(lr)
        return loss_sum / accum, result, counted, meter.stats if meter.enabled else None

    def _shrink(self, sampler: BatchSampler, step: int, rng: list[torch.Tensor], lost_s: float, error: str) -> None:
        """After an out-of-memory error in `step`: redo the step here at half the micro-batch,
        or record that and restart (`RestartSmaller`), or stop with the planner's breakdown
        (see shoestring.train.adapt for which, and why)."""
        split, strategy, rank = self.split, self.strategy, self.strategy.rank
        new = None if split.fixed or self._phase != "micro-step" else adapt.smaller(split.per_rank, split.micro)
        if new is None:
            why = ("train.micro_batch is fixed" if split.fixed else "micro-batch 1" if self._phase == "micro-step"
                   else "in the optimizer step, which the micro-batch does not change")
            budget, _ = adapt.memory_budget(self.cfg.train.memory_budget, self.device)
            estimate = step_memory(self.cfg, strategy.unwrapped().args, strategy.world_size, split.micro, self.device, budget)
            raise adapt.does_not_fit(f"on rank {rank} at step {step}, micro-batch {split.micro} ({why}; {error})",
                                     describe_breakdown(estimate, budget), self.last_ref.path if self.last_ref else None)
        if strategy.world_size == 1 and strategy.discard():
            gc.collect()  # whatever a reference cycle still holds of the failed step
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the smaller step should not meet the failed one's fragments
            sampler.rewind(step)
            set_step_rng_state(self.device, rng)
            event = adapt.Event("oom", step, rank, split.micro, new, redone=1, lost_s=lost_s, reason=error)
            split.micro = new
            sampler.resplit(split.accum)
            adapt.record(self.run_dir, event)
            self.console.print(f"[yellow]out of memory[/] at step {step}: micro-batch {event.micro_from} -> {new}, "
                               f"accumulation {split.accum} (global batch unchanged); step redone", highlight=False)
            return
        since = self.last_ref.path if self.last_ref else "the start"
        adapt.record(self.run_dir, adapt.Event("oom", step, rank, split.micro, new, in_process=False,
                                               redone=step - self.saved_step + 1, lost_s=time.perf_counter() - self.saved_at,
                                               devices=strategy.world_size, reason=error))
        raise adapt.RestartSmaller(f"out of memory on rank {rank} at step {step}, micro-batch {split.micro}: the ranks restart "
                                   f"from {since} at micro-batch {new}",
                                   "`shoestring train --nproc` restarts them on its own; under torchrun by hand give "
                                   "--max-restarts, or rerun with --resume auto")

    def _log(self, run: Prepared, pending: list[Logged], seconds: float, saved_act_bytes: int) -> float:
        """Write the pending steps' records (one sync for all of them, `seconds` their wall time);
        the last loss. Throughput and MFU count real tokens; `pad_tokens` is the rest."""
        tps, flops = sum(p.tokens for p in pending) / seconds, sum(p.flops for p in pending) / seconds
        mem = {**run.strategy.memory(), "activations_saved": saved_act_bytes,
               "device_peak": self.peak.bytes()}
        # Loss averaged over ranks (each saw its share of the batch); the norm is global.
        values = dist.mean(torch.stack([torch.stack([p.loss.float(), p.grad_norm.float()]) for p in pending])).tolist()
        for p, (loss, grad_norm) in zip(pending, values):
            run.metrics.write({"step": p.step, "loss": loss, "lr": p.lr, "grad_norm": grad_norm, "skipped": p.skipped,
                               "micro_batch": p.micro_batch, "tokens": p.tokens, "pad_tokens": run.tokens_per_step - p.tokens, "tokens_per_s": tps,
                               "mfu": self._mfu(run, flops), "peak_flops": run.peak_flops, "memory": mem})
        return values[-1][0]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host batch -> device without a sync: a copy from pinned memory is asynchronous on
        CUDA (from pageable memory it would wait for the copy)."""
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _stopping(self) -> bool:
        """Whether any rank was signalled: all ranks stop (and save) at the same step."""
        return dist.maximum(int(self.stop.requested)) > 0

    def _sync(self) -> None:
        """Wait for the device's queued work, so a clock read after it times that work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _evaluate(self, strategy: Strategy, batches: list[Batch],
                  lap: Callable[[], None] | None = None) -> float:
        """Mean val loss over ranks; `lap` (when given) is called before the first batch and
        after each, the device synchronized."""
        if lap is not None:
            lap()
        losses = []
        for batch in batches:  # (x, y) or (x, y, doc), split into micro-batches: eval fits where training does
            parts = [(len(micro[0]), strategy.eval_loss(*(t.to(self.device) for t in micro)).float())
                     for micro in zip(*(t.split(self.split.micro) for t in batch))]
            losses.append(sum(n * loss for n, loss in parts) / len(batch[0]))
            if lap is not None:
                self._sync()
                lap()
        return dist.mean(torch.stack(losses).mean()).item()

    def _save(self, strategy: Strategy, sampler: BatchSampler, step: int) -> ckpt.CheckpointRef:
        """All ranks: rank 0 writes the trainer's state (its RNG stands for every rank's: nothing
        in a step draws random numbers per rank), the strategy writes its own files."""
        files = {}
        if strategy.is_main:
            trainer_state = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state(),
                             "config": self.cfg.to_dict(), "version": __version__,
                             "micro_batch_limit": adapt.settled(adapt.events(self.run_dir))}
            if self.budget is not None:
                trainer_state["budget_spent_s"] = self.budget.spent()
            files["trainer.pt"] = ckpt.torch_bytes(trainer_state)
        ref = ckpt.save_checkpoint(self.ckpt_dir, step, files, keep_last=self.cfg.run.keep_last, write_extra=strategy.save)
        self.saved_step, self.saved_at = step, time.perf_counter()
        return ref

    def _summary(self, run: Prepared, steps: int, wall: float, tokens: int, flops: float, saved_act_bytes: int,
                 comm: CommStats, val_loss: float | None) -> dict[str, Any]:
        price, price_source = self._price()
        tps = tokens / wall if wall > 0 else 0.0
        flops_per_s = flops / wall if wall > 0 else 0.0
        last_loss = None
        metrics_path = self.run_dir / METRICS_FILE
        for line in reversed(metrics_path.read_text().splitlines()):
            record = json.loads(line)
            if "loss" in record:
                last_loss = record["loss"]
                break
        strategy = run.strategy
        devices = strategy.world_size
        peak = self.peak.bytes()
        return {
            "steps_run": steps,
            "tokens": tokens,  # real tokens: padding excluded (tokens/s and MFU count these)
            "tokens_processed": steps * run.tokens_per_step,
            "padding_tokens": steps * run.tokens_per_step - tokens,
            "wall_s": wall,
            "tokens_per_s": tps,
            "mfu": self._mfu(run, flops_per_s) if tps else None,
            "mfu_error": probe.mfu_error(flops_per_s, run.peak_flops),
            "peak_flops": run.peak_flops,  # the yardstick: measured matmul peak, all ranks, compute dtype
            "precision": {"mode": run.resolved.precision.value, "reason": run.resolved.precision.reason,
                          "warning": run.resolved.warning, "matmul_flops": dict(run.facts.matmul_flops)},
            "compile": {"on": run.resolved.compile.value, "reason": run.resolved.compile.reason},
            "keep_host_memory": {"on": run.resolved.host_memory.value, "reason": run.resolved.host_memory.reason},
            "memory_bytes": {**strategy.memory(), "activations_saved": saved_act_bytes,
                             "device_peak": peak, "device_peak_max_rank": dist.maximum(peak)},
            # Measured on one step (bytes this rank sent; collective time, hidden or not).
            "comm_per_step": {"bytes_sent": comm.bytes_sent, "busy_s": comm.busy_s, "calls": comm.calls,
                              "bytes_sent_by_span": comm.by_span,
                              "bytes_sent_by_collective": comm.by_collective},
            "final_train_loss": last_loss,
            "final_val_loss": val_loss,
            "unigram_val_loss": run.unigram,
            "device": str(self.device),
            "devices": devices,
            "cost_usd": wall / 3600 * devices * price,
            "price_per_device_hour": price,
            "price_source": price_source,
            "budget": self.budget.report() if self.budget is not None else None,
            "adapt": self._adapt_report(price),
        }

    def _adapt_report(self, price: float) -> dict[str, Any]:
        run_events = adapt.events(self.run_dir)
        shrunk = [e for e in run_events if e.kind == "oom"]
        start = shrunk[0].micro_from if shrunk else self.split.micro
        return adapt.report(run_events, start, self.split.micro, self.split.accum, price)

    def _price(self) -> tuple[float, str]:
        """USD per device-hour, and where the figure comes from."""
        if self.cfg.run.price_per_hour is not None:
            return self.cfg.run.price_per_hour, "config run.price_per_hour"
        return default_price(self.device)


def step_work(lengths: np.ndarray, flops_per_token: Callable[[int], float]) -> tuple[int, float]:
    """(real tokens, model FLOPs) of a step that computes sequences of `lengths` (padding left
    out): each token's FLOPs at its own sequence's length, since attention sees that many keys."""
    sizes, counts = np.unique(lengths, return_counts=True)
    return int(lengths.sum()), float(sum(int(c) * int(n) * flops_per_token(int(n)) for n, c in zip(sizes, counts)))
