"""The collectives the yafsdp engine runs, as async work handles, and the counting it does.

Hybrid sharding (`parallel.shard_group`) splits the ranks into groups that each hold one whole
sharded copy of the state: a unit is gathered and its gradient reduce-scattered within the
rank's group, and the reduced gradient shard is summed across the groups (one all-reduce per
step, over the ranks that hold the same shard). Without it the one group is every rank.

On gloo (CPU) all of these can be built from isend/irecv pairs (`p2p_all_gather`,
`p2p_reduce_scatter`, `p2p_all_reduce`): gloo's own all-gather goes through a full-size
temporary and its reduce-scatter is an all-reduce. Everywhere else torch's collectives run
(NCCL's are native). `Counted` is what the engine calls: the same collectives, with the bytes
they moved and the seconds the host blocked on them.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as tdist

from shoestring import dist
from shoestring.parallel.cost import shard_group_size

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # parallel.reduce_dtype
_GATHER_TAG, _REDUCE_TAG, _ACROSS_TAG = 1, 2, 3  # each kind matched in issue order (the same on every rank)


class Collectives:
    """The collectives the engine uses, as async work handles (tests pass a fake).

    `rank` and `world_size` are this rank's place in its shard group and the group's size (what
    the engine shards over); `replica` and `replicas` which group it is in and how many there
    are (1: flat sharding). `all_gather` and `reduce_scatter` run within the group;
    `reduce_scatter(recv, full)` leaves this rank's reduced chunk in `recv[:chunk]`, and `recv`
    has room for `recv_chunks(p2p, N)` chunks. `all_reduce_across` sums a shard over the groups,
    `all_reduce` a (scalar) tensor over every rank. `p2p` (gloo only): build them from
    isend/irecv; otherwise torch's collectives (NCCL's are native)."""

    def __init__(self, p2p: bool = False, shard_group: str | int | None = None) -> None:
        rank, world = dist.rank(), dist.world_size()
        size = shard_group_size(shard_group, world, dist.local_world_size())
        self.rank, self.world_size = rank % size, size
        self.replica, self.replicas = rank // size, world // size
        self.group, self.across = dist.hybrid_groups(size) if size < world else (None, None)
        # The ranks of each sub-group, for the comm meter (`Strategy.comm_groups`).
        self.spans = {} if self.group is None else {tuple(tdist.get_process_group_ranks(self.group)): "group",
                                                    tuple(tdist.get_process_group_ranks(self.across)): "across"}
        gloo_p2p = p2p and world > 1 and tdist.get_backend() == "gloo"
        self.p2p, self.p2p_across = gloo_p2p and size > 1, gloo_p2p

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> Any:
        if self.p2p:
            return p2p_all_gather(out, shard, self.rank, self.world_size, self.group)
        return tdist.all_gather_into_tensor(out, shard, group=self.group, async_op=True)

    def reduce_scatter(self, recv: torch.Tensor, full: torch.Tensor) -> Any:
        if self.p2p:
            return p2p_reduce_scatter(recv, full, self.rank, self.world_size, self.group)
        return tdist.reduce_scatter_tensor(recv[: full.numel() // self.world_size], full, op=tdist.ReduceOp.SUM,
                                           group=self.group, async_op=True)

    def all_reduce_across(self, t: torch.Tensor) -> Any:
        if self.p2p_across:
            return p2p_all_reduce(t, self.replica, self.replicas, self.across)
        return tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=self.across, async_op=True)

    def all_reduce(self, t: torch.Tensor) -> None:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)


class Counted:
    """`Collectives` as the engine calls them: bytes of the full (unsharded) tensors gathered and
    reduced within the group, of the shards all-reduced across groups, and seconds the host blocked in `wait()`, since the last `take`. On CUDA a wait
    only makes the compute stream wait for c10d's communication stream, so the seconds are host
    blocking only."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm
        self.wait_s, self.gathered, self.reduced, self.crossed = 0.0, 0, 0, 0

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> Any:
        self.gathered += nbytes(out)
        return self.comm.all_gather(out, shard)

    def reduce_scatter(self, recv: torch.Tensor, full: torch.Tensor) -> Any:
        self.reduced += nbytes(full)
        return self.comm.reduce_scatter(recv, full)

    def all_reduce_across(self, t: torch.Tensor) -> Any:
        self.crossed += nbytes(t)
        return self.comm.all_reduce_across(t)

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
        out = {"comm_wait_s": self.wait_s, "all_gather_bytes": self.gathered, "reduce_scatter_bytes": self.reduced,
               "all_reduce_bytes": self.crossed}
        self.wait_s, self.gathered, self.reduced, self.crossed = 0.0, 0, 0, 0
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
        self.works = []
        then, self.then = self.then, lambda: None
        then()


def recv_chunks(p2p: bool, world: int) -> int:
    """Chunks a reduce-scatter receives into: every peer's with `p2p`, else the result only."""
    return max(world - 1, 1) if p2p else 1


def p2p_all_gather(out: torch.Tensor, shard: torch.Tensor, rank: int, world: int,
                   group: tdist.ProcessGroup | None = None) -> _Posted:
    """All-gather from one isend/irecv pair per peer, straight into `out`'s chunks. Gloo's
    `all_gather_into_tensor` gathers into a temporary of the full size and copies it out: it
    took twice as long on 2 ranks (16 MiB: 17.8 vs 9.5 ms), and the temporaries it allocates on
    gloo's threads stay resident (+96 MiB RSS in that test). `rank` and `world` are within
    `group` (None: every rank)."""
    chunks = out.chunk(world)
    works = []
    for k in range(1, world):
        to, came = (rank + k) % world, (rank - k) % world
        works += _exchange(shard, to, chunks[came], came, group, _GATHER_TAG)
    chunks[rank].copy_(shard)
    return _Posted(works)


def p2p_reduce_scatter(recv: torch.Tensor, full: torch.Tensor, rank: int, world: int,
                       group: tdist.ProcessGroup | None = None) -> _Posted:
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
        works += _exchange(sends[to], to, got[k - 1], came, group, _REDUCE_TAG)

    def add() -> None:
        for g in got[1:]:
            got[0].add_(g)
        got[0].add_(sends[rank])

    return _Posted(works, add)


def p2p_all_reduce(t: torch.Tensor, rank: int, world: int, group: tdist.ProcessGroup | None) -> _Posted:
    """Sum `t` over `group` in place from isend/irecv pairs, a ring all-reduce's bytes (2(N-1)/N
    of `t` sent per rank, exactly so when N divides it): every rank sums one of N chunks (each
    peer sends it its copy of that chunk), then sends the sum to every peer. Both phases run at
    `wait()`: the second needs the first's sums."""
    chunks = t.tensor_split(world)
    peers = [((rank + k) % world, (rank - k) % world) for k in range(1, world)]  # (send to, receive from)
    got = [torch.empty_like(chunks[rank]) for _ in peers]

    def run() -> None:
        _Posted([w for (to, came), g in zip(peers, got) for w in _exchange(chunks[to], to, g, came, group, _ACROSS_TAG)]).wait()
        for g in got:
            chunks[rank].add_(g)  # this rank's chunk, summed over the group
        _Posted([w for to, came in peers for w in _exchange(chunks[rank], to, chunks[came], came, group, _ACROSS_TAG)]).wait()

    return _Posted([], run)


def _exchange(send: torch.Tensor, to: int, recv: torch.Tensor, came: int, group: tdist.ProcessGroup | None,
              tag: int) -> list[Any]:
    """Post one send and one receive (peers by their rank within `group`)."""
    return [tdist.isend(send, group=group, group_dst=to, tag=tag), tdist.irecv(recv, group=group, group_src=came, tag=tag)]
