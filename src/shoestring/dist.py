"""Process-group plumbing for runs started by torchrun (or `shoestring train --nproc`).

torchrun describes each process through environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). A process without them is a single-process run, and every helper here is
then a no-op, so the trainer and checkpoint code call them unconditionally.

Backend: NCCL for CUDA, gloo for CPU. The process group gets a finite timeout so that a rank
whose peer died raises instead of waiting for ever; torchrun additionally tears the whole group
down as soon as one worker exits with an error.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as tdist


def free_port() -> int:
    """A TCP port free on this host now, for the store of a process group started here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. A torchrun worker ends without the interpreter's teardown:
    gloo's threads outlive destroy_process_group while modules still hold the group, and freeing
    them as the interpreter finalizes can abort the process ("terminate called without an active
    exception", exit -6) after the run succeeded, which torchrun then takes for a failed rank."""
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


STARTS_DIR = "SHOESTRING_WORKER_STARTS"  # set by shoestring's launcher: a directory of this node's agent


def started_before() -> bool:
    """Whether torchrun started this worker before in this job (and note this start). After a
    failure torchrun counts the restart (TORCHELASTIC_RESTART_COUNT); after a change of
    membership (a node lost or joining, seen by an agent whose own workers were still healthy)
    it does not, so shoestring's launcher gives its agent a directory where each local rank
    leaves a mark on its first start. Call it once per process."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return True
    marks = os.environ.get(STARTS_DIR)
    if not marks:
        return False
    mark = Path(marks) / f"local_rank_{os.environ.get('LOCAL_RANK', '0')}"
    if mark.exists():
        return True
    mark.touch()
    return False


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; the world without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_main() -> bool:
    return rank() == 0


def local_device(device_type: str) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` on GPU machines, the CPU otherwise."""
    if device_type == "cuda":
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device_type)


@contextmanager
def process_group(device: torch.device, timeout_s: float, required: bool) -> Iterator[None]:
    """Join the group torchrun set up for the duration of the block, and leave it after. Without
    a launcher, a group of one is made when `required` (a distributed strategy run as one plain
    process, e.g. resuming a 2-rank run on one). An already initialised group is left alone."""
    if active() or not (launched() or required):
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    tdist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None,
                             **_store(timeout))
    try:
        yield
    finally:
        tdist.destroy_process_group()


def _store(timeout: timedelta) -> dict[str, Any]:
    """The rendezvous store for `init_process_group`. When the workers share their agent's store
    (torchrun's default), it outlives restarts, so the keys the previous attempt's ranks wrote
    (their gloo addresses) are still there: a restarted rank could read a dead peer's address
    before the new peer overwrites it and fail to connect. Each attempt then gets its own key
    prefix; that is right for one agent (`--standalone`), whose restart count every rank shares.
    Agents on several nodes count differently (a membership change is no restart to the agent
    that saw it), so shoestring's launcher turns the sharing off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE):
    each round then gets a new store, and no prefix."""
    if not launched():
        return {"store": tdist.HashStore(), "rank": 0, "world_size": 1}
    store, rank_, size = next(tdist.rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = tdist.PrefixStore(f"shoestring/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return {"store": store, "rank": rank_, "world_size": size}


def hybrid_groups(size: int) -> tuple[tdist.ProcessGroup, tdist.ProcessGroup]:
    """This rank's shard group (the `size` consecutive ranks it belongs to) and replica group (the
    ranks at the same place in every shard group). Every rank must call it: making a group is
    collective."""
    world = world_size()
    shard, _ = tdist.new_subgroups_by_enumeration([list(range(g, g + size)) for g in range(0, world, size)])
    replica, _ = tdist.new_subgroups_by_enumeration([list(range(i, world, size)) for i in range(size)])
    return shard, replica


def barrier() -> None:
    if active():
        tdist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a copy; `t` is left alone)."""
    if not active():
        return t
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out / world_size()


def maximum(value: int) -> int:
    """Largest `value` over ranks (per-rank memory figures)."""
    if not active():
        return value
    on_gpu = tdist.get_backend() == "nccl"
    t = torch.tensor([value], dtype=torch.int64, device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())
