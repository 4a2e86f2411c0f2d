"""One measuring harness for every bench section and the planner's accuracy check.

The same rules everywhere, so that two sections' figures can be set side by side:

* **start**: a job (a module-level function `module:name` taking a JSON-able spec and returning
  a dict) runs in its own processes: one rank as a plain `python -m shoestring.bench.harness`,
  N ranks under torchrun (`--standalone`), the launcher `shoestring train --nproc` uses. Each rank
  gets cores / ranks threads; rank 0 gathers every rank's result and prints it on a marked line.
* **build**: `build(tree, vocab)` is the trainer's path: `resolve_auto` on this machine's probed
  facts, then `build_strategy` (levers applied in the fixed order, compile where `auto` says).
* **warm-up and timer**: `timed_steps` runs `warmup_steps()` untimed steps then times each step
  with `time.perf_counter` between barriers. One for one of our processes alone (`WARMUP`): it
  compiles and lays out the activations above the optimizer state, which our strategies allocate
  at build (`parallel.base.with_state`), so the next step reuses its blocks. Two for a rank of
  several (`RANK_WARMUP`): its second step still faulted 13,000-60,000 pages in and took
  1.2-1.6x a later step (ddp and fsdp2, `small` 8 x 256 bf16, 2 ranks, Zen 5: the buffers their
  collectives fill, laid out in the first step), and two for a loop whose optimizer creates its
  state in its first step (`LAZY_STATE_WARMUP`: Hugging Face Trainer, a plain torch loop), where
  the state takes the place of the first step's freed activations and the second step grows the
  heap for its own again (60,000-67,000 page faults, 1.6-1.8x a later step, `small` 8 x 256 bf16
  alone, freed host memory kept: levers/host_memory.py). From then on a step faults little. A
  foreign loop (Hugging Face Trainer's callbacks) calls the same `Turns` before and after each
  step. A round's figure is its median step.
* **rounds, taken in turns**: `interleaved` starts each configuration's processes once; each sets
  up and warms up (at most `SETUP_AT_ONCE` jobs at a time), then waits. Only when all are warm
  does round 0 start, and the rounds go in turns, A B C ... A B C ...: the parent tells one job
  "go" (a file `go.<r>` in the job's control directory), the job's ranks time their `steps` steps
  and rank 0 writes `done.<r>`, then the next job. No timed round overlaps another job's work,
  and a drift in the machine's load falls on every configuration alike; after the last round the
  jobs finish (extras measured once, result, exit): in turns too where an extra is a time
  (`interleaved(timed_extras=True)`), else together. All processes of a group are
  alive at once, so jobs run in consecutive groups of at most `GROUP_RANKS` rank processes (and
  never across a change of `Job.group`: the rows a goal compares share a group).
  `median_round` keeps the round with the median step time, with every round's figure beside it.
  With one round there is nothing to interleave: `fresh_rounds` runs each job in fresh processes.
* **peak memory**: the process's VmHWM (`PeakRSS`). Taking turns, each round's peak is its own:
  reset at the round's start, read at its end, so the warm-up's transient peak (compiling, the
  first allocation of the optimizer state) is not in it, only what stays resident from it. In a
  fresh process (one round) the peak runs from the end of set-up, warm-up included.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from shoestring.measure.memory import PeakRSS

WARMUP, RANK_WARMUP, LAZY_STATE_WARMUP = 1, 2, 2  # untimed steps (the module docstring says why)
RESULT_MARK = "SHOESTRING-BENCH-RESULT "
PROCESS_GROUP_TIMEOUT_S = 600
# Taking turns: where a worker finds its control directory and how many rounds it times.
TURNS_ENV, ROUNDS_ENV = "SHOESTRING_BENCH_TURNS", "SHOESTRING_BENCH_ROUNDS"
POLL_S = 0.015  # a waiting process sleeps between looks: idle, it must not take the stepping job's cores
# A worker waiting for its turn sleeps longer the longer it waits, up to this, so that a group's
# waiting processes do not preempt the stepping one's threads: with twelve processes looking
# every 15 ms beside it, a `small` bf16 step took 1.39-1.57 s against 1.31-1.35 s alone (one run
# of 3 steps each, 2 cores). A turn then starts at most this late.
POLL_MAX_S = 0.25
TURN_TIMEOUT_S = 1200  # a set-up (compiling, cold), a round or a wait for a turn this long: stuck
SETUP_AT_ONCE = 2  # jobs setting up at once: imports and compiling are mostly one thread each
# Rank processes alive at once. A `small` rank holds 0.9-1.7 GiB at its peak (VmHWM); measured over
# a whole `shoestring bench --size small --only levers strategies incumbents`, the most resident at
# once (every python process of the run: ranks, torchrun launchers, the parent) was 15.7 GiB; 12
# ranks leave room in 24 GiB. `full` (16 x 512) ranks hold more: mind the machine's memory there.
GROUP_RANKS = 12


@dataclass(frozen=True)
class Job:
    """A measurement: which function runs it, on what, on how many ranks. The jobs a goal
    compares share a `group`, so that they take turns among the same processes."""

    target: str  # "module:function"
    spec: dict[str, Any]
    ranks: int = 1
    env: dict[str, str] = field(default_factory=dict)
    group: str = ""


Rounds = dict[str, list[list[dict[str, Any]]]]  # job name -> per round, every rank's result (rank 0 first)


def _command(job: Job) -> tuple[list[str], dict[str, str]]:
    payload = json.dumps({"target": job.target, "spec": job.spec})
    if job.ranks == 1:
        argv = [sys.executable, "-m", "shoestring.bench.harness", payload]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.ranks}",
                "-m", "shoestring.bench.harness", payload]
    return argv, {**os.environ, "OMP_NUM_THREADS": str(threads(job.ranks)), "DS_ACCELERATOR": "cpu", **job.env}


def _result(what: str, stdout: str, stderr: str, code: int | None) -> list[dict[str, Any]]:
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line.removeprefix(RESULT_MARK))
    raise RuntimeError(f"{what} failed, exit code {code}:\n" + _tail(stderr))


def _tail(text: str) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][-8:])


def _round(result: dict[str, Any], r: int) -> dict[str, Any]:
    """One rank's figures of round `r`: its `rounds[r]` over the figures of its whole process."""
    if "rounds" not in result:
        return result
    return {**{k: v for k, v in result.items() if k != "rounds"}, **result["rounds"][r]}


def launch(job: Job) -> list[dict[str, Any]]:
    """Run `job` in fresh processes, one round; every rank's result, rank 0 first."""
    argv, env = _command(job)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    ranks = _result(f"benchmark job {job.target} ({job.ranks} rank(s))", proc.stdout, proc.stderr, proc.returncode)
    return [_round(rank, 0) for rank in ranks]


def threads(ranks: int) -> int:
    """Threads per rank: the ranks split the cores."""
    from shoestring.plan.probe import cpu_cores

    return max(1, cpu_cores() // ranks)


def _error(err: RuntimeError) -> list[dict[str, Any]]:
    """A failed job's entry for a round: the error's first and last lines."""
    lines = str(err).splitlines()
    return [{"error": lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"}]


def fresh_rounds(jobs: dict[str, Job], rounds: int, progress: Callable[[str], None] = lambda s: None,
                 keep_going: bool = False) -> Rounds:
    """Every job in fresh processes once per round, A B A B ...: for one round, and for jobs that
    are whole runs (a `shoestring train`) rather than timed steps. `keep_going`: see `interleaved`."""
    out: Rounds = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            progress(f"round {r + 1}/{rounds}: {name}")
            try:
                out[name].append(launch(job))
            except RuntimeError as err:
                if not keep_going:
                    raise
                out[name].append(_error(err))
    return out


def interleaved(jobs: dict[str, Job], rounds: int, progress: Callable[[str], None] = lambda s: None,
                keep_going: bool = False, timed_extras: bool = True) -> Rounds:
    """name -> one entry (every rank's result) per round. Each job's processes start once and take
    their rounds in turns with the other jobs of their group (the module docstring says how);
    the job times through `timed_steps` or `Turns`. `keep_going`: a failed job is recorded as
    `[{"error": ...}]` in each round instead of stopping the rest. `timed_extras`: what a job
    measures after its last round includes a time, so the jobs finish in turns too; without,
    they finish together (their exits, seconds each, overlap)."""
    if rounds == 1:
        return fresh_rounds(jobs, rounds, progress, keep_going)
    out: Rounds = {}
    for group in groups(jobs):
        out.update(_take_turns(group, rounds, progress, keep_going, timed_extras))
    return {name: out[name] for name in jobs}


def groups(jobs: dict[str, Job], cap: int = GROUP_RANKS) -> list[dict[str, Job]]:
    """Consecutive jobs of the same `Job.group`, at most `cap` rank processes each."""
    out: list[dict[str, Job]] = []
    for name, job in jobs.items():
        last = list(out[-1].values()) if out else []
        if not last or last[0].group != job.group or sum(j.ranks for j in last) + job.ranks > cap:
            out.append({})
        out[-1][name] = job
    return out


class _Worker:
    """One job's processes, started once and driven through the markers in its control directory."""

    def __init__(self, name: str, job: Job, control: Path, rounds: int) -> None:
        self.name, self.job, self.control, self.rounds = name, job, control, rounds
        control.mkdir()
        argv, env = _command(job)
        env.update({TURNS_ENV: str(control), ROUNDS_ENV: str(rounds)})
        self.out, self.err = open(control / "stdout", "w+"), open(control / "stderr", "w+")
        # a session of its own, so that stopping it ends torchrun and its ranks together
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.err, text=True, env=env, start_new_session=True)

    @property
    def what(self) -> str:
        return f"benchmark job {self.name!r} ({self.job.target}, {self.job.ranks} rank(s))"

    def has(self, marker: str) -> bool:
        """Whether the job wrote `marker`; RuntimeError if its processes ended without it."""
        if (self.control / marker).exists():
            return True
        if self.proc.poll() is not None:
            self.fail(f"ended (exit code {self.proc.returncode}) before {marker}")
        return False

    def wait(self, marker: str) -> None:
        deadline = time.monotonic() + TURN_TIMEOUT_S
        while not self.has(marker):
            if time.monotonic() > deadline:
                self.fail(f"wrote no {marker} within {TURN_TIMEOUT_S} s")
            time.sleep(POLL_S)

    def go(self, turn: int) -> None:
        (self.control / f"go.{turn}").touch()

    def fail(self, why: str) -> None:
        self.stop()
        self.err.seek(0)
        raise RuntimeError(f"{self.what} {why}:\n" + _tail(self.err.read()))

    def finish(self) -> list[dict[str, Any]]:
        """Wait for it to measure its extras and end, once told to (`go(rounds)`, the turn after
        its last round); every rank's result."""
        try:
            code = self.proc.wait(TURN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.fail(f"did not end within {TURN_TIMEOUT_S} s of its last round")
        self.out.seek(0)
        self.err.seek(0)
        return _result(self.what, self.out.read(), self.err.read(), code)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _take_turns(jobs: dict[str, Job], rounds: int, progress: Callable[[str], None], keep_going: bool,
                timed_extras: bool) -> Rounds:
    """One group: start every job (at most `SETUP_AT_ONCE` setting up at a time), wait until all
    are warm, then the rounds in turns, then each finishes in turn (together without
    `timed_extras`)."""
    out: Rounds = {}
    workers: dict[str, _Worker] = {}

    def attempt(name: str, action: Callable[[_Worker], Any]) -> Any:
        try:
            return action(workers[name])
        except RuntimeError as err:
            if not keep_going:
                raise
            workers.pop(name).stop()
            out[name] = [_error(err)] * rounds

    with tempfile.TemporaryDirectory(prefix="shoestring-turns-") as tmp:
        try:
            for name, job in jobs.items():
                progress(f"set-up: {name}")
                while sum(not attempt(n, lambda w: w.has("ready")) for n in list(workers)) >= SETUP_AT_ONCE:
                    time.sleep(POLL_S)
                workers[name] = _Worker(name, job, Path(tmp) / str(len(workers)), rounds)
            for name in list(workers):
                attempt(name, lambda w: w.wait("ready"))
            for r in range(rounds):
                for name in list(workers):
                    progress(f"round {r + 1}/{rounds}: {name}")
                    attempt(name, lambda w: (w.go(r), w.wait(f"done.{r}")))
            for names in ([[n] for n in workers] if timed_extras else [list(workers)]):
                progress(f"finishing: {', '.join(names)}")
                for name in names:
                    attempt(name, lambda w: w.go(rounds))
                for name in [n for n in names if n in workers]:
                    ranks = attempt(name, lambda w: w.finish())
                    if ranks is not None:
                        out[name] = [[_round(rank, r) for rank in ranks] for r in range(rounds)]
        finally:
            for w in workers.values():
                w.stop()
                w.out.close()
                w.err.close()
    return out


def median_round(runs: list[dict[str, Any]], key: str = "step_s") -> dict[str, Any]:
    """The round with the median `key` (the upper one of an even count), with `<key>_all`: every
    round's figure, fastest first, so the spread is visible."""
    good = sorted((r for r in runs if "error" not in r), key=lambda r: r[key])
    if not good:
        return dict(runs[0])
    row = dict(good[len(good) // 2])
    row[f"{key}_all"] = [r[key] for r in good]
    return row


def spread(values: list[float]) -> float:
    """(slowest - fastest) / median of a configuration's rounds."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


# ---- inside a rank ------------------------------------------------------------------------

def warmup_steps() -> int:
    """Untimed steps before the first timed one of our strategy in this process: `WARMUP` alone,
    `RANK_WARMUP` as one rank of several."""
    from shoestring import dist

    return WARMUP if dist.world_size() == 1 else RANK_WARMUP


def steady(times: list[float]) -> list[float]:
    """The timed steps of a loop: all after the first `WARMUP` (the last one if there are no more)."""
    return times[WARMUP:] or times[-1:]


def worker_rounds() -> int:
    """How many timed rounds this process takes: 1 unless the harness runs it taking turns."""
    return int(os.environ.get(ROUNDS_ENV, "1"))


class Turns:
    """A rank's side of the rounds. A loop of `total_steps` steps (`warmup` untimed, then
    `worker_rounds()` rounds of `steps` timed ones) calls `before(i)` and `after(i, seconds)`
    around step i. Taking turns, a round's first step waits for the parent's go (the first round
    says "ready" before it) and resets the peak; its last says "done" with every rank there;
    after the last round the process waits for its turn to finish. `result()`: the figures."""

    def __init__(self, steps: int, warmup: int | None = None) -> None:
        self.steps, self.rounds = steps, worker_rounds()
        self.warmup = warmup_steps() if warmup is None else warmup
        self.control = os.environ.get(TURNS_ENV)
        self.rss = PeakRSS()
        self.times: list[float] = []
        self.per_round: list[dict[str, Any]] = []

    @property
    def total_steps(self) -> int:
        return self.warmup + self.rounds * self.steps

    def before(self, i: int) -> None:
        if i == 0:
            self.rss.reset()
        r, k = divmod(i - self.warmup, self.steps)
        if i >= self.warmup and k == 0 and self.control:
            if r == 0:
                self._say("ready")
            self._await(f"go.{r}")
            self.rss.reset()

    def after(self, i: int, seconds: float) -> None:
        if i < self.warmup:
            return
        self.times.append(seconds)
        r, k = divmod(i - self.warmup, self.steps)
        if k < self.steps - 1:
            return
        times = self.times[-self.steps:]
        self.per_round.append({"step_s": statistics.median(times), "steps_s": times, "peak_rss_bytes": self.rss.peak_bytes()})
        if self.control:
            self._say(f"done.{r}")
            if r == self.rounds - 1:
                self._await(f"go.{self.rounds}")

    def result(self) -> dict[str, Any]:
        """The figures over every timed step, and each round's in `rounds`."""
        return {"step_s": statistics.median(self.times), "steps_s": self.times,
                "peak_rss_bytes": max(f["peak_rss_bytes"] for f in self.per_round), "rounds": self.per_round}

    def _say(self, marker: str) -> None:
        """Every rank gets here, then rank 0 writes `marker`."""
        from shoestring import dist

        dist.barrier()
        if dist.rank() == 0:
            (Path(self.control) / marker).touch()

    def _await(self, marker: str) -> None:
        """Sleep until the parent writes `marker`; give up if it is gone (its control directory
        removed) or silent for `TURN_TIMEOUT_S`, so that no orphan waits for ever."""
        path, deadline, nap = Path(self.control) / marker, time.monotonic() + TURN_TIMEOUT_S, POLL_S
        while not path.exists():
            if not path.parent.is_dir() or time.monotonic() > deadline:
                raise RuntimeError(f"no {marker} from the bench harness in {path.parent}: it has gone")
            time.sleep(nap)
            nap = min(POLL_MAX_S, nap * 1.5)


def timed_steps(step: Callable[[int], Any], steps: int, warmup: int | None = None) -> dict[str, Any]:
    """`warmup` untimed steps (`warmup_steps()` unless given) then `worker_rounds()` rounds of
    `steps` timed ones, each step between barriers (the slowest rank sets the time); `step(i)` may
    return the step's loss. `Turns.result()` with `losses`: every step's, warm-up included."""
    from shoestring import dist

    turns, losses = Turns(steps, warmup), []
    for i in range(turns.total_steps):
        turns.before(i)
        dist.barrier()
        t0 = time.perf_counter()
        loss = step(i)
        dist.barrier()
        seconds = time.perf_counter() - t0
        if loss is not None:
            losses.append(float(loss))
        turns.after(i, seconds)
    return {**turns.result(), "losses": losses}


def timed_training(strategy, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[dict[str, Any], int]:
    """`timed_steps` of whole optimizer steps on one fixed batch, and the process's peak RSS
    (VmHWM, over every round; each round's in `rounds`)."""

    def step(_: int) -> torch.Tensor:
        loss = strategy.forward_backward(x, y, 1.0, True)
        strategy.step(1e-3)
        return loss

    timing = timed_steps(step, steps)
    return timing, timing["peak_rss_bytes"]


def random_batch(vocab: int, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded uniform tokens and targets: speed and memory do not depend on what is learnt."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, vocab, (batch, seq_len), generator=gen) for _ in range(2))  # type: ignore[return-value]


def bigram_batches(vocab: int, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len + 1) tokens of a seeded random bigram chain: each token has 4 equally
    likely successors, so the loss falls from ln(vocab) towards ln 4 as a model learns them (a
    learnable stream, the same for every system compared)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    n = steps * batch
    out = torch.empty(n, seq_len + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(seq_len):
        out[:, t + 1] = successors[out[:, t], torch.randint(0, 4, (n,), generator=g)]
    return out.view(steps, batch, seq_len + 1)


def build(tree: dict[str, Any], vocab: int, device: torch.device | None = None):
    """The strategy `shoestring train` would build for this config tree on this machine."""
    from shoestring.build import build_strategy, resolve_auto
    from shoestring.config import build_config
    from shoestring.plan.probe import device_facts

    device = device or torch.device("cpu")
    return build_strategy(resolve_auto(build_config(tree), device_facts(device)).cfg, vocab, device)


def compiled_blocks(strategy) -> bool:
    from shoestring.levers.compile import compiled

    return compiled(strategy.unwrapped())


def _run_rank(target: str, spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    import torch.distributed as tdist

    from shoestring import dist

    module, name = target.split(":")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads(world)))  # a job may ask for fewer
    with dist.process_group(torch.device("cpu"), PROCESS_GROUP_TIMEOUT_S, required=False):
        result = getattr(importlib.import_module(module), name)(spec)
        if not dist.active():
            return [result]
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, result)
        return gathered if tdist.get_rank() == 0 else None


if __name__ == "__main__":
    from shoestring import dist

    request = json.loads(sys.argv[1])
    results = _run_rank(request["target"], request["spec"])
    if results is not None:
        print(RESULT_MARK + json.dumps(results, default=str), flush=True)
    dist.exit_process(0)
