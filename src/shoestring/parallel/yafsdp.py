"""A YaFSDP-style sharded data-parallel engine: flat per-block shards, two reused gather buffers
and two reused gradient buffers, communication overlapped with compute in an explicit order.

Units. Each transformer block's matrices form one flat padded unit (`flat.FlatLayout`), sharded
evenly: rank r owns a contiguous 1/N slice. The embedding is one more unit, `embed`, and the head
another, `head`, unless it is tied to the embedding. Every small parameter (norm weights) forms
the `small` unit, which is *resident*: gathered once per optimizer step (the step's first
forward), kept for the whole step, its gradients accumulated in place and reduce-scattered once,
in `step`.

LoRA. A unit is trained or frozen as a whole. With a frozen base the block and root units hold
the frozen matrices (embed and head too), and the adapters (tiny) form one more resident unit,
`adapters`; the frozen norm weights form `frozen_small`. A frozen unit has a shard in the dtype `cast_model` would hold
it in (bf16 under bf16-pure or `lora.base_dtype = "bf16"`) and nothing else: no master, gradient
buffer, reduce-scatter or optimizer state. It never changes, so it is gathered only when its
buffer held something else: the frozen resident units once per run, blocks 0 and 1 (and a tied
embedding) stay resident from one step's backward into the next step's forward.

Buffers. Two gather buffers (the size of the largest block) hold the block being computed and the
next one; block i always uses buffer i % 2, and its parameters are permanent views into it (set
once at start-up: the gather writes straight into the weights, no copy-out, no per-step
allocation). Two gradient buffers in the reduce dtype take each block's gradients (the
post-accumulate hook copies them in and drops autograd's tensor) and are reduce-scattered from.
Embed and head share a third gather buffer and a third gradient buffer (the larger's size): the
embedding's backward reads no weight, so its buffer takes the head as soon as the lookup is done,
and the head's gradient (first in backward) is reduce-scattered while the blocks' backward runs,
before the embedding's (last) lands in the same buffer. A tied embedding stays in its buffer for
the whole step; autograd sums its two gradients, which arrive once, at the end of backward.

Schedule (async, the default). Forward: the model's forward issues the embedding's gather and
block 0's, and waits for the first; the end of the lookup issues the head's. Entering block i
waits for its gather and issues block i+1's into the other buffer; the head waits for its gather
and holds its buffer until its backward is over (an identity node on the final hidden states). Backward: an identity autograd node on block i's output runs before
any of the block's backward (and before a checkpointed block's recompute, which reads the same
views): it waits for block i's gather (usually still resident from forward for the last two
blocks, or issued by block i+1) and issues block i-1's. An identity node on the block's input
runs after the block's backward and frees its buffer. When the last gradient of block i lands,
its reduce-scatter is issued and runs while block i-1's backward computes; the buffer is waited
for before block i-2 reuses it. `async_collectives = false` waits every collective where it is
issued (no prefetch, no overlap): the benchmark uses it to isolate the buffer scheme.

Invariant (checked on every use, it costs a few integer compares): a gather buffer is never
written while a block still reads it, and never read while its gather is in flight; a gradient
buffer is never overwritten before its reduce-scatter has completed. Violations raise.

Precision. One flat fp32 master shard per rank is what fused AdamW steps on (two parameters over
it: matrices with weight decay, norm weights without). fp32 and bf16 (autocast) gather the fp32
shard itself; bf16-pure gathers a bf16 copy of it, made with one copy after each step. The loss
is backpropagated times the micro-step's share (1 / accumulation steps), as on one device, and
the shard gradients (fp32, accumulated across micro-steps) are divided once, in `step`, by the
world size. fp16 is autocast like bf16, with dynamic loss scaling: the loss is backpropagated
times the scale too (so a backward overflows where the single-device one would), and `step`
unscales the reduced shard gradients and checks them for inf/nan with a `RankAgreedGradScaler`,
whose flag is summed over ranks: every rank skips the same step and halves (or, after
`growth_interval` clean steps, doubles) its scale alike. Clipping sees the unscaled gradients.
The scale is saved per rank.

On CUDA the collectives run on c10d's communication stream, which waits for the compute stream at
issue time, and `wait()` makes the compute stream wait for them: the buffer ordering above is
stream-ordered with no `record_stream`. The `comm_wait_s` counter then measures host blocking
only.

Checkpoints: every rank writes its flat master, Adam moments and frozen shard with the layouts
(`yafsdp/rank{r}.pt`); `load` cuts them again for any world size; `consolidated_weights` rebuilds
the full state dict for export (fp32 from the masters, frozen weights in their own dtype).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as tdist
from torch import nn

from shoestring.config import ParallelSection
from shoestring.levers.lora import LoRASettings, estimate
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models.llama import Llama, ModelArgs
from shoestring import dist
from shoestring.parallel.base import (OptimizerSettings, RankAgreedGradScaler, StepResult, Strategy, WithLoss, adamw,
                                      require_file, scaled_step)
from shoestring.parallel.flat import FlatLayout
from shoestring import checkpoint as ckpt

CKPT_DIR = "yafsdp"
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


class _Gate(torch.autograd.Function):
    """Identity whose backward calls `callback`: marks where a block's backward starts or ends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, callback: Callable[[], None]) -> torch.Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback()
        return grad, None


def _units(model: Llama, world: int) -> tuple[list[FlatLayout], list[FlatLayout], list[FlatLayout]]:
    """(blocks, outer, resident) layouts, each parameter once (tied weights keep all their names).

    Trained and frozen parameters never share a unit. The large units (one per block, `embed`
    and `head`, the latter absent when tied to the embedding) hold the bulk's matrices: the
    frozen base when there is one (LoRA), else every matrix. The rest is resident, one unit per
    kind: `adapters` (trained matrices beside a frozen base), `small` (trained vectors),
    `frozen_small` (frozen vectors); empty ones are left out. In this order the trained matrices
    come first: one decayed range of the master."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    bulk = not any(not p.requires_grad and p.dim() >= 2 for p in params.values())  # do the large units train?

    def large(p: nn.Parameter) -> bool:
        return p.dim() >= 2 and p.requires_grad == bulk

    def layout(unit: str, trainable: bool, keep: Callable[[str, nn.Parameter], bool]) -> FlatLayout:
        ids = [i for i, p in params.items() if p.requires_grad == trainable and keep(names[i][0], p)]
        return FlatLayout(unit, tuple(tuple(names[i]) for i in ids), tuple(tuple(params[i].shape) for i in ids), world,
                          trainable)

    blocks = [layout(f"layers.{b}", bulk, lambda n, p, b=b: large(p) and n.startswith(f"layers.{b}."))
              for b in range(len(model.layers))]
    outer = [layout("embed", bulk, lambda n, p: large(p) and n.startswith("embed_tokens.")),
             layout("head", bulk, lambda n, p: large(p) and n.startswith("lm_head."))]
    resident = [layout("adapters", True, lambda n, p: p.dim() >= 2 and not large(p)),
                layout("small", True, lambda n, p: p.dim() < 2),
                layout("frozen_small", False, lambda n, p: p.dim() < 2)]
    return blocks, [u for u in outer if u.numel], [u for u in resident if u.numel]


def _held_dtype(policy: PrecisionPolicy, dtype: torch.dtype) -> torch.dtype:
    """The dtype a frozen weight stored in `dtype` computes in (as `cast_model` would hold it)."""
    return dtype if policy.param_dtype == torch.float32 else policy.param_dtype


def _storage_offsets(units: list[FlatLayout]) -> list[int]:
    """Where each unit's shard starts in its flat storage: the master for trained units, the
    frozen shard for the others."""
    at, out = {True: 0, False: 0}, []
    for u in units:
        out.append(at[u.trainable])
        at[u.trainable] += u.shard
    return out


class YaFSDP(Strategy):
    def __init__(self, model: Llama, policy: PrecisionPolicy, settings: OptimizerSettings, device: torch.device,
                 options: ParallelSection, comm: Collectives | None = None):
        self.device, self.policy, self.settings, self.model = device, policy, settings, model
        self.comm = comm or Collectives(p2p=options.gloo_collectives == "p2p")
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.overlap = options.async_collectives
        self.reduce_dtype = REDUCE_DTYPES[options.reduce_dtype]
        self.module = WithLoss(model)
        by_name = dict(model.named_parameters())
        self.blocks, outer, resident = _units(model, self.world_size)
        self.units = [*self.blocks, *outer, *resident]  # block i is unit i, then embed and head
        self.embed = len(self.blocks)
        self.head = self.embed + len(outer) - 1  # the embedding's unit when tied
        self.streamed = range(self.head + 1)  # units that go through the gather buffers
        self.at = _storage_offsets(self.units)
        trained = [u for u in self.units if u.trainable]
        total = sum(u.shard for u in trained)
        n_decay = sum(u.shard for u in trained if all(len(s) >= 2 for s in u.shapes))
        frozen_dtypes = {by_name[n[0]].dtype for u in self.units if not u.trainable for n in u.names}
        if len(frozen_dtypes) > 1:
            raise ValueError(f"yafsdp: frozen parameters of several dtypes {sorted(map(str, frozen_dtypes))}")
        frozen_dtype = _held_dtype(policy, frozen_dtypes.pop() if frozen_dtypes else torch.float32)

        # The fp32 master shard of the trained units, its gradient, Adam's moments: one flat tensor
        # each; the frozen units' shards in one more.
        self.master = torch.zeros(total, dtype=torch.float32, device=device)
        self.frozen = torch.zeros(sum(u.shard for u in self.units) - total, dtype=frozen_dtype, device=device)
        for k, unit in enumerate(self.units):
            full = unit.flatten([by_name[n[0]] for n in unit.names], self.shard(k).dtype)
            self.shard(k).copy_(full[self.rank * unit.shard : (self.rank + 1) * unit.shard])
        self.grad = torch.zeros_like(self.master)
        self.moments = torch.zeros(2, total, dtype=torch.float32, device=device)
        ranges = [(0, n_decay), (n_decay, total)]
        decay, no_decay = ([nn.Parameter(self.master[lo:hi])] if hi > lo else [] for lo, hi in ranges)
        self.optimizer = adamw(decay, no_decay, settings, device)
        self.scaler = RankAgreedGradScaler(device.type, policy, self.comm.all_reduce)
        for group, (lo, hi) in zip(self.optimizer.param_groups, ranges):
            for p in group["params"]:
                p.grad = self.grad[lo:hi]
                self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                           "exp_avg": self.moments[0, lo:hi], "exp_avg_sq": self.moments[1, lo:hi]}
        # What is gathered: the master itself, or its low-precision copy (one copy per step).
        lowp = policy.param_dtype != torch.float32
        self.send = self.master.to(policy.param_dtype) if lowp else self.master

        # Resident units, and three gather + three gradient buffers allocated once: two for the
        # blocks, one for embed and head (a gradient buffer is empty when its units are frozen).
        pdt, rdt = policy.param_dtype, self.reduce_dtype

        def dtype(u: FlatLayout) -> torch.dtype:
            return pdt if u.trainable else frozen_dtype

        self.resident = {k: torch.empty(u.padded, dtype=dtype(u), device=device)
                         for k, u in enumerate(resident, start=self.head + 1)}
        self.resident_grad = {k: torch.zeros(buf.numel(), dtype=rdt, device=device)
                              for k, buf in self.resident.items() if self.units[k].trainable}
        self.gather_buf, self.grad_buf, self.rs_out = [], [], []
        for group in (self.blocks, self.blocks, outer):
            largest = max((u.padded for u in group), default=0)
            trained = max((u.padded for u in group if u.trainable), default=0)
            self.gather_buf.append(torch.zeros(largest, dtype=dtype(group[0]) if group else pdt, device=device))
            self.grad_buf.append(torch.zeros(trained, dtype=rdt, device=device))
            self.rs_out.append(torch.zeros(self._recv_size(trained), dtype=rdt, device=device))

        # Parameters become views into their buffers; trained ones' gradients leave through hooks.
        for k, buf in self.resident.items():
            self._bind(self.units[k], buf, self.resident_grad.get(k), by_name, self._resident_grad)
        for k in self.streamed:
            s = self._slot(k)
            self._bind(self.units[k], self.gather_buf[s], self.grad_buf[s], by_name, functools.partial(self._unit_grad, k))
        for i, block in enumerate(model.layers):
            block.register_forward_pre_hook(functools.partial(self._enter, i))
            block.register_forward_hook(functools.partial(self._leave, i))
        model.register_forward_pre_hook(self._start_forward)
        model.embed_tokens.register_forward_hook(self._embedded)
        model.register_forward_hook(self._to_head)

        # Schedule state (see the module docstring's invariant).
        self.slot_unit: list[int | None] = [None] * 3  # unit whose weights a gather buffer holds
        self.slot_work: list[Any] = [None] * 3  # its gather, while in flight
        self.slot_reader: list[int | None] = [None] * 3  # unit computing with it now
        self.rs_pending: list[tuple[int, Any] | None] = [None] * 3  # (unit, reduce-scatter) per grad buffer
        self.grads_seen = [0] * len(self.streamed)
        self.input_gated = [False] * len(self.blocks)  # a gradient reaches the block's input
        self.gathered: set[int] = set()  # resident units whose gathered copy is current
        # Communication of the last completed optimizer step, for the trainer or a benchmark to
        # log: seconds blocked in wait(), bytes of full tensors gathered and reduced (an eval
        # forward since the previous step is counted in the next step).
        self.comm_wait_s, self.gathered_bytes, self.reduced_bytes = 0.0, 0, 0
        self.comm_stats: dict[str, float] = {}

    def _range(self, k: int) -> slice:
        """Unit k's shard in its flat storage (master or frozen)."""
        return slice(self.at[k], self.at[k] + self.units[k].shard)

    def shard(self, k: int) -> torch.Tensor:
        """This rank's shard of unit k as stored: in the fp32 master, or the frozen shard."""
        return (self.master if self.units[k].trainable else self.frozen)[self._range(k)]

    # ---- layout binding ---------------------------------------------------------------------
    def _bind(self, unit: FlatLayout, buf: torch.Tensor, grad_buf: torch.Tensor | None, by_name: dict,
              on_grad: Callable) -> None:
        for names, view in zip(unit.names, unit.views(buf)):
            by_name[names[0]].data = view
        if unit.trainable:
            for names, gview in zip(unit.names, unit.views(grad_buf)):
                by_name[names[0]].register_post_accumulate_grad_hook(functools.partial(on_grad, gview))

    # ---- collectives --------------------------------------------------------------------------
    def _wait(self, work: Any) -> None:
        t0 = time.perf_counter()
        work.wait()
        self.comm_wait_s += time.perf_counter() - t0

    def _shard_of(self, k: int) -> torch.Tensor:
        """This rank's slice of unit `k` (in `self.units` order) in the gathered dtype."""
        return (self.send if self.units[k].trainable else self.frozen)[self._range(k)]

    def _all_gather(self, out: torch.Tensor, k: int) -> Any:
        self.gathered_bytes += out.numel() * out.element_size()
        return self.comm.all_gather(out, self._shard_of(k))

    def _recv_size(self, padded: int) -> int:
        """Elements a reduce-scatter of `padded` receives into (`Collectives.reduce_scatter`)."""
        return recv_chunks(self.comm.p2p, self.world_size) * padded // self.world_size

    def _reduce_scatter(self, recv: torch.Tensor, full: torch.Tensor) -> Any:
        self.reduced_bytes += full.numel() * full.element_size()
        return self.comm.reduce_scatter(recv, full)

    def _accumulate(self, k: int, shard: torch.Tensor) -> None:
        self.grad[self._range(k)].add_(shard)

    # ---- resident units, embed and head -------------------------------------------------------
    def _start_forward(self, *_) -> None:
        """Gather the embedding (and block 0, which lands while the embedding runs) and whatever
        resident unit is stale."""
        if torch.is_grad_enabled():
            for k in range(self.embed, self.head + 1):
                self.grads_seen[k] = 0
        self._gather(self.embed)
        if self.overlap and self.blocks:
            self._gather(0)
        stale = [k for k in self.resident if k not in self.gathered]
        for w in [self._all_gather(self.resident[k], k) for k in stale]:
            self._wait(w)
        self.gathered.update(stale)
        self._acquire(self.embed)

    def _embedded(self, *_) -> None:
        """The embedding's backward needs no weight: its buffer can take the head now."""
        self._release(self.embed)
        if self.overlap:
            self._gather(self.head)

    def _to_head(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The head reads its buffer from the loss's forward to the end of its backward."""
        self._acquire(self.head)
        if not torch.is_grad_enabled():  # the loss follows at once and nothing is gathered meanwhile
            self._release(self.head)
            return out
        return _Gate.apply(out, functools.partial(self._release, self.head))

    def _resident_grad(self, dest: torch.Tensor, p: nn.Parameter) -> None:
        dest.add_(p.grad)
        p.grad = None

    # ---- gather buffers -----------------------------------------------------------------------
    def _slot(self, k: int) -> int:
        """The buffers of streamed unit k: block i's are i % 2, embed's and head's the third."""
        return k % 2 if k < self.embed else 2

    def _gather(self, i: int) -> None:
        """Start unit i's gather into its buffer (nothing when the buffer already holds it)."""
        s = self._slot(i)
        if self.slot_unit[s] == i:
            return
        if self.slot_reader[s] is not None:
            raise RuntimeError(f"yafsdp: gather of unit {i} would overwrite buffer {s} while unit "
                               f"{self.slot_reader[s]} still reads it")
        if self.slot_work[s] is not None:
            raise RuntimeError(f"yafsdp: buffer {s} still receives unit {self.slot_unit[s]}")
        work = self._all_gather(self.gather_buf[s][: self.units[i].padded], i)
        self.slot_unit[s], self.slot_work[s] = i, work
        if not self.overlap:
            self._landed(s)

    def _landed(self, s: int) -> None:
        if self.slot_work[s] is not None:
            self._wait(self.slot_work[s])
            self.slot_work[s] = None

    def _acquire(self, i: int) -> None:
        """Unit i is about to compute (forward, or backward with a block's recompute)."""
        self._gather(i)
        s = self._slot(i)
        self._landed(s)
        self.slot_reader[s] = i

    def _release(self, i: int) -> None:
        s = self._slot(i)
        if self.slot_reader[s] != i:
            raise RuntimeError(f"yafsdp: unit {i} releases buffer {s}, read by {self.slot_reader[s]}")
        self.slot_reader[s] = None

    def _enter(self, i: int, module: nn.Module, args: tuple) -> tuple:
        self._acquire(i)
        if self.overlap and i + 1 < len(self.blocks):
            self._gather(i + 1)
        if not torch.is_grad_enabled():
            return args
        # Without a gradient into the input (nothing before the block trains: LoRA's frozen
        # embedding) no gate can mark the end of the block's backward; `forward_backward`
        # releases the block when backward returns.
        self.input_gated[i] = args[0].requires_grad
        if not self.input_gated[i]:
            return args
        return (_Gate.apply(args[0], functools.partial(self._release, i)), *args[1:])

    def _leave(self, i: int, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        self._release(i)
        if not torch.is_grad_enabled():
            return out
        return _Gate.apply(out, functools.partial(self._backward_starts, i))

    def _backward_starts(self, i: int) -> None:
        self._acquire(i)
        if self.blocks[i].trainable:
            self._claim_grad(i)  # the gradient buffer block i + 2 used is free again
            self.grads_seen[i] = 0
        if self.overlap and i > 0 and self.input_gated[i]:  # block i - 1 has a backward
            self._gather(i - 1)

    # ---- gradients ----------------------------------------------------------------------------
    def _claim_grad(self, k: int) -> None:
        """Unit k's gradients are about to land in its gradient buffer: the reduce-scatter from
        it must be over, and the padding is zeroed."""
        s, unit = self._slot(k), self.units[k]
        self._reduced(s)
        self.grad_buf[s][unit.numel : unit.padded].zero_()

    def _unit_grad(self, k: int, dest: torch.Tensor, p: nn.Parameter) -> None:
        if k >= self.embed and self.grads_seen[k] == 0:  # embed and head share a gradient buffer
            self._claim_grad(k)
        dest.copy_(p.grad)
        p.grad = None
        self.grads_seen[k] += 1
        if self.grads_seen[k] == len(self.units[k].names):
            s = self._slot(k)
            self.rs_pending[s] = (k, self._reduce_scatter(self.rs_out[s], self.grad_buf[s][: self.units[k].padded]))
            if not self.overlap:
                self._reduced(s)

    def _reduced(self, s: int) -> None:
        """Finish the reduce-scatter from gradient buffer s, add it to the shard gradient."""
        if self.rs_pending[s] is None:
            return
        k, work = self.rs_pending[s]
        self._wait(work)
        self._accumulate(k, self.rs_out[s][: self.units[k].shard])
        self.rs_pending[s] = None

    # ---- the Strategy interface ---------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, last_micro_step: bool) -> torch.Tensor:
        loss = self._loss(x, y)
        self.scaler.scale(loss * loss_scale).backward()
        for s in (0, 1, 2):
            self._reduced(s)
            i = self.slot_reader[s]
            if i is not None:  # backward is over: only a unit no gradient passed may still hold its buffer
                if i < self.embed and self.input_gated[i]:
                    raise RuntimeError(f"yafsdp: block {i} still holds buffer {s} after backward")
                self._release(i)
        missing = [k for k in self.streamed if self.units[k].trainable and self.grads_seen[k] != len(self.units[k].names)]
        if missing:
            raise RuntimeError(f"yafsdp: units {missing} did not receive a gradient for every parameter")
        return loss.detach()

    def _reduce_resident(self) -> None:
        for k, full in self.resident_grad.items():
            recv = torch.empty(self._recv_size(full.numel()), dtype=full.dtype, device=full.device)
            self._wait(self._reduce_scatter(recv, full))
            self._accumulate(k, recv[: self.units[k].shard])
            full.zero_()

    def step(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._reduce_resident()
        self.grad.div_(self.world_size)
        grad_norm, skipped = scaled_step(self.optimizer, self.scaler, self._clip)
        if not skipped:
            self._refresh()
        self.grad.zero_()
        self.comm_stats = {"comm_wait_s": self.comm_wait_s, "all_gather_bytes": self.gathered_bytes,
                           "reduce_scatter_bytes": self.reduced_bytes}
        self.comm_wait_s, self.gathered_bytes, self.reduced_bytes = 0.0, 0, 0
        return StepResult(grad_norm=grad_norm.detach(), skipped=skipped)

    def _clip(self) -> torch.Tensor:
        """Clip the shard gradients by their global norm (over ranks); the pre-clip norm."""
        sq = self.grad.square().sum()
        self.comm.all_reduce(sq)
        grad_norm = sq.sqrt()
        if self.settings.grad_clip > 0:
            self.grad.mul_(torch.clamp(self.settings.grad_clip / (grad_norm + 1e-6), max=1.0))
        return grad_norm

    def _refresh(self, frozen_too: bool = False) -> None:
        """New masters (after a load, new frozen shards too): every gathered copy of them is stale."""
        if self.send is not self.master:
            self.send.copy_(self.master)

        def stale(k: int | None) -> bool:
            return k is not None and (frozen_too or self.units[k].trainable)

        self.slot_unit = [None if stale(i) else i for i in self.slot_unit]
        self.gathered = {k for k in self.gathered if not stale(k)}

    # ---- checkpoints --------------------------------------------------------------------------
    def _layouts(self) -> list[tuple]:
        return [(u.unit, u.names, u.shapes, u.trainable) for u in self.units]

    def save(self, directory: Path) -> None:
        state = {"world_size": self.world_size, "layouts": self._layouts(), "master": self.master,
                 "moments": self.moments, "frozen": self.frozen, "scaler": self.scaler.state_dict(),
                 "step": next(iter(self.optimizer.state.values()))["step"]}
        (directory / CKPT_DIR).mkdir(exist_ok=True)
        ckpt.write_file(directory / CKPT_DIR / f"rank{self.rank}.pt", ckpt.torch_bytes(state))

    @torch.no_grad()
    def load(self, directory: Path) -> None:
        for saved in _rank_files(require_file(directory, CKPT_DIR)):
            if [(u, tuple(map(tuple, n)), tuple(map(tuple, s)), t) for u, n, s, t in saved["layouts"]] != self._layouts():
                raise RuntimeError(f"{directory}: the checkpoint's parameters differ from this model's")
            for k, (old, new) in enumerate(zip(_relayout(saved), self.units)):
                a, b = old.shard_range(saved["rank"])
                c, d = new.shard_range(self.rank)
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    src = slice(saved["offsets"][k] + lo - a, saved["offsets"][k] + hi - a)
                    dst = slice(self.at[k] + lo - c, self.at[k] + hi - c)
                    if new.trainable:
                        self.master[dst] = saved["master"][src]
                        self.moments[:, dst] = saved["moments"][:, src]
                    else:
                        self.frozen[dst] = saved["frozen"][src]
            for state in self.optimizer.state.values():
                state["step"].fill_(saved["step"])
            if saved.get("scaler"):  # the same on every rank
                self.scaler.load_state_dict(saved["scaler"])
        self._refresh(frozen_too=True)

    @staticmethod
    def consolidated_weights(directory: Path) -> dict[str, torch.Tensor]:
        full: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for saved in _rank_files(require_file(directory, CKPT_DIR)):
            for k, unit in enumerate(_relayout(saved)):
                a, b = unit.shard_range(saved["rank"])
                store = saved["master" if unit.trainable else "frozen"]
                if k not in full:
                    full[k] = torch.zeros(unit.padded, dtype=store.dtype)
                full[k][a:b] = store[saved["offsets"][k] :][: b - a]
        for k, unit in enumerate(_relayout(saved)):
            for names, view in zip(unit.names, unit.views(full[k])):
                out.update({n: view.clone() for n in names})
        return out

    # ---- cost ---------------------------------------------------------------------------------
    @staticmethod
    def state_bytes(n_params: int, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                    frozen_bytes: int = 0) -> dict[str, int]:
        """Flat shards (padding ignored) of the `n_params` trained parameters: fp32 master (it is
        the parameter under fp32/bf16; under bf16-pure the gathered bf16 copy is the parameter and
        the master is counted apart), fp32 shard gradient, fp32 Adam moments; and 1/N of a frozen
        base (LoRA) of `frozen_bytes` on one replica. The buffers are `buffer_bytes`."""
        shard = n_params // world_size
        lowp = policy.uses_master_weights
        return {"params": (2 if lowp else 4) * shard + frozen_bytes // world_size, "grads": 4 * shard,
                "master": 4 * shard if lowp else 0, "optimizer": 8 * shard}

    @staticmethod
    def buffer_bytes(args: ModelArgs, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                     base: FrozenBase | None = None, p2p: bool = False) -> int:
        """The preallocated buffers: two gather buffers of the largest block and one of the larger
        of embed and head, and when those train a gradient buffer for each with what its
        reduce-scatter receives into (`p2p`: on gloo, `uses_p2p`); the resident units, with a
        gradient buffer for the trained ones."""
        block, outer, trains, resident = _unit_sizes(args, base)
        p, r, f = _itemsizes(policy, options, base)

        def streamed(n: int) -> int:
            n = _padded(n, world_size)
            return n * (p if trains else f) + ((n + recv_chunks(p2p, world_size) * n // world_size) * r if trains else 0)

        out = 2 * streamed(block) + streamed(max(outer))
        return out + sum(_padded(n, world_size) * (p + r if t else f) for n, t in resident)

    @staticmethod
    def uses_p2p(options: ParallelSection, device_type: str) -> bool:
        """Whether the engine's collectives are point-to-point ones (gloo: CPU)."""
        return options.gloo_collectives == "p2p" and device_type == "cpu"

    @staticmethod
    def communication_bytes(args: ModelArgs, world_size: int, policy: PrecisionPolicy, options: ParallelSection,
                            grad_accum: int, base: FrozenBase | None = None) -> dict[str, int]:
        """Bytes of gathered and reduced (full, unsharded) tensors per optimizer step, as the
        engine counts them in `comm_stats`. Forward gathers every block, backward re-gathers all
        but the last two (still resident from forward), and a later micro-step's forward finds
        blocks 0 and 1 still resident from the backward before. Embed and head take turns in
        their buffer, both gathered every micro-step; tied, the one unit stays there until the
        step changes it. Every block, embed and head is reduce-scattered each micro-step, the
        resident units once per step. Frozen units (LoRA) are never reduced and, as they never
        change, blocks 0 and 1 (and a tied embedding) stay resident into the next step too: this
        is the steady state, after a first step that also gathers them and the frozen resident
        units. A ring all-gather or reduce-scatter sends (N-1)/N of these bytes per rank, and so
        do the point-to-point ones on gloo (gloo's own reduce-scatter is an all-reduce: twice)."""
        block, outer, trains, resident = _unit_sizes(args, base)
        blk, out = _padded(block, world_size), sum(_padded(k, world_size) for k in outer)
        p, r, f = _itemsizes(policy, options, base)
        n = args.n_layers
        regathered = n - min(n, 2)
        gathers = (grad_accum * 2 * regathered + (min(n, 2) if trains else 0)) * blk
        gathers += grad_accum * out if len(outer) > 1 else (out if trains else 0)
        trained = sum(_padded(k, world_size) for k, t in resident if t)
        return {"all_gather_bytes": gathers * (p if trains else f) + trained * p,
                "reduce_scatter_bytes": (grad_accum * (n * blk + out) if trains else 0) * r + trained * r}

    def memory(self) -> dict[str, int]:
        buffers = [*self.gather_buf, *self.grad_buf, *self.rs_out, *self.resident.values(), *self.resident_grad.values()]
        steps = sum(_nbytes(s["step"]) for s in self.optimizer.state.values())
        return {"params": _nbytes(self.send) + _nbytes(self.frozen), "grads": _nbytes(self.grad),
                "master": _nbytes(self.master) if self.send is not self.master else 0,
                "optimizer": _nbytes(self.moments) + steps, "buffers": sum(_nbytes(b) for b in buffers)}

    def unwrapped(self) -> Llama:
        return self.model


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _padded(n: int, world_size: int) -> int:
    return -(-n // world_size) * world_size


class FrozenBase(NamedTuple):
    """A frozen base (LoRA) as the static estimates need it: the trained (adapter) parameters
    beside it and the bytes per element the base is stored in."""

    adapters: int
    itemsize: int

    @staticmethod
    def of(args: ModelArgs, lora: LoRASettings) -> "FrozenBase":
        return FrozenBase(estimate(args, lora).trainable_params, lora.base_dtype.itemsize)

    @staticmethod
    def counted(trained: int, frozen: int, itemsize: int) -> "FrozenBase | None":
        """From parameter counts (the planner's): None when nothing is frozen."""
        return FrozenBase(trained, itemsize) if frozen else None


def _unit_sizes(args: ModelArgs, base: FrozenBase | None) -> tuple[int, list[int], bool, list[tuple[int, bool]]]:
    """Elements of one block's matrices, of embed (and head unless tied), whether those train,
    and (elements, trains) of each resident unit (the order of `_units`)."""
    d, block = args.dim, args.block_matrices()
    outer = [args.vocab_size * d] * (1 if args.tie_embeddings else 2)
    small = args.n_layers * args.block_vectors() + d  # norms and biases
    if base is None:
        return block, outer, True, [(small, True)]
    return block, outer, False, [(base.adapters, True), (small, False)]


def _itemsizes(policy: PrecisionPolicy, options: ParallelSection, base: FrozenBase | None) -> tuple[int, int, int]:
    """Element sizes of trained gathered weights, of reduced gradients, of frozen weights."""
    frozen = (base.itemsize if base else 4) if policy.param_dtype == torch.float32 else policy.param_dtype.itemsize
    return policy.param_dtype.itemsize, REDUCE_DTYPES[options.reduce_dtype].itemsize, frozen


def _rank_files(directory: Path) -> list[dict]:
    """Every rank's saved state (memory-mapped), with its rank and unit offsets."""
    out = []
    for path in sorted(directory.glob("rank*.pt")):
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        saved["rank"] = int(path.stem.removeprefix("rank"))
        units = _relayout(saved)
        saved["offsets"] = _storage_offsets(units)
        out.append(saved)
    return out


def _relayout(saved: dict) -> list[FlatLayout]:
    return [FlatLayout(u, tuple(map(tuple, n)), tuple(map(tuple, s)), saved["world_size"], t)
            for u, n, s, t in saved["layouts"]]
