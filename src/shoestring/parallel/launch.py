"""`shoestring train CONFIG --nproc N [--nnodes ...]`: start the ranks through torchrun itself.

The launcher re-invokes `python -m shoestring train ...` (without the launch flags) in every
worker via `torch.distributed.run`, so `torchrun -m shoestring train ...` by hand is the same
thing. torchrun watches the workers: when one fails it stops the others and reports the failing
rank; with `--max-restarts` it restarts the whole group, and the restarted workers resume from
the newest checkpoint (`TORCHELASTIC_RESTART_COUNT` > 0 turns the run into `--resume auto`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shoestring.errors import RunError


@dataclass(frozen=True)
class LaunchOptions:
    nproc: int
    nnodes: str = "1"  # torchrun's meaning: N or MIN:MAX
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the rendezvous (multi-node)
    max_restarts: int = 0


def restart_count() -> int:
    """How often torchrun has restarted this worker group (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


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


def launch(opts: LaunchOptions, worker_argv: list[str]) -> int:
    """Run the workers to completion; 0 when every rank succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; ranks share the cores
    try:
        torchrun(torchrun_args(opts, worker_argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise RunError(f"rank {rank} failed (exit code {failure.exitcode}); the other ranks were stopped",
                       "see that rank's error above; fix it and rerun with --resume auto") from None
    return 0
