"""Runs that adapt instead of dying: the micro-batch that fits, found by running out of memory.

`train.micro_batch = "auto"` starts from the largest micro-batch the planner predicts fits in the
rank's memory budget. When a step still runs out of memory, the micro-batch halves and the
accumulation doubles: the step's global batch, its samples and their order are unchanged, so
the optimisation is the same (to summation-order rounding). Every change is an event file in
the run directory's `adapt/`, which every later start reads: a resumed run keeps the smaller
micro-batch, and the summary counts the steps redone, the restarts and the time they cost.

What a run guarantees when one rank runs out of memory:
* Alone (one rank) with a strategy whose step nothing else holds (`Strategy.discard`): the
  partial step is discarded in process (gradients dropped; the loss scaler and optimizer move
  only after the last micro-step; sampler position and RNG put back) and redone at once.
* With peers, or a sharded engine: the peers may already be blocked inside a collective of the
  step (FSDP2 gathers every block's weights in forward and backward, reduce-scatters in
  backward; DDP all-reduces in the last backward) that the failing rank will never issue, and
  no collective the failing rank could join instead would reach them: an all-reduce of an "I
  failed" flag would pair with their pending all-gather. So the failing rank records the
  smaller micro-batch and exits with status `RESTART_EXIT`; torchrun stops the peers at once
  (no rank waits for a timeout), and the launcher (or torchrun's --max-restarts) restarts the
  ranks, which resume from the last checkpoint at the smaller micro-batch. The steps since that
  checkpoint are redone, and counted. A peer never writes a partial checkpoint: a save needs
  every rank, and checkpoints are sealed atomically.
* At micro-batch 1 (or a fixed `train.micro_batch`, or in the optimizer step, which the
  micro-batch does not change) the run stops, exit 1, with the planner's breakdown of what
  needs the memory, what to change, and the last good checkpoint, untouched.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shoestring.config import parse_bytes
from shoestring.errors import RunError
from shoestring.parallel import launch
from shoestring.train.metrics import intact_records

RESTART_EXIT = launch.RESTART_EXIT  # EX_TEMPFAIL: "run me again": the ranks restart from the last checkpoint
EVENTS_DIR = "adapt"
MARGIN = 0.10  # of the free memory, left for what no estimate sees (other processes, allocator slack)
_CPU_OOM = re.compile(r"can't allocate memory|DefaultCPUAllocator|std::bad_alloc", re.IGNORECASE)


def is_oom(err: BaseException) -> bool:
    """A device (CUDA) or host (CPU allocator, Python) allocation failed."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and bool(_CPU_OOM.search(str(err))))


def _meminfo_available() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


def _own_bytes(field: str) -> int:
    """This process's VmRSS / VmData (what RLIMIT_DATA counts)."""
    match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def memory_budget(setting: str | None, device: torch.device) -> tuple[int, str]:
    """Bytes this rank may use for the whole step (what the planner's estimate totals), and where
    the figure comes from. Default: what is free now plus what this process holds already,
    less `MARGIN`; a host's free memory is shared by the node's ranks, and an RLIMIT_DATA cap
    bounds the process whatever is free."""
    if setting:
        return parse_bytes(setting), "train.memory_budget"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int((free + torch.cuda.memory_reserved(device)) * (1 - MARGIN)), f"free {device} memory less {MARGIN:.0%}"
    import resource

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget = _meminfo_available() // local + _own_bytes("VmRSS")
    source = "available host memory" + (f" / {local} ranks" if local > 1 else "")
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY and soft < budget:
        budget, source = soft, "the RLIMIT_DATA cap"
    return int(budget * (1 - MARGIN)), f"{source} less {MARGIN:.0%}"


def smaller(per_rank: int, micro: int) -> int | None:
    """The next micro-batch down: the largest divisor of `per_rank` at most half of `micro`."""
    return next((m for m in range(micro // 2, 0, -1) if per_rank % m == 0), None)


@dataclass(frozen=True)
class Event:
    """One adaptation: `kind` "oom" (the micro-batch shrank) or "restart" (the ranks started again)."""
    kind: str
    step: int
    rank: int = 0
    micro_from: int = 0
    micro_to: int = 0
    in_process: bool = True  # oom: redone here; else by a restart from the last checkpoint
    redone: int = 0  # steps whose work was thrown away and done again
    lost_s: float = 0.0  # wall time of that work (a restart: its set-up before the first step)
    devices: int = 1  # ranks that lost it
    reason: str = ""


def record(run_dir: Path, event: Event) -> None:
    """Write `event` (by the rank it happened on): one file each, so ranks never race."""
    directory = run_dir / EVENTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.time_ns()}-{event.kind}-step{event.step}-rank{event.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(event)))
    os.replace(tmp, path)


def events(run_dir: Path) -> list[Event]:
    """The run's events, oldest first."""
    directory = run_dir / EVENTS_DIR
    files = sorted(directory.glob("*.json"), key=lambda p: int(p.name.split("-")[0])) if directory.is_dir() else []
    return [Event(**json.loads(p.read_text())) for p in files]


def settled(run_events: list[Event]) -> int | None:
    """The smallest micro-batch an out-of-memory error has left the run with (None: none yet)."""
    sizes = [e.micro_to for e in run_events if e.kind == "oom"]
    return min(sizes) if sizes else None


def restart_pending(run_events: list[Event]) -> bool:
    """An out-of-memory error asked for a restart that no start has recorded yet."""
    asked = sum(1 for e in run_events if e.kind == "oom" and not e.in_process)
    done = sum(1 for e in run_events if e.kind == "restart" and e.reason == "out of memory")
    return asked > done


def logged_since(metrics: Path, step: int, tokens_per_step: int) -> tuple[int, float]:
    """Steps `metrics.jsonl` logged from `step` on (done, and to be done again after resuming
    there), and their wall time from their logged speed; a line cut by a kill ends the count."""
    steps, seconds = 0, 0.0
    for record in intact_records(metrics):
        if record.get("step", -1) >= step and "loss" in record:
            steps += 1
            seconds += tokens_per_step / record["tokens_per_s"] if record.get("tokens_per_s") else 0.0
    return steps, seconds


def report(run_events: list[Event], start: int, current: int, accum: int, price: float) -> dict[str, Any]:
    """The summary's account: micro-batch then and now, steps redone, restarts, and their cost."""
    device_s = sum(e.lost_s * e.devices for e in run_events)
    return {"micro_batch_start": start, "micro_batch": current, "grad_accum": accum,
            "oom_events": sum(1 for e in run_events if e.kind == "oom"),
            "steps_redone": sum(e.redone for e in run_events),
            "restarts": sum(1 for e in run_events if e.kind == "restart"),
            "lost_s": sum(e.lost_s for e in run_events), "lost_usd": device_s / 3600 * price}


def does_not_fit(where: str, breakdown: str, last_checkpoint: Path | None) -> RunError:
    kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    return RunError(f"out of memory {where}; {breakdown}; {kept}",
                    "lower what needs the memory: checkpointing.mode = 'full' (activations), a sharded "
                    "parallel.strategy (fsdp2, yafsdp) over more ranks (state), precision bf16 or bf16-pure, a "
                    "shorter data.seq_len, LoRA; or a device with more memory")


class RestartSmaller(RunError):
    """This rank ran out of memory where its peers may be blocked: restart at the smaller micro-batch."""
    exit_code = RESTART_EXIT


@dataclass
class Split:
    """How a rank's share of the global batch is cut: `micro` sequences x `accum` micro-steps."""
    per_rank: int
    micro: int
    fixed: bool  # train.micro_batch set to a number: never changed

    @property
    def accum(self) -> int:
        return self.per_rank // self.micro
