"""`shoestring train CONFIG --nproc N [--nnodes ...]`: start the ranks through torchrun itself.

The launcher re-invokes `python -m shoestring train ...` (without the launch flags) in every
worker via `torch.distributed.run`, so `torchrun -m shoestring train ...` by hand is the same
thing. torchrun watches the workers: when one fails it stops the others and reports the failing
rank; with `--max-restarts` it restarts the whole group, and the restarted workers resume from
the newest checkpoint (a worker started before in this job, `shoestring.dist.started_before`,
on any rank turns the run into `--resume auto`). With `--nnodes MIN:MAX` a lost node's agents
meet again in a new round on fewer nodes, which continue from the same checkpoint.
A rank that ran out of memory where it could not recover in process exits with
`RESTART_EXIT` (shoestring.train.adapt): the launcher then starts the ranks again itself, resuming
at the smaller micro-batch that rank recorded, restarts or not.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass

from shoestring import dist
from shoestring.errors import RunError, UserError

RESTART_EXIT = 75  # a rank asks for a restart from the last checkpoint (shoestring.train.adapt)


@dataclass(frozen=True)
class LaunchOptions:
    nproc: int
    nnodes: str = "1"  # torchrun's meaning: N or MIN:MAX
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the rendezvous (multi-node)
    max_restarts: int = 0


def world_sizes(opts: LaunchOptions) -> list[int]:
    """Every number of ranks the job may run on: nodes from MIN to MAX, `nproc` ranks each."""
    low, _, high = opts.nnodes.partition(":")
    return [n * opts.nproc for n in range(int(low), int(high or low) + 1)]


def check_elastic(opts: LaunchOptions, batch_size: int, micro_batch: int | str, strategy: str) -> None:
    """Refuse at start a job that a change of world size (`--nnodes MIN:MAX`: a node lost or
    back) could not continue: a global batch that does not split over some world (each rank's
    share re-derives the accumulation, keeping the batch), or a strategy whose checkpoints
    resume only on the world that saved them."""
    sizes = world_sizes(opts)
    if len(sizes) > 1 and strategy == "deepspeed":
        raise UserError(f"--nnodes {opts.nnodes}: DeepSpeed checkpoints resume only on the number of ranks that saved them, "
                        "so the job could not continue after a node is lost or added",
                        "use parallel.strategy fsdp2, yafsdp or ddp (they reshard), or a fixed --nnodes")
    step = micro_batch if isinstance(micro_batch, int) else 1
    bad = [w for w in sizes if batch_size % (w * step)]
    if bad:
        need = math.lcm(*sizes) * step
        raise UserError(f"train.batch_size {batch_size} does not split over {', '.join(map(str, bad))} ranks "
                        f"(--nnodes {opts.nnodes} x --nproc {opts.nproc}"
                        + (f", train.micro_batch {micro_batch}" if step > 1 else "") + ")",
                        f"use a train.batch_size that every world divides: a multiple of {need} "
                        f"(e.g. {', '.join(map(str, sorted({max(need, batch_size // need * need), (batch_size // need + 1) * need})))})")


def torchrun_args(opts: LaunchOptions, worker_argv: list[str]) -> list[str]:
    args = [f"--nproc-per-node={opts.nproc}", f"--nnodes={opts.nnodes}", f"--max-restarts={opts.max_restarts}"]
    if opts.rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={opts.rdzv_endpoint}", "--rdzv-id=shoestring",
                 f"--node-rank={opts.node_rank}"]
    elif opts.nnodes != "1":
        raise RunError(f"--nnodes {opts.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    else:
        args.append("--standalone")
    return args + ["-m", "shoestring", *worker_argv]


def launch(opts: LaunchOptions, worker_argv: list[str], restart_argv: list[str]) -> int:
    """Run the workers to completion, started again with `restart_argv` (resuming) whenever a
    rank asks for it; 0 when every rank succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    starts = tempfile.mkdtemp(prefix="shoestring-starts-")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # torchrun's default too; ranks share the cores
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # a new store each round (shoestring.dist._store)
           dist.STARTS_DIR: starts}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the agent (torchrun, in this process) passes its environment to the workers
    argv = worker_argv
    try:
        while True:
            try:
                torchrun(torchrun_args(opts, argv))
                return 0
            except ChildFailedError as err:
                if not any(f.exitcode == RESTART_EXIT for f in err.failures.values()):
                    rank, failure = err.get_first_failure()
                    raise RunError(f"rank {rank} failed (exit code {failure.exitcode}); the other ranks were stopped",
                                   "see that rank's error above; fix it and rerun with --resume auto") from None
            argv = restart_argv
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(starts, ignore_errors=True)
