"""The collectives the yafsdp engine runs, as async work handles, and the counting it does.

On gloo (CPU) the all-gather and the reduce-scatter can be built from isend/irecv pairs
(`p2p_all_gather`, `p2p_reduce_scatter`): gloo's own all-gather goes through a full-size
temporary and its reduce-scatter is an all-reduce. Everywhere else torch's collectives run
(NCCL's are native). `Counted` is what the engine calls: the same collectives, with the bytes
they moved and the seconds the host blocked on them.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as tdist

from shoestring.parallel import dist

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # parallel.reduce_dtype


class Collectives:
    """The collectives the engine uses, as async work handles (tests pass a fake).

    `reduce_scatter(recv, full)` leaves this rank's reduced chunk in `recv[:chunk]`; `recv` has
    room for `recv_chunks(p2p, N)` chunks. `p2p` (gloo only): build the all-gather and the
    reduce-scatter from isend/irecv (`p2p_all_gather`, `p2p_reduce_scatter`); otherwise torch's
    collectives (NCCL's are native)."""

    def __init__(self, p2p: bool = False) -> None:
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.p2p = p2p and self.world_size > 1 and tdist.get_backend() == "gloo"

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> Any:
        if self.p2p:
            return p2p_all_gather(out, shard, self.rank, self.world_size)
        return tdist.all_gather_into_tensor(out, shard, async_op=True)

    def reduce_scatter(self, recv: torch.Tensor, full: torch.Tensor) -> Any:
        if self.p2p:
            return p2p_reduce_scatter(recv, full, self.rank, self.world_size)
        return tdist.reduce_scatter_tensor(recv[: full.numel() // self.world_size], full, op=tdist.ReduceOp.SUM,
                                           async_op=True)

    def all_reduce(self, t: torch.Tensor) -> None:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


class Counted:
    """`Collectives` as the engine calls them: bytes of the full (unsharded) tensors gathered and
    reduced, and seconds the host blocked in `wait()`, since the last `take`. On CUDA a wait
    only makes the compute stream wait for c10d's communication stream, so the seconds are host
    blocking only."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self.wait_s, self.gathered, self.reduced = 0.0, 0, 0

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> Any:
        self.gathered += nbytes(out)
        return self.comm.all_gather(out, shard)

    def reduce_scatter(self, recv: torch.Tensor, full: torch.Tensor) -> Any:
        self.reduced += nbytes(full)
        return self.comm.reduce_scatter(recv, full)

    def all_reduce(self, t: torch.Tensor) -> None:
        self.comm.all_reduce(t)

    def recv_size(self, padded: int) -> int:
        """Elements a reduce-scatter of `padded` receives into (`Collectives.reduce_scatter`)."""
        return recv_chunks(self.comm.p2p, self.comm.world_size) * padded // self.comm.world_size

    def wait(self, work: Any) -> None:
        t0 = time.perf_counter()
        work.wait()
        self.wait_s += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """The counts so far (what `comm_stats` reports for a step), and start again from zero."""
        out = {"comm_wait_s": self.wait_s, "all_gather_bytes": self.gathered, "reduce_scatter_bytes": self.reduced}
        self.wait_s, self.gathered, self.reduced = 0.0, 0, 0
        return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Posted:
    """The work handle of point-to-point transfers posted together; `then` runs once, after all
    of them landed (on the waiting thread)."""

    def __init__(self, works: list[Any], then: Callable[[], None] = lambda: None):
        self.works, self.then = works, then

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        if self.works:
            self.works = []
            self.then()


def recv_chunks(p2p: bool, world: int) -> int:
    """Chunks a reduce-scatter receives into: every peer's with `p2p`, else the result only."""
    return max(world - 1, 1) if p2p else 1


_GATHER_TAG, _REDUCE_TAG = 1, 2  # each kind matched in issue order (the same on every rank)


def p2p_all_gather(out: torch.Tensor, shard: torch.Tensor, rank: int, world: int) -> _Posted:
    """All-gather from one isend/irecv pair per peer, straight into `out`'s chunks. Gloo's
    `all_gather_into_tensor` gathers into a temporary of the full size and copies it out: it
    took twice as long on 2 ranks (16 MiB: 17.8 vs 9.5 ms), and the temporaries it allocates on
    gloo's threads stay resident (+96 MiB RSS in that test)."""
    chunks = out.chunk(world)
    works = []
    for k in range(1, world):
        to, came = (rank + k) % world, (rank - k) % world
        works += [tdist.isend(shard, to, tag=_GATHER_TAG), tdist.irecv(chunks[came], came, tag=_GATHER_TAG)]
    chunks[rank].copy_(shard)
    return _Posted(works)


def p2p_reduce_scatter(recv: torch.Tensor, full: torch.Tensor, rank: int, world: int) -> _Posted:
    """Reduce-scatter (sum) from one isend/irecv pair per peer: chunk j goes to rank j, and the
    N-1 chunks this rank owns arrive in `recv`; `wait()` adds them up, with this rank's own,
    into `recv[:chunk]` in `full`'s dtype. Gloo has no reduce-scatter: torch all-reduces the
    whole buffer and keeps a chunk (2(N-1)/N of the buffer sent per rank, and a full-size
    temporary); this sends (N-1)/N, a ring reduce-scatter's bytes (2 ranks, 16 MiB fp32:
    8.4 ms, against 20.9 for `reduce_scatter_tensor` and 14.3 for the all-reduce itself)."""
    chunk = full.numel() // world
    sends, got = full.split(chunk), recv[: (world - 1) * chunk].split(chunk)
    works = []
    for k in range(1, world):
        to, came = (rank + k) % world, (rank - k) % world
        works += [tdist.isend(sends[to], to, tag=_REDUCE_TAG), tdist.irecv(got[k - 1], came, tag=_REDUCE_TAG)]

    def add() -> None:
        for g in got[1:]:
            got[0].add_(g)
        got[0].add_(sends[rank])

    return _Posted(works, add)
